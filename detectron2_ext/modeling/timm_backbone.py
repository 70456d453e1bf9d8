"""detectron2 ``Backbone`` around any timm model created with ``features_only=True``.

:class:`TimmBackbone` works for our models (``maformer_*``, ``*_mscsa``) and timm's own alike.
Everything it needs it asks timm, never the tensors' shapes: channels and strides from
``feature_info``, the layout from the feature wrapper's ``output_fmt``, which input sizes the
model takes from its constructor's signature and ``pretrained_cfg['fixed_input_size']``. Design
notes and the families the sweep test passes: docs/detectron2.md, "The backbone adapter".
Its forward traces, and scripts whenever timm's ``features_only`` model does (deployment:
docs/detectron2.md, "Deploying detectors").

Registered builders, one per backbone source and top block; the neck is ``MODEL.FPN.FUSION``:

* ``build_timm_backbone``: the model alone (``res2..res5``).
* ``build_timm_fpn_backbone``: multi-scale models + :class:`FusionFPN`, P2-P6 (R-CNNs, Panoptic FPN).
* ``build_retinanet_timm_fpn_backbone``: the same with P3-P7 from ``res5`` (RetinaNet).
* ``build_timm_simple_fpn_backbone``: single-scale models (ViT, DeiT, EVA) + detectron2's
  ``SimpleFeaturePyramid`` (ViTDet), P2-P6 (:class:`FusionSimpleFeaturePyramid`).
"""
import difflib
import inspect
import math
from typing import Any, Dict, List, Mapping, NamedTuple, Optional, Sequence, Tuple

import timm
import torch
from torch import nn

from timm.layers import convert_sync_batchnorm, freeze_batch_norm_2d
from timm.models import group_parameters

from detectron2.layers import ShapeSpec
from detectron2.modeling.backbone import BACKBONE_REGISTRY, Backbone

from .fpn_variants import (
    FusionFPN, FusionSimpleFeaturePyramid, build_fusion_fpn, build_fusion_simple_fpn,
    retinanet_top_block,
)

__all__ = [
    'TimmBackbone', 'build_timm_backbone', 'build_timm_fpn_backbone',
    'build_retinanet_timm_fpn_backbone', 'build_timm_simple_fpn_backbone', 'NORMS',
]
NORMS = ('FrozenBN', 'SyncBN', 'BN', '')
_SOURCE_PREFIXES = ('hf-hub:', 'local-dir:')
# create_model arguments the adapter sets from its own keys; MODEL.TIMM.KWARGS may not repeat them
_OWN_KWARGS = {
    'features_only': None, 'pretrained': 'PRETRAINED', 'pretrained_cfg_overlay': 'CHECKPOINT',
    'pretrained_base': 'PRETRAINED_BASE', 'out_indices': 'OUT_INDICES', 'in_chans': None,
    'drop_path_rate': 'DROP_PATH_RATE',
}


def _check_model_name(name: str) -> None:
    if not name:
        raise ValueError('MODEL.TIMM.NAME is empty: set it to a timm model name, e.g. '
                         "'resnet18_mscsa' or 'maformer_s' (see maformer_zoo.list_models()).")
    if name.startswith(_SOURCE_PREFIXES):
        raise ValueError(
            f"MODEL.TIMM.NAME={name!r}: give the architecture name here and the weight source in "
            f"MODEL.TIMM.CHECKPOINT (e.g. NAME 'resnet18_mscsa', CHECKPOINT '{name}').")
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.6)
        hint = f' Did you mean one of {close}?' if close else ''
        raise ValueError(
            f"Unknown timm model {name!r}.{hint} List names with timm.list_models('*pattern*') or "
            f"maformer_zoo.list_models(); our models are registered by `import maformer_zoo`.")


def _weight_source(name: str, pretrained: bool, checkpoint: str) -> Dict[str, Any]:
    """timm ``create_model`` kwargs selecting the initial weights (see the module docstring).

    A ``checkpoint`` goes through :func:`maformer_zoo.weights.pretrained_overlay`, the one resolver of
    weight sources in this project: it finds the local file (Hugging Face cache for ``hf-hub:``),
    checks that a ``config.json`` beside it names ``name``, and raises errors that list the ways
    to provide missing weights. timm then loads the file as any pretrained weights.
    """
    if not checkpoint:
        return dict(pretrained=bool(pretrained))
    from maformer_zoo.weights import pretrained_overlay
    return dict(pretrained=True, pretrained_cfg_overlay=pretrained_overlay(checkpoint, name))


