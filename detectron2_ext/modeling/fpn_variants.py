"""detectron2 FPNs with fusion modules passed in: FINE-FPN (Lee et al.) and ASFF-FPN (Liu et al.).

:class:`FusionFPN` is detectron2's ``FPN`` (same keys, outputs, padding, scripting) with modules before
each top-down sum (FINE), on the outputs (ASFF) and over the top-block levels; :func:`fpn_fusions`
makes them from ``MODEL.FPN.FUSION``. Placement and kernels: docs/necks.md#design-choices-where-the-papers-leave-room.
"""
import copy
import math
from typing import Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from detectron2.layers import ShapeSpec, get_norm
from detectron2.modeling.backbone import BACKBONE_REGISTRY, Backbone, FPN
from detectron2.modeling.backbone.fpn import LastLevelMaxPool, LastLevelP6P7
from detectron2.modeling.backbone.resnet import build_resnet_backbone
from detectron2.modeling.backbone.vit import SimpleFeaturePyramid

from maformer_zoo.layers.asff import ASFF
from maformer_zoo.layers.fine import FINE

from .timm_backbone import TimmBackbone

__all__ = [
    'FINE', 'ASFF', 'FPNFusions', 'FusionFPN', 'FusionSimpleFeaturePyramid', 'FUSIONS', 'fpn_fusions',
    'build_fusion_fpn', 'build_fusion_simple_fpn', 'build_resnet_fusion_fpn_backbone',
    'build_retinanet_resnet_fusion_fpn_backbone', 'build_timm_fpn_backbone', 'build_retinanet_timm_fpn_backbone',
    'build_timm_simple_fpn_backbone',
]

FUSIONS = ('sum', 'fine', 'asff')
Named = Sequence[Tuple[str, nn.Module]]  # modules with the names they are registered under


class FPNFusions(NamedTuple):
    """The fusion modules of a neck, each with its state-dict name (``fpn_*``)."""
    name: str = 'sum'  # what they are (MODEL.FPN.FUSION), kept as the neck's ``fusion``
    lateral: Named = ()  # one per top-down sum, coarse to fine: (lateral, top-down map) -> lateral
    output: Named = ()  # in turn on the in_features outputs, finest first: list -> list
    top: Named = ()  # top-down over the last levels, coarse to fine: (level, level above) -> level


class _BottomUpPadding:
    """Both pyramids' padding, which meets their own and the bottom-up network's needs (windows, a square
    size) that detectron2's pyramids drop, as two ints fixed at construction (for TorchScript)."""

    def _register(self, below: Backbone, fusions: Optional[Callable[[], FPNFusions]]) -> FPNFusions:
        """Record the padding; make the fusions and register them under their names."""
        self._joint_size_divisibility = math.lcm(self._size_divisibility, below.size_divisibility or 1)
        self._joint_square_size = max(self._square_pad, (below.padding_constraints or {}).get('square_size', 0))
        made = fusions() if fusions is not None else FPNFusions()
        self.fusion = made.name
        self._fusion_names = [name for name, _ in (*made.lateral, *made.top, *made.output)]
        for name, module in (*made.lateral, *made.top, *made.output):
            self.add_module(name, module)
        # plain lists, as the parent's lateral_convs: nn.ModuleLists in the scripted copy
        self.output_fusions = [module for _, module in made.output]
        return made

    @property
    def size_divisibility(self) -> int:
        return self._joint_size_divisibility

    @property
    def padding_constraints(self) -> Dict[str, int]:
        return {'size_divisibility': self._joint_size_divisibility, 'square_size': self._joint_square_size}


