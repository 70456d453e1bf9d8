"""Reading weight files without running their code, one state-dict unwrapping rule, and Hub export.

* :func:`load_checkpoint_file`, THE weight reader of every path: by content, not name, a safetensors
  file with safetensors, a ``torch.save`` file with ``torch.load(weights_only=True)``, any other pickle
  with a numpy-only unpickler (Detectron-format weights). A file that needs other code is refused.
* :func:`unwrap_state_dict`: THE rule for finding the weights inside a training checkpoint,
  timm's own (``timm.models.load_state_dict``): with ``weights='auto'`` EMA weights
  (``state_dict_ema``, ``model_ema``) win over the raw ones (``state_dict``, ``model``), because
  EMA weights are the ones a run evaluates and publishes; wrapper prefixes go via timm's
  ``clean_state_dict``. Our checkpoint filters and the exporter all use it.
* :func:`export_hub_folder`: a folder for the Hub (``model.safetensors`` + timm's ``config.json``
  with the class names + ``README.md``), after a strict key check.
"""
import argparse
import json
import os
import pickle
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from .utils.atomic import write_atomic
from .errors import CheckpointMismatchError, CorruptCheckpointError, PretrainedWeightsNotFoundError, \
    UnsafeCheckpointError

__all__ = [
    'load_numpy_pickle', 'weight_file_format', 'load_checkpoint_file', 'unwrap_state_dict', 'read_state_dict',
    'state_dict_mismatch',
    'format_mismatch', 'check_state_dict', 'export_hub_folder', 'label_names_of', 'read_label_names', 'EMA_KEYS',
]

PathLike = Union[str, os.PathLike]
EMA_KEYS = ('state_dict_ema', 'model_ema')
_MODEL_KEYS = ('state_dict', 'model')

# What a Detectron-format .pkl may reference: numpy arrays, dtypes and scalars (numpy 1 and 2
# module paths), ordered dicts, and the bytes codec Python 3 uses for protocol-2 pickles.
_PICKLE_ALLOWED = {
    ('numpy.core.multiarray', '_reconstruct'), ('numpy._core.multiarray', '_reconstruct'),
    ('numpy.core.multiarray', 'scalar'), ('numpy._core.multiarray', 'scalar'),
    ('numpy', 'ndarray'), ('numpy', 'dtype'), ('collections', 'OrderedDict'), ('_codecs', 'encode'),
}


_ZIP_MAGIC = b'PK\x03\x04'  # torch.save's default format is a zip archive
_LEGACY_TORCH_MAGIC = b'\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19'  # torch.save(_use_new_zipfile_serialization=False)


class _NumpyOnlyUnpickler(pickle.Unpickler):
    def __init__(self, file, path: Path):
        super().__init__(file, encoding='latin1')  # Detectron (Python 2) pickles
        self.path = path

    def find_class(self, module: str, name: str):
        if (module, name) not in _PICKLE_ALLOWED:
            raise UnsafeCheckpointError(
                f"Refused '{self.path}': it is a pickle that needs '{module}.{name}' to load; only numpy "
                f"arrays and plain containers are read from plain pickles (convert it to .safetensors).")
        return super().find_class(module, name)


def load_numpy_pickle(path: PathLike) -> Any:
    """A pickle of numpy arrays and plain containers (Detectron format), read without running code."""
    path = Path(path)
    with open(path, 'rb') as f:
        try:
            return _NumpyOnlyUnpickler(f, path).load()
        except (EOFError, pickle.UnpicklingError, ValueError, TypeError, IndexError, KeyError) as err:
            raise CorruptCheckpointError(
                f"'{path}' is not a weight file: neither safetensors, nor a PyTorch checkpoint, nor a readable "
                f"pickle ({type(err).__name__}); it is truncated, damaged or of another kind.") from err


def weight_file_format(path: PathLike) -> str:
    """'torch' (a ``torch.save`` zip or legacy file), 'safetensors', or 'pickle' (anything else), from
    the file's first bytes: the extension does not decide (a ``.pyth`` or ``.bin`` is read the same way)."""
    with open(path, 'rb') as f:
        head = f.read(16)
    if head.startswith(_ZIP_MAGIC) or head.startswith(_LEGACY_TORCH_MAGIC):
        return 'torch'
    if head[8:9] == b'{' and int.from_bytes(head[:8], 'little') <= os.path.getsize(path) - 8:
        return 'safetensors'  # 8-byte little-endian header length, then the JSON header
    return 'pickle'


