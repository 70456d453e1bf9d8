"""FINE: Feature Interaction Network, a semantic alignment module applied before FPN fusion.

Paper: Lee, Lee and Kang, "Context-Guided Semantic Alignment for Feature Fusion Networks" (FINE),
Sec. 4, Eq. 3-9: token sampling (Eq. 4), cross-level attention (Eq. 5-7), modulation (Eq. 8-9). The
choices the paper leaves open: docs/necks.md#design-choices-where-the-papers-leave-room; the
detectron2 neck is ``detectron2_ext/modeling/fpn_variants.py``.
"""
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F


def _pool_tokens(x: torch.Tensor, kernel: int, pool_type: str) -> torch.Tensor:
    """Non-overlapping pooling with the partial border window kept (AATS, Eq. 4)."""
    if kernel == 1:
        return x
    if pool_type == 'avg':
        # partial ceil-mode windows are averaged over their in-bounds pixels (there is no explicit padding)
        return F.avg_pool2d(x, kernel, stride=kernel, ceil_mode=True)
    return F.max_pool2d(x, kernel, stride=kernel, ceil_mode=True)


def _modulate_blocks(low: torch.Tensor, scale: torch.Tensor, block: int) -> torch.Tensor:
    """``low * Up(scale, block)`` cropped to ``low``'s size (Eq. 8-9 with ``scale = 1 + M_hat``), on
    ``low`` zero-padded to the token grid: one traced program serves every size, and ``M`` is never
    materialised (docs/necks.md#design-choices-where-the-papers-leave-room, Any size)."""
    B, C, H, W = low.shape[0], low.shape[1], low.shape[2], low.shape[3]
    h, w = scale.shape[2], scale.shape[3]
    # eager and scripted code skip the pad when there is none; a trace always records it
    if torch.jit.is_tracing() or h * block != H or w * block != W:
        low = F.pad(low, [0, w * block - W, 0, h * block - H])
    out = low.reshape(B, C, h, block, w, block) * scale[:, :, :, None, :, None]
    return out.reshape(B, C, h * block, w * block)[:, :, :H, :W]


class FINE(nn.Module):
    """Aligns ``low (B, C_low, H, W)`` to its higher-level neighbour ``high (B, C_high, H', W')``
    (typically ``H' = ceil(H / 2)``; any size works) before fusion (Eq. 3-9); returns ``low``'s shape.

    ``high_channels`` other than ``low_channels`` are projected by a 1x1 conv (Appendix C, Eq. 10).
    ``kernel_size`` is the AATS kernel ``k`` of ``F_high`` (Eq. 4; the paper: 1 at stride 16, 2 at stride 8),
    ``ratio`` the ``r`` of ``F_low``'s ``r * k`` (paper: 2), ``head_dim`` the ``d`` of Table 4 (16),
    ``pool_type`` ``'avg'`` or ``'max'`` (Table 6: same AP); ``zero_init_out`` makes FINE start as the identity.
    """

    def __init__(
            self, low_channels: int, high_channels: Optional[int] = None, kernel_size: int = 1, ratio: int = 2,
            head_dim: int = 16, qkv_bias: bool = True, pool_type: str = 'avg', zero_init_out: bool = False,
    ):
        super().__init__()
        if kernel_size < 1 or ratio < 1:
            raise ValueError(f'FINE needs kernel_size >= 1 and ratio >= 1, got {kernel_size}, {ratio}')
        if low_channels % head_dim != 0:
            raise ValueError(f'FINE: low_channels={low_channels} is not a multiple of head_dim={head_dim}; '
                             f'choose a head_dim that divides the channel count (paper: 16).')
        if pool_type not in ('avg', 'max'):
            raise ValueError(f"FINE: pool_type must be 'avg' or 'max', got {pool_type!r}")
        high_channels = high_channels or low_channels
        self.kernel_size = kernel_size
        self.ratio = ratio
        self.low_kernel = ratio * kernel_size
        self.pool_type = pool_type
        self.num_heads = low_channels // head_dim
        self.head_dim = head_dim

        self.high_proj = (
            nn.Conv2d(high_channels, low_channels, kernel_size=1) if high_channels != low_channels else nn.Identity())
        self.q = nn.Linear(low_channels, low_channels, bias=qkv_bias)
        self.kv = nn.Linear(low_channels, 2 * low_channels, bias=qkv_bias)
        self.proj = nn.Linear(low_channels, low_channels, bias=qkv_bias)
        self.init_weights(zero_init_out)

    def init_weights(self, zero_init_out: bool = False) -> None:
        for linear in (self.q, self.kv, self.proj):
            nn.init.trunc_normal_(linear.weight, std=.02)
            if linear.bias is not None:
                nn.init.zeros_(linear.bias)
        if zero_init_out:  # the bias is zero already
            nn.init.zeros_(self.proj.weight)

    def coarse_modulation(self, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
        """The modulation map ``M_hat`` of Eq. 7 on the token grid, ``(B, C, h, w)``."""
        B, C = low.shape[0], low.shape[1]
        high = self.high_proj(high)
        low_tokens = _pool_tokens(low, self.low_kernel, self.pool_type)
        high_tokens = _pool_tokens(high, self.kernel_size, self.pool_type)
        h, w = low_tokens.shape[-2], low_tokens.shape[-1]

        q = self.q(low_tokens.flatten(2).transpose(1, 2))
        q = q.reshape(B, h * w, self.num_heads, self.head_dim).transpose(1, 2)
        kv = self.kv(high_tokens.flatten(2).transpose(1, 2))
        k, v = kv.reshape(B, -1, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        heads = F.scaled_dot_product_attention(q, k, v)  # softmax(QK^T / sqrt(d)) V, Eq. 6

        m = self.proj(heads.transpose(1, 2).reshape(B, h * w, C))  # Eq. 7
        # contiguous NCHW (a cheap copy of the small map): left as a channels-last view, it makes
        # the full-resolution upsampling and product that follow run with strided memory access
        return m.transpose(1, 2).reshape(B, C, h, w).contiguous()

    def modulation(self, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
        """The upsampled modulation map ``M`` of Eq. 8, cropped to ``low``'s size."""
        H, W = low.shape[-2:]
        m = self.coarse_modulation(low, high)
        if self.low_kernel > 1:
            m = F.interpolate(m, scale_factor=float(self.low_kernel), mode='nearest')
        return m[..., :H, :W]

    def forward(self, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
        if low.dim() != 4 or high.dim() != 4 or low.shape[0] != high.shape[0]:
            raise ValueError(f'FINE expects low and high as (B, C, H, W) with the same batch size, '
                             f'got {low.shape} and {high.shape}')
        if low.shape[1] != self.q.in_features:
            raise ValueError(f'FINE was built for {self.q.in_features} low-level channels, got {low.shape[1]}')
        scale = 1 + self.coarse_modulation(low, high)
        return _modulate_blocks(low, scale, self.low_kernel)

    def extra_repr(self) -> str:
        return (f'kernel_size={self.kernel_size}, ratio={self.ratio}, num_heads={self.num_heads}, '
                f'head_dim={self.head_dim}, pool_type={self.pool_type!r}')
