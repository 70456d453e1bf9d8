"""Weights: read any weight file without running its code, find the weights in it, check they fit, export.

* :func:`load_checkpoint_file`, the one reader of every path, decides by content, never by name: safetensors,
  a ``torch.save`` file through ``torch.load(weights_only=True)`` passed explicitly (so no environment
  variable turns it off), any other pickle through a numpy-only unpickler (Detectron ``.pkl``).
* :func:`unwrap_state_dict`: timm's ``load_state_dict`` rule (EMA first, ``clean_state_dict``) on a loaded dict.
* :func:`check_fit`: the one key check, refusing missing, unused and mis-shaped keys with their counts.
* :func:`resolve_weight_file` / :func:`pretrained_overlay`: one source string (``hf-hub:``, ``local-dir:``,
  folder, file) for timm; :func:`export_hub_folder`: timm's ``save_for_hf`` folder plus our model card.
Choices and errors: docs/weights.md.
"""
import argparse
import json
import os
import pickle
import re
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from timm import list_pretrained
from timm.models import clean_state_dict, get_pretrained_cfg

from .cards import HUB_ORG, describe_checkpoint, hub_id, render_model_card
from .errors import CheckpointMismatchError, CorruptCheckpointError, PretrainedWeightsNotFoundError, \
    UnsafeCheckpointError
from .utils.atomic import write_atomic

EMA_KEYS, MODEL_KEYS = ('state_dict_ema', 'model_ema'), ('state_dict', 'model')
# What a Detectron-format .pkl may reference: numpy arrays, dtypes and scalars (numpy 1 and 2 paths),
# OrderedDict, and the bytes codec of Python 2 pickles.
_PICKLE_ALLOWED = {(m, n) for m in ('numpy.core.multiarray', 'numpy._core.multiarray') for n in ('_reconstruct', 'scalar')}
_PICKLE_ALLOWED |= {('numpy', 'ndarray'), ('numpy', 'dtype'), ('collections', 'OrderedDict'), ('_codecs', 'encode')}
_TORCH_MAGIC = (b'PK\x03\x04', b'\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19')  # torch.save's zip, its legacy format
_UNREADABLE = {'safetensors': 'is not a readable safetensors file', 'torch': 'is not a readable PyTorch checkpoint',
               'pickle': 'is not a weight file: neither safetensors, nor a PyTorch checkpoint, nor a readable pickle'}


def _refused(path: Path, needs: str) -> UnsafeCheckpointError:
    return UnsafeCheckpointError(
        f"Refused '{path}': it is a pickle that needs {needs} to load; weights are read only from safetensors, "
        f"torch.load(weights_only=True) or numpy-only pickles. If you trust it, load it yourself and save "
        f"model.state_dict() with safetensors.")


class _NumpyOnlyUnpickler(pickle.Unpickler):
    path = Path()

    def find_class(self, module: str, name: str):
        if (module, name) not in _PICKLE_ALLOWED:
            raise _refused(self.path, f"'{module}.{name}'")
        return super().find_class(module, name)


def weight_file_format(path) -> str:
    """'torch', 'safetensors' or 'pickle' (anything else), from the file's first bytes."""
    with open(path, 'rb') as f:
        head = f.read(16)
    if head.startswith(_TORCH_MAGIC):
        return 'torch'
    fits = int.from_bytes(head[:8], 'little') <= os.path.getsize(path) - 8  # safetensors: header length, JSON
    return 'safetensors' if head[8:9] == b'{' and fits else 'pickle'


