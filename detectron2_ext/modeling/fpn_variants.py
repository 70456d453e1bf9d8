"""FPN variants for detectron2: FINE-FPN and ASFF-FPN.

:class:`FusionFPN` is detectron2's :class:`~detectron2.modeling.backbone.FPN` with one more
argument, ``fusion``:

* ``'sum'``: detectron2's FPN unchanged.
* ``'fine'``: FINE (Lee et al., Eq. 3) aligns each lateral feature ``F_low`` to the top-down feature
  ``F_high`` of the level above *before* they are summed: ``P_l = FINE(L_l, T_{l+1}) + Up(T_{l+1})``,
  with ``T_{l+1}`` the top-down merged map (pre output conv), which the paper's recursion makes the
  high-level input of the next stage (Sec. 3). One FINE per top-down fusion: three on R50-FPN
  (P2-P5), two on RetinaNet's P3-P5.

  ``fine_extra_levels=True`` (``MODEL.FINE.EXTRA_LEVELS``, on in our R50 paper configs) adds one
  FINE per adjacent pair among the last FPN level and the ``top_block`` levels, so that every
  output level but the coarsest is modulated by its upper neighbour: ``P5 <- FINE(P5, P6)`` on
  the R-CNN pyramid, ``P6 <- FINE(P6, P7)`` then ``P5 <- FINE(P5, P6)`` on RetinaNet's. That is
  four modules on both (4 x (4C^2 + 4C) = 1.053M at C = 256), which is what the paper's parameter
  counts imply (+1.0M Faster R-CNN and RetinaNet, +1.1M Mask R-CNN, Tables 1 and 7; RetinaNet and
  FCOS have only two top-down fusions, so their +1.0M cannot come from Eq. 3 alone). The paper
  does not say where these modules sit; our reading and its order:

  - the top block runs first, on the unmodulated maps, as in detectron2 (``p6`` is the max pool of
    the FPN's ``p5``; RetinaNet's ``p6``/``p7`` come from ``res5``), so the extra FINEs change no
    top-block input and keep its state-dict keys;
  - pairs are then visited from the top down and each modulated map is the context of the next
    pair below (``P5`` sees the modulated ``P6``), as Sec. 3 feeds each fused map to the next
    stage as ``F_high``;
  - FINE acts on the output maps (after the 3x3 output conv): these levels have no lateral and no
    top-down sum to act before;
  - AATS kernel ``k = 1`` (``F_low`` pooled by ``r = 2``): at 800x1333 ``p5`` is 25x42, so the
    attention already runs on 13x21 tokens; ``k = 1`` is also the paper's choice at its coarsest
    fusion. ``fine_pool_kernels`` entries for these levels, if given, override it.
* ``'asff'``: ASFF (Liu et al.) re-fuses the FPN outputs (after the 3x3 output convs) of all
  ``in_features`` levels; ``top_block`` (P6 / P6-P7) then runs as in detectron2.

It subclasses detectron2's FPN, so the lateral/output convolutions keep detectron2's state-dict
keys (``fpn_lateral{s}``, ``fpn_output{s}``, ``top_block.*``) and an FPN checkpoint loads into a
FINE/ASFF-FPN (the new modules, ``fpn_fine{s}`` and ``fpn_asff``, are then reported as missing;
``fpn_fine{s}`` is the FINE whose ``F_low`` is ``p{s}``, so the extra-level ones are
``fpn_fine5`` and, on RetinaNet, ``fpn_fine6``).
The output contract (``p2..p6`` or ``p3..p7``, ``output_shape``, ``size_divisibility``,
``padding_constraints``) is the parent's.
:class:`FusionFPN` traces at any size and scripts as detectron2's FPN does (its
``__prepare_scriptable__`` turns the module lists into ``nn.ModuleList``s; docs/detectron2.md,
"Deploying detectors").

:class:`FusionSimpleFeaturePyramid` is detectron2's ViTDet ``SimpleFeaturePyramid`` with the same
``fusion`` argument for single-scale backbones: ``'sum'`` (ViTDet's pyramid unchanged) or
``'asff'`` (ASFF on its P2-P5). FINE does not apply there: it aligns a lateral map to the
upsampled coarser map before a top-down sum, and a simple pyramid has no top-down pathway (all
levels come from one map); ``'fine'`` is refused with that reason (docs/necks.md).

Both carry the bottom-up network's ``size_divisibility`` and ``padding_constraints`` (window
multiples, the square size of fixed-size models) into their own, so detectron2 pads each batch to
what the backbone needs.

Builders registered in ``BACKBONE_REGISTRY`` for detectron2's ResNet, one per top block, with the
neck from ``MODEL.FPN.FUSION``: ``build_resnet_fusion_fpn_backbone`` (``LastLevelMaxPool``,
R-CNNs and Panoptic FPN) and ``build_retinanet_resnet_fusion_fpn_backbone`` (``LastLevelP6P7``
from ``res5``). Any other bottom-up :class:`Backbone` (e.g. the timm adapter) goes through
:func:`build_fusion_fpn` / :func:`build_fusion_simple_fpn`. Design notes: docs/necks.md.
"""
import copy
import math
from typing import Dict, List, Optional

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

