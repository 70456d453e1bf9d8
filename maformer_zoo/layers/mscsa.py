"""Multi-Stage Cross-Scale Attention (MSCSA), the backbone add-on module, in plain PyTorch (BCHW).

Paper: L. Shang et al., "Vision Backbone Enhancement via Multi-Stage Cross-Scale Attention",
arXiv:2308.05872 (2023), Sec. 3, Fig. 4-5, Table 7; the timm models are :mod:`maformer_zoo.models.mscsa`.
Each choice the paper leaves open, with the reason: docs/mscsa.md#choices-the-paper-leaves-open.
"""
from typing import Dict, List, Optional, Sequence, Tuple, Type

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from timm.layers import DropPath, register_notrace_function

from ._compile import is_compiling


def squeezed_channels(in_chs: Sequence[int], squeeze_ratio: Optional[float]) -> List[int]:
    """Per-stage widths after the optional squeeze (Table 7 "Squeeze Ratio"; ``None`` = no squeeze)."""
    if squeeze_ratio is None:
        return list(in_chs)
    if not 0. < squeeze_ratio <= 1.:
        raise ValueError(f'squeeze_ratio must be in (0, 1] or None, got {squeeze_ratio}.')
    out = [int(round(c * squeeze_ratio)) for c in in_chs]
    if min(out) < 1:
        raise ValueError(f'squeeze_ratio {squeeze_ratio} leaves a stage of {in_chs} with no channels.')
    return out


@register_notrace_function  # size arithmetic: an FX leaf
def pooled_size(deepest: torch.Tensor, deepest_stride: int, pool_stride: int) -> Tuple[int, int]:
    """Size of the multi-stage map: the deepest stage's size scaled to ``pool_stride``, rounded up."""
    h, w = deepest.shape[-2], deepest.shape[-1]
    out_h = (h * deepest_stride + pool_stride - 1) // pool_stride
    out_w = (w * deepest_stride + pool_stride - 1) // pool_stride
    return max(1, out_h), max(1, out_w)


def _adaptive_pool_matrix(n_in: int, n_out: int, like: torch.Tensor) -> torch.Tensor:
    """``(n_out, n_in)`` matrix whose row ``i`` averages ``adaptive_avg_pool2d``'s window ``i``."""
    i = torch.arange(n_out, device=like.device)
    start = torch.div(i * n_in, n_out, rounding_mode='floor')
    end = torch.div((i + 1) * n_in + n_out - 1, n_out, rounding_mode='floor')
    j = torch.arange(n_in, device=like.device)
    inside = (j[None, :] >= start[:, None]) & (j[None, :] < end[:, None])
    return inside.to(like.dtype) / (end - start).to(like.dtype)[:, None]