def load_checkpoint_file(path) -> Any:
    """Read a weight file of any name without running code from it (see the module docstring)."""
    path = Path(path)
    if not path.is_file():
        raise PretrainedWeightsNotFoundError(f"Checkpoint file not found: '{path}'.")
    if path.stat().st_size == 0:
        raise CorruptCheckpointError(f"'{path}' is empty (0 bytes): the save or download did not finish.")
    kind = weight_file_format(path)
    try:
        if kind == 'safetensors':
            import safetensors.torch
            return safetensors.torch.load_file(str(path), device='cpu')
        with open(path, 'rb') as f:  # a file object: torch would send a path ending in .safetensors to safetensors
            if kind == 'pickle':
                unpickler = _NumpyOnlyUnpickler(f, encoding='latin1')  # Detectron pickles come from Python 2
                unpickler.path = path
                return unpickler.load()
            with torch.serialization.safe_globals([argparse.Namespace]):  # timm train.py's args
                return torch.load(f, map_location='cpu', weights_only=True)
    except UnsafeCheckpointError:
        raise
    except Exception as err:  # noqa: BLE001 - each format raises its own types for damaged files
        if kind == 'torch' and isinstance(err, pickle.UnpicklingError):  # weights_only refused a global
            try:  # a zip names them without running anything; a legacy file does not
                needs = f"code ({', '.join(torch.serialization.get_unsafe_globals_in_checkpoint(str(path)))})"
            except Exception:  # noqa: BLE001
                needs = 'code'
            raise _refused(path, needs) from err
        raise CorruptCheckpointError(
            f"'{path}' {_UNREADABLE[kind]} ({type(err).__name__}): it is truncated, damaged or of another kind; "
            f"save or download it again.") from err


def unwrap_state_dict(checkpoint: Any, weights: str = 'auto') -> Tuple[Dict[str, torch.Tensor], str]:
    """The tensors of a state dict or training checkpoint and their entry ('' for a plain state dict).

    ``weights``: 'auto' (EMA ``state_dict_ema``/``model_ema`` if present, else ``state_dict``/``model``: timm's
    rule, EMA weights being the ones a run evaluates and publishes), 'ema' (required) or 'model' (raw).
    """
    if not isinstance(checkpoint, dict):
        raise CorruptCheckpointError(f"Expected a state dict or a checkpoint dict, got {type(checkpoint).__name__}.")
    ema, raw = (next((k for k in keys if isinstance(checkpoint.get(k), dict)), '') for keys in (EMA_KEYS, MODEL_KEYS))
    if weights == 'ema' and not ema:
        raise ValueError(f"weights='ema' but the checkpoint has no EMA weights (entries: {sorted(checkpoint)[:10]}).")
    key = raw if weights == 'model' else ema or raw
    state_dict = {k: v for k, v in clean_state_dict(checkpoint[key] if key else checkpoint).items()
                  if isinstance(v, torch.Tensor)}
    if not state_dict:
        raise CorruptCheckpointError(
            f"No tensors in the checkpoint{f' entry {key!r}' if key else ''} (entries: {sorted(checkpoint)[:10]}).")
    return state_dict, key


def read_state_dict(path, weights: str = 'auto') -> Tuple[Dict[str, torch.Tensor], str]:
    """``unwrap_state_dict(load_checkpoint_file(path), weights)``."""
    return unwrap_state_dict(load_checkpoint_file(path), weights)


def mismatch_error(model: torch.nn.Module, what: str, total: int, missing: Sequence[str], unused: Sequence[str],
                   misshaped: Sequence[str] = ()) -> CheckpointMismatchError:
    """The refusal of weights that do not fit ``model``, in one line: the counts, then the first keys of each kind."""
    name = (getattr(model, 'pretrained_cfg', None) or {}).get('architecture') or type(model).__name__
    first = '; '.join(f"{kind}: {', '.join(keys[:8])}" for kind, keys in (
        ('missing', missing), ('unused', unused), ('mis-shaped', misshaped)) if keys)
    return CheckpointMismatchError(
        f"Refused weights {what}: they do not fit '{name}' ({total - len(missing) - len(misshaped)} of its {total} "
        f"parameters matched, {len(missing)} missing, {len(unused)} keys of the file unused, {len(misshaped)} "
        f"mis-shaped; {first}). Give weights of this architecture (and its num_classes and model args).")


def check_fit(model: torch.nn.Module, state_dict: Dict[str, Any], what: str, skip: Sequence[str] = ()) -> None:
    """Raise :func:`mismatch_error` unless every key and shape of ``state_dict`` fits ``model``; keys equal to
    or under a ``skip`` prefix are not compared (a classifier or input conv that the caller adapts)."""
    def kept(keys):
        return {k for k in keys if not any(k == p or k.startswith(p + '.') for p in skip)}
    own = model.state_dict()
    keys = kept(own)
    missing, unused = sorted(keys - state_dict.keys()), sorted(kept(state_dict) - own.keys())
    misshaped = sorted(f'{k} {tuple(state_dict[k].shape)} vs {tuple(own[k].shape)}' for k in keys & state_dict.keys()
                       if tuple(getattr(state_dict[k], 'shape', ())) != tuple(own[k].shape))
    if missing or unused or misshaped:
        raise mismatch_error(model, what, len(keys), missing, unused, misshaped)


