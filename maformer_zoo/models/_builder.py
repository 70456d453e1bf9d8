"""Model construction shared by every maformer-zoo family.

``build_zoo_model`` is timm's ``build_model_with_cfg`` with two things added:

* ``features_only`` defaults to timm's *getter* feature class (our models are not sequential
  chains, so the feature wrapper calls ``forward_intermediates``), at strides 4/8/16/32;
* pretrained-weight failures become errors that say what went wrong and what to do, instead of a
  bare hub or ``load_state_dict`` traceback.

Weights are loaded by timm's ``load_pretrained``, which reads safetensors or
``torch.load(weights_only=True)`` only, so a pickle carrying code is refused.
"""
from typing import Any, Callable, Optional, Sequence, Type

import torch
from torch import nn
from timm.models import build_model_with_cfg


class PretrainedWeightsNotFoundError(RuntimeError):
    """No usable pretrained weight file for a model (offline without a cache, missing file...)."""


class CheckpointMismatchError(RuntimeError):
    """A checkpoint's keys or shapes do not fit the model it is loaded into."""


def _weight_sources_help(variant: str, hf_hub_id: Optional[str]) -> str:
    repo = hf_hub_id or f'maformer-zoo/{variant}.in1k'
    return (
        f"Ways to provide the weights of '{variant}':\n"
        f"  * put them in the Hugging Face cache on a machine with internet:\n"
        f"      huggingface-cli download {repo}   (then HF_HUB_OFFLINE=1 works here)\n"
        f"  * load a local file: timm.create_model('{variant}', pretrained=True,\n"
        f"      pretrained_cfg_overlay=dict(file='/path/model.safetensors'))\n"
        f"  * load a local Hub folder: timm.create_model('local-dir:/path/to/folder', pretrained=True)\n"
        f"  * or use pretrained=False for random initialisation."
    )


def _is_hub_unavailable(err: BaseException) -> bool:
    try:
        from huggingface_hub import errors as hf_errors
    except ImportError:  # pragma: no cover - very old huggingface_hub
        return False
    hub_types = tuple(
        getattr(hf_errors, name) for name in (
            'LocalEntryNotFoundError', 'OfflineModeIsEnabled', 'RepositoryNotFoundError',
            'EntryNotFoundError', 'RevisionNotFoundError', 'GatedRepoError',
        ) if hasattr(hf_errors, name)
    )
    return isinstance(err, hub_types) or isinstance(err, (ConnectionError, TimeoutError, OSError)) and (
        'huggingface' in str(err).lower() or 'offline' in str(err).lower())


def build_zoo_model(
        model_cls: Type[nn.Module],
        variant: str,
        pretrained: bool = False,
        pretrained_filter_fn: Optional[Callable] = None,
        default_out_indices: Sequence[int] = (0, 1, 2, 3),
        **kwargs: Any,
) -> nn.Module:
    """Build ``model_cls`` for timm entrypoint ``variant`` (see the module docstring)."""
    out_indices = kwargs.pop('out_indices', tuple(default_out_indices))
    feature_cfg = dict(flatten_sequential=True, out_indices=out_indices, feature_cls='getter')
    try:
        return build_model_with_cfg(
            model_cls,
            variant,
            pretrained,
            pretrained_filter_fn=pretrained_filter_fn,
            feature_cfg=feature_cfg,
            **kwargs,
        )
    except FileNotFoundError as err:
        raise PretrainedWeightsNotFoundError(
            f"Pretrained weight file for '{variant}' not found: {err}.\n"
            + _weight_sources_help(variant, None)) from err
    except Exception as err:  # noqa: BLE001 - re-raised with context below
        if pretrained and _is_hub_unavailable(err):
            cfg = kwargs.get('pretrained_cfg') or {}
            hub_id = cfg.get('hf_hub_id') if isinstance(cfg, dict) else getattr(cfg, 'hf_hub_id', None)
            raise PretrainedWeightsNotFoundError(
                f"Could not get pretrained weights for '{variant}' from the Hugging Face Hub "
                f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}). "
                f"If you are offline (HF_HUB_OFFLINE=1) the file is not in your cache.\n"
                + _weight_sources_help(variant, hub_id)) from err
        if isinstance(err, RuntimeError) and 'Error(s) in loading state_dict' in str(err):
            raise CheckpointMismatchError(
                f"The checkpoint does not fit '{variant}': {err}\n"
                f"Check that it was saved from the same architecture (and variant) and that "
                f"num_classes / in_chans match, or load it with pretrained=False and "
                f"model.load_state_dict(..., strict=False) if a partial load is intended."
            ) from err
        raise


def check_input(x: torch.Tensor, in_chans: int, min_size: int, model_name: str) -> None:
    """Fail early, and clearly, on an input the model cannot take.

    Args:
        x: the batch given to ``forward``.
        in_chans: channels the model was built for.
        min_size: smallest height/width the model supports.
        model_name: shown in the message.
    """
    if x.ndim != 4:
        raise ValueError(
            f"{model_name} expects a 4-D batch (B, C, H, W); got a tensor of shape {tuple(x.shape)}. "
            f"Add a batch dimension with x.unsqueeze(0) for a single image.")
    if x.shape[1] != in_chans:
        raise ValueError(
            f"{model_name} was built for {in_chans} input channels but got {x.shape[1]} "
            f"(input shape {tuple(x.shape)}). Convert the images, or create the model with "
            f"in_chans={x.shape[1]}.")
    if x.shape[-2] < min_size or x.shape[-1] < min_size:
        raise ValueError(
            f"{model_name} needs inputs of at least {min_size}x{min_size} pixels; got "
            f"{x.shape[-2]}x{x.shape[-1]}. Resize or pad the images.")