__all__ = [
    'FINE', 'ASFF', 'FusionFPN', 'FusionSimpleFeaturePyramid', 'FUSIONS', 'build_fusion_fpn',
    'build_fusion_simple_fpn', 'retinanet_top_block', 'build_resnet_fusion_fpn_backbone',
    'build_retinanet_resnet_fusion_fpn_backbone',
]

FUSIONS = ('sum', 'fine', 'asff')


class _BottomUpPadding:
    """``size_divisibility`` and ``padding_constraints`` that meet both the pyramid's own need
    (its coarsest stride, detectron2's) and the bottom-up network's (window multiples, square
    size), which detectron2's FPN and SimpleFeaturePyramid drop."""

    def _bottom_up_network(self) -> Backbone:
        return self.bottom_up

    def _record_padding(self) -> None:
        """Fix the joint padding needs at construction: the properties below then read two ints,
        which TorchScript compiles (detectron2's R-CNN reads them in its scripted forward)."""
        below = self._bottom_up_network()
        self._joint_size_divisibility = math.lcm(self._size_divisibility,
                                                 below.size_divisibility or 1)
        self._joint_square_size = max(self._square_pad,
                                      (below.padding_constraints or {}).get('square_size', 0))

    @property
    def size_divisibility(self) -> int:
        return self._joint_size_divisibility

    @property
    def padding_constraints(self) -> Dict[str, int]:
        return {'size_divisibility': self._joint_size_divisibility,
                'square_size': self._joint_square_size}


