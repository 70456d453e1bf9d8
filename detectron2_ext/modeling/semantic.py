"""UPerNet's decoder as a detectron2 semantic segmentation head, for ``SemanticSegmentor``.

UPerNet (Xiao et al., "Unified Perceptual Parsing for Scene Understanding", ECCV 2018) decodes a
feature pyramid with a pyramid pooling module (PPM, from PSPNet) on its coarsest level, an FPN over
all levels, and a fusion of every level upsampled to the finest one. detectron2 has no UPerNet;
MAFormer reports it on ADE20K (Table 7). :class:`UPerNetHead` is registered as
``MODEL.SEM_SEG_HEAD.NAME: "UPerNetHead"``.

Where the FPN lives (docs/segmentation.md): the head runs on the *neck's* outputs (``p2..p5`` of
``build_timm_fpn_backbone``), so the neck is UPerNet's FPN and ``MODEL.FPN.FUSION`` 'sum' / 'fine'
/ 'asff' chooses it as in detection. The PPM therefore pools the coarsest FPN output rather than
the raw last stage before the top-down pass; the fusion (upsample, concatenate, 3x3 conv) and the
classifier are UPerNet's. Given backbone features directly (``build_timm_backbone``,
``IN_FEATURES: res2..res5``) 1x1 laterals bring every level to ``CONVS_DIM`` and the same head
applies, without a top-down pass.
"""
from typing import Dict, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from detectron2.config import configurable
from detectron2.layers import Conv2d, ShapeSpec, get_norm
from detectron2.modeling import SEM_SEG_HEADS_REGISTRY

__all__ = ['PyramidPoolingModule', 'UPerNetHead']


def _conv_norm_relu(in_channels: int, out_channels: int, kernel_size: int, norm: str) -> Conv2d:
    return Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2,
                  bias=not norm, norm=get_norm(norm, out_channels), activation=F.relu)


