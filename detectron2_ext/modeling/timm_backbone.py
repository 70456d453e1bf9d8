"""detectron2 ``Backbone`` around any timm model created with ``features_only=True``.

:class:`TimmBackbone` works for our models (``maformer_*``, ``*_mscsa``) and timm's own alike:
everything it needs comes from timm's ``feature_info`` (channels and strides of each stage).

* Outputs are named by stride as detectron2's ResNet names them: stride ``2**k`` -> ``res{k}``,
  so ``res2..res5`` for strides 4..32, and every detectron2 head config (``IN_FEATURES``) applies.
* ``size_divisibility`` is the largest stride, times any extra factor the model declares in a
  ``size_divisibility`` attribute (models whose windows do not pad themselves); detectron2 pads
  the batch to it. ``padding_constraints`` carries the same value.
* ``freeze_at`` has detectron2's meaning (0: train all; 1: the stem; ``k``: stem + ``k - 1``
  stages). Stem and stages come from timm's ``group_matcher(coarse=True)`` where the model has
  one (MSCSA's features come from fusion layers, not from its stages), else from the
  ``feature_info`` modules (the stem: every parameter created before them). Frozen parameters get
  ``requires_grad=False``, frozen BatchNorms become ``FrozenBatchNorm2d``, and frozen modules stay
  in eval mode across ``model.train()`` so that neither BN statistics nor drop-path change them.
* ``norm``: ``'FrozenBN'`` / ``'SyncBN'`` / ``'BN'`` / ``''`` for the model's BatchNorm layers.
* Initial weights: timm's pretrained source (``pretrained=True``), or a local file,
  ``hf-hub:<repo>`` or ``local-dir:<folder>`` (``checkpoint``, resolved and checked by
  :func:`maformer_zoo.hub.pretrained_overlay`), loaded by timm through its
  ``pretrained_cfg_overlay`` mechanism, i.e. safetensors or ``torch.load(weights_only=True)``;
  or, for MSCSA models, timm's ImageNet weights of the base network (``pretrained_base``).

Registered builders: ``build_timm_backbone`` (no FPN), ``build_timm_{fpn,fine_fpn,asff_fpn}_backbone``
(P2-P6 for R-CNNs and Panoptic FPN) and ``build_retinanet_timm_{fpn,fine_fpn,asff_fpn}_backbone``
(P3-P7); the FPNs are :class:`~detectron2_ext.modeling.fpn_variants.FusionFPN`.
"""
import difflib
import math
from typing import Any, Dict, List, Optional, Sequence

import timm
import torch
from torch import nn

from timm.models import group_parameters

from detectron2.layers import FrozenBatchNorm2d, ShapeSpec
from detectron2.modeling.backbone import BACKBONE_REGISTRY, Backbone

from .fpn_variants import FusionFPN, _forced_fusion, _retinanet_top_block, build_fusion_fpn