class _NoAlignment(nn.Module):
    """The lateral as it is: the place of a FINE in fusions that have none (no parameters)."""

    def forward(self, lateral: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        return lateral


class FusionFPN(_BottomUpPadding, FPN):
    """detectron2's FPN with FINE before each top-down fusion (and optionally on the top-block
    levels) or ASFF on its outputs. Scripts (``torch.jit.script``) as detectron2's FPN does."""

    def __init__(
        self,
        bottom_up: Backbone,
        in_features: List[str],
        out_channels: int,
        norm: str = '',
        top_block: Optional[nn.Module] = None,
        fuse_type: str = 'sum',
        square_pad: int = 0,
        fusion: str = 'sum',
        fine_pool_kernels: Optional[List[int]] = None,
        fine_ratio: int = 2,
        fine_head_dim: int = 16,
        fine_pool_type: str = 'avg',
        fine_qkv_bias: bool = True,
        fine_zero_init_out: bool = False,
        fine_extra_levels: bool = False,
        asff_norm: str = '',
        asff_upsample_mode: str = 'nearest',
    ):
        """
        Args:
            bottom_up, in_features, out_channels, norm, top_block, fuse_type, square_pad: as in
                detectron2's :class:`FPN` (``fuse_type`` 'sum' or 'avg' still combines the aligned
                lateral and the top-down map).
            fusion: ``'sum'`` (plain FPN), ``'fine'`` or ``'asff'``.
            fine_pool_kernels: AATS kernel ``k`` per FINE, indexed by the output level it
                modulates: entry ``i`` is for ``p{i+2}`` (``F_low`` at stride ``2**(i+2)``).
                Default ``[8, 2, 1]``: the paper's ``k = 1`` at stride 16 and ``k = 2`` at stride 8,
                ``k = 8`` at detectron2's extra stride-4 fusion (see ``_add_neck_config``). Levels
                past the end of the list that only ``fine_extra_levels`` modulates use ``k = 1``.
            fine_ratio: alignment-aware sampling ratio ``r`` (paper: 2).
            fine_head_dim: attention head dimension (paper: 16).
            fine_pool_type: ``'avg'`` (paper) or ``'max'``.
            fine_qkv_bias: biases in FINE's four projections.
            fine_zero_init_out: start FINE as the identity (``W_O = 0``).
            fine_extra_levels: also modulate each of the last FPN level and the ``top_block``
                levels but the coarsest by FINE with the level above as context (see the module
                docstring). Needs a ``top_block``.
            asff_norm: detectron2 norm name after ASFF's resize convs (``''``: none).
            asff_upsample_mode: ASFF interpolation, ``'nearest'`` or ``'bilinear'``.
        """
        if fusion not in FUSIONS:
            raise ValueError(f'FusionFPN: fusion must be one of {FUSIONS}, got {fusion!r}')
        super().__init__(bottom_up, in_features, out_channels, norm=norm, top_block=top_block,
                         fuse_type=fuse_type, square_pad=square_pad)
        self._record_padding()
        self.fusion = fusion
        strides = [bottom_up.output_shape()[f].stride for f in in_features]
        # Low-level strides of the top-down fusions, in the order forward() visits them (coarse
        # to fine): the fusion making p{s} has F_low at stride 2**s.
        self._fine_stages = [int(math.log2(s)) for s in strides[:-1]][::-1]
        self.fine_modules: Optional[List[FINE]] = None
        self.fine_extra_modules: List[FINE] = []
        # one aligner per lateral, coarse to fine, so that forward() zips it with the convs as
        # detectron2's FPN does (TorchScript indexes module lists by literals only); the coarsest
        # lateral has no context above it
        self._aligners: List[nn.Module] = [_NoAlignment() for _ in in_features]
        self.fpn_asff: Optional[ASFF] = None
        if fusion == 'fine':
            kernels = list(fine_pool_kernels if fine_pool_kernels is not None else [8, 2, 1])

            def add_fine(stage: int, kernel: int) -> FINE:
                fine = FINE(out_channels, kernel_size=int(kernel), ratio=fine_ratio,
                            head_dim=fine_head_dim, qkv_bias=fine_qkv_bias,
                            pool_type=fine_pool_type, zero_init_out=fine_zero_init_out)
                self.add_module(f'fpn_fine{stage}', fine)
                return fine

            # plain lists, like the parent's lateral_convs: the modules are registered under
            # readable names (fpn_fine{s} modulates p{s}), and the lists fix the order of forward()
            self.fine_modules = []
            for stage in self._fine_stages:
                if not 0 <= stage - 2 < len(kernels):
                    raise ValueError(
                        f'MODEL.FINE.POOL_KERNELS={kernels} has no entry for the fusion producing '
                        f'p{stage} (entry i is for p{{i+2}}); give one kernel per level p2..p{stage}.')
                self.fine_modules.append(add_fine(stage, kernels[stage - 2]))
            self._aligners = [_NoAlignment()] + list(self.fine_modules)
            if fine_extra_levels:
                if top_block is None:
                    raise ValueError(
                        'FusionFPN: fine_extra_levels (MODEL.FINE.EXTRA_LEVELS) modulates the '
                        'top_block levels, but there is no top_block; pass one or turn it off.')
                # F_low of each extra pair, coarse to fine: the top-block levels but the last,
                # then the last FPN level
                lows = self._out_features[len(in_features) - 1:-1][::-1]
                for stage in (int(math.log2(self._out_feature_strides[f])) for f in lows):
                    kernel = kernels[stage - 2] if stage - 2 < len(kernels) else 1
                    self.fine_extra_modules.append(add_fine(stage, kernel))
        elif fusion == 'asff':
            norm_layer = (lambda c: get_norm(asff_norm, c)) if asff_norm else None
            self.fpn_asff = ASFF([out_channels] * len(in_features),
                                 upsample_mode=asff_upsample_mode, norm_layer=norm_layer)

    def __prepare_scriptable__(self) -> 'FusionFPN':
        """A copy for ``torch.jit.script`` (torch calls this hook), made the way detectron2.export
        prepares its FPN: the module lists become ``nn.ModuleList`` (TorchScript iterates those
        only) and the ``fpn_*`` aliases of their modules go, so the scripted state-dict keys are
        ``lateral_convs.{i}``, ``output_convs.{i}``, ``_aligners.{i}``, ``fine_extra_modules.{i}``
        (as detectron2's scripted FPN renames its own). ``fpn_asff`` stays."""
        ret = copy.deepcopy(self)
        for name in ('lateral_convs', 'output_convs', '_aligners', 'fine_extra_modules'):
            setattr(ret, name, nn.ModuleList(getattr(ret, name)))
        ret.fine_modules = None  # forward() reads the FINEs through _aligners
        for name, _ in self.named_children():
            if name.startswith(('fpn_lateral', 'fpn_output', 'fpn_fine')):
                delattr(ret, name)
        return ret

    def top_down(self, bottom_up_features: Dict[str, torch.Tensor]) -> List[torch.Tensor]:
        """FPN outputs of the ``in_features`` levels, finest first, with FINE or ASFF applied."""
        prev_features = bottom_up_features[self.in_features[-1]]
        results: List[torch.Tensor] = []
        for idx, (lateral_conv, align, output_conv) in enumerate(
                zip(self.lateral_convs, self._aligners, self.output_convs)):
            lateral = lateral_conv(bottom_up_features[self.in_features[-idx - 1]])
            if idx > 0:
                lateral = align(lateral, prev_features)  # Eq. 3 (FINE), or the lateral as is
                top_down = F.interpolate(prev_features, scale_factor=2.0, mode='nearest')
                lateral = lateral + top_down
                if self._fuse_type == 'avg':
                    lateral = lateral / 2
            prev_features = lateral
            results.insert(0, output_conv(prev_features))
        if self.fpn_asff is not None:
            results = self.fpn_asff(results)
        return results

    def pyramid(self, bottom_up_features: Dict[str, torch.Tensor]) -> List[torch.Tensor]:
        """All output maps, finest first: :meth:`top_down`, the top block, then the extra FINEs."""
        results = self.top_down(bottom_up_features)
        if self.top_block is not None:
            if self.top_block.in_feature in bottom_up_features:
                top_block_in_feature = bottom_up_features[self.top_block.in_feature]
            else:
                top_block_in_feature = results[self._out_features.index(self.top_block.in_feature)]
            results.extend(self.top_block(top_block_in_feature))
        # top-down over the pairs (P6, P7) then (P5, P6): the modulated map is the next context
        for offset, fine in enumerate(self.fine_extra_modules):
            low = len(results) - 2 - offset
            results[low] = fine(results[low], results[low + 1])
        return results

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Same contract as :meth:`FPN.forward`: ``{'p2': ..., ..., 'p6': ...}``."""
        results = self.pyramid(self.bottom_up(x))
        assert len(self._out_features) == len(results)
        return {f: res for f, res in zip(self._out_features, results)}


class FusionSimpleFeaturePyramid(_BottomUpPadding, SimpleFeaturePyramid):
    """detectron2's ViTDet pyramid (P2-P5 from one stride-16 map, then the top block), with ASFF
    on P2-P5 for ``fusion='asff'`` (see the module docstring)."""

    def __init__(
        self,
        net: Backbone,
        in_feature: str,
        out_channels: int,
        scale_factors: List[float] = (4.0, 2.0, 1.0, 0.5),
        top_block: Optional[nn.Module] = None,
        norm: str = 'LN',
        square_pad: int = 0,
        fusion: str = 'sum',
        asff_norm: str = '',
        asff_upsample_mode: str = 'nearest',
    ):
        """
        Args:
            net, in_feature, out_channels, scale_factors, top_block, norm, square_pad: as in
                detectron2's :class:`SimpleFeaturePyramid`.
            fusion: ``'sum'`` (ViTDet's pyramid) or ``'asff'``; ``'fine'`` has no top-down
                fusion to act on here and is refused.
            asff_norm, asff_upsample_mode: as in :class:`FusionFPN`.
        """
        if fusion not in ('sum', 'asff'):
            raise ValueError(
                f"MODEL.FPN.FUSION={fusion!r}: the simple feature pyramid of single-scale "
                f"backbones takes 'sum' or 'asff'. FINE aligns a lateral map to the coarser map "
                f"of a top-down pathway, which this pyramid does not have (docs/necks.md).")
        super().__init__(net, in_feature, out_channels, list(scale_factors), top_block=top_block,
                         norm=norm, square_pad=square_pad)
        self._record_padding()
        self.fusion = fusion
        self.fpn_asff: Optional[ASFF] = None
        if fusion == 'asff':
            norm_layer = (lambda c: get_norm(asff_norm, c)) if asff_norm else None
            self.fpn_asff = ASFF([out_channels] * len(self.stages),
                                 upsample_mode=asff_upsample_mode, norm_layer=norm_layer)

    def _bottom_up_network(self) -> Backbone:
        return self.net

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Same contract as :meth:`SimpleFeaturePyramid.forward`: ``{'p2': ..., ..., 'p6': ...}``."""
        features = self.net(x)[self.in_feature]
        results = [stage(features) for stage in self.stages]
        if self.fpn_asff is not None:
            results = self.fpn_asff(results)
        if self.top_block is not None:
            results.extend(self.top_block(results[self._out_features.index(self.top_block.in_feature)]))
        assert len(self._out_features) == len(results)
        return dict(zip(self._out_features, results))


def _check_neck_keys(cfg) -> None:
    if 'FINE' not in cfg.MODEL or 'ASFF' not in cfg.MODEL or 'FUSION' not in cfg.MODEL.FPN:
        raise KeyError(
            'The config lacks the MODEL.FINE / MODEL.ASFF / MODEL.FPN.FUSION keys: call '
            'detectron2_ext.add_maformer_zoo_config(cfg) on get_cfg() before merge_from_file.')


def build_fusion_fpn(bottom_up: Backbone, cfg, top_block: Optional[nn.Module] = None) -> FusionFPN:
    """A :class:`FusionFPN` on ``bottom_up`` from ``MODEL.FPN.*`` (the neck: ``MODEL.FPN.FUSION``),
    ``MODEL.FINE.*`` and ``MODEL.ASFF.*``.

    Args:
        bottom_up: any detectron2 :class:`Backbone` producing ``MODEL.FPN.IN_FEATURES``.
        cfg: a detectron2 config with :func:`detectron2_ext.add_maformer_zoo_config` applied.
        top_block: extra levels; ``None`` means ``LastLevelMaxPool`` (P6), as in R-CNN configs.
    """
    _check_neck_keys(cfg)
    missing = [f for f in cfg.MODEL.FPN.IN_FEATURES if f not in bottom_up.output_shape()]
    if missing:
        raise ValueError(
            f'MODEL.FPN.IN_FEATURES={list(cfg.MODEL.FPN.IN_FEATURES)} asks for {missing}, which '
            f'the bottom-up backbone does not output (it has {list(bottom_up.output_shape())}).'
            + (' A single-scale backbone takes MODEL.BACKBONE.NAME build_timm_simple_fpn_backbone.'
               if len(bottom_up.output_shape()) == 1 else ''))
    fine, asff = cfg.MODEL.FINE, cfg.MODEL.ASFF
    return FusionFPN(
        bottom_up=bottom_up,
        in_features=cfg.MODEL.FPN.IN_FEATURES,
        out_channels=cfg.MODEL.FPN.OUT_CHANNELS,
        norm=cfg.MODEL.FPN.NORM,
        top_block=LastLevelMaxPool() if top_block is None else top_block,
        fuse_type=cfg.MODEL.FPN.FUSE_TYPE,
        fusion=cfg.MODEL.FPN.FUSION,
        fine_pool_kernels=list(fine.POOL_KERNELS),
        fine_ratio=fine.RATIO,
        fine_head_dim=fine.HEAD_DIM,
        fine_pool_type=fine.POOL_TYPE,
        fine_qkv_bias=fine.QKV_BIAS,
        fine_zero_init_out=fine.ZERO_INIT_OUT,
        fine_extra_levels=fine.EXTRA_LEVELS,
        asff_norm=asff.NORM,
        asff_upsample_mode=asff.UPSAMPLE_MODE,
    )


def build_fusion_simple_fpn(net: Backbone, cfg) -> FusionSimpleFeaturePyramid:
    """A :class:`FusionSimpleFeaturePyramid` (P2-P6) on the stride-16 output of ``net`` (its last
    one at that stride), from ``MODEL.FPN.OUT_CHANNELS`` / ``NORM`` / ``FUSION`` and
    ``MODEL.ASFF.*``. ``MODEL.FPN.NORM`` ``''`` (detectron2's default) means ViTDet's ``'LN'``:
    detectron2's pyramid puts the norm between its two stride-4 deconvolutions and has no
    norm-free variant there."""
    _check_neck_keys(cfg)
    shapes = net.output_shape()
    at_16 = [name for name, shape in shapes.items() if shape.stride == 16]
    if not at_16:
        raise ValueError(
            f'The simple feature pyramid builds P2-P5 from a stride-16 map, and the backbone has '
            f'none ({ {k: v.stride for k, v in shapes.items()} }); use build_timm_fpn_backbone '
            f'for multi-scale backbones.')
    return FusionSimpleFeaturePyramid(
        net, at_16[-1], cfg.MODEL.FPN.OUT_CHANNELS, scale_factors=(4.0, 2.0, 1.0, 0.5),
        top_block=LastLevelMaxPool(), norm=cfg.MODEL.FPN.NORM or 'LN', fusion=cfg.MODEL.FPN.FUSION,
        asff_norm=cfg.MODEL.ASFF.NORM, asff_upsample_mode=cfg.MODEL.ASFF.UPSAMPLE_MODE)


def retinanet_top_block(cfg, bottom_up: Backbone) -> LastLevelP6P7:
    """RetinaNet's P6-P7 from ``res5``, as detectron2's ``build_retinanet_resnet_fpn_backbone``."""
    in_channels_p6p7 = bottom_up.output_shape()['res5'].channels
    return LastLevelP6P7(in_channels_p6p7, cfg.MODEL.FPN.OUT_CHANNELS)


@BACKBONE_REGISTRY.register()
def build_resnet_fusion_fpn_backbone(cfg, input_shape: ShapeSpec) -> FusionFPN:
    """detectron2 ResNet + FPN (``MODEL.FPN.FUSION``) with P6 by max pooling (Faster / Mask
    R-CNN, Panoptic FPN)."""
    return build_fusion_fpn(build_resnet_backbone(cfg, input_shape), cfg)


@BACKBONE_REGISTRY.register()
def build_retinanet_resnet_fusion_fpn_backbone(cfg, input_shape: ShapeSpec) -> FusionFPN:
    """detectron2 ResNet + FPN (``MODEL.FPN.FUSION``) with P6-P7 from ``res5`` (RetinaNet)."""
    bottom_up = build_resnet_backbone(cfg, input_shape)
    return build_fusion_fpn(bottom_up, cfg, retinanet_top_block(cfg, bottom_up))
