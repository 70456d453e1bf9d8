"""ASFF: Adaptively Spatial Feature Fusion of a feature pyramid.

Paper: Liu, Huang and Wang, "Learning Spatial Fusion for Single-Shot Object Detection" (ASFF), Sec. 3.2:
every level is the per-pixel softmax-weighted sum of all levels resized to it. Any number of levels
and sizes, the initialisation and the export rules: docs/necks.md#design-choices-where-the-papers-leave-room.
"""
from typing import Callable, List, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.ops import Conv2dNormActivation

NormFactory = Optional[Callable[[int], nn.Module]]
ActFactory = Optional[Callable[[], nn.Module]]


class _Downsample(nn.Module):
    """``2^(s-1)`` max pooling then a 3x3 stride-2 convolution: a ``1 / 2^s`` resize."""

    def __init__(self, in_channels: int, out_channels: int, steps: int, norm_layer: NormFactory,
                 act_layer: ActFactory):
        super().__init__()
        self.pool_kernel = 2 ** (steps - 1)
        self.conv = Conv2dNormActivation(in_channels, out_channels, 3, 2, norm_layer=norm_layer,
                                         activation_layer=act_layer, inplace=None)

    def forward(self, x: torch.Tensor, size: List[int]) -> torch.Tensor:
        if self.pool_kernel > 1:
            x = F.max_pool2d(x, self.pool_kernel, stride=self.pool_kernel, ceil_mode=True)
        return _match_size(self.conv(x), size)


class _Upsample(nn.Module):
    """1x1 convolution to the target's channels, then interpolation to the target's size."""

    def __init__(self, in_channels: int, out_channels: int, mode: str, norm_layer: NormFactory,
                 act_layer: ActFactory):
        super().__init__()
        self.mode = mode
        self.align_corners: Optional[bool] = None if mode == 'nearest' else False
        self.conv = Conv2dNormActivation(in_channels, out_channels, 1, 1, norm_layer=norm_layer,
                                         activation_layer=act_layer, inplace=None)

    def forward(self, x: torch.Tensor, size: List[int]) -> torch.Tensor:
        return F.interpolate(self.conv(x), size=size, mode=self.mode, align_corners=self.align_corners)


class _Same(nn.Module):
    """The target level itself, with the resizers' ``(x, size)`` signature."""

    def forward(self, x: torch.Tensor, size: List[int]) -> torch.Tensor:
        return x


def _match_size(x: torch.Tensor, size: List[int]) -> torch.Tensor:
    """Crop or replicate-pad the bottom/right so that ``x`` has spatial ``size`` (odd pyramids)."""
    H, W = size[0], size[1]
    x = x[:, :, :H, :W]
    pad_h, pad_w = H - x.shape[-2], W - x.shape[-1]
    # a trace records the (usually empty) pad, so that it serves sizes that need one
    if torch.jit.is_tracing() or pad_h > 0 or pad_w > 0:
        x = F.pad(x, [0, pad_w, 0, pad_h], mode='replicate')
    return x


class ASFFLevel(nn.Module):
    """ASFF for one target level: resize every source, weigh per pixel, sum."""

    def __init__(self, level: int, in_channels: Sequence[int], upsample_mode: str = 'nearest',
                 norm_layer: NormFactory = None, act_layer: ActFactory = None):
        super().__init__()
        self.level = level
        channels = in_channels[level]
        resizers = []
        for source, source_channels in enumerate(in_channels):
            if source < level:
                resizers.append(_Downsample(source_channels, channels, level - source, norm_layer, act_layer))
            elif source > level:
                resizers.append(_Upsample(source_channels, channels, upsample_mode, norm_layer, act_layer))
            else:
                resizers.append(_Same())
        self.resizers = nn.ModuleList(resizers)
        self.weight_convs = nn.ModuleList([nn.Conv2d(channels, 1, kernel_size=1) for _ in in_channels])
        for conv in self.weight_convs:
            nn.init.zeros_(conv.weight)
            nn.init.zeros_(conv.bias)

    def resize(self, features: List[torch.Tensor]) -> List[torch.Tensor]:
        target = features[self.level]
        size = [target.shape[-2], target.shape[-1]]
        resized: List[torch.Tensor] = []
        for source, resizer in enumerate(self.resizers):
            resized.append(resizer(features[source], size))
        return resized

    def fusion_weights(self, resized: List[torch.Tensor]) -> torch.Tensor:
        """Per-pixel weights ``alpha`` of shape ``(B, num_levels, H, W)``; they sum to 1 on dim 1."""
        logits: List[torch.Tensor] = []
        for source, conv in enumerate(self.weight_convs):
            logits.append(conv(resized[source]))
        return torch.cat(logits, dim=1).softmax(dim=1)

    def forward(self, features: List[torch.Tensor]) -> torch.Tensor:
        resized = self.resize(features)
        weights = self.fusion_weights(resized)
        fused = resized[0] * weights[:, 0:1]
        for source in range(1, len(resized)):
            fused = fused + resized[source] * weights[:, source:source + 1]
        return fused


class ASFF(nn.Module):
    """ASFF on a pyramid (finest first, each level half the previous): every level fused, at its own size
    and channels. ``upsample_mode``: ``'nearest'`` or ``'bilinear'``; ``norm_layer`` (``channels -> module``)
    and ``act_layer`` (``() -> module``) follow each resize convolution."""

    def __init__(self, in_channels: Sequence[int], upsample_mode: str = 'nearest', norm_layer: NormFactory = None,
                 act_layer: ActFactory = None):
        super().__init__()
        if len(in_channels) < 2:
            raise ValueError(f'ASFF needs at least two pyramid levels, got {len(in_channels)}')
        if upsample_mode not in ('nearest', 'bilinear'):
            raise ValueError(f"ASFF: upsample_mode must be 'nearest' or 'bilinear', got {upsample_mode!r}")
        self.in_channels: List[int] = [int(c) for c in in_channels]
        self.levels = nn.ModuleList([
            ASFFLevel(level, in_channels, upsample_mode, norm_layer, act_layer) for level in range(len(in_channels))])

    def forward(self, features: List[torch.Tensor]) -> List[torch.Tensor]:
        if len(features) != len(self.in_channels):
            raise ValueError(f'ASFF was built for {len(self.in_channels)} levels, got {len(features)}')
        for i, x in enumerate(features):
            if x.dim() != 4 or x.shape[1] != self.in_channels[i]:
                raise ValueError(
                    f'ASFF expects levels with channels {self.in_channels}, got level {i} of shape {x.shape}')
        fused: List[torch.Tensor] = []
        for level in self.levels:
            fused.append(level(features))
        return fused