__all__ = [
    'TimmBackbone', 'build_timm_backbone', 'build_timm_fpn_backbone',
    'build_timm_fine_fpn_backbone', 'build_timm_asff_fpn_backbone',
    'build_retinanet_timm_fpn_backbone', 'build_retinanet_timm_fine_fpn_backbone',
    'build_retinanet_timm_asff_fpn_backbone', 'NORMS',
]
NORMS = ('FrozenBN', 'SyncBN', 'BN', '')
_SOURCE_PREFIXES = ('hf-hub:', 'local-dir:')


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

    A ``checkpoint`` goes through :func:`maformer_zoo.hub.pretrained_overlay`, the one resolver of
    weight sources in this project: it finds the local file (Hugging Face cache for ``hf-hub:``),
    checks that a ``config.json`` beside it names ``name``, and raises errors that list the ways
    to provide missing weights. timm then loads the file as any pretrained weights.
    """
    if not checkpoint:
        return dict(pretrained=bool(pretrained))
    from maformer_zoo.hub import pretrained_overlay
    return dict(pretrained=True, pretrained_cfg_overlay=pretrained_overlay(checkpoint, name))


def _convert_batchnorm(module: nn.Module, norm: str) -> nn.Module:
    """Replace the BatchNorm layers of ``module`` according to ``norm``."""
    if norm == 'FrozenBN':
        return FrozenBatchNorm2d.convert_frozen_batchnorm(module)
    if norm == 'SyncBN':
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    return module  # 'BN' trains the model's BatchNorms as they are; '' keeps whatever is there


def _find_module(model: nn.Module, timm_name: str) -> Optional[nn.Module]:
    """The submodule a ``feature_info`` entry names, in any of timm's feature wrappers."""
    modules = dict(model.named_modules())
    for candidate in (timm_name, timm_name.replace('.', '_'), 'model.' + timm_name):
        if candidate in modules:
            return modules[candidate]
    return None


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
            **model_kwargs: Any,
    ):
        """
        Args:
            model_name: a timm model name (``timm.is_model``); ``import maformer_zoo`` registers ours.
            pretrained: load timm's default pretrained weights of ``model_name``.
            checkpoint: another weight source (implies ``pretrained``): a local file,
                ``'hf-hub:<repo id>'`` or ``'local-dir:<folder>'``.
            pretrained_base: MSCSA models only: base network from timm's ImageNet weights.
            out_indices: stages to return (timm's ``out_indices``); empty: timm's default stages
                at strides 4..32. Outputs are named ``res{log2(stride)}``.
            freeze_at: 0 trains everything; 1 freezes the stem; ``k`` the stem and ``k - 1`` stages.
            norm: ``'FrozenBN'``, ``'SyncBN'``, ``'BN'`` or ``''`` for the model's BatchNorms.
            drop_path_rate: stochastic depth rate (0 leaves the model's default).
            grad_ckpt: gradient checkpointing in the stages (trades compute for memory).
            in_chans: input channels.
            size_divisibility: padding multiple of the input; 0 derives it from the model.
            model_kwargs: further keyword arguments for ``timm.create_model``.
        """
        super().__init__()
        _check_model_name(model_name)
        if norm not in NORMS:
            raise ValueError(f'MODEL.TIMM.NORM={norm!r} is not one of {NORMS}.')
        kwargs = dict(features_only=True, in_chans=in_chans,
                      **_weight_source(model_name, pretrained, checkpoint), **model_kwargs)
        if out_indices:
            kwargs['out_indices'] = tuple(out_indices)
        if drop_path_rate:
            kwargs['drop_path_rate'] = drop_path_rate
        if pretrained_base:
            kwargs['pretrained_base'] = True
        try:
            model = timm.create_model(model_name, **kwargs)
        except TypeError as err:
            if pretrained_base and 'pretrained_base' in str(err):
                raise ValueError(
                    f"MODEL.TIMM.PRETRAINED_BASE is set, but {model_name!r} has no "
                    f"'pretrained_base' argument (only the *_mscsa models do). Use "
                    f"MODEL.TIMM.PRETRAINED or MODEL.TIMM.CHECKPOINT instead.") from err
            if drop_path_rate and 'drop_path_rate' in str(err):
                raise ValueError(f'{model_name!r} has no drop path; set MODEL.TIMM.DROP_PATH_RATE '
                                 f'to 0.') from err
            raise
        self.model = _convert_batchnorm(model, norm)
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
                raise ValueError(f'{model_name}: feature stride {stride} is not a power of two.')
            self._out_features.append(f'res{level}')
        if len(set(self._out_features)) != len(strides):
            raise ValueError(f'{model_name}: two outputs share a stride ({strides}); choose '
                             f'MODEL.TIMM.OUT_INDICES with one stage per stride.')
        self._out_feature_strides = dict(zip(self._out_features, strides))
        self._out_feature_channels = dict(zip(self._out_features, channels))
        self._stage_modules = modules
        self._size_divisibility = int(size_divisibility) or self._model_size_divisibility(
            max(strides))
        self._frozen: List[nn.Module] = []
        self.freeze(freeze_at)

    # ----------------------------------------------------------------------------- contract

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Returns ``{res{k}: (B, C_k, H / 2**k, W / 2**k)}`` for the selected stages."""
        features = self.model(x)
        out = {}
        for i, name in zip(self._selected, self._out_features):
            feature, channels = features[i], self._out_feature_channels[name]
            # Some timm models (Swin) return channels-last stages; detectron2 wants NCHW.
            if feature.shape[1] != channels and feature.shape[-1] == channels:
                feature = feature.permute(0, 3, 1, 2).contiguous()
            out[name] = feature
        return out

    @property
    def size_divisibility(self) -> int:
        return self._size_divisibility

    @property
    def padding_constraints(self) -> Dict[str, int]:
        return {'size_divisibility': self._size_divisibility}

    def output_shape(self) -> Dict[str, ShapeSpec]:
        return {name: ShapeSpec(channels=self._out_feature_channels[name],
                                stride=self._out_feature_strides[name])
                for name in self._out_features}

    # ------------------------------------------------------------------------------- extras

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
        inner = getattr(self.model, 'model', None)
        if isinstance(inner, nn.Module) and hasattr(inner, 'group_matcher'):
            by_name = dict(inner.named_parameters())
            grouped = group_parameters(inner, inner.group_matcher(coarse=True))
            return [{id(by_name[n]) for n in grouped[k]} for k in sorted(grouped)]
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

        Returns ``self``.
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
            converted = FrozenBatchNorm2d.convert_frozen_batchnorm(module)
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
        t = cfg.MODEL.TIMM
        in_chans = input_shape.channels if input_shape is not None and input_shape.channels else 3
        return cls(
            t.NAME, pretrained=t.PRETRAINED, checkpoint=t.CHECKPOINT,
            pretrained_base=t.PRETRAINED_BASE, out_indices=tuple(t.OUT_INDICES),
            freeze_at=t.FREEZE_AT, norm=t.NORM, drop_path_rate=t.DROP_PATH_RATE,
            grad_ckpt=t.GRAD_CKPT, in_chans=in_chans, size_divisibility=t.SIZE_DIVISIBILITY,
        )


@BACKBONE_REGISTRY.register()
def build_timm_backbone(cfg, input_shape: ShapeSpec) -> TimmBackbone:
    """The timm model alone (``res2..res5``), e.g. for heads that take backbone features."""
    return TimmBackbone.from_config(cfg, input_shape)


def _timm_fpn(cfg, input_shape: ShapeSpec, fusion: str, retinanet: bool) -> FusionFPN:
    bottom_up = TimmBackbone.from_config(cfg, input_shape)
    top_block = _retinanet_top_block(cfg, bottom_up) if retinanet else None
    return build_fusion_fpn(bottom_up, cfg, _forced_fusion(cfg, fusion), top_block)


@BACKBONE_REGISTRY.register()
def build_timm_fpn_backbone(cfg, input_shape: ShapeSpec) -> FusionFPN:
    """timm model + FPN with P6 by max pooling (Mask / Cascade Mask R-CNN, Panoptic FPN)."""
    return _timm_fpn(cfg, input_shape, 'sum', retinanet=False)


@BACKBONE_REGISTRY.register()
def build_timm_fine_fpn_backbone(cfg, input_shape: ShapeSpec) -> FusionFPN:
    """timm model + FINE-FPN with P6 by max pooling."""
    return _timm_fpn(cfg, input_shape, 'fine', retinanet=False)


@BACKBONE_REGISTRY.register()
def build_timm_asff_fpn_backbone(cfg, input_shape: ShapeSpec) -> FusionFPN:
    """timm model + ASFF-FPN with P6 by max pooling."""
    return _timm_fpn(cfg, input_shape, 'asff', retinanet=False)


@BACKBONE_REGISTRY.register()
def build_retinanet_timm_fpn_backbone(cfg, input_shape: ShapeSpec) -> FusionFPN:
    """timm model + FPN with P6-P7 from ``res5`` (RetinaNet)."""
    return _timm_fpn(cfg, input_shape, 'sum', retinanet=True)


@BACKBONE_REGISTRY.register()
def build_retinanet_timm_fine_fpn_backbone(cfg, input_shape: ShapeSpec) -> FusionFPN:
    """timm model + FINE-FPN with P6-P7 from ``res5`` (RetinaNet)."""
    return _timm_fpn(cfg, input_shape, 'fine', retinanet=True)


@BACKBONE_REGISTRY.register()
def build_retinanet_timm_asff_fpn_backbone(cfg, input_shape: ShapeSpec) -> FusionFPN:
    """timm model + ASFF-FPN with P6-P7 from ``res5`` (RetinaNet)."""
    return _timm_fpn(cfg, input_shape, 'asff', retinanet=True)
