"""detectron2 ``Backbone`` around any timm model created with ``features_only=True``, from what timm
declares: ``feature_info`` (channels, strides), ``output_fmt`` (layout), ``pretrained_cfg`` and
:data:`DYNAMIC_SIZE_MODULES` (input sizes). Design and the families it passes:
docs/detectron2.md#the-backbone-adapter-detectron2_extmodelingtimm_backbonepy.
"""
import difflib
import itertools
import inspect
import math
from typing import Any, Dict, List, Mapping, Optional, Sequence

import timm
import torch
from torch import nn

from timm.layers import convert_sync_batchnorm, freeze_batch_norm_2d
from timm.models import group_parameters, is_model_in_modules
from timm.utils import freeze as freeze_modules

from detectron2.config import get_cfg
from detectron2.layers import ShapeSpec
from detectron2.modeling.backbone import BACKBONE_REGISTRY, Backbone

from maformer_zoo.utils.names import close_names_hint

__all__ = ['TimmBackbone', 'build_timm_backbone', 'NORMS', 'DYNAMIC_SIZE_MODULES']
NORMS = ('FrozenBN', 'SyncBN', 'BN', '')
# timm modules whose models take any input size built with dynamic_img_size=True; other models whose
# pretrained_cfg says fixed_input_size take timm's img_size (its builder's convention), padded to it
DYNAMIC_SIZE_MODULES = ('vision_transformer', 'vision_transformer_hybrid', 'deit', 'eva', 'swin_transformer',
                        'swin_transformer_v2', 'swin_transformer_v2_cr')
# create_model arguments the adapter sets, with the config key that sets them (None: no key)
_OWN_KWARGS = {'features_only': None, 'in_chans': None, 'pretrained': 'PRETRAINED',
               'pretrained_cfg_overlay': 'CHECKPOINT', 'pretrained_base': 'PRETRAINED_BASE',
               'out_indices': 'OUT_INDICES', 'drop_path_rate': 'DROP_PATH_RATE'}


