"""Attention pieces of the MAFormer Multi-scale Attention Fusion (MAF) block, on ``(B, H, W, C)`` maps.

Paper: MAFormer (arXiv:2209.01620), Sec. 3.2, Eq. 1-4: cross-shaped window attention (Eq. 1), GLD
(Eq. 2) and the local-to-global fusion (Eq. 3-4); the model is :mod:`maformer_zoo.models.maformer`.
The reason for every choice: docs/maformer.md#design-decisions-what-the-paper-leaves-open-and-why.
"""
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.fx.experimental.symbolic_shapes import statically_known_true

from timm.layers import register_notrace_function, register_notrace_module

from ._compile import is_compiling


def balanced_split(size: int, max_len: Optional[int]) -> Tuple[int, int]:
    """``(count, length)`` of the fewest equal windows of length ``<= max_len`` (None: the whole axis)
    that cover ``size``; the padding ``count * length - size`` is below ``count``. Integer arithmetic
    only, so torch.export keeps it symbolic."""
    if max_len is None or max_len >= size:
        return 1, size
    divisible = size % max_len == 0
    if not torch.jit.is_scripting():
        if isinstance(divisible, torch.SymBool):  # True only where it holds for every size: no guard
            divisible = statically_known_true(divisible)
    if divisible:  # the general formula gives the same; this keeps export's symbolic sizes simple
        return size // max_len, max_len
    count = (size + max_len - 1) // max_len
    return count, (size + count - 1) // count


def window_labels(
        size: Tuple[int, int], padded: Tuple[int, int], window: Tuple[int, int], shift: Tuple[int, int],
        device: torch.device,
) -> torch.Tensor:
    """Per-token region label of the padded, shifted map: tokens of one window attend to each other
    only if their labels are equal (Swin's shift regions; padding is -1 and attends only to padding,
    which keeps every softmax row finite). Comparisons of ``arange``, so it traces with symbolic sizes."""
    labels: List[torch.Tensor] = []
    pads: List[torch.Tensor] = []
    for axis in range(2):
        pos = torch.arange(padded[axis], device=device)
        # regions [0, P - w), [P - w, P - s), [P - s, P); unshifted, the last region is the last window
        lab = (pos >= padded[axis] - window[axis]).long() + (pos >= padded[axis] - shift[axis]).long()
        labels.append(lab)
        pads.append(torch.roll(pos >= size[axis], -shift[axis]))
    label = labels[0][:, None] * 3 + labels[1][None, :]
    return label.masked_fill(pads[0][:, None] | pads[1][None, :], -1)


