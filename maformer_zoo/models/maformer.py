"""MAFormer: a transformer network with Multi-scale Attention Fusion for visual recognition.

Paper: `MAFormer: A Transformer Network with Multi-scale Attention Fusion for Visual Recognition`
(Y. Wang et al., 2022) - https://arxiv.org/abs/2209.01620. No official code exists.

Sec. 3.1, Table 1: a convolutional stem, four stages of MAF blocks (1-2) and ViT blocks (3-4). The
choices the paper leaves open: docs/maformer.md#design-decisions-what-the-paper-leaves-open-and-why.
"""
from typing import List, Optional, Sequence, Tuple, Type, Union

import torch
from torch import nn

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import DropPath, LayerNorm, LayerNorm2d, Mlp, calculate_drop_path_rates, trunc_normal_
from timm.models import generate_default_cfgs, register_model
from timm.models._features import feature_take_indices
from timm.models._manipulate import checkpoint

from ..layers.maf import (
    CrossShapedWindowAttention, GlobalLearningDownsample, MultiScaleAttentionFusion, WindowSelfAttention,
)
from ._builder import build_zoo_model, check_input

__all__ = ['MAFormer', 'MafBlock', 'TransformerBlock']

# Largest input side with full-length stripes and global stage-3 attention (docs/maformer.md#window-policy-issue-11)
_FULL_ATTN_IMG_SIZE = 384


class MafBlock(nn.Module):
    """Multi-scale Attention Fusion block (Sec. 3.2, Fig. 1b / 2c, Eq. 1-4) on ``(B, H, W, C)`` maps:
    cross-shaped window attention and MLP (local), GLD to a ``global_grid`` of tokens whose FC weights
    are defined on ``gld_ref_size`` (global), and the local-to-global fusion attention."""

    def __init__(
            self, dim: int, num_heads: int, stripe_width: int, stripe_len: Optional[int],
            gld_ref_size: Tuple[int, int], global_grid: Tuple[int, int], mlp_ratio: float = 4.,
            qkv_bias: bool = True, proj_drop: float = 0., attn_drop: float = 0., drop_path: float = 0.,
            act_layer: Type[nn.Module] = nn.GELU, norm_layer: Type[nn.Module] = LayerNorm,
    ):
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.local_attn = CrossShapedWindowAttention(
            dim, num_heads, stripe_width=stripe_width, stripe_len=stripe_len, qkv_bias=qkv_bias,
            attn_drop=attn_drop, proj_drop=proj_drop)
        self.drop_path1 = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=act_layer, drop=proj_drop)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.global_branch = GlobalLearningDownsample(gld_ref_size, global_grid)
        self.norm_local = norm_layer(dim)
        self.norm_global = norm_layer(dim)
        self.fusion = MultiScaleAttentionFusion(
            dim, num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=proj_drop)
        self.drop_path3 = DropPath(drop_path) if drop_path > 0. else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        x_norm = self.norm1(x)
        x_global = self.global_branch(x_norm)
        x = x + self.drop_path1(self.local_attn(x_norm))
        x = x + self.drop_path2(self.mlp(self.norm2(x)))
        fused = self.fusion(self.norm_local(x).reshape(B, H * W, C), self.norm_global(x_global))
        return x + self.drop_path3(fused.reshape(B, H, W, C))


class TransformerBlock(nn.Module):
    """Pre-norm ViT block (stages 3-4) on ``(B, H, W, C)`` maps; attention global (``window_size=None``)
    or in windows, shifted by half a window when ``shift``."""

    def __init__(
            self, dim: int, num_heads: int, window_size: Optional[int] = None, shift: bool = False,
            mlp_ratio: float = 4., qkv_bias: bool = True, proj_drop: float = 0., attn_drop: float = 0.,
            drop_path: float = 0., act_layer: Type[nn.Module] = nn.GELU, norm_layer: Type[nn.Module] = LayerNorm,
    ):
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = WindowSelfAttention(
            dim, num_heads, window_size=window_size, shift=shift, qkv_bias=qkv_bias,
            attn_drop=attn_drop, proj_drop=proj_drop)
        self.drop_path1 = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=act_layer, drop=proj_drop)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0. else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path1(self.attn(self.norm1(x)))
        return x + self.drop_path2(self.mlp(self.norm2(x)))


