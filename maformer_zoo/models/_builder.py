"""Model construction shared by every maformer-zoo family: timm's ``build_model_with_cfg``, plus

* ``features_only`` defaulting to timm's *getter* feature class (our models are not sequential
  chains; the wrapper calls ``forward_intermediates``) at strides 4/8/16/32;
* weight errors decided from our own state before timm loads anything: a model without any
  weight source (nothing is published yet) fails at once, a weight file is read here safely
  (:func:`maformer_zoo.weights.load_checkpoint_file`) and its head size becomes the pretrained
  cfg's ``num_classes``, so timm keeps a trained head whenever the requested class count matches;
* a key check of the (filtered) weights against the model even where timm loads non-strictly
  (``features_only``, a new ``num_classes``), so weights of another architecture never half-load.
"""
import inspect
from typing import Any, Callable, Dict, Optional, Sequence, Type

import torch
from torch import nn
from timm.models import build_model_with_cfg, resolve_pretrained_cfg
from timm.layers import register_notrace_function

from ..errors import CheckpointMismatchError, CorruptCheckpointError, PretrainedWeightsNotFoundError, \
    UnsafeCheckpointError  # noqa: F401 (re-exported)
from ..hub import missing_weights_error, resolve_weight_file
from ..weights import format_mismatch, read_label_names, read_state_dict, state_dict_mismatch


def _names(value: Any) -> tuple:
    return (value,) if isinstance(value, str) else tuple(value or ())


def _checked_filter(filter_fn: Optional[Callable], variant: str, cfg: Dict[str, Any], source: str) -> Callable:
    """``filter_fn``, then a key check against the model (the classifier and the input conv's shape are timm's)."""
    takes_model = filter_fn is not None and len(inspect.signature(filter_fn).parameters) >= 2

    def filter_and_check(state_dict: Dict[str, Any], model: nn.Module) -> Dict[str, Any]:
        if filter_fn is not None:
            state_dict = filter_fn(state_dict, model) if takes_model else filter_fn(state_dict)
        problems = state_dict_mismatch(model, state_dict, ignore=_names(cfg.get('classifier')),
                                       ignore_shape=tuple(f'{c}.weight' for c in _names(cfg.get('first_conv'))))
        if any(problems.values()):
            raise CheckpointMismatchError(
                f"The pretrained weights ({source}) do not fit '{variant}':\n{format_mismatch(problems)}\nUse the "
                f"architecture, num_classes and in_chans they were saved with, or load them with "
                f"model.load_state_dict(..., strict=False) if a partial load is intended.")
        return state_dict

    return filter_and_check


def _weights_overlay(variant: str, cfg: Dict[str, Any]) -> Dict[str, Any]:
    """What to add to the pretrained cfg overlay so timm loads what the user gave (see the module docstring)."""
    if cfg.get('state_dict') is None and cfg.get('file') and cfg.get('source') != 'hf-hub':
        prefix = 'local-dir:' if cfg.get('source') == 'local-dir' else ''
        file = resolve_weight_file(prefix + cfg['file'], variant)  # also: does a config.json beside it name variant
        state_dict, _ = read_state_dict(file)  # our errors: missing, empty, unsafe, corrupt
        heads = [state_dict[f'{c}.weight'] for c in _names(cfg.get('classifier')) if f'{c}.weight' in state_dict]
        overlay = dict(state_dict=state_dict, file=None, source=None)
        if heads and heads[0].ndim >= 1:
            overlay['num_classes'] = int(heads[0].shape[0])
        names = read_label_names(file)  # as timm reads a local-dir's config.json: in pretrained_cfg
        if names:
            overlay['label_names'] = names
        return overlay
    if not any(cfg.get(k) for k in ('state_dict', 'hf_hub_id', 'url')):
        raise missing_weights_error(variant)
    return {}


def build_zoo_model(
        model_cls: Type[nn.Module],
        variant: str,
        pretrained: bool = False,
        pretrained_filter_fn: Optional[Callable] = None,
        default_out_indices: Sequence[int] = (0, 1, 2, 3),
        **kwargs: Any,
) -> nn.Module:
    """Build ``model_cls`` for timm entrypoint ``variant`` (see the module docstring)."""
    kwargs.setdefault('feature_cfg', dict(flatten_sequential=True, feature_cls='getter'))
    kwargs['feature_cfg'].setdefault('out_indices', kwargs.pop('out_indices', tuple(default_out_indices)))
    file = None
    if pretrained:
        overlay = dict(kwargs.get('pretrained_cfg_overlay') or {})
        cfg = resolve_pretrained_cfg(variant, pretrained_cfg=kwargs.get('pretrained_cfg'),
                                     pretrained_cfg_overlay=overlay).to_dict()
        file = cfg.get('file')
        source = f"file '{file}'" if file else f"'{cfg.get('hf_hub_id') or cfg.get('url') or 'state_dict'}'"
        kwargs['pretrained_cfg_overlay'] = dict(overlay, **_weights_overlay(variant, cfg))
        pretrained_filter_fn = _checked_filter(pretrained_filter_fn, variant, cfg, source)
    model = build_model_with_cfg(model_cls, variant, pretrained, pretrained_filter_fn=pretrained_filter_fn, **kwargs)
    cfg = getattr(model, 'pretrained_cfg', None)
    if isinstance(cfg, dict) and cfg.get('state_dict') is not None:  # do not keep a second copy of the weights
        model.pretrained_cfg = dict({k: v for k, v in cfg.items() if k != 'state_dict'}, file=file)
        if hasattr(model, 'default_cfg'):
            model.default_cfg = model.pretrained_cfg
    return model


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