@register_notrace_function
def window_self_attention(
        qkv: torch.Tensor, window: Tuple[Optional[int], Optional[int]], shift: bool = False,
        pe_weight: Optional[torch.Tensor] = None, pe_bias: Optional[torch.Tensor] = None, attn_drop: float = 0.,
) -> torch.Tensor:
    """Self-attention of ``qkv (B, H, W, 3, heads, head_dim)`` in :func:`balanced_split` windows of at most
    ``window`` (None: the whole axis; padded bottom/right and masked), rolled by half a window (Swin) on
    axes of several windows when ``shift``, plus CSWin's LePE when ``pe_weight`` (a depthwise 3x3 conv of
    the values); returns ``(B, H, W, heads * head_dim)``."""
    B, H, W, _, num_heads, head_dim = qkv.shape
    n_h, win_h = balanced_split(H, window[0])
    n_w, win_w = balanced_split(W, window[1])
    pad_h, pad_w = n_h * win_h - H, n_w * win_w - W
    shift_h = win_h // 2 if shift and n_h > 1 else 0
    shift_w = win_w // 2 if shift and n_w > 1 else 0
    # with symbolic sizes (export) whether padding occurs is unknown: always pad and mask
    padded = is_compiling() or pad_h > 0 or pad_w > 0
    shifted = shift_h > 0 or shift_w > 0
    if padded:
        qkv = F.pad(qkv, (0, 0, 0, 0, 0, 0, 0, pad_w, 0, pad_h))
    if shifted:
        qkv = torch.roll(qkv, (-shift_h, -shift_w), dims=(1, 2))

    num_win, win_len = B * n_h * n_w, win_h * win_w
    q, k, v = qkv.reshape(B, n_h, win_h, n_w, win_w, 3, num_heads, head_dim).permute(
        5, 0, 1, 3, 6, 2, 4, 7).reshape(3, num_win, num_heads, win_len, head_dim).unbind(0)

    mask: Optional[torch.Tensor] = None
    if padded or shifted:
        labels = window_labels(
            (H, W), (n_h * win_h, n_w * win_w), (win_h, win_w), (shift_h, shift_w), qkv.device)
        labels = labels.reshape(n_h, win_h, n_w, win_w).permute(0, 2, 1, 3).reshape(n_h * n_w, win_len)
        mask = labels[:, :, None] == labels[:, None, :]
        mask = mask[None, :, None].expand(B, -1, -1, -1, -1).reshape(num_win, 1, win_len, win_len)

    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=attn_drop)
    if pe_weight is not None:
        # channels-last windows: CPU depthwise convolutions are several times faster in that layout
        v_img = v.permute(0, 2, 1, 3).reshape(num_win, win_h, win_w, num_heads * head_dim).permute(0, 3, 1, 2)
        pe = F.conv2d(v_img, pe_weight, pe_bias, padding=1, groups=num_heads * head_dim)
        out = out + pe.permute(0, 2, 3, 1).reshape(num_win, win_len, num_heads, head_dim).transpose(1, 2)

    out = out.reshape(B, n_h, n_w, num_heads, win_h, win_w, head_dim).permute(
        0, 1, 4, 2, 5, 3, 6).reshape(B, n_h * win_h, n_w * win_w, num_heads * head_dim)
    if shifted:
        out = torch.roll(out, (shift_h, shift_w), dims=(1, 2))
    if padded:
        # crop by negative padding: a copy with symbolic sizes; copying a cropped view instead makes
        # torch.export decide whether the crop removed anything (docs/maformer.md#deploy-paths-per-model-issue-11)
        out = F.pad(out, (0, 0, 0, -pad_w, 0, -pad_h))
    return out


