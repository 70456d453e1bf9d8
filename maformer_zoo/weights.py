"""Weights: read a file by its content without running its code, check that it fits, find it from a source.

Loading is timm's ``load_pretrained`` (and exporting, scripts/push_to_hub.py, timm's ``save_for_hf`` /
``push_to_hf_hub``); ours are the numpy-only ``.pkl`` reader, the class names and the one-line errors.
Choices and errors: docs/weights.md.
"""
import json
import os
import pickle
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import safetensors.torch
import torch
from timm import list_pretrained
from timm.models import clean_state_dict, get_pretrained_cfg
from timm.models._helpers import _checkpoint_unsafe_globals, _torch_load
from timm.models._hub import _EXT_PRIORITY, _PREFERRED_FILES, download_from_hf

from .cards import HUB_ORG, hub_id
from .errors import CheckpointMismatchError, CorruptCheckpointError, PretrainedWeightsNotFoundError, \
    UnsafeCheckpointError, download_errors

# What a Detectron-format .pkl may reference: numpy arrays, dtypes and scalars (numpy 1 and 2 paths),
# OrderedDict, and the bytes codec of Python 2 pickles.
_PICKLE_ALLOWED = {(f'numpy.{core}.multiarray', n) for core in ('core', '_core') for n in ('_reconstruct', 'scalar')}
_PICKLE_ALLOWED |= {('numpy', 'ndarray'), ('numpy', 'dtype'), ('collections', 'OrderedDict'), ('_codecs', 'encode')}
_TORCH_MAGIC = (b'PK\x03\x04', b'\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19')  # torch.save's zip, its legacy format


class _NumpyOnlyUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) not in _PICKLE_ALLOWED:
            raise UnsafeCheckpointError(f'{module}.{name}')  # the message load_checkpoint_file gives
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
    """Read a weight file of any name by its content: safetensors, ``torch.load(weights_only=True)`` or a
    numpy-only pickle (Detectron ``.pkl``)."""
    path = Path(path)
    if not path.is_file():
        raise PretrainedWeightsNotFoundError(f"Checkpoint file not found: '{path}'.")
    if path.stat().st_size == 0:
        raise CorruptCheckpointError(f"'{path}' is empty (0 bytes): the save or download did not finish.")
    kind = weight_file_format(path)
    try:
        if kind == 'safetensors':
            return safetensors.torch.load_file(str(path), device='cpu')
        with open(path, 'rb') as f:  # a file object: torch would send a path ending in .safetensors to safetensors
            if kind == 'torch':
                return _torch_load(f, map_location='cpu', weights_only=True)
            return _NumpyOnlyUnpickler(f, encoding='latin1').load()  # Detectron pickles come from Python 2
    except Exception as err:  # noqa: BLE001 - each format raises its own types for damaged files
        refused = kind == 'torch' and isinstance(err.__cause__ or err, pickle.UnpicklingError)  # torch's refusal
        if refused or isinstance(err, UnsafeCheckpointError):
            needs = _checkpoint_unsafe_globals(str(path)) if kind == 'torch' else f' Unsupported globals: {err}.'
            raise UnsafeCheckpointError(
                f"Refused '{path}': it is a pickle that needs code to load.{needs} Weights are read only "
                f"from safetensors, torch.load(weights_only=True) or numpy-only pickles; if you trust it, load it "
                f"yourself and save model.state_dict() with safetensors.") from err
        what = 'a weight file (safetensors, PyTorch or numpy pickle)' if kind == 'pickle' else f'a readable {kind} file'
        raise CorruptCheckpointError(f"'{path}' is not {what} ({type(err).__name__}): it is truncated, damaged or "
                                     f"of another kind; save or download it again.") from err


def unwrap_state_dict(checkpoint: Any, weights: str = 'auto') -> Tuple[Dict[str, torch.Tensor], str]:
    """The tensors of a checkpoint and their entry ('' for a plain state dict), by timm's rule: 'auto' takes
    ``state_dict_ema``/``model_ema`` if present, else ``state_dict``/``model``; 'ema' requires EMA; 'model' not."""
    if not isinstance(checkpoint, dict):
        raise CorruptCheckpointError(f"Expected a state dict or a checkpoint dict, got {type(checkpoint).__name__}.")
    ema, raw = (next((k for k in keys if isinstance(checkpoint.get(k), dict)), '')
                for keys in (('state_dict_ema', 'model_ema'), ('state_dict', 'model')))
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
    return unwrap_state_dict(load_checkpoint_file(path), weights)


def layer_names(value: Any) -> Tuple[str, ...]:
    """A pretrained cfg's ``classifier`` or ``first_conv``, one name or several, as a tuple."""
    return (value,) if isinstance(value, str) else tuple(value or ())


