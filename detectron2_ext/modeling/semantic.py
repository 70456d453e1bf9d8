"""Semantic segmentation heads as mmsegmentation builds them, for detectron2's ``SemanticSegmentor``.

:class:`UPerNetHead`: mmseg's ``UPerHead`` (Xiao et al., UPerNet, ECCV 2018) and its auxiliary FCN head, with
``MODEL.FPN.FUSION``'s FINE / ASFF in place of the top-down sums. :class:`SemanticFPNHead`: detectron2's
``SemSegFPNHead`` (Kirillov et al.) with mmseg's dropout. Design and differences: docs/segmentation.md#heads.
"""
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from detectron2.config import configurable
from detectron2.layers import Conv2d, ShapeSpec, get_norm
from detectron2.modeling import SEM_SEG_HEADS_REGISTRY
from detectron2.modeling.meta_arch.semantic_seg import SemSegFPNHead
import fvcore.nn.weight_init as weight_init

from maformer_zoo.layers.mscsa import pool_to

from .fpn_variants import FPNFusions, fpn_fusions

__all__ = ['PyramidPoolingModule', 'FCNAuxHead', 'UPerNetHead', 'SemanticFPNHead']


def _conv_norm_relu(in_channels: int, out_channels: int, kernel_size: int, norm: str) -> Conv2d:
    """mmcv's ``ConvModule``: conv (no bias under a norm), norm, ReLU; MSRA init as mmcv's."""
    conv = Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=not norm,
                  norm=get_norm(norm, out_channels), activation=F.relu)
    weight_init.c2_msra_fill(conv)
    return conv


def _classifier(in_channels: int, num_classes: int) -> Conv2d:
    """mmseg's ``conv_seg``: 1x1 conv with bias, weights N(0, 0.01)."""
    conv = Conv2d(in_channels, num_classes, kernel_size=1)
    nn.init.normal_(conv.weight, 0, 0.01)
    nn.init.zeros_(conv.bias)
    return conv