class CrossShapedWindowAttention(nn.Module):
    """Cross-shaped window self-attention (Eq. 1, Table 2 default): half of the heads in horizontal
    stripes (``stripe_width`` rows, at most ``stripe_len`` columns, None: whole rows), half in vertical
    ones, each with CSWin's LePE (a depthwise 3x3 conv of the values); concatenated and projected."""

    def __init__(
            self, dim: int, num_heads: int, stripe_width: int = 1, stripe_len: Optional[int] = None,
            qkv_bias: bool = True, attn_drop: float = 0., proj_drop: float = 0.,
    ):
        super().__init__()
        if num_heads % 2 or dim % num_heads:
            raise ValueError(f'CrossShapedWindowAttention needs an even number of heads that divides dim; got '
                             f'dim={dim}, num_heads={num_heads}.')
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.stripe_width = stripe_width
        self.stripe_len = stripe_len
        self.attn_drop = attn_drop
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.lepe_h = nn.Conv2d(dim // 2, dim // 2, kernel_size=3, padding=1, groups=dim // 2)
        self.lepe_v = nn.Conv2d(dim // 2, dim // 2, kernel_size=3, padding=1, groups=dim // 2)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        qkv = self.qkv(x).reshape(B, H, W, 3, self.num_heads, self.head_dim)
        half = self.num_heads // 2
        attn_drop = self.attn_drop if self.training else 0.
        x_h = window_self_attention(
            qkv[..., :half, :], (self.stripe_width, self.stripe_len), False,
            self.lepe_h.weight, self.lepe_h.bias, attn_drop)
        x_v = window_self_attention(
            qkv[..., half:, :], (self.stripe_len, self.stripe_width), False,
            self.lepe_v.weight, self.lepe_v.bias, attn_drop)
        return self.proj_drop(self.proj(torch.cat([x_h, x_v], dim=-1)))


class WindowSelfAttention(nn.Module):
    """Multi-head self-attention over the whole map (``window_size=None``) or in (shifted) square windows."""

    def __init__(
            self, dim: int, num_heads: int, window_size: Optional[int] = None, shift: bool = False,
            qkv_bias: bool = True, attn_drop: float = 0., proj_drop: float = 0.,
    ):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f'num_heads={num_heads} must divide dim={dim}.')
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.window_size = window_size
        self.shift = shift
        self.attn_drop = attn_drop
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        qkv = self.qkv(x).reshape(B, H, W, 3, self.num_heads, self.head_dim)
        x = window_self_attention(
            qkv, (self.window_size, self.window_size), self.shift, None, None,
            self.attn_drop if self.training else 0.)
        return self.proj_drop(self.proj(x))


def _bilinear_resize(x: torch.Tensor, size: List[int]) -> torch.Tensor:
    """Anti-aliased bilinear resize, in float32 for half precision (not implemented on every device)."""
    half = x.dtype == torch.float16 or x.dtype == torch.bfloat16
    out = F.interpolate(x.float() if half else x, size=size, mode='bilinear', align_corners=False, antialias=True)
    return out.to(x.dtype)


@register_notrace_module  # size-dependent weights: an FX leaf
class GlobalLearningDownsample(nn.Module):
    """GLD (Eq. 2): ``X_G = Pos(X) + FC(X)``, ``(B, H, W, C)`` -> ``(B, g*g, C)``: ``FC`` a dense layer along
    the tokens of the ``ref_size`` map, resampled to other sizes; ``Pos`` an anti-aliased bilinear
    down-sampling (docs/maformer.md#design-decisions-what-the-paper-leaves-open-and-why)."""

    def __init__(self, ref_size: Tuple[int, int], grid_size: Tuple[int, int]):
        super().__init__()
        self.ref_size: Tuple[int, int] = (int(ref_size[0]), int(ref_size[1]))
        self.grid_size: Tuple[int, int] = (int(grid_size[0]), int(grid_size[1]))
        self.token_mix = nn.Linear(ref_size[0] * ref_size[1], grid_size[0] * grid_size[1], bias=False)

    def mixing_weight(self, size: Tuple[int, int]) -> torch.Tensor:
        """The FC weight for a ``size = (H, W)`` map: ``(g*g, H*W)``."""
        weight = self.token_mix.weight
        ref_h, ref_w = self.ref_size
        if size[0] == ref_h and size[1] == ref_w:
            return weight
        num_global = weight.shape[0]
        resized = _bilinear_resize(weight.reshape(1, num_global, ref_h, ref_w), [size[0], size[1]])
        area_ratio = (ref_h * ref_w) / (size[0] * size[1])
        return resized.reshape(num_global, size[0] * size[1]) * area_ratio

    def pos_matrix(self, size: Tuple[int, int]) -> torch.Tensor:
        """*Pos* as a ``(g*g, H*W)`` matrix: the Kronecker product of one resize matrix per axis
        (bilinear resizing is linear and separable), folded into the FC weight at no extra pass."""
        device = self.token_mix.weight.device
        rows = _bilinear_resize(torch.eye(size[0], device=device)[None, None], [self.grid_size[0], size[0]])[0, 0]
        cols = _bilinear_resize(torch.eye(size[1], device=device)[None, None], [self.grid_size[1], size[1]])[0, 0]
        # Kronecker product (torch.kron is needlessly slow on CPU)
        return (rows[:, None, :, None] * cols[None, :, None, :]).reshape(rows.shape[0] * cols.shape[0], -1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        weight = (self.mixing_weight((H, W)) + self.pos_matrix((H, W))).to(x.dtype)
        return torch.matmul(weight, x.reshape(B, H * W, C))

    def extra_repr(self) -> str:
        return f'ref_size={self.ref_size}, grid_size={self.grid_size}'


class MultiScaleAttentionFusion(nn.Module):
    """Eq. 3-4: local tokens ``(B, N, C)`` attend to global ones ``(B, M, C)``, ``softmax(Q_L K_G^T / sqrt(d)) V_G``."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, attn_drop: float = 0., proj_drop: float = 0.):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.attn_drop = attn_drop
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, dim * 2, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x_local: torch.Tensor, x_global: torch.Tensor) -> torch.Tensor:
        B, N, C = x_local.shape
        q = self.q(x_local).reshape(B, N, self.num_heads, self.head_dim).transpose(1, 2)
        k, v = self.kv(x_global).reshape(B, -1, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        x = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop if self.training else 0.)
        return self.proj_drop(self.proj(x.transpose(1, 2).reshape(B, N, C)))