def label_names_of(checkpoint: Any, num_classes: int) -> Optional[List[str]]:
    """Class names by index from a checkpoint's ``class_to_idx`` (our training runs record it)."""
    class_to_idx = checkpoint.get('class_to_idx') if isinstance(checkpoint, dict) else None
    if not isinstance(class_to_idx, dict) or not class_to_idx:
        return None
    names = [str(i) for i in range(num_classes)]
    for name, index in class_to_idx.items():
        if 0 <= int(index) < num_classes:
            names[int(index)] = str(name)
    return names


def read_label_names(weights_file) -> Optional[List[str]]:
    """Class names recorded with weights: a safetensors file's ``label_names`` metadata (our runs'
    ``model_best.safetensors``) or the ``config.json`` beside it (an export); else None."""
    path = Path(weights_file)
    try:
        if weight_file_format(path) == 'safetensors':
            from safetensors import safe_open
            with safe_open(str(path), framework='pt') as f:
                recorded = (f.metadata() or {}).get('label_names')
            if recorded:
                return list(json.loads(recorded))
        names = json.loads((path.parent / 'config.json').read_text(encoding='utf-8')).get('label_names')
    except (OSError, ValueError, AttributeError):  # nothing recorded, or not JSON
        return None
    return list(names) if isinstance(names, list) else None


def missing_weights_error(variant: str) -> PretrainedWeightsNotFoundError:
    """``pretrained=True`` with no weight source: timm's convention, no ``hf_hub_id`` until weights exist."""
    return PretrainedWeightsNotFoundError(
        f"'{variant}' has no pretrained weights to load: none are published for '{hub_id(variant)}' yet "
        f"(docs/weights.md). Give a file, timm.create_model('{variant}', pretrained=True, "
        f"pretrained_cfg_overlay=dict(file='/path/model.safetensors')), or a folder from scripts/push_to_hub.py, "
        f"timm.create_model('local-dir:/path/to/folder', pretrained=True), or use pretrained=False.")


def resolve_weight_file(source, model_name: Optional[str] = None, cache_dir=None) -> Path:
    """The local weight file of ``hf-hub:<repo>[@revision]`` (the Hugging Face cache, or the Hub when online),
    ``local-dir:<folder>`` or a folder (its ``model.safetensors``, else a .pth/.bin), or a file; nothing is
    read but a ``config.json`` beside it, which must name ``model_name`` if given."""
    match = re.match(r'^(hf-hub|hf_hub|local-dir):(.+)$', str(source))
    kind, location = match.groups() if match else ('', str(source))
    path = Path(location).expanduser()
    if kind in ('hf-hub', 'hf_hub'):
        repo, _, revision = location.partition('@')
        # our repos hold weights once a pretrained cfg names them (timm's convention); decided without a lookup
        if repo.startswith(HUB_ORG + '/') and repo.split('/')[1] not in list_pretrained():
            raise missing_weights_error(model_name or repo.split('/')[1].split('.')[0])
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError
        try:
            path = Path(hf_hub_download(repo, 'model.safetensors', revision=revision or None, cache_dir=cache_dir))
            hf_hub_download(repo, 'config.json', revision=revision or None, cache_dir=cache_dir)
        except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as err:
            raise PretrainedWeightsNotFoundError(
                f"Could not get 'model.safetensors' and 'config.json' of Hugging Face repo '{repo}' "
                f"({type(err).__name__}): check the id, or download it where there is internet (hf download {repo}) "
                f"and copy the cache here.") from err
    elif path.is_dir():
        found = [f for pattern in ('model.safetensors', 'pytorch_model.bin', '*.safetensors', '*.pth', '*.pth.tar',
                                   '*.bin') for f in sorted(path.glob(pattern))]
        if not found:
            raise PretrainedWeightsNotFoundError(f"No weight file in '{path}' (model.safetensors, *.pth, *.bin): "
                                                 f"export one with scripts/push_to_hub.py --dry-run.")
        path = found[0]
    elif kind or not path.is_file():
        raise PretrainedWeightsNotFoundError(
            f"Weights not found: '{path}' is not {'a folder' if kind else 'a file or folder'}: give an existing "
            f"weight file or a folder from scripts/push_to_hub.py, or use pretrained=False.")
    config = path.parent / 'config.json'
    if model_name and config.is_file():
        try:
            arch = json.loads(config.read_text(encoding='utf-8')).get('architecture')
        except (OSError, ValueError, AttributeError) as err:
            raise CorruptCheckpointError(f"'{config}' is not a valid timm config.json ({err}).") from err
        if arch and arch != model_name.split('.')[0]:
            raise CheckpointMismatchError(
                f"'{path.parent}' holds weights of '{arch}' (config.json), not '{model_name}': use the matching "
                f"model name, or weights exported for '{model_name}'.")
    return path