def _upsample(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    return F.interpolate(x, size=tuple(size), mode='bilinear', align_corners=False)


def _seg_loss(logits: torch.Tensor, targets: torch.Tensor, ignore_value: int) -> torch.Tensor:
    """Cross-entropy of logits upsampled to the label size, mean over the labelled pixels."""
    logits = _upsample(logits, targets.shape[-2:])
    return F.cross_entropy(logits.float(), targets, reduction='mean', ignore_index=ignore_value)


class PyramidPoolingModule(nn.Module):
    """PSPNet's PPM: the map pooled to ``s x s`` per scale, 1x1 conv, upsampled, concatenated, 3x3 conv."""

    def __init__(self, in_channels: int, channels: int, pool_scales: Sequence[int], norm: str):
        super().__init__()
        self.pool_scales = tuple(pool_scales)
        self.branches = nn.ModuleList([_conv_norm_relu(in_channels, channels, 1, norm) for _ in self.pool_scales])
        self.bottleneck = _conv_norm_relu(in_channels + len(self.pool_scales) * channels, channels, 3, norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[-2:]
        pooled = [x] + [_upsample(branch(pool_to(x, (scale, scale))), size)  # pool_to: ONNX-exportable
                        for scale, branch in zip(self.pool_scales, self.branches)]
        return self.bottleneck(torch.cat(pooled, dim=1))


class FCNAuxHead(nn.Module):
    """mmseg's auxiliary ``FCNHead`` (one 3x3 conv-norm-ReLU, no input concat) on one stage; training only."""

    def __init__(self, in_channels: int, channels: int, num_classes: int, norm: str, dropout: float = 0.1):
        super().__init__()
        self.conv = _conv_norm_relu(in_channels, channels, 3, norm)
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        self.predictor = _classifier(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.predictor(self.dropout(self.conv(x)))


@SEM_SEG_HEADS_REGISTRY.register()
class UPerNetHead(nn.Module):
    """mmseg's UPerHead (+ auxiliary FCN head) on backbone stages; see the module docstring."""

    @configurable
    def __init__(self, input_shape: Dict[str, ShapeSpec], *, num_classes: int, conv_dims: int, common_stride: int,
                 pool_scales: Sequence[int] = (1, 2, 3, 6), dropout: float = 0.1, loss_weight: float = 1.0,
                 norm: str = 'BN', ignore_value: int = 255, fusions: Optional[Callable[[], FPNFusions]] = None,
                 aux_in_feature: str = '', aux_input_shape: Optional[ShapeSpec] = None, aux_channels: int = 256,
                 aux_loss_weight: float = 0.4):
        """
        Args:
            input_shape: the backbone stages used (``res2..res5``); the coarsest feeds the PPM.
            conv_dims: width of the PPM, laterals, FPN convs and bottleneck (mmseg: 512).
            common_stride: stride of the fused map; must be the finest input stride.
            norm: detectron2 norm name after every conv ('SyncBN' in the recipes, 'BN', 'GN').
            fusions: the top-down merge's modules (:func:`~detectron2_ext.modeling.fpn_variants.fpn_fusions`
                with ``finest_first``): a FINE per lateral, finest first, or one ASFF on all levels instead
                of the sums; None: mmseg's sums.
            aux_in_feature: backbone stage of the auxiliary FCN head (``'res4'``); ``''``: none.
            The others: mmseg's (``MODEL.UPERNET.*``, docs/segmentation.md#heads).
        """
        super().__init__()
        shapes = sorted(input_shape.items(), key=lambda item: item[1].stride)
        self.in_features = [name for name, _ in shapes]
        if common_stride != shapes[0][1].stride:
            raise ValueError(
                f'UPerNetHead fuses at the finest input stride {shapes[0][1].stride}, but '
                f'MODEL.SEM_SEG_HEAD.COMMON_STRIDE is {common_stride}: set it to {shapes[0][1].stride}.')
        self.common_stride = common_stride
        self.ignore_value = ignore_value
        self.loss_weight = loss_weight
        self.laterals = nn.ModuleList([_conv_norm_relu(shape.channels, conv_dims, 1, norm) for _, shape in shapes[:-1]])
        self.ppm = PyramidPoolingModule(shapes[-1][1].channels, conv_dims, pool_scales, norm)
        self.fpn_convs = nn.ModuleList([_conv_norm_relu(conv_dims, conv_dims, 3, norm) for _ in shapes[:-1]])
        self.fpn_bottleneck = _conv_norm_relu(len(shapes) * conv_dims, conv_dims, 3, norm)
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        self.predictor = _classifier(conv_dims, num_classes)
        made = fusions() if fusions is not None else FPNFusions()
        self.fusion = made.name
        # FINE i aligns lateral i to the merged map above it
        self.fine = nn.ModuleList([m for _, m in made.lateral]) if made.lateral else None
        self.asff = made.output[0][1] if made.output else None
        self.aux_in_feature = aux_in_feature
        self.aux_loss_weight = aux_loss_weight
        self.aux_head = (FCNAuxHead(aux_input_shape.channels, aux_channels, num_classes, norm, dropout)
                         if aux_in_feature else None)

    @classmethod
    def from_config(cls, cfg, input_shape: Dict[str, ShapeSpec]) -> Dict:
        head, uper = cfg.MODEL.SEM_SEG_HEAD, cfg.MODEL.UPERNET
        missing = [f for f in list(head.IN_FEATURES) + [uper.AUX_IN_FEATURE] if f and f not in input_shape]
        if missing:
            raise ValueError(
                f'UPerNetHead reads {missing} (MODEL.SEM_SEG_HEAD.IN_FEATURES / MODEL.UPERNET.AUX_IN_FEATURE), '
                f'which the backbone does not output (it has {list(input_shape)}); UPerNet takes the backbone '
                f'stages: MODEL.BACKBONE.NAME build_timm_backbone.')
        strides = sorted(input_shape[f].stride for f in head.IN_FEATURES)
        return dict(
            input_shape={k: v for k, v in input_shape.items() if k in head.IN_FEATURES},
            num_classes=head.NUM_CLASSES, conv_dims=head.CONVS_DIM, common_stride=head.COMMON_STRIDE,
            pool_scales=tuple(uper.POOL_SCALES), dropout=uper.DROPOUT, loss_weight=head.LOSS_WEIGHT, norm=head.NORM,
            ignore_value=head.IGNORE_VALUE,
            fusions=fpn_fusions(cfg, strides, channels=head.CONVS_DIM, finest_first=True),
            aux_in_feature=uper.AUX_IN_FEATURE, aux_input_shape=input_shape.get(uper.AUX_IN_FEATURE),
            aux_channels=uper.AUX_CHANNELS, aux_loss_weight=uper.AUX_LOSS_WEIGHT,
        )

    def pyramid(self, features: Dict[str, torch.Tensor]) -> List[torch.Tensor]:
        """The merged levels, finest first: laterals and PPM output after the top-down merge or ASFF."""
        maps = [lateral(features[name]) for name, lateral in zip(self.in_features, self.laterals)]
        maps.append(self.ppm(features[self.in_features[-1]]))
        if self.asff is not None:
            return self.asff(maps)
        for i in range(len(maps) - 2, -1, -1):
            low = maps[i] if self.fine is None else self.fine[i](maps[i], maps[i + 1])
            maps[i] = low + _upsample(maps[i + 1], maps[i].shape[-2:])
        return maps

    def layers(self, features: Dict[str, torch.Tensor]) -> torch.Tensor:
        """Logits at ``common_stride`` (the main head only)."""
        maps = self.pyramid(features)
        outs = [conv(m) for conv, m in zip(self.fpn_convs, maps[:-1])] + [maps[-1]]
        size = outs[0].shape[-2:]
        outs = [outs[0]] + [_upsample(m, size) for m in outs[1:]]
        return self.predictor(self.dropout(self.fpn_bottleneck(torch.cat(outs, dim=1))))

    def forward(self, features: Dict[str, torch.Tensor], targets: Optional[torch.Tensor] = None
                ) -> Tuple[Optional[torch.Tensor], Dict[str, torch.Tensor]]:
        """As detectron2's ``SemSegFPNHead``: ``(None, losses)`` in training (``loss_sem_seg``, and
        ``loss_sem_seg_aux`` with the auxiliary head), ``(logits at the padded input size, {})`` in inference."""
        logits = self.layers(features)
        if self.training:
            losses = {'loss_sem_seg': _seg_loss(logits, targets, self.ignore_value) * self.loss_weight}
            if self.aux_head is not None:
                aux = self.aux_head(features[self.aux_in_feature])
                losses['loss_sem_seg_aux'] = _seg_loss(aux, targets, self.ignore_value) * self.aux_loss_weight
            return None, losses
        return F.interpolate(logits, scale_factor=self.common_stride, mode='bilinear', align_corners=False), {}


@SEM_SEG_HEADS_REGISTRY.register()
class SemanticFPNHead(SemSegFPNHead):
    """detectron2's ``SemSegFPNHead`` with mmseg's ``FPNHead`` dropout (``MODEL.SEMANTIC_FPN.DROPOUT``) and init."""

    @configurable
    def __init__(self, input_shape: Dict[str, ShapeSpec], *, dropout: float = 0.1, **kwargs):
        super().__init__(input_shape, **kwargs)
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        nn.init.normal_(self.predictor.weight, 0, 0.01)
        nn.init.zeros_(self.predictor.bias)

    @classmethod
    def from_config(cls, cfg, input_shape: Dict[str, ShapeSpec]) -> Dict:
        return dict(SemSegFPNHead.from_config(cfg, input_shape), dropout=cfg.MODEL.SEMANTIC_FPN.DROPOUT)

    def layers(self, features: Dict[str, torch.Tensor]) -> torch.Tensor:
        x = sum(head(features[f]) for f, head in zip(self.in_features, self.scale_heads))
        return self.predictor(self.dropout(x))
