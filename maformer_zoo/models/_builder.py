"""Construction shared by the maformer-zoo families: timm's ``build_model_with_cfg``, with ``features_only`` as
timm's *getter* feature class at strides 4-32 (the models are not chains), and weights loaded by timm's
``load_pretrained`` from a file we read (:func:`maformer_zoo.weights.pretrained_overlay`) and check
(:func:`maformer_zoo.weights.check_fit`). docs/weights.md#loading-weights-you-have.
"""
from functools import partial
from typing import Any, Callable, Dict, Optional, Sequence, Type

import timm
import torch
from torch import nn
from timm.layers import register_notrace_function
from timm.models import build_model_with_cfg, resolve_pretrained_cfg

from ..errors import download_errors
from ..weights import check_fit, layer_names, missing_weights_error, pretrained_overlay


def _filter_and_check(filter_fn: Optional[Callable], cfg: Dict[str, Any], variant: str,
                      state_dict: Dict[str, Any], model: nn.Module) -> Dict[str, Any]:
    state_dict = filter_fn(state_dict, model) if filter_fn else state_dict
    # timm itself adapts the input conv to in_chans and drops a classifier of another size
    skip = layer_names(cfg.get('classifier')) + tuple(f'{c}.weight' for c in layer_names(cfg.get('first_conv')))
    check_fit(model, state_dict, f"'{cfg.get('file') or cfg.get('hf_hub_id') or variant}'", skip)
    return state_dict


def build_zoo_model(
        model_cls: Type[nn.Module],
        variant: str,
        pretrained: bool = False,
        pretrained_filter_fn: Optional[Callable] = None,
        default_out_indices: Sequence[int] = (0, 1, 2, 3),
        **kwargs: Any,
) -> nn.Module:
    """Build ``model_cls`` for timm entrypoint ``variant``; ``pretrained=True`` without a source fails at once."""
    kwargs.setdefault('feature_cfg', dict(flatten_sequential=True, feature_cls='getter'))
    kwargs['feature_cfg'].setdefault('out_indices', kwargs.pop('out_indices', tuple(default_out_indices)))
    if pretrained:
        overlay = dict(kwargs.get('pretrained_cfg_overlay') or {})
        cfg = resolve_pretrained_cfg(variant, pretrained_cfg=kwargs.get('pretrained_cfg'),
                                     pretrained_cfg_overlay=overlay).to_dict()
        if cfg.get('file') and cfg.get('state_dict') is None and cfg.get('source') != 'hf-hub':
            # read by content, with our errors: timm's file route picks its reader by the file name
            overlay.update(pretrained_overlay(cfg['file'], variant))  # a local-dir: source's file is its folder
        elif not any(cfg.get(k) for k in ('state_dict', 'hf_hub_id', 'url')):
            raise missing_weights_error(variant)
        kwargs['pretrained_cfg_overlay'] = overlay
        pretrained_filter_fn = partial(_filter_and_check, pretrained_filter_fn, cfg, variant)
    model = build_model_with_cfg(model_cls, variant, pretrained, pretrained_filter_fn=pretrained_filter_fn, **kwargs)
    for built in (model, getattr(model, 'model', None)):  # FeatureGetterNet keeps the model as .model
        (getattr(built, 'pretrained_cfg', None) or {}).pop('state_dict', None)  # no second copy of the weights
    return model


def create_base(name: str, pretrained: bool, **kwargs: Any) -> nn.Module:
    """``timm.create_model`` for a family's base network, with one line where its weights cannot be had."""
    with download_errors(f"timm's weights for the base '{name}'", f"give a file, base_pretrained_cfg_overlay=dict("
                         f"file='/path/{name}.safetensors'), fill the Hugging Face cache where there is internet, or "
                         f"use pretrained_base=False.", active=pretrained):
        return timm.create_model(name, pretrained=pretrained, **kwargs)


@register_notrace_function  # Python control flow on sizes: an FX leaf, still run by the traced graph
def check_input(x: torch.Tensor, in_chans: int, min_size: int, model_name: str,
                dtype: Optional[torch.dtype] = None) -> None:
    """Fail early, and clearly, on an input the model cannot take.

    Args:
        x: the batch given to ``forward``.
        in_chans: channels the model was built for.
        min_size: smallest height/width the model supports.
        model_name: shown in the message.
        dtype: the model's parameter dtype, if the caller knows it.
    """
    if x.ndim != 4:
        raise ValueError(
            f"{model_name} expects a 4-D batch (B, C, H, W); got a tensor of shape {tuple(x.shape)}. "
            f"Add a batch dimension with x.unsqueeze(0) for a single image.")
    if x.shape[0] == 0:
        raise ValueError(f"{model_name} got an empty batch (shape {tuple(x.shape)}): pass at least one image.")
    if x.shape[1] != in_chans:
        if x.shape[-1] == in_chans:
            raise ValueError(
                f"{model_name} expects channels first (B, {in_chans}, H, W) but got {tuple(x.shape)}, which looks "
                f"channels-last (B, H, W, C): pass x.permute(0, 3, 1, 2).")
        raise ValueError(
            f"{model_name} was built for {in_chans} input channels but got {x.shape[1]} "
            f"(input shape {tuple(x.shape)}). Convert the images, or create the model with "
            f"in_chans={x.shape[1]}.")
    if not x.is_floating_point() or (dtype is not None and x.dtype != dtype
                                     and not torch.is_autocast_enabled(x.device.type)):  # autocast casts itself
        wanted = dtype if dtype is not None else 'a floating-point dtype'
        raise TypeError(f"{model_name} expects input of {wanted} (its parameters' dtype) but got {x.dtype}: pass "
                        f"x.to({dtype if dtype is not None else 'torch.float32'}) (images scaled and normalised).")
    if x.shape[-2] < min_size or x.shape[-1] < min_size:
        raise ValueError(
            f"{model_name} needs inputs of at least {min_size}x{min_size} pixels; got "
            f"{x.shape[-2]}x{x.shape[-1]}. Resize or pad the images.")