def mismatch_error(model: torch.nn.Module, what: str, total: int, missing: Sequence[str], unused: Sequence[str],
                   misshaped: Sequence[str] = ()) -> CheckpointMismatchError:
    """The refusal of weights that do not fit ``model``: the counts, then the first keys of each kind."""
    name = (getattr(model, 'pretrained_cfg', None) or {}).get('architecture') or type(model).__name__
    first = '; '.join(f"{kind}: {', '.join(keys[:8])}" for kind, keys in (
        ('missing', missing), ('unused', unused), ('mis-shaped', misshaped)) if keys)
    return CheckpointMismatchError(
        f"Refused weights {what}: they do not fit '{name}' ({total - len(missing) - len(misshaped)} of its {total} "
        f"parameters matched, {len(missing)} missing, {len(unused)} keys of the file unused, {len(misshaped)} "
        f"mis-shaped; {first}). Give weights of this architecture (and its num_classes and model args).")


def check_fit(model: torch.nn.Module, state_dict: Dict[str, Any], what: str, skip: Sequence[str] = ()) -> None:
    """Refuse ``state_dict`` unless every key and shape fits ``model``, but for keys equal to or under a ``skip``
    prefix (a classifier or input conv that the caller adapts)."""
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
    by_index = {int(index): str(name) for name, index in class_to_idx.items()}
    return [by_index.get(i, str(i)) for i in range(num_classes)]


def read_label_names(weights_file) -> Optional[List[str]]:
    """Class names recorded with weights: a safetensors file's ``label_names`` metadata (our runs'
    ``model_best.safetensors``), else the ``config.json`` beside it (an export); else None."""
    path = Path(weights_file)
    try:
        if weight_file_format(path) == 'safetensors':
            with safetensors.safe_open(str(path), framework='pt') as f:
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
        f"'{variant}' has no pretrained weights: none are published for '{hub_id(variant)}' yet. Give a file, "
        f"pretrained_cfg_overlay=dict(file='/path/model.safetensors'), or a scripts/push_to_hub.py folder, "
        f"timm.create_model('local-dir:/path/to/folder', pretrained=True), or use pretrained=False.")


def resolve_weight_file(source, model_name: Optional[str] = None, cache_dir=None) -> Path:
    """The local weight file of ``hf-hub:<repo>[@revision]`` (the Hugging Face cache, or the Hub when online),
    ``local-dir:<folder>`` or a folder (the file timm would choose), or a file; a ``config.json`` beside it
    must name ``model_name`` if given."""
    kind, _, location = str(source).partition(':')
    if kind not in ('hf-hub', 'hf_hub', 'local-dir'):
        kind, location = '', str(source)
    path = Path(location).expanduser()
    if kind.startswith('hf'):
        repo = location.split('@')[0]
        if repo.startswith(HUB_ORG + '/') and repo.split('/')[1] not in list_pretrained():  # no hf_hub_id, no weights
            raise missing_weights_error(model_name or repo.split('/')[1].split('.')[0])
        with download_errors(f"model.safetensors and config.json of Hugging Face repo '{repo}'", f"check the id, or "
                             f"download it where there is internet (hf download {repo}) and copy the cache."):
            path = Path(download_from_hf(location, 'model.safetensors', cache_dir))
            download_from_hf(location, 'config.json', cache_dir)
    elif path.is_dir():
        found = [path / f for f in _PREFERRED_FILES if (path / f).is_file()] + [  # timm's local-dir choice
            f for ext in _EXT_PRIORITY for f in sorted(path.glob(f'*{ext}'))]
        if not found:
            raise PretrainedWeightsNotFoundError(f"No weight file in '{path}' (model.safetensors, *.pth, *.bin): "
                                                 f"export one with scripts/push_to_hub.py --dry-run.")
        path = found[0]
    elif kind or not path.is_file():
        raise PretrainedWeightsNotFoundError(
            f"Weights not found: '{path}' is not {'a folder' if kind else 'a file or folder'}: give an existing "
            f"weight file or a folder from scripts/push_to_hub.py, or use pretrained=False.")
    config = path.parent / 'config.json'
    arch = json.loads(config.read_text(encoding='utf-8')).get('architecture') if model_name and config.is_file() else ''
    if arch and arch != model_name.split('.')[0]:
        raise CheckpointMismatchError(f"'{path.parent}' holds weights of '{arch}' (config.json), not '{model_name}': "
                                      f"use the matching model name, or weights exported for '{model_name}'.")
    return path


def pretrained_overlay(source, model_name: Optional[str] = None, cache_dir=None) -> Dict[str, Any]:
    """``pretrained_cfg_overlay`` making ``timm.create_model(model_name, pretrained=True)`` load ``source`` with
    timm's ``load_pretrained``: the state dict read here, the classes of its head (timm keeps the head when the
    model has as many, else drops it) and their names."""
    file = resolve_weight_file(source, model_name, cache_dir)
    state_dict = read_state_dict(file)[0]
    classifier = layer_names(getattr(get_pretrained_cfg(model_name or ''), 'classifier', None))
    heads = [state_dict[f'{c}.weight'] for c in classifier if f'{c}.weight' in state_dict]
    overlay = dict(state_dict=state_dict, num_classes=int(heads[0].shape[0]) if heads else None,
                   label_names=read_label_names(file))
    return dict({k: v for k, v in overlay.items() if v is not None}, source=None)  # not timm's local-dir route