@register_notrace_function  # branches on sizes: an FX leaf
def pool_to(x: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
    """``adaptive_avg_pool2d`` of ``x`` to ``size`` (a no-op when it already has it). Under the ONNX
    exporter, two products with window-averaging matrices: ONNX has no adaptive pooling to a computed
    size (docs/detectron2.md#deploying-detectors-scriptsexport_detectorpy-detectron2_extexportpy)."""
    if not torch.jit.is_scripting():  # the ONNX check does not script; scripted code never exports
        if torch.jit.is_tracing() and torch.onnx.is_in_onnx_export():
            rows = _adaptive_pool_matrix(x.shape[-2], size[0], x)
            cols = _adaptive_pool_matrix(x.shape[-1], size[1], x)
            return torch.matmul(torch.matmul(rows, x), cols.transpose(0, 1))
    if x.shape[-2] == size[0] and x.shape[-1] == size[1]:
        return x
    return F.adaptive_avg_pool2d(x, [size[0], size[1]])


@register_notrace_function  # branches on sizes: an FX leaf
def resize_like(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Bilinear resize of ``x`` to ``ref``'s height and width (a no-op when they match)."""
    if x.shape[-2] == ref.shape[-2] and x.shape[-1] == ref.shape[-1]:
        return x
    return F.interpolate(x, size=[ref.shape[-2], ref.shape[-1]], mode='bilinear', align_corners=False)


@register_notrace_function  # branches on sizes: an FX leaf
def chunked_attention(
        q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, chunk_elems: int, dropout_p: float = 0.,
) -> torch.Tensor:
    """``F.scaled_dot_product_attention`` over query chunks of at most ``chunk_elems`` matrix elements
    per image (exact: softmax is per query row); one call under compile/export, so a traced program
    serves every size (docs/mscsa.md#deploy-paths-issue-11)."""
    if is_compiling():
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)
    n, m = q.shape[-2], k.shape[-2]
    chunk = max(1, chunk_elems // (q.shape[1] * m))
    if n <= chunk:
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)
    return torch.cat([
        F.scaled_dot_product_attention(q_chunk, k, v, dropout_p=dropout_p)
        for q_chunk in q.split(chunk, dim=-2)], dim=-2)


@register_notrace_function  # branches on autograd state: an FX leaf
def inject(feat: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    """``feat * sigmoid(weight) + bias`` (Fig. 5b). Without autograd, one full-resolution temporary:
    ``weight`` is overwritten, and so is ``feat`` when ``inplace`` (the caller no longer needs it)."""
    if torch.is_grad_enabled() and (feat.requires_grad or weight.requires_grad or bias.requires_grad):
        return torch.addcmul(bias, feat, weight.sigmoid())
    if inplace:
        return feat.mul_(weight.sigmoid_()).add_(bias)
    return weight.sigmoid_().mul_(feat).add_(bias)


class MultiStageGather(nn.Module):
    """Pool every stage (shallowest first, at ``in_strides``) to the size at ``pool_stride``, squeeze
    (1x1 conv + norm, optional), concatenate (Sec. 3.4, Fig. 4)."""

    def __init__(self, in_chs: Sequence[int], in_strides: Sequence[int], pool_stride: int = 32,
                 squeeze_ratio: Optional[float] = None, norm_layer: Type[nn.Module] = nn.BatchNorm2d):
        super().__init__()
        if len(in_chs) != len(in_strides):
            raise ValueError(f'{len(in_chs)} stage widths but {len(in_strides)} strides.')
        self.in_strides = tuple(in_strides)
        self.pool_stride = pool_stride
        self.out_chs = squeezed_channels(in_chs, squeeze_ratio)
        self.squeeze = None if squeeze_ratio is None else nn.ModuleList([
            nn.Sequential(nn.Conv2d(c, o, 1, bias=False), norm_layer(o)) for c, o in zip(in_chs, self.out_chs)])

    def forward(self, features: List[torch.Tensor]) -> torch.Tensor:
        size = pooled_size(features[-1], self.in_strides[-1], self.pool_stride)
        pooled = [pool_to(x, size) for x in features]
        if self.squeeze is not None:
            for i, squeeze in enumerate(self.squeeze):
                pooled[i] = squeeze(pooled[i])
        return torch.cat(pooled, dim=1)


class CrossScaleAttention(nn.Module):
    """Cross-Scale Attention with multi-scale K/V projections and a parallel conv path (Sec. 3.2):
    ``key_dim`` is ``d`` of Eq. 1, values ``attn_ratio`` times wider (LeViT), ``kv_strides`` Eq. 2's
    down-samplings; at most ``attn_chunk_elems`` attention elements per image at once."""

    def __init__(
            self, dim: int, num_heads: int = 8, key_dim: int = 32, attn_ratio: float = 2.,
            kv_strides: Sequence[int] = (2, 3), attn_drop: float = 0., act_layer: Type[nn.Module] = nn.Hardswish,
            attn_chunk_elems: int = 1 << 24,
    ):
        super().__init__()
        self.num_heads = num_heads
        self.key_dim = key_dim
        self.val_dim = int(attn_ratio * key_dim)
        self.scale = key_dim ** -0.5
        self.attn_drop = attn_drop
        self.attn_chunk_elems = attn_chunk_elems
        qk_chs = num_heads * key_dim
        v_chs = num_heads * self.val_dim
        self.split_qkv = (qk_chs, qk_chs, v_chs)
        self.split_kv = (qk_chs, v_chs)

        # Q, K0, V0 (Eq. 1 and Eq. 4, scale 0)
        self.qkv = nn.Conv2d(dim, 2 * qk_chs + v_chs, 1)
        # X1, X2 (Eq. 2) and their own K_i, V_i projections (Eq. 4)
        self.down = nn.ModuleList([
            nn.Conv2d(dim, dim, 3, stride=s, padding=1, groups=dim) for s in kv_strides])
        self.kv = nn.ModuleList([nn.Conv2d(dim, qk_chs + v_chs, 1) for _ in kv_strides])
        # parallel convolution path on V0 (Eq. 8)
        self.pcp_act = act_layer()
        self.pcp = nn.Conv2d(v_chs, v_chs, 3, padding=1, groups=v_chs)
        # Hardswish on the attention output (App. D.2), then the output projection
        self.proj = nn.Sequential(act_layer(), nn.Conv2d(v_chs, dim, 1))

    def _heads(self, x: torch.Tensor, head_dim: int) -> torch.Tensor:
        return x.reshape(x.shape[0], self.num_heads, head_dim, -1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        q, k0, v0 = self.qkv(x).split(self.split_qkv, dim=1)
        keys = [self._heads(k0, self.key_dim)]
        values = [self._heads(v0, self.val_dim)]
        downs: List[torch.Tensor] = []
        for down in self.down:
            downs.append(down(x))
        for i, kv in enumerate(self.kv):
            k_i, v_i = kv(downs[i]).split(self.split_kv, dim=1)
            keys.append(self._heads(k_i, self.key_dim))
            values.append(self._heads(v_i, self.val_dim))
        # (B, heads, tokens, head_dim); K, V concatenated over the three scales (Eq. 5)
        q = self._heads(q, self.key_dim).transpose(-1, -2)
        k = torch.cat(keys, dim=-1).transpose(-1, -2)
        v = torch.cat(values, dim=-1).transpose(-1, -2)
        out = chunked_attention(q, k, v, self.attn_chunk_elems, self.attn_drop if self.training else 0.)  # Eq. 6
        out = out.transpose(-1, -2).reshape(b, -1, h, w)
        out = out + self.pcp(self.pcp_act(v0))  # Eq. 7 / 9
        return self.proj(out)


class ConvFFN(nn.Module):
    """1x1 conv -> 3x3 depthwise conv -> activation -> 1x1 conv (Fig. 3c), with dropout."""

    def __init__(self, dim: int, hidden_dim: int, act_layer: Type[nn.Module] = nn.GELU, drop: float = 0.):
        super().__init__()
        self.fc1 = nn.Conv2d(dim, hidden_dim, 1)
        self.dwconv = nn.Conv2d(hidden_dim, hidden_dim, 3, padding=1, groups=hidden_dim)
        self.act = act_layer()
        self.drop1 = nn.Dropout(drop)
        self.fc2 = nn.Conv2d(hidden_dim, dim, 1)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.dwconv(self.fc1(x)))
        return self.drop2(self.fc2(self.drop1(x)))


class IntraFFN(nn.Module):
    """One :class:`ConvFFN` per stage's channel slice of the multi-stage map (Sec. 3.3, Fig. 3b)."""

    def __init__(self, stage_chs: Sequence[int], mlp_ratio: float = 2., act_layer: Type[nn.Module] = nn.GELU,
                 drop: float = 0.):
        super().__init__()
        self.stage_chs = list(stage_chs)
        self.ffns = nn.ModuleList([
            ConvFFN(c, int(c * mlp_ratio), act_layer=act_layer, drop=drop) for c in stage_chs])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        parts = x.split(self.stage_chs, dim=1)
        out: List[torch.Tensor] = []
        for i, ffn in enumerate(self.ffns):
            out.append(ffn(parts[i]))
        return torch.cat(out, dim=1)


class MscsaBlock(nn.Module):
    """CSA -> Intra-FFN -> CSA -> FFN, each a pre-norm residual sub-layer (Sec. 3.4, App. D.1), on a
    multi-stage map of width ``sum(stage_chs)``; ``proj_drop`` is the FFNs' dropout."""

    def __init__(
            self, stage_chs: Sequence[int], num_heads: int = 8, key_dim: int = 32, mlp_ratio: float = 2.,
            attn_ratio: float = 2., proj_drop: float = 0., attn_drop: float = 0., drop_path: float = 0.,
            norm_layer: Type[nn.Module] = nn.BatchNorm2d, attn_act_layer: Type[nn.Module] = nn.Hardswish,
            mlp_act_layer: Type[nn.Module] = nn.GELU,
    ):
        super().__init__()
        dim = sum(stage_chs)
        csa_args = dict(num_heads=num_heads, key_dim=key_dim, attn_ratio=attn_ratio, attn_drop=attn_drop)
        self.norm1 = norm_layer(dim)
        self.attn1 = CrossScaleAttention(dim, act_layer=attn_act_layer, **csa_args)
        self.norm2 = norm_layer(dim)
        self.intra_ffn = IntraFFN(stage_chs, mlp_ratio, act_layer=mlp_act_layer, drop=proj_drop)
        self.norm3 = norm_layer(dim)
        self.attn2 = CrossScaleAttention(dim, act_layer=attn_act_layer, **csa_args)
        self.norm4 = norm_layer(dim)
        self.ffn = ConvFFN(dim, int(dim * mlp_ratio), act_layer=mlp_act_layer, drop=proj_drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0. else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn1(self.norm1(x)))
        x = x + self.drop_path(self.intra_ffn(self.norm2(x)))
        x = x + self.drop_path(self.attn2(self.norm3(x)))
        x = x + self.drop_path(self.ffn(self.norm4(x)))
        return x


class MultiStageCrossScaleAttention(nn.Module):
    """The MSCSA trunk (Fig. 4): gathering, then ``depth`` blocks; stage features (shallowest first) ->
    the multi-stage map. Arguments as Table 7; ``drop_path_rate`` is the last block's (linear from 0)."""

    def __init__(
            self, in_chs: Sequence[int], in_strides: Sequence[int] = (4, 8, 16, 32), pool_stride: int = 32,
            squeeze_ratio: Optional[float] = None, depth: int = 1, num_heads: int = 8, key_dim: int = 32,
            mlp_ratio: float = 2., attn_ratio: float = 2., proj_drop: float = 0., attn_drop: float = 0.,
            drop_path_rate: float = 0., norm_layer: Type[nn.Module] = nn.BatchNorm2d,
            attn_act_layer: Type[nn.Module] = nn.Hardswish, mlp_act_layer: Type[nn.Module] = nn.GELU,
    ):
        super().__init__()
        self.gather = MultiStageGather(
            in_chs, in_strides, pool_stride=pool_stride, squeeze_ratio=squeeze_ratio, norm_layer=norm_layer)
        self.stage_chs = self.gather.out_chs
        self.num_features = sum(self.stage_chs)
        self.grad_checkpointing = False
        dpr = [drop_path_rate * (i + 1) / depth for i in range(depth)]
        self.blocks = nn.Sequential(*[
            MscsaBlock(
                self.stage_chs, num_heads=num_heads, key_dim=key_dim, mlp_ratio=mlp_ratio,
                attn_ratio=attn_ratio, proj_drop=proj_drop, attn_drop=attn_drop, drop_path=dpr[i],
                norm_layer=norm_layer, attn_act_layer=attn_act_layer, mlp_act_layer=mlp_act_layer)
            for i in range(depth)])

    def forward(self, features: List[torch.Tensor]) -> torch.Tensor:
        x = self.gather(features)
        if self.grad_checkpointing and torch.is_grad_enabled() and not torch.jit.is_scripting():
            for block in self.blocks:
                x = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)
            return x
        return self.blocks(x)


class InjectionFusion(nn.Module):
    """Fuse one stage's MSCSA slice (``in_chs`` wide) into the backbone feature (``out_chs``):
    ``feat * sigmoid(w) + b`` (Fig. 5b)."""

    def __init__(self, in_chs: int, out_chs: int, norm_layer: Type[nn.Module] = nn.BatchNorm2d):
        super().__init__()
        self.out_chs = out_chs
        self.embed = nn.Sequential(nn.Conv2d(in_chs, 2 * out_chs, 1, bias=False), norm_layer(2 * out_chs))

    def forward(self, feat: torch.Tensor, mscsa_part: torch.Tensor, inplace: bool = False) -> torch.Tensor:
        if self.training:
            # Fig. 5b's order: BatchNorm statistics are those of the upsampled map
            weight, bias = self.embed(resize_like(mscsa_part, feat)).split(self.out_chs, dim=1)
        else:
            # the same function: 1x1 conv and eval-mode BatchNorm are per-pixel affine maps and
            # bilinear weights sum to 1, so they commute with the upsampling (docs/mscsa.md)
            weight, bias = self.embed(mscsa_part).split(self.out_chs, dim=1)
            weight, bias = resize_like(weight, feat), resize_like(bias, feat)
        return inject(feat, weight, bias, inplace)


class PrunedFusion(nn.Module):
    """Stand-in for a fusion layer removed by ``prune_intermediate_layers``."""

    def forward(self, feat: torch.Tensor, mscsa_part: torch.Tensor, inplace: bool = False) -> torch.Tensor:
        raise RuntimeError('This fusion layer was pruned (prune_intermediate_layers); its stage cannot be computed.')


class DenseFusion(nn.Module):
    """The dense-prediction variant's output stage (Fig. 5a): split the MSCSA map into its stages'
    slices (``mscsa_chs``), upsample each and fuse it into its backbone feature (``backbone_chs``)."""

    def __init__(self, mscsa_chs: Sequence[int], backbone_chs: Sequence[int],
                 norm_layer: Type[nn.Module] = nn.BatchNorm2d):
        super().__init__()
        self.mscsa_chs = list(mscsa_chs)
        self.layers = nn.ModuleList([
            InjectionFusion(i, o, norm_layer=norm_layer) for i, o in zip(mscsa_chs, backbone_chs)])

    def prune(self, keep: Sequence[int]) -> None:
        """Drop the fusion layers of stages not in ``keep``."""
        for i in range(len(self.layers)):
            if i not in keep:
                self.layers[i] = PrunedFusion()

    def forward(self, features: List[torch.Tensor], mscsa_out: torch.Tensor, indices: Optional[List[int]] = None,
                inplace: bool = False) -> List[torch.Tensor]:
        """Fused features of the stages in ``indices`` (all when None), in that order."""
        parts = mscsa_out.split(self.mscsa_chs, dim=1)
        take = list(range(len(self.layers))) if indices is None else indices
        fused: Dict[int, torch.Tensor] = {}
        for i, layer in enumerate(self.layers):
            if i in take:
                fused[i] = layer(features[i], parts[i], inplace)
        return [fused[i] for i in take]
