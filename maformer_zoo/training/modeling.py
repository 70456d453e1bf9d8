"""Model creation for training and validation: timm's ``create_model`` plus clear errors and
fine-tuning weight sources.

Three weight sources, each with any new ``num_classes``:

* ``pretrained=True``: the model's own pretrained weights (our Hub repos ``maformer-zoo/<name>.in1k``,
  or timm's for timm models); timm drops the classifier when ``num_classes`` differs.
* ``pretrained_file``: a ``.safetensors`` file or a checkpoint (ours or timm's), read with
  safetensors or ``torch.load(weights_only=True)``; its EMA weights are used when it has them. The
  model family's ``checkpoint_filter_fn`` converts original-repository layouts, and classifier
  tensors whose shape does not fit the new head are dropped (the head then starts from scratch).
* neither: random initialisation.
"""
import difflib
import logging
import os
import sys
from typing import Any, Dict, Optional

import torch
from torch import nn
import timm

from ..errors import CheckpointMismatchError, PretrainedWeightsNotFoundError
from ..weights import read_state_dict

__all__ = ['UnknownModelError', 'check_model_name', 'create_model_for_run', 'load_weights_file']

_logger = logging.getLogger(__name__)


class UnknownModelError(ValueError):
    """A model name that no registered timm entrypoint has."""


def check_model_name(name: str) -> None:
    """Raise :class:`UnknownModelError` with the closest registered names for an unknown ``name``."""
    if ':' in name:  # hf-hub:<repo> / local-dir:<path>: resolved by timm itself
        return
    if timm.is_model(name):
        return
    import maformer_zoo  # noqa: F401  (our models register on import)
    if timm.is_model(name):
        return
    close = difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.6)
    hint = f" Did you mean: {', '.join(close)}?" if close else ''
    raise UnknownModelError(
        f"Unknown model '{name}'.{hint} List the models with "
        "`python -c \"import timm, maformer_zoo; print(maformer_zoo.list_models())\"` (ours) "
        "or timm.list_models('*pattern*') (all).")


def _classifier_prefixes(model: nn.Module):
    names = getattr(model, 'pretrained_cfg', {}).get('classifier') or ()
    return (names,) if isinstance(names, str) else tuple(names)


def load_weights_file(model: nn.Module, path: str, use_ema: bool = True) -> Dict[str, Any]:
    """Load a weight file into ``model`` for fine-tuning; returns what was skipped.

    The classifier may differ in shape (new ``num_classes``) and is then left at its fresh
    initialisation. Any other missing, unexpected or mis-shaped tensor is an error.
    """
    state_dict, _ = read_state_dict(path, 'auto' if use_ema else 'model')  # safe; our errors for bad files
    filter_fn = getattr(sys.modules.get(type(model).__module__), 'checkpoint_filter_fn', None)
    if filter_fn is not None:
        try:
            state_dict = filter_fn(state_dict, model)
        except Exception as err:  # noqa: BLE001 - a filter made for another layout; use the file as is
            _logger.debug('checkpoint_filter_fn not applied: %s', err)
    own = model.state_dict()
    classifier = _classifier_prefixes(model)
    is_head = lambda k: any(k == c or k.startswith(c + '.') for c in classifier)  # noqa: E731
    reset_head = [k for k, v in state_dict.items()
                  if is_head(k) and k in own and own[k].shape != v.shape]
    for k in reset_head:
        del state_dict[k]
    mismatched = [f'{k}: file {tuple(v.shape)} vs model {tuple(own[k].shape)}'
                  for k, v in state_dict.items() if k in own and own[k].shape != v.shape]
    result = model.load_state_dict({k: v for k, v in state_dict.items() if k in own and own[k].shape == v.shape},
                                   strict=False)
    missing = [k for k in result.missing_keys if not (is_head(k) and reset_head)]
    unexpected = [k for k in state_dict if k not in own]
    if missing or unexpected or mismatched:
        raise CheckpointMismatchError(
            f"'{path}' does not fit model '{type(model).__name__}'. "
            f"Missing: {missing[:8]}{'...' if len(missing) > 8 else ''}; "
            f"unexpected: {unexpected[:8]}{'...' if len(unexpected) > 8 else ''}; "
            f"mis-shaped: {mismatched[:8]}. Is it a checkpoint of the same architecture "
            "(same --model and --model-kwargs)?")
    if reset_head:
        _logger.info('Fine-tuning: new classifier (%s) for %d classes', ', '.join(reset_head),
                     getattr(model, 'num_classes', -1))
    return {'reset_head': reset_head}


def create_model_for_run(
        name: str,
        num_classes: Optional[int] = None,
        pretrained: bool = False,
        weights_file: str = '',
        in_chans: Optional[int] = None,
        use_ema: bool = True,
        **kwargs: Any,
) -> nn.Module:
    """``timm.create_model`` with a checked name and one of the weight sources above."""
    check_model_name(name)
    if weights_file and not os.path.isfile(weights_file):
        raise FileNotFoundError(f"Weight file '{weights_file}' does not exist.")
    if pretrained and weights_file:
        raise ValueError('Give either pretrained=True (Hub / timm weights) or a weights file, not both.')
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    if num_classes is not None:
        kwargs['num_classes'] = num_classes
    if in_chans is not None:
        kwargs['in_chans'] = in_chans
    try:
        model = timm.create_model(name, pretrained=pretrained, **kwargs)
    except (OSError, RuntimeError) as err:
        if pretrained and 'maformer-zoo' not in str(err):
            raise PretrainedWeightsNotFoundError(
                f"Could not load the pretrained weights of '{name}': {err}\nOffline? Download them on a "
                "machine with internet into the Hugging Face cache, or pass the file with --pretrained-file.") from err
        raise
    if weights_file:
        load_weights_file(model, weights_file, use_ema=use_ema)
    return model