def _size_kwargs(name: str, img_size: int, divisor: int):
    """``(create_model kwargs, square side every batch is padded to; 0: none)``."""
    if is_model_in_modules(name, DYNAMIC_SIZE_MODULES):
        return {'dynamic_img_size': True}, 0
    cfg = timm.get_pretrained_cfg(name)
    if cfg is None or not cfg.fixed_input_size:
        return {}, 0
    side = -(-(int(img_size) or max(cfg.input_size[-2:])) // divisor) * divisor
    return {'img_size': side}, side


def _check_model_name(name: str) -> None:
    if not name:
        raise ValueError("MODEL.TIMM.NAME is empty: set it to a timm model name, e.g. 'resnet18_mscsa' "
                         "(see maformer_zoo.list_models()).")
    if name.startswith(('hf-hub:', 'local-dir:')):
        raise ValueError(f"MODEL.TIMM.NAME={name!r}: give the architecture name here and the weight source in "
                         f"MODEL.TIMM.CHECKPOINT (CHECKPOINT '{name}').")
    if not timm.is_model(name):
        raise ValueError(f"Unknown timm model {name!r}{close_names_hint(name, timm.list_models())}; list names "
                         f"with timm.list_models('*pattern*').")


def _create(name: str, kwargs: Dict[str, Any], sources: Mapping[str, str]) -> nn.Module:
    """``timm.create_model``; an argument its class's signature lacks is refused naming its config key (``sources``)."""
    try:
        return timm.create_model(name, **kwargs)
    except TypeError:
        with torch.device('meta'):  # weightless: milliseconds, and only on this error path
            params = inspect.signature(type(timm.create_model(name, pretrained=False))).parameters
        unknown = [key for key in sources if key not in params]
        if not unknown or any(p.kind is p.VAR_KEYWORD for p in params.values()):
            raise
        close = difflib.get_close_matches(unknown[0], sorted(params), n=3, cutoff=0.6)
        hint = f' (did you mean {close}?)' if close else ''
        raise ValueError(f'{sources[unknown[0]]}: {name!r} takes no argument {unknown[0]!r}{hint}. Its arguments: '
                         f'{sorted(params)}.') from None


class TimmBackbone(Backbone):
    """A timm feature extractor as a detectron2 :class:`Backbone` (see the module docstring)."""

    def __init__(self, model_name: str, pretrained: bool = False, checkpoint: str = '',
                 pretrained_base: bool = False, out_indices: Sequence[int] = (), freeze_at: int = 0,
                 norm: str = 'FrozenBN', drop_path_rate: float = 0.0, grad_ckpt: bool = False,
                 in_chans: int = 3, size_divisibility: int = 0, img_size: int = 0,
                 model_kwargs: Optional[Mapping[str, Any]] = None):
        """The arguments are the ``MODEL.TIMM.*`` keys (docs/detectron2.md). ``checkpoint``: a file,
        ``hf-hub:<id>`` or ``local-dir:<dir>`` (implies ``pretrained``); ``out_indices`` empty: timm's stages
        at strides 4..32, or a single-scale model's last map; ``freeze_at`` ``k``: the stem and ``k - 1``
        stages; ``size_divisibility`` 0: from the model; ``img_size``: the square a fixed-input-size
        model is built for and batches are padded to (0: its native size)."""
        super().__init__()
        _check_model_name(model_name)
        if norm not in NORMS:
            raise ValueError(f'MODEL.TIMM.NORM={norm!r} is not one of {NORMS}.')
        extra = dict(model_kwargs or {})
        for key in set(extra) & set(_OWN_KWARGS):
            raise ValueError(f'MODEL.TIMM.KWARGS sets {key!r}, which the adapter sets itself' +
                             (f': use MODEL.TIMM.{_OWN_KWARGS[key]}.' if _OWN_KWARGS[key] else '.'))
        sources = {key: 'MODEL.TIMM.KWARGS' for key in extra}
        size_kwargs, self._square_size = _size_kwargs(model_name, img_size, math.lcm(32, int(size_divisibility) or 1))
        kwargs = {'features_only': True, 'in_chans': in_chans, **size_kwargs,
                  'pretrained': bool(pretrained or checkpoint)}
        if checkpoint:  # resolved and checked against the name by the project's one resolver
            from maformer_zoo.weights import pretrained_overlay
            kwargs['pretrained_cfg_overlay'] = pretrained_overlay(checkpoint, model_name)
        kwargs.update(extra)  # the config has the last word
        for key, value in [('out_indices', tuple(out_indices)), ('drop_path_rate', drop_path_rate),
                           ('pretrained_base', pretrained_base)]:
            if value:
                kwargs[key], sources[key] = value, f'MODEL.TIMM.{_OWN_KWARGS[key]}'
        self._frozen: List[nn.Module] = []
        self.model = self._convert_norms(_create(model_name, kwargs, sources), norm)
        for module in self.model.modules():  # the checkpoint read for timm's load_pretrained: no second copy kept
            (getattr(module, 'pretrained_cfg', None) or {}).pop('state_dict', None)
        fmt = getattr(self.model, 'output_fmt', 'NCHW')  # the layout timm's wrapper declares
        self._channels_last = str(getattr(fmt, 'value', fmt)) == 'NHWC'
        if grad_ckpt:  # timm's sequential wrappers have the method; the getter wrapper keeps it in .model
            targets = [t for t in (self.model, getattr(self.model, 'model', None))
                       if hasattr(t, 'set_grad_checkpointing')]
            try:
                targets[0].set_grad_checkpointing(True)
            except (IndexError, AssertionError, NotImplementedError):
                raise ValueError(f'{model_name!r} does not support gradient checkpointing; set MODEL.TIMM.GRAD_CKPT '
                                 f'to False.') from None
        info = self.model.feature_info
        strides, channels, modules = info.reduction(), info.channels(), info.module_name()
        if out_indices:
            self._selected = list(range(len(strides)))
        elif len(set(strides)) == 1:  # single-scale (ViT): its last map
            self._selected = [len(strides) - 1]
        else:  # timm's default stages at strides 4..32 (timm's ResNet also returns its stem)
            self._selected = [i for i, s in enumerate(strides) if 4 <= s <= 32]
        if not self._selected:
            raise ValueError(f'{model_name}: no feature stage at strides 4..32 ({strides}).')
        strides = [strides[i] for i in self._selected]
        if any(s & (s - 1) for s in strides):
            raise ValueError(f'{model_name}: feature strides {strides} are not all powers of two, as detectron2 '
                             f'heads need (a ViT: MODEL.TIMM.KWARGS {{patch_size: 16}}).')
        self._out_features: List[str] = [f'res{s.bit_length() - 1}' for s in strides]
        if len(set(self._out_features)) != len(strides):
            raise ValueError(f'{model_name}: two outputs share a stride ({strides}); choose MODEL.TIMM.OUT_INDICES '
                             f'with one stage per stride.')
        self._out_feature_strides = dict(zip(self._out_features, strides))
        self._out_feature_channels = {n: channels[i] for n, i in zip(self._out_features, self._selected)}
        self._stage_modules = [modules[i] for i in self._selected]
        self._size_divisibility = int(size_divisibility) or self._model_size_divisibility(max(strides))
        if self._square_size % self._size_divisibility:
            raise ValueError(f'{model_name} is built for {self._square_size}x{self._square_size} inputs, no multiple '
                             f'of its size divisibility {self._size_divisibility}: set MODEL.TIMM.IMG_SIZE to a '
                             f'multiple of {self._size_divisibility}.')
        self.freeze(freeze_at)

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        """``{res{k}: (B, C_k, H / 2**k, W / 2**k)}`` for the selected stages."""
        features = self.model(x)
        assert torch.jit.isinstance(features, List[torch.Tensor])  # timm's getter declares a Union
        out = {}
        for i, name in zip(self._selected, self._out_features):
            feature = features[i]
            if self._channels_last:  # timm's Swin declares NHWC; detectron2 wants NCHW
                feature = feature.permute(0, 3, 1, 2).contiguous()
            out[name] = feature
        return out

    @property
    def size_divisibility(self) -> int:
        return self._size_divisibility

    @property
    def padding_constraints(self) -> Dict[str, int]:
        return {'size_divisibility': self._size_divisibility, 'square_size': self._square_size}

    def _convert_norms(self, model: nn.Module, norm: str) -> nn.Module:
        # timm's conversions keep its norm + act layers' activation; 1d/3d BatchNorms are frozen here
        if norm == 'SyncBN':
            return convert_sync_batchnorm(model)
        if norm != 'FrozenBN':
            return model
        model = freeze_batch_norm_2d(model)
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.requires_grad_(False)
                self._frozen.append(module)
        return model

    def _model_size_divisibility(self, max_stride: int) -> int:
        """The coarsest stride, times a ``size_divisibility`` the model declares (windows)."""
        values = [getattr(m, 'size_divisibility', None) for m in (self.model, getattr(self.model, 'model', None))]
        return math.lcm(max_stride, *[v for v in values if isinstance(v, int) and v > 0])

    def _parameter_groups(self) -> List[set]:
        """Parameter ids of ``[stem, stage 1, ...]``: timm's ``group_matcher(coarse=True)`` if the model
        has it, else each stage's ``feature_info`` module and every parameter before it as the stem."""
        for owner in (getattr(self.model, 'model', None), self.model):
            if isinstance(owner, nn.Module) and hasattr(owner, 'group_matcher'):
                by_name = dict(owner.named_parameters())
                grouped = group_parameters(owner, owner.group_matcher(coarse=True))
                return [{id(by_name[n]) for n in grouped[k] if n in by_name} for k in sorted(grouped)]
        modules = dict(self.model.named_modules())
        stages = []
        for name in self._stage_modules:
            found = [modules[c] for c in (name, name.replace('.', '_'), 'model.' + name) if c in modules]
            if not found:
                raise RuntimeError(f"feature_info names module '{name}', which the model lacks.")
            stages.append({id(p) for p in found[0].parameters()})
        stem = set(itertools.takewhile(lambda i: i not in stages[0], map(id, self.model.parameters())))
        return [stem] + stages

    def freeze(self, freeze_at: int = 0) -> 'TimmBackbone':
        """Freeze the stem (``freeze_at >= 1``) and the first ``freeze_at - 1`` stages: no gradient, timm's
        frozen BatchNorms, eval mode across ``train()``. Returns ``self``."""
        if freeze_at < 0:
            raise ValueError(f'MODEL.TIMM.FREEZE_AT must be >= 0, got {freeze_at}.')
        if freeze_at == 0:
            return self
        frozen_ids = set()
        for group in self._parameter_groups()[:freeze_at]:
            frozen_ids |= group
        frozen_modules = []  # whole top-most frozen modules: parameter-free leaves follow them
        for name, module in self.model.named_modules():
            params = [id(p) for p in module.parameters()]
            if params and all(i in frozen_ids for i in params) and not any(
                    name.startswith(parent + '.') for parent in frozen_modules):
                frozen_modules.append(name)
        for p in self.model.parameters():
            if id(p) in frozen_ids:
                p.requires_grad_(False)
        if frozen_modules:  # timm's freeze (BatchNorms frozen in place); given no module it freezes all
            freeze_modules(self.model, frozen_modules)
        self._frozen += [self.model.get_submodule(name) for name in frozen_modules]
        self.train(self.training)
        return self

    def train(self, mode: bool = True) -> 'TimmBackbone':
        super().train(mode)
        for module in self._frozen:
            module.eval()
        return self

    @classmethod
    def from_config(cls, cfg, input_shape: Optional[ShapeSpec] = None) -> 'TimmBackbone':
        """Build from ``MODEL.TIMM.*`` (``detectron2_ext.config``)."""
        if 'TIMM' not in cfg.MODEL:
            raise KeyError('The config lacks MODEL.TIMM: call detectron2_ext.add_maformer_zoo_config(cfg) on '
                           'get_cfg() before merge_from_file.')
        defaults = get_cfg().MODEL  # detectron2's ResNet keys a timm backbone would ignore
        for node, key, ours in [('BACKBONE', 'FREEZE_AT', 'FREEZE_AT'), ('RESNETS', 'NORM', 'NORM')]:
            value = cfg.MODEL[node][key]
            if value != defaults[node][key]:
                raise ValueError(f"MODEL.{node}.{key}={value!r} applies to detectron2's ResNet only; a timm backbone "
                                 f"reads MODEL.TIMM.{ours}. Set MODEL.TIMM.{ours} {value!r} and leave "
                                 f"MODEL.{node}.{key} at its default {defaults[node][key]!r}.")
        t = cfg.MODEL.TIMM
        return cls(t.NAME, pretrained=t.PRETRAINED, checkpoint=t.CHECKPOINT, pretrained_base=t.PRETRAINED_BASE,
                   out_indices=tuple(t.OUT_INDICES), freeze_at=t.FREEZE_AT, norm=t.NORM,
                   drop_path_rate=t.DROP_PATH_RATE, grad_ckpt=t.GRAD_CKPT, size_divisibility=t.SIZE_DIVISIBILITY,
                   in_chans=input_shape.channels if input_shape is not None and input_shape.channels else 3,
                   # fixed-size models are built for the largest side the data loader produces
                   img_size=t.IMG_SIZE or max(cfg.INPUT.MAX_SIZE_TRAIN, cfg.INPUT.MAX_SIZE_TEST),
                   model_kwargs=dict(t.KWARGS))


@BACKBONE_REGISTRY.register()
def build_timm_backbone(cfg, input_shape: ShapeSpec) -> Backbone:
    """The timm model alone (``res2..res5``), e.g. for UPerNet."""
    return TimmBackbone.from_config(cfg, input_shape)
