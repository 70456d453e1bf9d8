"""Hub ids of our weights, whether they are published, and where a weight source resolves to.

Our models' pretrained cfgs carry a Hub id only once its weights are published
(``PUBLISHED_HUB_IDS``, empty today): timm's registry then lists no model of ours under
``timm.list_models(pretrained=True)`` (timm's convention for models without weights) and
``pretrained=True`` fails at once with :func:`missing_weights_error`. Weights you have load the
timm ways (docs/weights.md)::

    timm.create_model('maformer_s', pretrained=True, pretrained_cfg_overlay=dict(file='/path/model.safetensors'))
    timm.create_model('local-dir:/path/to/exported_folder', pretrained=True)
    timm.create_model('hf-hub:<org>/<repo>', pretrained=True)

:func:`resolve_weight_file` / :func:`pretrained_overlay` turn any of these sources into a local file
for code that takes one source string (the detectron2 backbone's ``MODEL.TIMM.CHECKPOINT``).
"""
import json
import os
import re
from pathlib import Path
from typing import Any, Dict, Optional, Union

from .errors import CheckpointMismatchError, CorruptCheckpointError, PretrainedWeightsNotFoundError, \
    UnsafeCheckpointError  # noqa: F401 (re-exported: users catch them from here)

__all__ = [
    'HUB_ORG', 'DEFAULT_TAG', 'PUBLISHED_HUB_IDS', 'hub_id', 'published_hub_id', 'weights_published',
    'weight_sources_help', 'missing_weights_error', 'resolve_weight_file', 'load_weights', 'pretrained_overlay',
    'CheckpointMismatchError', 'CorruptCheckpointError', 'PretrainedWeightsNotFoundError', 'UnsafeCheckpointError',
]

HUB_ORG = 'maformer-zoo'
DEFAULT_TAG = 'in1k'
# Repos that really hold trained weights. Add an id only after scripts/push_to_hub.py uploaded a
# trained checkpoint to it; the models' pretrained cfgs, cards and errors follow from this set.
PUBLISHED_HUB_IDS: frozenset = frozenset()
SAFE_WEIGHTS_NAME = 'model.safetensors'
PathLike = Union[str, os.PathLike]


def hub_id(model_name: str, tag: str = DEFAULT_TAG) -> str:
    """The Hub repo of a model's weights, ``maformer-zoo/<name>.<tag>`` (published or not)."""
    return f'{HUB_ORG}/{model_name}.{tag}'


def weights_published(repo_or_model: str) -> bool:
    """Whether trained weights are uploaded for a repo id (or a model name's default id)."""
    repo = repo_or_model if '/' in repo_or_model else hub_id(repo_or_model)
    return repo.split('@')[0] in PUBLISHED_HUB_IDS


def published_hub_id(model_name: str, tag: str = DEFAULT_TAG) -> Optional[str]:
    """``hf_hub_id`` for a model's pretrained cfg: its Hub id once published, else None (no weights)."""
    repo = hub_id(model_name, tag)
    return repo if weights_published(repo) else None


def weight_sources_help(variant: str) -> str:
    """The ways to give ``variant`` weights, as error messages list them."""
    text = (
        f"Ways to load weights into '{variant}':\n"
        f"  * a local file: timm.create_model('{variant}', pretrained=True,\n"
        f"        pretrained_cfg_overlay=dict(file='/path/model.safetensors'))\n"
        f"  * a folder written by scripts/push_to_hub.py --dry-run (model.safetensors + config.json):\n"
        f"        timm.create_model('local-dir:/path/to/folder', pretrained=True)\n"
        f"  * or pretrained=False for random initialisation.")
    if not weights_published(variant):
        text += f"\nNo trained weights are published for '{hub_id(variant)}' yet (docs/weights.md)."
    return text


def missing_weights_error(variant: str) -> PretrainedWeightsNotFoundError:
    """The error of ``pretrained=True`` for a model with no weight source at all."""
    return PretrainedWeightsNotFoundError(
        f"'{variant}' has no pretrained weights to load: none are published.\n" + weight_sources_help(variant))


def _config_architecture(config_file: Path) -> Optional[str]:
    try:
        return json.loads(config_file.read_text(encoding='utf-8')).get('architecture')
    except FileNotFoundError:
        return None
    except (OSError, ValueError, AttributeError) as err:
        raise CorruptCheckpointError(f"'{config_file}' is not a valid timm config.json ({err}).") from err


