""" MSCSA-augmented backbones: ResNet, PVTv2, Swin and ConvNeXt with Multi-Stage Cross-Scale Attention

Paper: `Vision Backbone Enhancement via Multi-Stage Cross-Scale Attention` (Shang et al., 2023)
    - https://arxiv.org/abs/2308.05872

The base is timm's own model; the MSCSA map feeds the classifier (Fig. 4) or, ``features_only``, is fused
into every stage (Fig. 5); settings of Table 7. Usage and choices: docs/mscsa.md#choices-the-paper-leaves-open.
"""
import re
from typing import Any, Dict, List, Optional, Set, Tuple, Type, Union

import torch
import torch.nn.functional as F
from torch import nn
from torch.fx._symbolic_trace import is_fx_symbolic_tracing

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import ClassifierHead, register_notrace_function, trunc_normal_
from timm.models import SwinTransformer, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices
from timm.models.swin_transformer import window_partition, window_reverse

from ..layers._compile import is_compiling
from ..layers.maf import window_labels
from ..layers.mscsa import DenseFusion, MultiStageCrossScaleAttention
from ._builder import build_zoo_model, check_input, create_base

__all__ = ['MscsaNet']

_STAGE_STRIDES = (4, 8, 16, 32)
_GROUP_LAST = 100000  # after every base group (timm bases use at most 99999 for their final norm)


def _stage_indices(base: nn.Module, base_name: str) -> Tuple[List[int], List[Dict[str, Any]]]:
    """Indices (for ``forward_intermediates``) and feature info of the base's stride 4..32 stages."""
    infos = list(getattr(base, 'feature_info', None) or [])
    indices = []
    for stride in _STAGE_STRIDES:
        matches = [i for i, info in enumerate(infos) if info.get('reduction') == stride]
        if not matches:
            raise ValueError(f"Base model '{base_name}' has no feature at stride {stride} (its feature_info has "
                             f"strides {[info.get('reduction') for info in infos]}); MSCSA needs {_STAGE_STRIDES}.")
        indices.append(matches[-1])
    return indices, [infos[i] for i in indices]


def _prefix_matcher(matcher: Any, prefix: str) -> Any:
    """A base model's ``group_matcher`` value with its regexes moved under ``prefix``."""
    def prefix_regex(pattern: str) -> str:
        body = re.sub(r'(^|\|)\^', r'\1', pattern)  # drop the anchors of every alternative
        return rf'^{re.escape(prefix)}(?:{body})'

    if isinstance(matcher, str):
        return prefix_regex(matcher)
    if isinstance(matcher, (list, tuple)):
        return [(prefix_regex(pattern), ordinal) for pattern, ordinal in matcher]
    if isinstance(matcher, dict):
        return {k: _prefix_matcher(v, prefix) for k, v in matcher.items()}
    raise TypeError(f'Unsupported group_matcher entry {matcher!r}.')