class _ModelFacts(NamedTuple):
    """What timm declares about a model, read from a weightless (meta device) instance."""
    init_params: frozenset   # constructor arguments, along the class hierarchy
    any_kwarg: bool          # some constructor takes **kwargs that reach no named argument
    fixed_input_size: bool   # pretrained_cfg['fixed_input_size']
    native_size: Tuple[int, int]
    reductions: Tuple[int, ...]  # feature_info strides of every stage


def _model_facts(name: str) -> _ModelFacts:
    # On the meta device no weights are allocated or initialised: this costs milliseconds. A
    # model whose constructor needs real values (e.g. computes on tensors) is built on the CPU.
    try:
        with torch.device('meta'):
            model = timm.create_model(name, pretrained=False)
    except (RuntimeError, NotImplementedError):
        model = timm.create_model(name, pretrained=False)
    params, any_kwarg = set(), True
    for cls in type(model).__mro__:
        if '__init__' not in vars(cls) or cls is nn.Module:
            continue
        signature = inspect.signature(cls.__init__).parameters
        params |= {p for p, v in signature.items() if v.kind not in (v.VAR_KEYWORD, v.VAR_POSITIONAL)}
        if not any(v.kind is v.VAR_KEYWORD for v in signature.values()):
            any_kwarg = False  # the kwargs of the subclasses end here, all named
            break
    cfg = model.pretrained_cfg or {}
    feature_info = getattr(model, 'feature_info', None) or []
    native = tuple(cfg.get('input_size', (3, 224, 224))[-2:])
    return _ModelFacts(frozenset(params) - {'self'}, any_kwarg, bool(cfg.get('fixed_input_size')),
                       native, tuple(int(d['reduction']) for d in feature_info))


def _check_extra_kwargs(name: str, kwargs: Mapping[str, Any], facts: _ModelFacts) -> None:
    """``MODEL.TIMM.KWARGS`` against the adapter's own keys and the model's constructor."""
    for key in kwargs:
        if key in _OWN_KWARGS:
            own = _OWN_KWARGS[key]
            raise ValueError(f"MODEL.TIMM.KWARGS sets {key!r}, which the adapter sets itself" +
                             (f': use MODEL.TIMM.{own}.' if own else '.'))
        if key not in facts.init_params and not facts.any_kwarg:
            close = difflib.get_close_matches(key, sorted(facts.init_params), n=3, cutoff=0.6)
            raise ValueError(
                f'MODEL.TIMM.KWARGS: {name!r} takes no argument {key!r}' +
                (f' (did you mean {close}?)' if close else '') +
                f'. Its arguments: {sorted(facts.init_params)}.')