def load_checkpoint_file(path: PathLike) -> Any:
    """Read a weight file without running code from it, whatever its name (see the module docstring).

    ``torch.load`` gets ``weights_only=True`` explicitly (timm's ``_torch_load`` way), which torch
    keeps even when ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1`` is set (that variable only changes the
    default); every other pickle goes to the numpy-only unpickler.

    Raises:
        PretrainedWeightsNotFoundError: ``path`` is not a file.
        UnsafeCheckpointError: a pickle that needs code to load (names what it needs).
        CorruptCheckpointError: empty, truncated or not a checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise PretrainedWeightsNotFoundError(f"Checkpoint file not found: '{path}'.")
    if path.stat().st_size == 0:
        raise CorruptCheckpointError(f"'{path}' is empty (0 bytes): the save or download did not finish.")
    kind = weight_file_format(path)
    if kind == 'pickle':
        return load_numpy_pickle(path)
    if kind == 'safetensors':
        import safetensors.torch
        try:
            return safetensors.torch.load_file(str(path), device='cpu')
        except Exception as err:  # SafetensorError has no stable import path
            raise CorruptCheckpointError(
                f"'{path}' is not a readable safetensors file: it is truncated or damaged, export or download "
                f"it again.") from err
    try:  # a file object: torch 2.14 sends a *path* ending in .safetensors to safetensors, by name
        with open(path, 'rb') as f, torch.serialization.safe_globals([argparse.Namespace]):  # timm's train.py args
            return torch.load(f, map_location='cpu', weights_only=True)
    except pickle.UnpicklingError as err:
        try:
            needed = ', '.join(torch.serialization.get_unsafe_globals_in_checkpoint(str(path)))
        except Exception:  # noqa: BLE001 - a legacy (non-zip) file: the needed names are not listed
            needed = ''
        raise UnsafeCheckpointError(
            f"Refused '{path}': it is a pickle that needs code to load{f' ({needed})' if needed else ''}; weights "
            f"are read only from safetensors or torch.load(weights_only=True). If you trust it, load it yourself "
            f"and save model.state_dict() with safetensors.") from err
    except (RuntimeError, EOFError, OSError, ValueError) as err:
        raise CorruptCheckpointError(
            f"'{path}' is not a readable PyTorch checkpoint ({type(err).__name__}): it is truncated or damaged, "
            f"save or download it again.") from err


def unwrap_state_dict(checkpoint: Any, weights: str = 'auto') -> Tuple[Dict[str, Any], str]:
    """The model weights inside ``checkpoint`` and the entry they came from ('' for a plain state dict).

    Args:
        checkpoint: a state dict or a training checkpoint (``state_dict``/``state_dict_ema``, or
            ``model``/``model_ema``, with optimizer state etc. beside them).
        weights: 'auto' (EMA if present, else raw: timm's rule), 'ema' (required) or 'model' (raw).
    """
    if weights not in ('auto', 'ema', 'model'):
        raise ValueError(f"weights must be 'auto', 'ema' or 'model', got {weights!r}.")
    if not isinstance(checkpoint, dict):
        raise CorruptCheckpointError(f"Expected a state dict or a checkpoint dict, got {type(checkpoint).__name__}.")
    from timm.models import clean_state_dict
    ema = next((k for k in EMA_KEYS if isinstance(checkpoint.get(k), dict)), '')
    raw = next((k for k in _MODEL_KEYS if isinstance(checkpoint.get(k), dict)), '')
    if weights == 'ema' and not ema:
        raise ValueError(f"weights='ema' but the checkpoint has no EMA weights (entries: {sorted(checkpoint)[:10]}).")
    key = raw if weights == 'model' else (ema or raw)
    state_dict = {k: v for k, v in clean_state_dict(checkpoint[key] if key else checkpoint).items()
                  if isinstance(v, torch.Tensor)}
    if not state_dict:
        raise CorruptCheckpointError(
            f"No tensors in the checkpoint{f' entry {key!r}' if key else ''} (entries: {sorted(checkpoint)[:10]}).")
    return state_dict, key


def read_state_dict(path: PathLike, weights: str = 'auto') -> Tuple[Dict[str, torch.Tensor], str]:
    """``unwrap_state_dict(load_checkpoint_file(path), weights)``."""
    return unwrap_state_dict(load_checkpoint_file(path), weights)


def state_dict_mismatch(model: nn.Module, state_dict: Dict[str, Any], ignore: Sequence[str] = (),
                        ignore_shape: Sequence[str] = ()) -> Dict[str, list]:
    """Missing / unexpected keys and shape mismatches of ``state_dict`` against ``model``.

    ``ignore``: key prefixes left out (a classifier timm replaces); ``ignore_shape``: keys whose shape may
    differ (an input conv timm adapts to ``in_chans``).
    """
    expected = model.state_dict()

    def kept(key: str) -> bool:
        return not any(key == p or key.startswith(p + '.') for p in ignore)

    return dict(
        missing=sorted(k for k in expected if k not in state_dict and kept(k)),
        unexpected=sorted(k for k in state_dict if k not in expected and kept(k)),
        shape_mismatch=sorted(
            f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(expected[k].shape)}"
            for k in expected if k in state_dict and kept(k) and k not in ignore_shape
            and hasattr(state_dict[k], 'shape') and tuple(state_dict[k].shape) != tuple(expected[k].shape)))


def format_mismatch(problems: Dict[str, list], limit: int = 8) -> str:
    """``state_dict_mismatch`` output as text (the first ``limit`` of each kind)."""
    return '\n'.join(
        f"  {name.replace('_', ' ')} ({len(items)}): {', '.join(items[:limit])}"
        + (f' ... and {len(items) - limit} more' if len(items) > limit else '')
        for name, items in problems.items() if items)


def check_state_dict(model: nn.Module, state_dict: Dict[str, torch.Tensor], what: str = 'the checkpoint') -> None:
    """Load ``state_dict`` strictly into ``model``, or raise ``CheckpointMismatchError`` saying why not."""
    problems = state_dict_mismatch(model, state_dict)
    if any(problems.values()):
        name = (getattr(model, 'pretrained_cfg', None) or {}).get('architecture', type(model).__name__)
        raise CheckpointMismatchError(
            f"{what} does not fit '{name}':\n{format_mismatch(problems)}\nPick the architecture (and "
            f"num_classes / model args) the checkpoint was trained with.")
    model.load_state_dict(state_dict, strict=True)


def _describe_checkpoint(source: str, checkpoint: Any, key: str) -> str:
    """One line on where exported weights come from, from what the checkpoint records."""
    parts = [f"exported from `{source}`"]
    if key:
        parts.append(f"entry `{key}`" + (' (EMA weights)' if key in EMA_KEYS else ''))
    if isinstance(checkpoint, dict):
        if isinstance(checkpoint.get('epoch'), int):
            parts.append(f"saved after epoch {checkpoint['epoch']}")
        metrics = checkpoint.get('metrics')  # maformer_zoo.training: {'eval': {...}, 'ema': {...}}
        chosen = metrics.get('ema' if key in EMA_KEYS else 'eval') if isinstance(metrics, dict) else None
        numbers = [f"{n} {chosen[n]:.2f}" for n in ('top1', 'top5')
                   if isinstance(chosen, dict) and isinstance(chosen.get(n), (int, float))]
        if numbers:
            parts.append("the training run's validation of these weights: " + ', '.join(numbers))
        elif isinstance(checkpoint.get('metric'), (int, float)):  # timm train.py
            parts.append(f"training script's eval metric {checkpoint['metric']:.4g}")
    return '; '.join(parts) + '.'


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


def export_hub_folder(
        model_name: str,
        checkpoint: Union[PathLike, Dict[str, Any]],
        out_dir: PathLike,
        weights: str = 'auto',
        num_classes: Optional[int] = None,
        model_args: Optional[Dict[str, Any]] = None,
        tag: Optional[str] = None,
        repo_id: Optional[str] = None,
        published: Optional[bool] = None,
        results: Optional[Dict[str, Any]] = None,
        stats: Optional[Dict[str, Any]] = None,
        measure: bool = True,
        label_names: Optional[List[str]] = None,
) -> Dict[str, Any]:
    """Write a Hub-ready folder for ``model_name`` from a checkpoint file or dict; nothing if it does not fit.

    Args:
        model_name: a registered architecture, e.g. 'maformer_s'.
        checkpoint: a weight file (read by :func:`load_checkpoint_file`) or a loaded checkpoint dict.
        out_dir: folder to write (files of the same names are replaced).
        weights: 'auto' | 'ema' | 'model', see :func:`unwrap_state_dict`.
        num_classes: classes of the checkpoint's head (default: from its classifier weight).
        model_args: other constructor arguments the checkpoint was trained with.
        tag, repo_id: the repo (default ``maformer-zoo/<name>.<tag>``, tag 'in1k').
        published: the card presents the weights as published (default: the repo is in ``PUBLISHED_HUB_IDS``).
        results: measured evaluation numbers for the card.
        stats: card numbers if known; else measured (``measure=True``) or params only.
        label_names: class names by index for ``config.json`` (default: the checkpoint's ``class_to_idx``).

    Returns:
        dict(folder, model, state_dict_key, repo_id, stats).
    """
    import timm
    from timm.models import get_pretrained_cfg, save_for_hf
    from . import cards, hub
    from .utils.flops import measure_model_stats

    if not timm.is_model(model_name):
        from . import list_models
        raise ValueError(f"Unknown model '{model_name}'. Registered maformer-zoo models: "
                         f"{', '.join(list_models())}; any timm model name also works.")
    tag = tag or hub.DEFAULT_TAG
    source = 'a state dict' if isinstance(checkpoint, dict) else str(checkpoint)
    loaded = checkpoint if isinstance(checkpoint, dict) else load_checkpoint_file(checkpoint)
    arch = loaded.get('arch') if isinstance(loaded, dict) else None
    if isinstance(arch, str) and ':' not in arch and arch.split('.')[0] != model_name.split('.')[0]:
        raise CheckpointMismatchError(
            f"The checkpoint was trained as '{arch}' (its 'arch' entry), not '{model_name}': export it with "
            f"--model {arch.split('.')[0]}.")
    state_dict, key = unwrap_state_dict(loaded, weights)
    kwargs = dict(model_args or {})
    if num_classes is None:
        cfg = get_pretrained_cfg(model_name)
        classifier = (cfg.classifier if cfg else None) or ''
        head = state_dict.get(f'{classifier}.weight') if isinstance(classifier, str) else None
        num_classes = int(head.shape[0]) if head is not None else None
    if num_classes is not None:
        kwargs['num_classes'] = num_classes
    repo_id = repo_id or hub.hub_id(model_name, tag)
    model = timm.create_model(model_name, pretrained=False, **kwargs)
    check_state_dict(model, state_dict, what=f'The checkpoint ({source})')
    model.eval()

    folder = Path(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    label_names = label_names or label_names_of(loaded, model.num_classes)
    extra = {'label_names': label_names} if label_names else None
    save_for_hf(model, str(folder), model_config=extra, safe_serialization=True)
    if stats is None:
        stats = measure_model_stats(model) if measure else dict(
            params_m=round(sum(p.numel() for p in model.parameters()) / 1e6, 2))
    info = cards.WeightsInfo(
        published=hub.weights_published(repo_id) if published is None else published,
        description=_describe_checkpoint(source, loaded, key), results=dict(results or {}))
    card = cards.render_model_card(model_name, stats, info, tag=tag, num_classes=model.num_classes,
                                   repo_id=repo_id)
    write_atomic(folder / 'README.md', card)
    return dict(folder=folder, model=model, state_dict_key=key, repo_id=repo_id, stats=stats)


def read_label_names(weights_file: PathLike) -> Optional[List[str]]:
    """Class names by index recorded with weights: a safetensors file's ``label_names`` metadata (our
    training runs' ``model_best.safetensors``) or a ``config.json`` beside it (an export); else None."""
    path = Path(weights_file)
    try:
        if path.suffix == '.safetensors':
            from safetensors import safe_open
            with safe_open(str(path), framework='pt') as f:
                recorded = (f.metadata() or {}).get('label_names')
            if recorded:
                return list(json.loads(recorded))
        names = json.loads((path.parent / 'config.json').read_text(encoding='utf-8')).get('label_names')
    except (OSError, ValueError, AttributeError):  # no config.json, or not JSON: nothing recorded
        return None
    return list(names) if isinstance(names, list) else None