@register_notrace_function  # branches on sizes: an FX leaf
def pad_to_multiple(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """Zero-pad an NCHW batch at the bottom/right to sides that are multiples of ``multiple``."""
    pad_h = -x.shape[-2] % multiple
    pad_w = -x.shape[-1] % multiple
    if pad_h > 0 or pad_w > 0:
        x = F.pad(x, [0, pad_w, 0, pad_h])
    return x


@register_notrace_function  # sizes are Proxies under FX: a leaf
def swin_shift_mask(x: torch.Tensor, window: Tuple[int, int], shift: Tuple[int, int]) -> torch.Tensor:
    """timm's ``SwinTransformerBlock.get_attn_mask(x)`` (``(num_windows, N, N)``, 0 within a region, -100 across)
    for the padded, shifted ``x (B, Hp, Wp, C)``, from :func:`window_labels`: export keeps sizes symbolic."""
    size = (x.shape[1], x.shape[2])
    label = window_labels(size, size, window, shift, x.device)
    rows, cols = label.shape[0] // window[0], label.shape[1] // window[1]
    label = label.reshape(rows, window[0], cols, window[1]).permute(0, 2, 1, 3).reshape(rows * cols, -1)
    across = label[:, None, :] != label[:, :, None]
    return torch.zeros(across.shape, dtype=x.dtype, device=x.device).masked_fill(across, -100.)


def _swin_window_attention(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """timm's ``SwinTransformerBlock._attn`` with sizes kept symbolic (see :meth:`MscsaNet._swin_features`)."""
    B, H, W, C = x.shape
    (win_h, win_w), (shift_h, shift_w) = block.window_size, block.shift_size
    if shift_h or shift_w:
        x = torch.roll(x, shifts=(-shift_h, -shift_w), dims=(1, 2))
    # padded sizes as ceil-multiples: window_partition's view then needs no divisibility decision
    pad_h, pad_w = -(-H // win_h) * win_h - H, -(-W // win_w) * win_w - W
    x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
    mask = swin_shift_mask(x, block.window_size, block.shift_size) if shift_h or shift_w else None
    windows = block.attn(window_partition(x, block.window_size).view(-1, win_h * win_w, C), mask=mask)
    x = window_reverse(windows.view(-1, win_h, win_w, C), block.window_size, H + pad_h, W + pad_w)
    # crop by negative padding: a copy with symbolic sizes (timm's contiguous() of a cropped view makes
    # torch.export decide whether the crop removed anything)
    x = F.pad(x, (0, 0, 0, -pad_w, 0, -pad_h))
    if shift_h or shift_w:
        x = torch.roll(x, shifts=(shift_h, shift_w), dims=(1, 2))
    return x


class MscsaNet(nn.Module):
    """A timm base model with the MSCSA add-on (classification variant, or dense with fusion)."""

    def __init__(
            self,
            base_model: str,
            squeeze_ratio: Optional[float] = None, depth: int = 1, num_heads: int = 8, key_dim: int = 32,
            mlp_ratio: float = 2., attn_ratio: float = 2., pool_stride: int = 32,
            num_classes: int = 1000, in_chans: int = 3, global_pool: str = 'avg',
            drop_rate: float = 0., proj_drop_rate: float = 0., attn_drop_rate: float = 0., drop_path_rate: float = 0.,
            base_drop_path_rate: Optional[float] = None, dense_fusion: bool = False,
            pretrained_base: bool = False, base_pretrained_cfg_overlay: Optional[Dict[str, Any]] = None,
            base_kwargs: Optional[Dict[str, Any]] = None, input_multiple: int = 1, min_input_size: int = 32,
            norm_layer: Type[nn.Module] = nn.BatchNorm2d, attn_act_layer: Type[nn.Module] = nn.Hardswish,
            mlp_act_layer: Type[nn.Module] = nn.GELU, model_name: Optional[str] = None,
            device: Optional[Union[str, torch.device]] = None, dtype: Optional[torch.dtype] = None,
    ):
        """
        Args:
            base_model: timm name of the base (``'resnet50'``, or with a weight tag ``'resnet50.tv_in1k'``).
            squeeze_ratio ... pool_stride: Table 7 (``key_dim`` of queries/keys; values ``attn_ratio`` times wider).
            drop_path_rate: of the MSCSA blocks, and of the base unless ``base_drop_path_rate`` is given.
            dense_fusion: build the dense-prediction variant's fusion layers (Fig. 5; ``features_only``).
            pretrained_base: load timm's weights into the base only, from ``base_pretrained_cfg_overlay``
                (e.g. ``dict(file='resnet50.safetensors')``) if given; ``base_kwargs`` go to its ``create_model``.
            input_multiple: inputs are zero-padded (bottom/right) to a multiple of this.
        """
        super().__init__()
        self.model_name = model_name or f'{base_model}+MSCSA'
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.input_multiple = input_multiple
        self.min_input_size = min_input_size
        self.grad_checkpointing = False
        self.num_stages = len(_STAGE_STRIDES)  # an attribute: TorchScript reads no module globals

        base_kwargs = dict(base_kwargs or {})
        if base_pretrained_cfg_overlay:
            base_kwargs['pretrained_cfg_overlay'] = base_pretrained_cfg_overlay
        self.base = create_base(
            base_model, pretrained_base, in_chans=in_chans,
            drop_path_rate=drop_path_rate if base_drop_path_rate is None else base_drop_path_rate, **base_kwargs)
        self._base_indices, base_info = _stage_indices(self.base, base_model)
        # the MSCSA branch replaces the base's classifier and final norm
        self.base.prune_intermediate_layers(self._base_indices, prune_norm=True, prune_head=True)
        base_chs = [info['num_chs'] for info in base_info]

        self.mscsa = MultiStageCrossScaleAttention(
            base_chs, in_strides=_STAGE_STRIDES, pool_stride=pool_stride, squeeze_ratio=squeeze_ratio,
            depth=depth, num_heads=num_heads, key_dim=key_dim, mlp_ratio=mlp_ratio, attn_ratio=attn_ratio,
            proj_drop=proj_drop_rate, attn_drop=attn_drop_rate, drop_path_rate=drop_path_rate,
            norm_layer=norm_layer, attn_act_layer=attn_act_layer, mlp_act_layer=mlp_act_layer)
        self.num_features = self.head_hidden_size = self.mscsa.num_features
        self.fusion = DenseFusion(self.mscsa.stage_chs, base_chs, norm_layer=norm_layer) if dense_fusion else None
        self.norm = norm_layer(self.num_features)
        self.head = ClassifierHead(self.num_features, num_classes, pool_type=global_pool, drop_rate=drop_rate)
        self.feature_info = [
            dict(num_chs=c, reduction=s, module=f'fusion.layers.{i}' if dense_fusion else f"base.{info['module']}")
            for i, (c, s, info) in enumerate(zip(base_chs, _STAGE_STRIDES, base_info))]

        if isinstance(self.head.fc, nn.Linear):
            trunc_normal_(self.head.fc.weight, std=.02)
            nn.init.zeros_(self.head.fc.bias)
        if device is not None or dtype is not None:
            self.to(device=device, dtype=dtype)

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        base = _prefix_matcher(self.base.group_matcher(coarse=coarse), 'base.')
        blocks = base.get('blocks', [])
        blocks = [(blocks, None)] if isinstance(blocks, str) else list(blocks)
        blocks.append((r'^mscsa\.|^fusion\.|^norm\.', (_GROUP_LAST,)))
        return dict(stem=base['stem'], blocks=blocks)

    @torch.jit.ignore
    def no_weight_decay(self) -> Set[str]:
        base_nwd = self.base.no_weight_decay() if hasattr(self.base, 'no_weight_decay') else set()
        return {f'base.{name}' for name in base_nwd}

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable
        self.base.set_grad_checkpointing(enable)
        self.mscsa.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head.fc

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        self.num_classes = num_classes
        self.head.reset(num_classes, pool_type=global_pool)

    def _base_features(self, x: torch.Tensor, indices: Optional[List[int]] = None,
                       stop_early: bool = False) -> List[torch.Tensor]:
        """The base's stage features (all four, or the stages in ``indices``)."""
        if not torch.jit.is_scripting():
            check_input(x, self.in_chans, self.min_input_size, self.model_name, next(self.parameters()).dtype)
        x = pad_to_multiple(x, self.input_multiple)
        base_indices = self._base_indices if indices is None else [self._base_indices[i] for i in indices]
        if torch.jit.is_scripting():
            if hasattr(self.base, 'layer4') and hasattr(self.base, 'maxpool'):
                # timm's ResNet.forward_intermediates is not scriptable (a tuple slice); the same stages
                return self._scripted_resnet_stages(x, base_indices)
            else:
                feats = self.base.forward_intermediates(
                    x, indices=base_indices, stop_early=stop_early, intermediates_only=True)
                assert torch.jit.isinstance(feats, List[torch.Tensor])
                return feats
        elif isinstance(self.base, SwinTransformer) and (is_fx_symbolic_tracing() or is_compiling()):
            return self._swin_features(x, base_indices, stop_early)
        else:
            return self.base.forward_intermediates(
                x, indices=base_indices, stop_early=stop_early, intermediates_only=True)

    def _swin_features(self, x: torch.Tensor, base_indices: List[int], stop_early: bool) -> List[torch.Tensor]:
        """timm Swin's ``forward_intermediates`` with its blocks' own modules and traceable window code, for FX
        and compile/export; eager and TorchScript run timm's (docs/maformer.md#deploy-paths-per-model-issue-11)."""
        base = self.base
        last = max(base_indices) if stop_early else len(base.layers) - 1
        x = base.patch_embed(x)
        out: List[torch.Tensor] = []
        for i, stage in enumerate(base.layers):
            if i > last:
                break
            x = stage.downsample(x)
            for block in stage.blocks:
                B, H, W, C = x.shape
                x = x + block.drop_path1(_swin_window_attention(block, block.norm1(x)))
                x = x.reshape(B, -1, C)
                x = x + block.drop_path2(block.mlp(block.norm2(x)))
                x = x.reshape(B, H, W, C)
            if i in base_indices:
                out.append(x.permute(0, 3, 1, 2).contiguous())
        return out

    def _scripted_resnet_stages(self, x: torch.Tensor, base_indices: List[int]) -> List[torch.Tensor]:
        """timm ResNet's feature indices 1-4 (``layer1``-``layer4``), for TorchScript only."""
        base = self.base
        x1 = base.layer1(base.maxpool(base.act1(base.bn1(base.conv1(x)))))
        x2 = base.layer2(x1)
        x3 = base.layer3(x2)
        out: List[torch.Tensor] = []
        for i, feat in enumerate([x1, x2, x3, base.layer4(x3)]):
            if i + 1 in base_indices:
                out.append(feat)
        return out

    def forward_intermediates(
            self, x: torch.Tensor, indices: Optional[Union[int, List[int]]] = None, norm: bool = False,
            stop_early: bool = False, output_fmt: str = 'NCHW', intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """timm's API: the fused features with ``dense_fusion``, else the base's stages; ``norm`` must be False.
        ``stop_early`` without fusion layers skips MSCSA and the base's later stages (the final features are then
        the deepest stage taken); with them it changes nothing (docs/mscsa.md#choices-the-paper-leaves-open)."""
        if output_fmt not in ('NCHW', 'NHWC'):
            # concatenation, not an f-string: TorchScript compiles this method (features_only)
            raise ValueError("output_fmt must be 'NCHW' or 'NHWC'; got '" + output_fmt + "'.")
        if norm:
            raise ValueError(self.model_name + " has no final norm for its stage features (MSCSA replaces the base's "
                             'norm; forward_features is normalised): call forward_intermediates with norm=False.')
        take_indices, _ = feature_take_indices(self.num_stages, indices)
        if self.fusion is None and stop_early:
            intermediates = self._base_features(x, take_indices, stop_early=True)
            x = intermediates[-1]
        else:
            features = self._base_features(x)
            x = self.mscsa(features)
            if self.fusion is not None:
                # the base features are ours and not needed after fusion
                intermediates = self.fusion(features, x, take_indices, inplace=True)
            else:
                intermediates = [features[i] for i in take_indices]
            x = self.norm(x)
        if output_fmt == 'NHWC':
            intermediates = [t.permute(0, 2, 3, 1) for t in intermediates]
        if intermediates_only:
            return intermediates
        return x, intermediates

    def prune_intermediate_layers(
            self, indices: Union[int, List[int]] = 1, prune_norm: bool = False, prune_head: bool = True,
    ) -> List[int]:
        """Remove the head, final norm and unused fusion layers; the base's stages all stay (MSCSA reads them)."""
        take_indices, _ = feature_take_indices(self.num_stages, indices)
        if prune_head:
            self.reset_classifier(0, '')
        if prune_norm:
            self.norm = nn.Identity()
        if self.fusion is not None:
            self.fusion.prune(take_indices)
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        features = self._base_features(x)
        x = self.mscsa(features)
        if not torch.jit.is_scripting():
            if self.fusion is not None and is_fx_symbolic_tracing():
                # put the fusion layers (the dense variant's feature_info modules) into the FX graph
                # that timm's feature_cls='fx' extracts from; unused outputs are pruned from the graph
                self.fusion(features, x)
        return self.norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.head(x, pre_logits=pre_logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def checkpoint_filter_fn(state_dict: Dict[str, torch.Tensor], model: MscsaNet) -> Dict[str, torch.Tensor]:
    """Refuse a bare base model's checkpoint; keep the model's own fusion layers where the checkpoint
    has none (a classification checkpoint in the dense variant: they train on the dense task, Fig. 5),
    and drop a dense checkpoint's fusion layers in the classification variant."""
    if state_dict and not any(k.startswith(('base.', 'mscsa.')) for k in state_dict):
        raise ValueError(
            f"This checkpoint has no 'base.' or 'mscsa.' keys (first keys: {list(state_dict)[:3]}): it looks "
            f"like weights of a plain timm model. To start {model.model_name} from base weights, create it "
            f"with pretrained_base=True, base_pretrained_cfg_overlay=dict(file=...) instead of pretrained=True.")
    if model.fusion is not None:
        for k, v in model.state_dict().items():
            if k.startswith('fusion.') and k not in state_dict:
                state_dict[k] = v
    else:
        state_dict = {k: v for k, v in state_dict.items() if not k.startswith('fusion.')}
    return state_dict


def _create_mscsa(variant: str, pretrained: bool, kwargs: Dict[str, Any], **model_args: Any) -> MscsaNet:
    """A Table 7 model: the base is ``variant`` without ``_mscsa``; ``kwargs`` override ``model_args``."""
    kwargs = {**model_args, 'base_model': variant[:-len('_mscsa')], 'model_name': variant, **kwargs}
    if kwargs.get('features_only', False):
        kwargs.setdefault('dense_fusion', True)
    return build_zoo_model(MscsaNet, variant, pretrained, pretrained_filter_fn=checkpoint_filter_fn, **kwargs)


def _cfg(**kwargs: Any) -> Dict[str, Any]:
    return {
        'num_classes': 1000, 'input_size': (3, 224, 224), 'pool_size': (7, 7), 'crop_pct': 0.9,
        'interpolation': 'bicubic', 'fixed_input_size': False, 'mean': IMAGENET_DEFAULT_MEAN,
        'std': IMAGENET_DEFAULT_STD, 'classifier': 'head.fc', 'license': 'apache-2.0', 'paper_ids': 'arXiv:2308.05872',
        'paper_name': 'Vision Backbone Enhancement via Multi-Stage Cross-Scale Attention', **kwargs,
    }


default_cfgs = generate_default_cfgs({
    'resnet18_mscsa.in1k': _cfg(first_conv='base.conv1', crop_pct=0.875),
    'resnet50_mscsa.in1k': _cfg(first_conv='base.conv1', crop_pct=0.875),
    'pvt_v2_b0_mscsa.in1k': _cfg(first_conv='base.patch_embed.proj'),
    'pvt_v2_b1_mscsa.in1k': _cfg(first_conv='base.patch_embed.proj'),
    'pvt_v2_b2_mscsa.in1k': _cfg(first_conv='base.patch_embed.proj'),
    'swin_tiny_patch4_window7_224_mscsa.in1k': _cfg(first_conv='base.patch_embed.proj'),
    'convnext_tiny_mscsa.in1k': _cfg(first_conv='base.stem.0', crop_pct=0.875),
})


# Table 7 (App. B) configurations; depth 1 and MLP ratio 2 (MscsaNet's defaults) in all of them
@register_model
def resnet18_mscsa(pretrained: bool = False, **kwargs: Any) -> MscsaNet:
    """ResNet-18 + MSCSA (Table 7)."""
    return _create_mscsa('resnet18_mscsa', pretrained, kwargs, squeeze_ratio=5 / 8, num_heads=8, key_dim=24)


@register_model
def resnet50_mscsa(pretrained: bool = False, **kwargs: Any) -> MscsaNet:
    """ResNet-50 + MSCSA (Table 7)."""
    return _create_mscsa('resnet50_mscsa', pretrained, kwargs, squeeze_ratio=1 / 4, num_heads=8, key_dim=32)


@register_model
def pvt_v2_b0_mscsa(pretrained: bool = False, **kwargs: Any) -> MscsaNet:
    """PVTv2-B0 + MSCSA (Table 7)."""
    return _create_mscsa('pvt_v2_b0_mscsa', pretrained, kwargs, squeeze_ratio=3 / 4, num_heads=8, key_dim=15)


@register_model
def pvt_v2_b1_mscsa(pretrained: bool = False, **kwargs: Any) -> MscsaNet:
    """PVTv2-B1 + MSCSA (Table 7)."""
    return _create_mscsa('pvt_v2_b1_mscsa', pretrained, kwargs, squeeze_ratio=5 / 8, num_heads=8, key_dim=24)


@register_model
def pvt_v2_b2_mscsa(pretrained: bool = False, **kwargs: Any) -> MscsaNet:
    """PVTv2-B2 + MSCSA (Table 7)."""
    return _create_mscsa('pvt_v2_b2_mscsa', pretrained, kwargs, squeeze_ratio=None, num_heads=8, key_dim=35)


@register_model
def swin_tiny_patch4_window7_224_mscsa(pretrained: bool = False, **kwargs: Any) -> MscsaNet:
    """Swin-T + MSCSA (Table 7); any input size."""
    base_kwargs = dict(strict_img_size=False, **kwargs.pop('base_kwargs', {}))
    return _create_mscsa('swin_tiny_patch4_window7_224_mscsa', pretrained, kwargs, squeeze_ratio=3 / 4, num_heads=12,
                         key_dim=28, input_multiple=4, base_kwargs=base_kwargs)


@register_model
def convnext_tiny_mscsa(pretrained: bool = False, **kwargs: Any) -> MscsaNet:
    """ConvNeXt-T + MSCSA (Table 7)."""
    return _create_mscsa('convnext_tiny_mscsa', pretrained, kwargs, squeeze_ratio=3 / 4, num_heads=12, key_dim=28)