def _input_size_kwargs(facts: _ModelFacts, img_size: int, divisor: int) -> Tuple[Dict[str, Any], int]:
    """``create_model`` kwargs that let the model take detection sizes, and the square size it
    must be padded to (0: any size that is a multiple of the size divisibility).

    Decided from what the model declares: a ``dynamic_img_size`` or ``strict_img_size`` argument
    (ViT, DeiT, EVA, Swin: position embeddings and attention masks follow the input); else, for a
    model whose ``pretrained_cfg`` says ``fixed_input_size`` (attention biases or windows sized
    at construction: MaxViT, CoAtNet, LeViT, EfficientFormerV2, CoaT), build it for a square
    ``img_size`` (rounded up to ``divisor``; 0: the native size) and pad every batch to that square.
    """
    if 'dynamic_img_size' in facts.init_params:
        return {'dynamic_img_size': True}, 0
    if 'strict_img_size' in facts.init_params:
        return {'strict_img_size': False}, 0
    if not facts.fixed_input_size:
        return {}, 0
    if 'img_size' not in facts.init_params and not facts.any_kwarg:
        return {}, 0  # nothing to ask for: the model runs at its native size only
    side = int(img_size) or max(facts.native_size)
    side = -(-side // divisor) * divisor
    return {'img_size': side}, side


def _output_fmt(model: nn.Module) -> str:
    """The layout timm's feature wrapper declares for its outputs (``NCHW`` unless it says so)."""
    fmt = getattr(model, 'output_fmt', 'NCHW')
    return str(getattr(fmt, 'value', fmt))


def _find_module(model: nn.Module, timm_name: str) -> Optional[nn.Module]:
    """The submodule a ``feature_info`` entry names, in any of timm's feature wrappers."""
    modules = dict(model.named_modules())
    for candidate in (timm_name, timm_name.replace('.', '_'), 'model.' + timm_name):
        if candidate in modules:
            return modules[candidate]
    return None


def _other_batchnorms(module: nn.Module) -> List[nn.Module]:
    """BatchNorms that timm's ``freeze_batch_norm_2d`` does not convert (1d, 3d: LeViT)."""
    return [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


class TimmBackbone(Backbone):
    """A timm feature extractor as a detectron2 :class:`Backbone` (see the module docstring)."""

    def __init__(
            self,
            model_name: str,
            pretrained: bool = False,
            checkpoint: str = '',
            pretrained_base: bool = False,
            out_indices: Sequence[int] = (),
            freeze_at: int = 0,
            norm: str = 'FrozenBN',
            drop_path_rate: float = 0.0,
            grad_ckpt: bool = False,
            in_chans: int = 3,
            size_divisibility: int = 0,
            img_size: int = 0,
            model_kwargs: Optional[Mapping[str, Any]] = None,
            **kwargs: Any,
    ):
        """
        Args:
            model_name: a timm model name (``timm.is_model``); ``import maformer_zoo`` registers ours.
            pretrained: load timm's default pretrained weights of ``model_name``.
            checkpoint: another weight source (implies ``pretrained``): a local file,
                ``'hf-hub:<repo id>'`` or ``'local-dir:<folder>'``.
            pretrained_base: MSCSA models only: base network from timm's ImageNet weights.
            out_indices: stages to return (timm's ``out_indices``); empty: timm's default stages
                at strides 4..32, or the last block of a single-scale model (ViT). Outputs are
                named ``res{log2(stride)}``.
            freeze_at: 0 trains everything; 1 freezes the stem; ``k`` the stem and ``k - 1`` stages.
            norm: ``'FrozenBN'``, ``'SyncBN'``, ``'BN'`` or ``''`` for the model's BatchNorms
                (timm's norm + activation layers keep their activation).
            drop_path_rate: stochastic depth rate (0 leaves the model's default).
            grad_ckpt: gradient checkpointing in the stages (trades compute for memory).
            in_chans: input channels.
            size_divisibility: padding multiple of the input; 0 derives it from the model.
            img_size: models with a fixed input size only: the square side they are built for
                and every batch is padded to (0: their native size).
            model_kwargs: further ``timm.create_model`` arguments (``MODEL.TIMM.KWARGS``),
                checked against the model's constructor.
            kwargs: merged into ``model_kwargs``.
        """
        super().__init__()
        _check_model_name(model_name)
        if norm not in NORMS:
            raise ValueError(f'MODEL.TIMM.NORM={norm!r} is not one of {NORMS}.')
        facts = _model_facts(model_name)
        extra = {**(model_kwargs or {}), **kwargs}
        _check_extra_kwargs(model_name, extra, facts)
        if pretrained_base and 'pretrained_base' not in facts.init_params:
            raise ValueError(
                f"MODEL.TIMM.PRETRAINED_BASE is set, but {model_name!r} has no 'pretrained_base' "
                f"argument (only the *_mscsa models do). Use MODEL.TIMM.PRETRAINED or "
                f"MODEL.TIMM.CHECKPOINT instead.")
        if drop_path_rate and 'drop_path_rate' not in facts.init_params and not facts.any_kwarg:
            raise ValueError(f'{model_name!r} has no drop path; set MODEL.TIMM.DROP_PATH_RATE to 0.')
        if not out_indices and facts.reductions and len(set(facts.reductions)) == 1:
            out_indices = (len(facts.reductions) - 1,)  # single-scale: the last block
        # the padding multiple of the default outputs (strides 4..32), known before creation
        default_strides = [r for r in facts.reductions if 4 <= r <= 32] or facts.reductions or [32]
        divisor = math.lcm(max(default_strides), int(size_divisibility) or 1)
        size_kwargs, self._square_size = _input_size_kwargs(facts, img_size, divisor)
        create_kwargs = dict(features_only=True, in_chans=in_chans, **size_kwargs,
                             **_weight_source(model_name, pretrained, checkpoint))
        create_kwargs.update(extra)  # the config has the last word
        if out_indices:
            create_kwargs['out_indices'] = tuple(out_indices)
        if drop_path_rate:
            create_kwargs['drop_path_rate'] = drop_path_rate
        if pretrained_base:
            create_kwargs['pretrained_base'] = True
        model = timm.create_model(model_name, **create_kwargs)
        self._frozen: List[nn.Module] = []
        self.model = self._convert_norms(model, norm)
        self._channels_last = _output_fmt(self.model) == 'NHWC'
        if grad_ckpt:
            self._enable_grad_checkpointing(model_name)

        info = self.model.feature_info
        strides, channels, modules = info.reduction(), info.channels(), info.module_name()
        # Without explicit out_indices, keep timm's default stages at strides 4..32 (timm's ResNet
        # also returns its stride-2 stem, which no detectron2 head uses).
        self._selected = [i for i, s in enumerate(strides) if out_indices or 4 <= s <= 32]
        if not self._selected:
            raise ValueError(f'{model_name}: no feature stage at strides 4..32 ({strides}).')
        strides = [strides[i] for i in self._selected]
        channels = [channels[i] for i in self._selected]
        modules = [modules[i] for i in self._selected]
        self._out_features: List[str] = []
        for stride in strides:
            level = int(round(math.log2(stride)))
            if 2 ** level != stride:
                raise ValueError(
                    f'{model_name}: feature stride {stride} is not a power of two, which '
                    f'detectron2 heads need. For a ViT-style model with {stride}x{stride} '
                    f'patches, MODEL.TIMM.KWARGS {{patch_size: 16}} fixes it (timm resamples the '
                    f'patch embedding of pretrained weights); other models cannot be used.')
            self._out_features.append(f'res{level}')
        if len(set(self._out_features)) != len(strides):
            raise ValueError(f'{model_name}: two outputs share a stride ({strides}); choose '
                             f'MODEL.TIMM.OUT_INDICES with one stage per stride.')
        self._out_feature_strides = dict(zip(self._out_features, strides))
        self._out_feature_channels = dict(zip(self._out_features, channels))
        self._stage_modules = modules
        self._size_divisibility = int(size_divisibility) or self._model_size_divisibility(
            max(strides))
        if self._square_size % self._size_divisibility:
            raise ValueError(
                f'{model_name} is built for {self._square_size}x{self._square_size} inputs, which '
                f'is no multiple of its size divisibility {self._size_divisibility}: set '
                f'MODEL.TIMM.IMG_SIZE to a multiple of {self._size_divisibility}.')
        self.freeze(freeze_at)

    # ----------------------------------------------------------------------------- contract

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Returns ``{res{k}: (B, C_k, H / 2**k, W / 2**k)}`` for the selected stages."""
        features = self.model(x)
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

    def output_shape(self) -> Dict[str, ShapeSpec]:
        return {name: ShapeSpec(channels=self._out_feature_channels[name],
                                stride=self._out_feature_strides[name])
                for name in self._out_features}

    # ------------------------------------------------------------------------------- extras

    def _convert_norms(self, model: nn.Module, norm: str) -> nn.Module:
        """timm's own conversions, which keep the activation and drop of its norm + act layers.

        ``FrozenBN``: ``freeze_batch_norm_2d``; BatchNorms it does not convert (1d, 3d) get
        ``requires_grad=False`` and stay in eval mode. ``SyncBN``: timm's
        ``convert_sync_batchnorm``. ``BN`` / ``''``: the model's BatchNorms as they are.
        """
        if norm == 'SyncBN':
            return convert_sync_batchnorm(model)
        if norm != 'FrozenBN':
            return model
        model = freeze_batch_norm_2d(model)
        for module in _other_batchnorms(model):
            module.requires_grad_(False)
            self._frozen.append(module)
        return model

    def _model_size_divisibility(self, max_stride: int) -> int:
        extra = [getattr(m, 'size_divisibility', None) for m in (self.model,
                 getattr(self.model, 'model', None)) if m is not None]
        divisor = max_stride
        for value in extra:
            if isinstance(value, int) and value > 0:
                divisor = math.lcm(divisor, value)
        return divisor

    def _enable_grad_checkpointing(self, model_name: str) -> None:
        # timm's sequential feature wrappers have the method; the getter wrapper keeps the model
        # in ``.model``.
        for target in (self.model, getattr(self.model, 'model', None)):
            if target is not None and hasattr(target, 'set_grad_checkpointing'):
                try:
                    target.set_grad_checkpointing(True)
                    return
                except (AssertionError, NotImplementedError):
                    break
        raise ValueError(f'{model_name!r} does not support gradient checkpointing; set '
                         f'MODEL.TIMM.GRAD_CKPT to False.')

    def _parameter_groups(self) -> List[set]:
        """Parameter ids of ``[stem, stage 1, stage 2, ...]``, in execution order.

        timm's own grouping (``group_matcher(coarse=True)``, the one layer-wise learning-rate
        decay uses) when the wrapped model has it: it knows which parameters form the stem and
        each stage even when the returned features come from elsewhere (MSCSA returns fused
        maps). Otherwise timm's sequential feature wrappers hold the stages themselves: each
        returned stage is its ``feature_info`` module, and the stem is every parameter created
        before the first stage.
        """
        # the model inside timm's getter wrapper, or a model that is its own feature extractor
        # (HRNet's features class)
        for owner in (getattr(self.model, 'model', None), self.model):
            if isinstance(owner, nn.Module) and hasattr(owner, 'group_matcher'):
                by_name = dict(owner.named_parameters())
                grouped = group_parameters(owner, owner.group_matcher(coarse=True))
                return [{id(by_name[n]) for n in grouped[k] if n in by_name}
                        for k in sorted(grouped)]
        stages = []
        for name in self._stage_modules:
            module = _find_module(self.model, name)
            if module is None:
                raise RuntimeError(f"feature_info names module '{name}', which the model lacks.")
            stages.append({id(p) for p in module.parameters()})
        stem = set()
        for p in self.model.parameters():
            if id(p) in stages[0]:
                break
            stem.add(id(p))
        return [stem] + stages

    def freeze(self, freeze_at: int = 0) -> 'TimmBackbone':
        """Freeze the stem (``freeze_at >= 1``) and the first ``freeze_at - 1`` stages.

        Frozen parameters get ``requires_grad=False``, frozen BatchNorms become timm's frozen
        BatchNorms (``freeze_batch_norm_2d``), and frozen modules stay in eval mode across
        ``train()``. Returns ``self``.
        """
        if freeze_at < 0:
            raise ValueError(f'MODEL.TIMM.FREEZE_AT must be >= 0, got {freeze_at}.')
        if freeze_at == 0:
            return self
        frozen_ids = set()
        for group in self._parameter_groups()[:freeze_at]:
            frozen_ids |= group
        # A module is frozen when all its parameters are; parameter-free leaves (activations,
        # pooling, drop path) follow their parent, so freeze whole top-most frozen modules.
        frozen_modules = []
        for name, module in self.model.named_modules():
            params = [id(p) for p in module.parameters()]
            if params and all(i in frozen_ids for i in params):
                if not any(name.startswith(parent + '.') for parent, _ in frozen_modules):
                    frozen_modules.append((name, module))
        for p in self.model.parameters():
            if id(p) in frozen_ids:
                p.requires_grad_(False)
        for name, module in frozen_modules:
            converted = freeze_batch_norm_2d(module)
            if converted is not module:  # the frozen module itself was a BatchNorm
                parent_name, _, child = name.rpartition('.')
                parent = self.model.get_submodule(parent_name) if parent_name else self.model
                setattr(parent, child, converted)
                module = converted
            self._frozen.append(module)
        self.train(self.training)
        return self

    def train(self, mode: bool = True) -> 'TimmBackbone':
        super().train(mode)
        for module in self._frozen:
            module.eval()
        return self

    @classmethod
    def from_config(cls, cfg, input_shape: Optional[ShapeSpec] = None) -> 'TimmBackbone':
        """Build from ``MODEL.TIMM.*`` (see :func:`detectron2_ext.config._add_timm_backbone_config`)."""
        if 'TIMM' not in cfg.MODEL:
            raise KeyError('The config lacks MODEL.TIMM: call detectron2_ext.add_maformer_zoo_config'
                           '(cfg) on get_cfg() before merge_from_file.')
        _refuse_resnet_keys(cfg)
        t = cfg.MODEL.TIMM
        in_chans = input_shape.channels if input_shape is not None and input_shape.channels else 3
        # fixed-size models are built for the largest side the data loader produces
        img_size = t.IMG_SIZE or max(cfg.INPUT.MAX_SIZE_TRAIN, cfg.INPUT.MAX_SIZE_TEST)
        return cls(
            t.NAME, pretrained=t.PRETRAINED, checkpoint=t.CHECKPOINT,
            pretrained_base=t.PRETRAINED_BASE, out_indices=tuple(t.OUT_INDICES),
            freeze_at=t.FREEZE_AT, norm=t.NORM, drop_path_rate=t.DROP_PATH_RATE,
            grad_ckpt=t.GRAD_CKPT, in_chans=in_chans, size_divisibility=t.SIZE_DIVISIBILITY,
            img_size=img_size, model_kwargs=dict(t.KWARGS),
        )


# detectron2's keys for its own ResNet that a timm backbone does not read, with the one it reads
_RESNET_KEYS = {('BACKBONE', 'FREEZE_AT'): 'MODEL.TIMM.FREEZE_AT',
                ('RESNETS', 'NORM'): 'MODEL.TIMM.NORM'}


def _refuse_resnet_keys(cfg) -> None:
    """A changed ``MODEL.BACKBONE.FREEZE_AT`` / ``MODEL.RESNETS.NORM`` would be silently
    ignored by a timm backbone: refuse it, naming the key that applies."""
    from detectron2.config import get_cfg
    defaults = get_cfg().MODEL
    for (node, key), ours in _RESNET_KEYS.items():
        value = cfg.MODEL[node][key]
        if value != defaults[node][key]:
            raise ValueError(
                f'MODEL.{node}.{key}={value!r} applies to detectron2\'s ResNet only; a timm '
                f'backbone reads {ours}. Set {ours} {value!r} and leave MODEL.{node}.{key} at '
                f'its default {defaults[node][key]!r}.')


@BACKBONE_REGISTRY.register()
def build_timm_backbone(cfg, input_shape: ShapeSpec) -> TimmBackbone:
    """The timm model alone (``res2..res5``), e.g. for heads that take backbone features."""
    return TimmBackbone.from_config(cfg, input_shape)


@BACKBONE_REGISTRY.register()
def build_timm_fpn_backbone(cfg, input_shape: ShapeSpec) -> FusionFPN:
    """timm model + FPN (``MODEL.FPN.FUSION``) with P6 by max pooling: P2-P6 for Faster / Mask /
    Cascade Mask R-CNN and Panoptic FPN."""
    return build_fusion_fpn(TimmBackbone.from_config(cfg, input_shape), cfg)


@BACKBONE_REGISTRY.register()
def build_retinanet_timm_fpn_backbone(cfg, input_shape: ShapeSpec) -> FusionFPN:
    """timm model + FPN (``MODEL.FPN.FUSION``) with P6-P7 from ``res5`` (RetinaNet)."""
    bottom_up = TimmBackbone.from_config(cfg, input_shape)
    return build_fusion_fpn(bottom_up, cfg, retinanet_top_block(cfg, bottom_up))


@BACKBONE_REGISTRY.register()
def build_timm_simple_fpn_backbone(cfg, input_shape: ShapeSpec) -> FusionSimpleFeaturePyramid:
    """Single-scale timm model (ViT, DeiT, EVA) + ViTDet's simple feature pyramid, P2-P6 from its
    last map (``MODEL.FPN.FUSION`` ``'sum'`` or ``'asff'``)."""
    return build_fusion_simple_fpn(TimmBackbone.from_config(cfg, input_shape), cfg)