class _NoAlignment(nn.Module):
    """The lateral as it is: the place of a lateral fusion where there is none."""

    def forward(self, lateral: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        return lateral


class FusionFPN(_BottomUpPadding, FPN):
    """detectron2's FPN with lateral, output and top fusion modules (see the module docstring)."""

    def __init__(self, bottom_up: Backbone, in_features: List[str], out_channels: int, norm: str = '',
                 top_block: Optional[nn.Module] = None, fuse_type: str = 'sum', square_pad: int = 0,
                 fusions: Optional[Callable[[], FPNFusions]] = None):
        """Arguments as detectron2's ``FPN``; ``fusions`` makes the :class:`FPNFusions` (None: none),
        called after detectron2's convs so that seeded runs draw initial weights in the same order."""
        super().__init__(bottom_up, in_features, out_channels, norm=norm, top_block=top_block,
                         fuse_type=fuse_type, square_pad=square_pad)
        made = self._register(bottom_up, fusions)
        top_levels = top_block.num_levels if top_block is not None else 0
        if made.lateral and len(made.lateral) != len(in_features) - 1 or len(made.top) > top_levels:
            raise ValueError(f'FusionFPN: {len(made.lateral)} lateral fusions for {len(in_features) - 1} '
                             f'top-down sums and {len(made.top)} top fusions for {top_levels} top-block levels.')
        # coarse to fine, one per lateral: the coarsest has no level above it
        self.lateral_fusions = [_NoAlignment()] + ([m for _, m in made.lateral] or [
            _NoAlignment() for _ in in_features[1:]])
        self.top_fusions = [module for _, module in made.top]

    def __prepare_scriptable__(self) -> 'FusionFPN':
        """The copy ``torch.jit.script`` compiles, as detectron2.export's FPN: ModuleLists, no ``fpn_*`` aliases."""
        ret = copy.deepcopy(self)
        for name in ('lateral_convs', 'output_convs', 'lateral_fusions', 'output_fusions', 'top_fusions'):
            setattr(ret, name, nn.ModuleList(getattr(ret, name)))
        for name, _ in self.named_children():
            if name.startswith(('fpn_lateral', 'fpn_output')) or name in self._fusion_names:
                delattr(ret, name)
        return ret

    def pyramid(self, bottom_up_features: Dict[str, torch.Tensor]) -> List[torch.Tensor]:
        """All output maps, finest first: top-down path, output fusions, top block, top fusions."""
        prev_features = bottom_up_features[self.in_features[-1]]
        results: List[torch.Tensor] = []
        for idx, (lateral_conv, fuse, output_conv) in enumerate(
                zip(self.lateral_convs, self.lateral_fusions, self.output_convs)):
            lateral = lateral_conv(bottom_up_features[self.in_features[-idx - 1]])
            if idx > 0:
                lateral = fuse(lateral, prev_features)  # FINE, Eq. 3 (or the lateral as is)
                lateral = lateral + F.interpolate(prev_features, scale_factor=2.0, mode='nearest')
                if self._fuse_type == 'avg':
                    lateral = lateral / 2
            prev_features = lateral
            results.insert(0, output_conv(prev_features))
        for fusion in self.output_fusions:  # ASFF
            results = fusion(results)
        if self.top_block is not None:
            if self.top_block.in_feature in bottom_up_features:
                top_block_in_feature = bottom_up_features[self.top_block.in_feature]
            else:
                top_block_in_feature = results[self._out_features.index(self.top_block.in_feature)]
            results.extend(self.top_block(top_block_in_feature))
        # (P6, P7) then (P5, P6): each modulated map is the context of the pair below
        for offset, fuse in enumerate(self.top_fusions):
            low = len(results) - 2 - offset
            results[low] = fuse(results[low], results[low + 1])
        return results

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        results = self.pyramid(self.bottom_up(x))
        assert len(self._out_features) == len(results)
        return {f: res for f, res in zip(self._out_features, results)}


class FusionSimpleFeaturePyramid(_BottomUpPadding, SimpleFeaturePyramid):
    """detectron2's ViTDet pyramid (P2-P5 from one map, then the top block) with output fusions (ASFF)."""

    def __init__(self, net: Backbone, in_feature: str, out_channels: int,
                 scale_factors: Sequence[float] = (4.0, 2.0, 1.0, 0.5), top_block: Optional[nn.Module] = None,
                 norm: str = 'LN', square_pad: int = 0, fusions: Optional[Callable[[], FPNFusions]] = None):
        """Arguments as detectron2's ``SimpleFeaturePyramid``; ``fusions`` as :class:`FusionFPN`'s, output ones only."""
        super().__init__(net, in_feature, out_channels, list(scale_factors), top_block=top_block,
                         norm=norm, square_pad=square_pad)
        made = self._register(net, fusions)
        if made.lateral or made.top:
            raise ValueError('FusionSimpleFeaturePyramid takes output fusions only: it has no '
                             'top-down sums for lateral or top fusions (docs/necks.md).')

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        features = self.net(x)[self.in_feature]
        results = [stage(features) for stage in self.stages]
        for fusion in self.output_fusions:
            results = fusion(results)
        if self.top_block is not None:
            results.extend(self.top_block(results[self._out_features.index(self.top_block.in_feature)]))
        assert len(self._out_features) == len(results)
        return dict(zip(self._out_features, results))


def fpn_fusions(cfg, strides: Sequence[int], top_levels: int = 0, channels: int = 0,
                finest_first: bool = False) -> Callable[[], FPNFusions]:
    """What makes the modules ``MODEL.FPN.FUSION`` names (``MODEL.FINE.*``, ``MODEL.ASFF.*``) for levels
    of ``strides`` (finest first) and ``top_levels`` top-block levels: nothing (``'sum'``); a FINE
    ``fpn_fine{s}`` per top-down sum into ``p{s}``, made coarse to fine (``finest_first``: UPerNet's
    order), and with ``MODEL.FINE.EXTRA_LEVELS`` one per pair of the last levels; or ASFF
    (``fpn_asff``). ``channels`` 0: ``MODEL.FPN.OUT_CHANNELS``. Checked now, made when called."""
    if 'FINE' not in cfg.MODEL or 'ASFF' not in cfg.MODEL or 'FUSION' not in cfg.MODEL.FPN:
        raise KeyError('The config lacks the MODEL.FINE / MODEL.ASFF / MODEL.FPN.FUSION keys: call '
                       'detectron2_ext.add_maformer_zoo_config(cfg) on get_cfg() before merge_from_file.')
    fusion, channels = cfg.MODEL.FPN.FUSION, channels or cfg.MODEL.FPN.OUT_CHANNELS
    fine, asff = cfg.MODEL.FINE, cfg.MODEL.ASFF
    if fusion not in FUSIONS:
        raise ValueError(f'MODEL.FPN.FUSION={fusion!r}: fusion must be one of {FUSIONS}.')
    if fusion == 'asff':
        norm_layer = (lambda c: get_norm(asff.NORM, c)) if asff.NORM else None
        return lambda: FPNFusions('asff', output=[('fpn_asff', ASFF(
            [channels] * len(strides), upsample_mode=asff.UPSAMPLE_MODE, norm_layer=norm_layer))])
    if fusion == 'sum':
        return lambda: FPNFusions('sum')
    kernels = list(fine.POOL_KERNELS)  # entry i: k of the FINE whose F_low is p{i+2}
    stages = [int(math.log2(s)) for s in strides]
    lows = stages[:-1] if finest_first else stages[:-1][::-1]  # F_low of each top-down sum
    for stage in lows:
        if not 0 <= stage - 2 < len(kernels):
            raise ValueError(f'MODEL.FINE.POOL_KERNELS={kernels} has no entry for the fusion producing '
                             f'p{stage} (entry i is for p{{i+2}}); give one kernel per level p2..p{stage}.')
    extra = list(range(stages[-1], stages[-1] + top_levels))[::-1] if fine.EXTRA_LEVELS else []

    def make(stage: int) -> Tuple[str, nn.Module]:
        kernel = kernels[stage - 2] if stage - 2 < len(kernels) else 1  # docs/necks.md
        return f'fpn_fine{stage}', FINE(
            channels, kernel_size=int(kernel), ratio=fine.RATIO, head_dim=fine.HEAD_DIM,
            qkv_bias=fine.QKV_BIAS, pool_type=fine.POOL_TYPE, zero_init_out=fine.ZERO_INIT_OUT)
    return lambda: FPNFusions('fine', lateral=[make(s) for s in lows], top=[make(s) for s in extra])


def build_fusion_fpn(bottom_up: Backbone, cfg, top_block: Optional[nn.Module] = None) -> FusionFPN:
    """A :class:`FusionFPN` on ``bottom_up`` from ``MODEL.FPN.*``; ``top_block`` None: ``LastLevelMaxPool``."""
    shapes = bottom_up.output_shape()
    missing = [f for f in cfg.MODEL.FPN.IN_FEATURES if f not in shapes]
    if missing:
        raise ValueError(
            f'MODEL.FPN.IN_FEATURES={list(cfg.MODEL.FPN.IN_FEATURES)} asks for {missing}, which the bottom-up '
            f'backbone does not output (it has {list(shapes)}).' + (
                ' A single-scale backbone takes MODEL.BACKBONE.NAME build_timm_simple_fpn_backbone.'
                if len(shapes) == 1 else ''))
    top_block = LastLevelMaxPool() if top_block is None else top_block
    fusions = fpn_fusions(cfg, [shapes[f].stride for f in cfg.MODEL.FPN.IN_FEATURES], top_block.num_levels)
    return FusionFPN(bottom_up, cfg.MODEL.FPN.IN_FEATURES, out_channels=cfg.MODEL.FPN.OUT_CHANNELS,
                     norm=cfg.MODEL.FPN.NORM, top_block=top_block, fuse_type=cfg.MODEL.FPN.FUSE_TYPE, fusions=fusions)


def build_fusion_simple_fpn(net: Backbone, cfg) -> FusionSimpleFeaturePyramid:
    """A :class:`FusionSimpleFeaturePyramid` (P2-P6) on the last stride-16 output of ``net``;
    ``MODEL.FPN.NORM`` ``''`` means ViTDet's ``'LN'`` (detectron2's pyramid has no norm-free variant)."""
    if cfg.MODEL.FPN.get('FUSION') == 'fine':
        raise ValueError("MODEL.FPN.FUSION='fine': the simple feature pyramid of single-scale backbones takes "
                         "'sum' or 'asff'. FINE aligns a lateral map to the coarser map of a top-down pathway, "
                         "which this pyramid does not have (docs/necks.md).")
    shapes = net.output_shape()
    at_16 = [name for name, shape in shapes.items() if shape.stride == 16]
    if not at_16:
        raise ValueError(f'The simple feature pyramid builds P2-P5 from a stride-16 map, and the backbone has '
                         f'none ({ {k: v.stride for k, v in shapes.items()} }); use build_timm_fpn_backbone '
                         f'for multi-scale backbones.')
    return FusionSimpleFeaturePyramid(net, at_16[-1], cfg.MODEL.FPN.OUT_CHANNELS, top_block=LastLevelMaxPool(),
                                      norm=cfg.MODEL.FPN.NORM or 'LN', fusions=fpn_fusions(cfg, [4, 8, 16, 32]))


@BACKBONE_REGISTRY.register()
def build_resnet_fusion_fpn_backbone(cfg, input_shape: ShapeSpec) -> FusionFPN:
    """detectron2 ResNet + FPN (``MODEL.FPN.FUSION``), P2-P6 (R-CNNs, Panoptic FPN)."""
    return build_fusion_fpn(build_resnet_backbone(cfg, input_shape), cfg)


@BACKBONE_REGISTRY.register()
def build_retinanet_resnet_fusion_fpn_backbone(cfg, input_shape: ShapeSpec) -> FusionFPN:
    """detectron2 ResNet + FPN with P6-P7 from ``res5`` (RetinaNet, as detectron2's own builder)."""
    bottom_up = build_resnet_backbone(cfg, input_shape)
    top = LastLevelP6P7(bottom_up.output_shape()['res5'].channels, cfg.MODEL.FPN.OUT_CHANNELS)
    return build_fusion_fpn(bottom_up, cfg, top)


@BACKBONE_REGISTRY.register()
def build_timm_fpn_backbone(cfg, input_shape: ShapeSpec) -> FusionFPN:
    """timm model + FPN (``MODEL.FPN.FUSION``), P2-P6 (R-CNNs, Panoptic FPN)."""
    return build_fusion_fpn(TimmBackbone.from_config(cfg, input_shape), cfg)


@BACKBONE_REGISTRY.register()
def build_retinanet_timm_fpn_backbone(cfg, input_shape: ShapeSpec) -> FusionFPN:
    """timm model + FPN with P6-P7 from ``res5`` (RetinaNet)."""
    bottom_up = TimmBackbone.from_config(cfg, input_shape)
    top = LastLevelP6P7(bottom_up.output_shape()['res5'].channels, cfg.MODEL.FPN.OUT_CHANNELS)
    return build_fusion_fpn(bottom_up, cfg, top)


@BACKBONE_REGISTRY.register()
def build_timm_simple_fpn_backbone(cfg, input_shape: ShapeSpec) -> FusionSimpleFeaturePyramid:
    """Single-scale timm model (ViT, DeiT, EVA) + ViTDet's pyramid, P2-P6."""
    return build_fusion_simple_fpn(TimmBackbone.from_config(cfg, input_shape), cfg)