class ConvStem(nn.Module):
    """Two 3x3 stride-2 convolutions to ``H/4 x W/4``; ``(B, C, H, W)`` in, ``(B, H/4, W/4, C')`` out."""

    def __init__(self, in_chans: int, out_chans: int, act_layer: Type[nn.Module] = nn.GELU):
        super().__init__()
        self.conv1 = nn.Conv2d(in_chans, out_chans // 2, kernel_size=3, stride=2, padding=1)
        self.norm1 = LayerNorm2d(out_chans // 2)
        self.act = act_layer()
        self.conv2 = nn.Conv2d(out_chans // 2, out_chans, kernel_size=3, stride=2, padding=1)
        self.norm2 = LayerNorm(out_chans)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # channels-last convolutions: faster on CPU, and the NHWC output below needs no copy
        x = x.contiguous(memory_format=torch.channels_last)
        x = self.conv2(self.act(self.norm1(self.conv1(x))))
        return self.norm2(x.permute(0, 2, 3, 1))


class PatchMerging(nn.Module):
    """3x3 stride-2 convolution + LayerNorm between stages; ``(B, C, H, W)`` -> ``(B, ceil(H/2), ceil(W/2), C')``."""

    def __init__(self, in_chans: int, out_chans: int):
        super().__init__()
        self.conv = nn.Conv2d(in_chans, out_chans, kernel_size=3, stride=2, padding=1)
        self.norm = LayerNorm(out_chans)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.conv(x).permute(0, 2, 3, 1))


class MAFormerStage(nn.Module):
    """Patch merging (stage 1: none, the stem's output is NHWC) and blocks on ``(B, H, W, C)`` maps; NCHW out
    (a view of channels-last memory)."""

    def __init__(self, downsample: nn.Module, blocks: Sequence[nn.Module]):
        super().__init__()
        self.grad_checkpointing = False
        self.downsample = downsample
        self.blocks = nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.downsample(x)
        for block in self.blocks:
            if self.grad_checkpointing and not torch.jit.is_scripting():
                x = checkpoint(block, x)
            else:
                x = block(x)
        return x.permute(0, 3, 1, 2)


class MAFormer(nn.Module):
    """MAFormer backbone and classifier (Sec. 3.1, Table 1)."""

    def __init__(
            self,
            in_chans: int = 3, num_classes: int = 1000, global_pool: str = 'avg',
            embed_dims: Tuple[int, int, int, int] = (64, 128, 320, 512),
            depths: Tuple[int, int, int, int] = (3, 5, 8, 3),
            head_dim: int = 32, mlp_ratio: float = 4.,
            stripe_widths: Tuple[int, int] = (1, 2), global_grids: Tuple[int, int] = (7, 7),
            window_sizes: Tuple[Optional[int], Optional[int]] = (_FULL_ATTN_IMG_SIZE // 16, None),
            ref_img_size: int = 224, attn_img_size: int = _FULL_ATTN_IMG_SIZE,
            qkv_bias: bool = True,
            drop_rate: float = 0., proj_drop_rate: float = 0., attn_drop_rate: float = 0., drop_path_rate: float = 0.,
            act_layer: Type[nn.Module] = nn.GELU, norm_layer: Type[nn.Module] = LayerNorm,
    ):
        """
        Args:
            embed_dims, depths: channels and blocks of the four stages (Table 1 "Dim", "Blocks").
            stripe_widths, global_grids: cross-shaped stripe widths and GLD grid sides of the MAF stages 1-2.
            window_sizes: stage 3-4 attention window sides (``None``: global); 24 is stage 3 at ``attn_img_size``.
            ref_img_size: input size at which the GLD weights are used as stored (ImageNet training size).
            attn_img_size: largest input side at which stage 1-2 stripes are full-length.
        """
        super().__init__()
        if len(embed_dims) != 4 or len(depths) != 4:
            raise ValueError(f'MAFormer has four stages; got embed_dims={embed_dims}, depths={depths}.')
        self.in_chans = in_chans
        self.min_input_size = 32  # one token at stride 32
        self.grad_checkpointing = False
        num_heads = [d // head_dim for d in embed_dims]
        ref_sizes = [ref_img_size // (4 * 2 ** i) for i in range(4)]
        stripe_lens = [attn_img_size // (4 * 2 ** i) for i in range(2)]
        window_sizes = [None, None] + list(window_sizes)

        self.stem = ConvStem(in_chans, embed_dims[0], act_layer=act_layer)
        dpr = calculate_drop_path_rates(drop_path_rate, depths, stagewise=True)
        common = dict(
            mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, proj_drop=proj_drop_rate, attn_drop=attn_drop_rate,
            act_layer=act_layer, norm_layer=norm_layer)
        self.feature_info = []
        stages = []
        for i in range(4):
            if i < 2:
                blocks = [MafBlock(
                    embed_dims[i], num_heads[i], stripe_width=stripe_widths[i], stripe_len=stripe_lens[i],
                    gld_ref_size=(ref_sizes[i], ref_sizes[i]), global_grid=(global_grids[i], global_grids[i]),
                    drop_path=dpr[i][j], **common) for j in range(depths[i])]
            else:
                blocks = [TransformerBlock(
                    embed_dims[i], num_heads[i], window_size=window_sizes[i],
                    shift=window_sizes[i] is not None and j % 2 == 1, drop_path=dpr[i][j], **common)
                    for j in range(depths[i])]
            downsample = PatchMerging(embed_dims[i - 1], embed_dims[i]) if i > 0 else nn.Identity()
            stages.append(MAFormerStage(downsample, blocks))
            self.feature_info.append(dict(num_chs=embed_dims[i], reduction=4 * 2 ** i, module=f'stages.{i}'))
        self.stages = nn.Sequential(*stages)

        self.num_features = self.head_hidden_size = embed_dims[-1]
        self.norm = norm_layer(self.num_features)
        self.head_drop = nn.Dropout(drop_rate)
        self.reset_classifier(num_classes, global_pool)
        self.apply(self._init_weights)

    def _init_weights(self, m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    @torch.jit.ignore
    def no_weight_decay(self) -> set:
        # GLD's token-mixing weights are learned spatial pooling maps, i.e. positional parameters,
        # which ViTs keep out of weight decay like position embeddings.
        return {n for n, _ in self.named_parameters() if n.endswith('global_branch.token_mix.weight')}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        blocks = r'^stages\.(\d+)' if coarse else [
            (r'^stages\.(\d+)\.downsample', (0,)), (r'^stages\.(\d+)\.blocks\.(\d+)', None), (r'^norm', (99999,))]
        return dict(stem=r'^stem', blocks=blocks)

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable
        for stage in self.stages:
            stage.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        if global_pool is not None:
            if global_pool not in ('avg', ''):
                raise ValueError(f"global_pool must be 'avg' or ''; got {global_pool!r}.")
            self.global_pool = global_pool
        self.num_classes = num_classes
        device = self.norm.weight.device if hasattr(self.norm, 'weight') else None
        self.head = nn.Linear(self.num_features, num_classes, device=device) if num_classes > 0 else nn.Identity()

    def _check_input(self, x: torch.Tensor) -> None:
        if not torch.jit.is_scripting():
            check_input(x, self.in_chans, self.min_input_size, 'MAFormer', self.stem.conv1.weight.dtype)

    def forward_intermediates(
            self, x: torch.Tensor, indices: Optional[Union[int, List[int]]] = None, norm: bool = False,
            stop_early: bool = False, output_fmt: str = 'NCHW', intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """Stage outputs (strides 4, 8, 16, 32) and optionally the final features (timm's API);
        ``norm`` applies the final norm to the last stage's output when it is taken."""
        if output_fmt not in ('NCHW', 'NHWC'):
            # concatenation, not an f-string: TorchScript compiles this method (features_only)
            raise ValueError("output_fmt must be 'NCHW' or 'NHWC'; got '" + output_fmt + "'.")
        self._check_input(x)
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        if torch.jit.is_scripting() or not stop_early:  # TorchScript cannot slice a Sequential
            stages = self.stages
        else:
            stages = self.stages[:max_index + 1]
        last_index = len(self.stages) - 1
        intermediates = []
        x = self.stem(x)
        for idx, stage in enumerate(stages):
            x = stage(x)
            if idx in take_indices:
                feat = self._norm_nchw(x) if norm and idx == last_index else x
                intermediates.append(feat if output_fmt == 'NCHW' else feat.permute(0, 2, 3, 1))
        if intermediates_only:
            return intermediates
        if len(stages) == len(self.stages):
            x = self._norm_nchw(x)
        return x, intermediates

    def prune_intermediate_layers(
            self, indices: Union[int, List[int]] = 1, prune_norm: bool = False, prune_head: bool = True,
    ) -> List[int]:
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        self.stages = self.stages[:max_index + 1]
        if max_index < len(self.feature_info) - 1:
            self.num_features = self.head_hidden_size = self.feature_info[max_index]['num_chs']
            prune_norm = prune_head = True
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.reset_classifier(0, '')
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        return self._norm_nchw(self.stages(self.stem(x)))

    def _norm_nchw(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.global_pool == 'avg':
            x = x.mean(dim=(2, 3))
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _create_maformer(variant: str, pretrained: bool = False, **kwargs) -> MAFormer:
    return build_zoo_model(MAFormer, variant, pretrained, **kwargs)  # our checkpoints need no key conversion


def _cfg(**kwargs) -> dict:
    return {
        'url': '', 'num_classes': 1000, 'input_size': (3, 224, 224), 'pool_size': (7, 7), 'crop_pct': 0.9,
        'interpolation': 'bicubic', 'fixed_input_size': False, 'mean': IMAGENET_DEFAULT_MEAN,
        'std': IMAGENET_DEFAULT_STD, 'first_conv': 'stem.conv1', 'classifier': 'head', 'license': 'apache-2.0',
        'paper_ids': 'arXiv:2209.01620',
        'paper_name': 'MAFormer: A Transformer Network with Multi-scale Attention Fusion for Visual Recognition',
        **kwargs,
    }


default_cfgs = generate_default_cfgs({
    'maformer_s.in1k': _cfg(),
    'maformer_b.in1k': _cfg(),
    'maformer_l.in1k': _cfg(),
})


@register_model
def maformer_s(pretrained: bool = False, **kwargs) -> MAFormer:
    """MAFormer-S (Table 1): 23M params, 4.5 GFLOPs, 83.7% top-1 (with Token Labeling)."""
    model_args = dict(embed_dims=(64, 128, 320, 512), depths=(3, 5, 8, 3), global_grids=(7, 7))
    return _create_maformer('maformer_s', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def maformer_b(pretrained: bool = False, **kwargs) -> MAFormer:
    """MAFormer-B (Table 1): 53M params, 9.8 GFLOPs, 85.0% top-1 (with Token Labeling)."""
    model_args = dict(embed_dims=(64, 128, 320, 512), depths=(3, 8, 20, 7), global_grids=(14, 14))
    return _create_maformer('maformer_b', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def maformer_l(pretrained: bool = False, **kwargs) -> MAFormer:
    """MAFormer-L (Table 1): 104M params, 22.6 GFLOPs, 85.9% top-1 (with Token Labeling)."""
    model_args = dict(embed_dims=(128, 192, 448, 640), depths=(3, 8, 24, 7), global_grids=(14, 14))
    return _create_maformer('maformer_l', pretrained=pretrained, **dict(model_args, **kwargs))