class PyramidPoolingModule(nn.Module):
    """PSPNet's PPM: the map pooled to ``s x s`` for each scale ``s``, 1x1 conv, upsampled back,
    concatenated with the map and reduced by a 3x3 conv."""

    def __init__(self, in_channels: int, channels: int, pool_scales: Sequence[int], norm: str):
        """
        Args:
            in_channels: channels of the input map.
            channels: channels of each pooled branch and of the output.
            pool_scales: output sizes of the adaptive average poolings (UPerNet: 1, 2, 3, 6).
            norm: detectron2 norm name after every conv (``''``: none).
        """
        super().__init__()
        self.pool_scales = tuple(pool_scales)
        self.branches = nn.ModuleList(
            [_conv_norm_relu(in_channels, channels, 1, norm) for _ in self.pool_scales])
        self.bottleneck = _conv_norm_relu(
            in_channels + len(self.pool_scales) * channels, channels, 3, norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[-2:]
        pooled = [x]
        for scale, branch in zip(self.pool_scales, self.branches):
            y = branch(F.adaptive_avg_pool2d(x, scale))
            pooled.append(F.interpolate(y, size=size, mode='bilinear', align_corners=False))
        return self.bottleneck(torch.cat(pooled, dim=1))


@SEM_SEG_HEADS_REGISTRY.register()
class UPerNetHead(nn.Module):
    """UPerNet decoder: PPM on the coarsest input, every level to the finest stride, concatenated,
    fused by a 3x3 conv, classified per pixel (see the module docstring)."""

    @configurable
    def __init__(
            self,
            input_shape: Dict[str, ShapeSpec],
            *,
            num_classes: int,
            conv_dims: int,
            common_stride: int,
            pool_scales: Sequence[int] = (1, 2, 3, 6),
            dropout: float = 0.1,
            loss_weight: float = 1.0,
            norm: str = 'BN',
            ignore_value: int = 255,
    ):
        """
        Args:
            input_shape: the features used, name -> shape (``MODEL.SEM_SEG_HEAD.IN_FEATURES``);
                the coarsest one feeds the PPM.
            num_classes: classes predicted per pixel.
            conv_dims: width of the PPM, the laterals and the fusion conv (UPerNet: 512).
            common_stride: stride of the fused map; must be the finest input stride.
            pool_scales: PPM pooling sizes.
            dropout: dropout probability before the classifier.
            loss_weight: weight of the cross-entropy loss.
            norm: detectron2 norm name after every conv ('BN', 'SyncBN', 'GN', '' ...).
            ignore_value: label ignored by the loss (255).
        """
        super().__init__()
        shapes = sorted(input_shape.items(), key=lambda item: item[1].stride)
        self.in_features = [name for name, _ in shapes]
        strides = [shape.stride for _, shape in shapes]
        if common_stride != strides[0]:
            raise ValueError(
                f'UPerNetHead fuses at the finest input stride {strides[0]}, but '
                f'MODEL.SEM_SEG_HEAD.COMMON_STRIDE is {common_stride}: set it to {strides[0]}.')
        self.common_stride = common_stride
        self.ignore_value = ignore_value
        self.loss_weight = loss_weight
        # laterals only where a level is not yet conv_dims wide (backbone features)
        self.laterals = nn.ModuleList([
            nn.Identity() if shape.channels == conv_dims
            else _conv_norm_relu(shape.channels, conv_dims, 1, norm)
            for _, shape in shapes[:-1]])
        self.ppm = PyramidPoolingModule(shapes[-1][1].channels, conv_dims, pool_scales, norm)
        self.fuse = _conv_norm_relu(len(shapes) * conv_dims, conv_dims, 3, norm)
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        self.predictor = Conv2d(conv_dims, num_classes, kernel_size=1)
        nn.init.normal_(self.predictor.weight, 0, 0.01)
        nn.init.zeros_(self.predictor.bias)

    @classmethod
    def from_config(cls, cfg, input_shape: Dict[str, ShapeSpec]) -> Dict:
        head = cfg.MODEL.SEM_SEG_HEAD
        return dict(
            input_shape={k: v for k, v in input_shape.items() if k in head.IN_FEATURES},
            num_classes=head.NUM_CLASSES, conv_dims=head.CONVS_DIM,
            common_stride=head.COMMON_STRIDE, pool_scales=tuple(cfg.MODEL.UPERNET.POOL_SCALES),
            dropout=cfg.MODEL.UPERNET.DROPOUT, loss_weight=head.LOSS_WEIGHT, norm=head.NORM,
            ignore_value=head.IGNORE_VALUE,
        )

    def layers(self, features: Dict[str, torch.Tensor]) -> torch.Tensor:
        """Logits at ``common_stride``."""
        maps = [lateral(features[name]) for name, lateral in zip(self.in_features, self.laterals)]
        maps.append(self.ppm(features[self.in_features[-1]]))
        size = maps[0].shape[-2:]
        maps = [maps[0]] + [F.interpolate(m, size=size, mode='bilinear', align_corners=False)
                            for m in maps[1:]]
        return self.predictor(self.dropout(self.fuse(torch.cat(maps, dim=1))))

    def forward(self, features: Dict[str, torch.Tensor], targets: Optional[torch.Tensor] = None
                ) -> Tuple[Optional[torch.Tensor], Dict[str, torch.Tensor]]:
        """As detectron2's ``SemSegFPNHead``: ``(None, losses)`` in training, ``(logits at the
        padded input size, {})`` in inference."""
        logits = self.layers(features)
        logits = F.interpolate(logits, scale_factor=self.common_stride, mode='bilinear',
                               align_corners=False)
        if self.training:
            loss = F.cross_entropy(logits.float(), targets, reduction='mean',
                                   ignore_index=self.ignore_value)
            return None, {'loss_sem_seg': loss * self.loss_weight}
        return logits, {}