def _check_architecture(config_file: Path, model_name: Optional[str], where: str) -> None:
    architecture = _config_architecture(config_file) if model_name else None
    if architecture and architecture != model_name.split('.')[0]:  # a name may carry a tag
        raise CheckpointMismatchError(
            f"{where} holds weights of '{architecture}' (config.json), not '{model_name}': use the matching "
            f"model name, or weights exported for '{model_name}'.")


def _folder_weight_file(folder: Path) -> Path:
    for pattern in (SAFE_WEIGHTS_NAME, 'pytorch_model.bin', '*.safetensors', '*.pth', '*.pth.tar', '*.bin'):
        found = sorted(folder.glob(pattern))
        if found:
            return found[0]
    raise PretrainedWeightsNotFoundError(
        f"No weight file in '{folder}' (model.safetensors, *.pth, *.bin): export one with "
        f"scripts/push_to_hub.py --dry-run.")


def resolve_weight_file(source: PathLike, model_name: Optional[str] = None,
                        cache_dir: Optional[PathLike] = None) -> Path:
    """A local weight file for ``source``; nothing is loaded.

    Args:
        source: ``hf-hub:<org>/<repo>[@revision]`` (the Hugging Face cache, or the Hub when online),
            ``local-dir:<folder>`` or a folder (its ``model.safetensors``, else a .pth/.bin), or a file.
        model_name: if given, a ``config.json`` next to the weights must name this architecture.
        cache_dir: Hugging Face cache instead of the default (``HF_HUB_CACHE``).

    Raises:
        PretrainedWeightsNotFoundError: no such file or folder, a repo of ours that is not published,
            or a Hub download that failed (chained).
        CheckpointMismatchError: ``config.json`` names another architecture.
    """
    match = re.match(r'^(hf-hub|hf_hub|local-dir):(.+)$', str(source))
    kind, location = (match.group(1).replace('_', '-'), match.group(2)) if match else ('path', str(source))
    if kind == 'hf-hub':
        repo, _, revision = location.partition('@')
        if repo.startswith(HUB_ORG + '/') and not weights_published(repo):
            raise missing_weights_error(model_name or repo.split('/')[1].split('.')[0])
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, LocalEntryNotFoundError
        try:
            weights = Path(hf_hub_download(repo, SAFE_WEIGHTS_NAME, revision=revision or None, cache_dir=cache_dir))
            config = Path(hf_hub_download(repo, 'config.json', revision=revision or None, cache_dir=cache_dir))
        except (LocalEntryNotFoundError, EntryNotFoundError, HfHubHTTPError, OSError) as err:
            raise PretrainedWeightsNotFoundError(
                f"Could not get '{SAFE_WEIGHTS_NAME}' and 'config.json' of Hugging Face repo '{repo}' "
                f"({type(err).__name__}): check the id, or download it where there is internet "
                f"(hf download {repo}) and copy the cache here.") from err
        _check_architecture(config, model_name, f"Hugging Face repo '{repo}'")
        return weights
    path = Path(location).expanduser()
    if path.is_dir():
        _check_architecture(path / 'config.json', model_name, f"Folder '{path}'")
        return _folder_weight_file(path)
    if kind == 'local-dir' or not path.is_file():
        raise PretrainedWeightsNotFoundError(
            f"Weights not found: '{path}' is not {'a folder' if kind == 'local-dir' else 'a file or folder'}."
            + (f"\n{weight_sources_help(model_name)}" if model_name else ''))
    _check_architecture(path.parent / 'config.json', model_name, f"Folder '{path.parent}'")
    return path


def load_weights(source: PathLike, model_name: Optional[str] = None, cache_dir: Optional[PathLike] = None,
                 weights: str = 'auto') -> Dict[str, Any]:
    """The state dict of any source :func:`resolve_weight_file` accepts, read safely and unwrapped."""
    from .weights import read_state_dict
    return read_state_dict(resolve_weight_file(source, model_name, cache_dir), weights)[0]


def pretrained_overlay(source: PathLike, model_name: Optional[str] = None,
                       cache_dir: Optional[PathLike] = None) -> Dict[str, Any]:
    """``pretrained_cfg_overlay`` making ``timm.create_model(..., pretrained=True)`` load ``source``.

    Works with ``features_only=True`` and another ``num_classes`` (timm keeps the head when the counts match)::

        timm.create_model('maformer_s', pretrained=True, features_only=True,
                          pretrained_cfg_overlay=pretrained_overlay('/runs/maformer_s/model_best.safetensors'))
    """
    from .weights import load_checkpoint_file
    file = resolve_weight_file(source, model_name, cache_dir)
    load_checkpoint_file(file)  # our reader's one-line refusal before timm (or our builder) reads it for the model
    return dict(file=str(file))
