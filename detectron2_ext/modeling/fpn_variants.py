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

Builders registered in ``BACKBONE_REGISTRY`` for detectron2's ResNet:
``build_resnet_{fine,asff,fusion}_fpn_backbone`` (``LastLevelMaxPool``, R-CNNs and Panoptic FPN)
and ``build_retinanet_resnet_{fine,asff,fusion}_fpn_backbone`` (``LastLevelP6P7`` from ``res5``).
The ``fusion`` builders read ``MODEL.FPN.FUSION``. Any other bottom-up :class:`Backbone` (e.g. the
timm adapters) goes through :func:`build_fusion_fpn`.
"""
import math
from typing import Dict, List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from detectron2.layers import ShapeSpec, get_norm
from detectron2.modeling.backbone import BACKBONE_REGISTRY, Backbone, FPN
from detectron2.modeling.backbone.fpn import LastLevelMaxPool, LastLevelP6P7
from detectron2.modeling.backbone.resnet import build_resnet_backbone

from maformer_zoo.layers.asff import ASFF
from maformer_zoo.layers.fine import FINE

__all__ = [
    'FINE', 'ASFF', 'FusionFPN', 'FUSIONS', 'build_fusion_fpn',
    'build_resnet_fine_fpn_backbone', 'build_resnet_asff_fpn_backbone',
    'build_resnet_fusion_fpn_backbone', 'build_retinanet_resnet_fine_fpn_backbone',
    'build_retinanet_resnet_asff_fpn_backbone', 'build_retinanet_resnet_fusion_fpn_backbone',
]

FUSIONS = ('sum', 'fine', 'asff')


class FusionFPN(FPN):
    """detectron2's FPN with FINE before each top-down fusion (and optionally on the top-block
    levels) or ASFF on its outputs."""

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
        self.fusion = fusion
        strides = [bottom_up.output_shape()[f].stride for f in in_features]
        # Low-level strides of the top-down fusions, in the order forward() visits them (coarse
        # to fine): the fusion making p{s} has F_low at stride 2**s.
        self._fine_stages = [int(math.log2(s)) for s in strides[:-1]][::-1]
        self.fine_modules: Optional[List[FINE]] = None
        self.fine_extra_modules: List[FINE] = []
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

    def top_down(self, bottom_up_features: Dict[str, torch.Tensor]) -> List[torch.Tensor]:
        """FPN outputs of the ``in_features`` levels, finest first, with FINE or ASFF applied."""
        prev_features = self.lateral_convs[0](bottom_up_features[self.in_features[-1]])
        results = [self.output_convs[0](prev_features)]
        for idx in range(1, len(self.lateral_convs)):
            lateral = self.lateral_convs[idx](bottom_up_features[self.in_features[-idx - 1]])
            if self.fine_modules is not None:
                lateral = self.fine_modules[idx - 1](lateral, prev_features)  # Eq. 3
            top_down = F.interpolate(prev_features, scale_factor=2.0, mode='nearest')
            prev_features = lateral + top_down
            if self._fuse_type == 'avg':
                prev_features = prev_features / 2
            results.insert(0, self.output_convs[idx](prev_features))
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
        return dict(zip(self._out_features, results))


def build_fusion_fpn(bottom_up: Backbone, cfg, fusion: str, top_block: Optional[nn.Module] = None
                     ) -> FusionFPN:
    """A :class:`FusionFPN` on ``bottom_up`` from ``MODEL.FPN.*``, ``MODEL.FINE.*``, ``MODEL.ASFF.*``.

    Args:
        bottom_up: any detectron2 :class:`Backbone` producing ``MODEL.FPN.IN_FEATURES``.
        cfg: a detectron2 config with :func:`detectron2_ext.add_maformer_zoo_config` applied.
        fusion: ``'sum'``, ``'fine'`` or ``'asff'``.
        top_block: extra levels; ``None`` means ``LastLevelMaxPool`` (P6), as in R-CNN configs.
    """
    if 'FINE' not in cfg.MODEL or 'ASFF' not in cfg.MODEL or 'FUSION' not in cfg.MODEL.FPN:
        raise KeyError(
            'The config lacks the MODEL.FINE / MODEL.ASFF / MODEL.FPN.FUSION keys: call '
            'detectron2_ext.add_maformer_zoo_config(cfg) on get_cfg() before merge_from_file.')
    missing = [f for f in cfg.MODEL.FPN.IN_FEATURES if f not in bottom_up.output_shape()]
    if missing:
        raise ValueError(
            f'MODEL.FPN.IN_FEATURES={list(cfg.MODEL.FPN.IN_FEATURES)} asks for {missing}, which '
            f'the bottom-up backbone does not output (it has {list(bottom_up.output_shape())}).')
    fine, asff = cfg.MODEL.FINE, cfg.MODEL.ASFF
    return FusionFPN(
        bottom_up=bottom_up,
        in_features=cfg.MODEL.FPN.IN_FEATURES,
        out_channels=cfg.MODEL.FPN.OUT_CHANNELS,
        norm=cfg.MODEL.FPN.NORM,
        top_block=LastLevelMaxPool() if top_block is None else top_block,
        fuse_type=cfg.MODEL.FPN.FUSE_TYPE,
        fusion=fusion,
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


def _forced_fusion(cfg, fusion: str) -> str:
    """The fusion of a ``*_fine_*`` / ``*_asff_*`` builder; a conflicting MODEL.FPN.FUSION is an error."""
    configured = cfg.MODEL.FPN.get('FUSION', 'sum')
    if configured not in ('sum', fusion):
        raise ValueError(
            f"MODEL.FPN.FUSION={configured!r} conflicts with MODEL.BACKBONE.NAME="
            f"{cfg.MODEL.BACKBONE.NAME!r}, which builds a '{fusion}' FPN. Use "
            f"build_resnet_fusion_fpn_backbone to take the fusion from MODEL.FPN.FUSION.")
    return fusion


def _retinanet_top_block(cfg, bottom_up: Backbone) -> LastLevelP6P7:
    in_channels_p6p7 = bottom_up.output_shape()['res5'].channels
    return LastLevelP6P7(in_channels_p6p7, cfg.MODEL.FPN.OUT_CHANNELS)


@BACKBONE_REGISTRY.register()
def build_resnet_fine_fpn_backbone(cfg, input_shape: ShapeSpec) -> FusionFPN:
    """detectron2 ResNet + FINE-FPN with P6 by max pooling (Faster/Mask R-CNN, Panoptic FPN)."""
    return build_fusion_fpn(build_resnet_backbone(cfg, input_shape), cfg, _forced_fusion(cfg, 'fine'))


@BACKBONE_REGISTRY.register()
def build_resnet_asff_fpn_backbone(cfg, input_shape: ShapeSpec) -> FusionFPN:
    """detectron2 ResNet + ASFF-FPN with P6 by max pooling."""
    return build_fusion_fpn(build_resnet_backbone(cfg, input_shape), cfg, _forced_fusion(cfg, 'asff'))


@BACKBONE_REGISTRY.register()
def build_resnet_fusion_fpn_backbone(cfg, input_shape: ShapeSpec) -> FusionFPN:
    """detectron2 ResNet + FPN whose fusion is ``MODEL.FPN.FUSION``."""
    return build_fusion_fpn(build_resnet_backbone(cfg, input_shape), cfg, cfg.MODEL.FPN.FUSION)


@BACKBONE_REGISTRY.register()
def build_retinanet_resnet_fine_fpn_backbone(cfg, input_shape: ShapeSpec) -> FusionFPN:
    """detectron2 ResNet + FINE-FPN with P6-P7 from ``res5`` (RetinaNet)."""
    bottom_up = build_resnet_backbone(cfg, input_shape)
    return build_fusion_fpn(bottom_up, cfg, _forced_fusion(cfg, 'fine'),
                            _retinanet_top_block(cfg, bottom_up))


@BACKBONE_REGISTRY.register()
def build_retinanet_resnet_asff_fpn_backbone(cfg, input_shape: ShapeSpec) -> FusionFPN:
    """detectron2 ResNet + ASFF-FPN with P6-P7 from ``res5`` (RetinaNet)."""
    bottom_up = build_resnet_backbone(cfg, input_shape)
    return build_fusion_fpn(bottom_up, cfg, _forced_fusion(cfg, 'asff'),
                            _retinanet_top_block(cfg, bottom_up))


@BACKBONE_REGISTRY.register()
def build_retinanet_resnet_fusion_fpn_backbone(cfg, input_shape: ShapeSpec) -> FusionFPN:
    """detectron2 ResNet + FPN (fusion from ``MODEL.FPN.FUSION``) with P6-P7 from ``res5``."""
    bottom_up = build_resnet_backbone(cfg, input_shape)
    return build_fusion_fpn(bottom_up, cfg, cfg.MODEL.FPN.FUSION, _retinanet_top_block(cfg, bottom_up))
