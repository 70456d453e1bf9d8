"""Model creation for training and validation: ``timm.create_model`` with a checked name and one weight source
(``pretrained=True``, or a ``weights_file`` to fine-tune from, whose classifier starts afresh if its shape
differs). docs/weights.md#loading-weights-you-have.
"""
import difflib
import logging
from typing import Any, Optional

import timm
from torch import nn

from ..errors import download_errors
from ..weights import check_fit, layer_names, read_state_dict

__all__ = ['UnknownModelError', 'check_model_name', 'create_model_for_run']

_logger = logging.getLogger(__name__)


class UnknownModelError(ValueError):
    """A model name that no registered timm entrypoint has."""


def check_model_name(name: str) -> None:
    """Raise :class:`UnknownModelError` with the closest registered names for an unknown ``name``."""
    if ':' in name or timm.is_model(name):  # hf-hub:<repo> / local-dir:<path>: resolved by timm itself
        return
    close = difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.6)
    hint = f" Did you mean: {', '.join(close)}?" if close else ''
    raise UnknownModelError(
        f"Unknown model '{name}'.{hint} List the models with "
        "`python -c \"import timm, maformer_zoo; print(maformer_zoo.list_models())\"` (ours) "
        "or timm.list_models('*pattern*') (all).")


def create_model_for_run(name: str, num_classes: Optional[int] = None, pretrained: bool = False, weights_file: str = '',
                         in_chans: Optional[int] = None, **kwargs: Any) -> nn.Module:
    """``timm.create_model`` with a checked name and one of the weight sources above."""
    check_model_name(name)
    if pretrained and weights_file:
        raise ValueError('Give either pretrained=True (Hub / timm weights) or a weights file, not both.')
    kwargs = {k: v for k, v in dict(kwargs, num_classes=num_classes, in_chans=in_chans).items() if v is not None}
    with download_errors(f"the pretrained weights of '{name}'", "offline? Download them on a machine with internet "
                         "into the Hugging Face cache, or pass the file with --pretrained-file.",
                         active=pretrained and not name.startswith('local-dir:')):  # ours are RuntimeErrors
        model = timm.create_model(name, pretrained=pretrained, **kwargs)
    if weights_file:
        state_dict, own = read_state_dict(weights_file)[0], model.state_dict()
        classifier = layer_names(model.pretrained_cfg.get('classifier'))
        fresh = [k for k, v in state_dict.items() if k.rsplit('.', 1)[0] in classifier and k in own
                 and own[k].shape != v.shape]  # fine-tuning to another num_classes: a new head
        state_dict = {k: v for k, v in state_dict.items() if k not in fresh}
        check_fit(model, state_dict, f"'{weights_file}'", skip=fresh)
        model.load_state_dict(state_dict, strict=not fresh)
        if fresh:
            _logger.info('Fine-tuning: new classifier (%s) for %d classes', ', '.join(fresh), model.num_classes)
    return model