def load_weights(source, model_name: Optional[str] = None, cache_dir=None) -> Dict[str, torch.Tensor]:
    """The state dict of any :func:`resolve_weight_file` source, read by :func:`load_checkpoint_file`."""
    return read_state_dict(resolve_weight_file(source, model_name, cache_dir))[0]


def pretrained_overlay(source, model_name: Optional[str] = None, cache_dir=None) -> Dict[str, Any]:
    """``pretrained_cfg_overlay`` making ``timm.create_model(..., pretrained=True)`` load ``source``. The file is
    read here first, so a bad file gets our one-line error for timm's own models too."""
    file = resolve_weight_file(source, model_name, cache_dir)
    load_checkpoint_file(file)
    return dict(file=str(file))


def export_hub_folder(model_name: str, checkpoint, out_dir, weights: str = 'auto', num_classes: Optional[int] = None,
                      model_args: Optional[Dict[str, Any]] = None, tag: str = 'in1k', repo_id: Optional[str] = None,
                      published: Optional[bool] = None, results: Optional[Dict[str, Any]] = None,
                      measure: bool = True) -> Dict[str, Any]:
    """Write a Hub folder for ``model_name`` from a weight file or checkpoint dict; nothing if it does not fit.

    Args:
        weights: see :func:`unwrap_state_dict`. num_classes: of the checkpoint's head (default: its rows).
        model_args: other constructor arguments it was trained with. tag, repo_id, published, results: for
            the card (:func:`maformer_zoo.cards.render_model_card`). measure: fvcore numbers on the card.
    Returns: dict(folder, model, state_dict_key, repo_id, stats); ``config.json`` names the classes of the
    checkpoint's ``class_to_idx``.
    """
    import timm
    from timm.models import save_for_hf
    from .utils.flops import measure_model_stats
    source = 'a state dict' if isinstance(checkpoint, dict) else str(checkpoint)
    loaded = checkpoint if isinstance(checkpoint, dict) else load_checkpoint_file(checkpoint)
    arch = loaded.get('arch') if isinstance(loaded, dict) else None
    if isinstance(arch, str) and arch.split('.')[0] != model_name.split('.')[0]:
        raise CheckpointMismatchError(f"The checkpoint was trained as '{arch}' (its 'arch' entry), not "
                                      f"'{model_name}': export it with --model {arch.split('.')[0]}.")
    state_dict, key = unwrap_state_dict(loaded, weights)
    head = state_dict.get(f'{get_pretrained_cfg(model_name).classifier}.weight')
    kwargs = dict(model_args or {}, num_classes=num_classes or (head.shape[0] if head is not None else None))
    model = timm.create_model(model_name, **{k: v for k, v in kwargs.items() if v is not None}).eval()
    check_fit(model, state_dict, f"'{source}'")
    model.load_state_dict(state_dict)
    folder, repo_id = Path(out_dir), repo_id or hub_id(model_name, tag)
    label_names = label_names_of(loaded, model.num_classes)
    save_for_hf(model, str(folder), model_config=dict(label_names=label_names) if label_names else None,
                safe_serialization=True)
    stats = measure_model_stats(model) if measure else dict(params_m=round(sum(
        p.numel() for p in model.parameters()) / 1e6, 2))
    write_atomic(folder / 'README.md', render_model_card(
        model_name, stats, tag=tag, num_classes=model.num_classes, repo_id=repo_id, published=published,
        about=describe_checkpoint(source, loaded, key), results=results))
    return dict(folder=folder, model=model, state_dict_key=key, repo_id=repo_id, stats=stats)
