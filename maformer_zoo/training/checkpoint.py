"""Training checkpoints that resume exactly, kept by timm's ``CheckpointSaver`` and written atomically.

Besides timm's entries a checkpoint holds the scheduler, the step counter, the run config, the class map and
the random-number states of every process, as tensors and built-in types (``weights_only=True`` loads it).
Write order and repairs: docs/training.md#run-folders-no-run-is-lost.
"""
import json
import os
import random
import secrets
import shutil
from typing import Any, Dict, Optional

import numpy as np
import torch
from timm.utils import CheckpointSaver

from ..errors import CorruptCheckpointError
from ..utils.atomic import atomic_write, write_atomic
from ..weights import label_names_of, load_checkpoint_file

__all__ = ['capture_rng_state', 'restore_rng_state', 'save_checkpoint', 'load_training_checkpoint', 'RunSaver',
           'best_weights_epoch']

CHECKPOINT_VERSION = 1  # timm's meaning: 'epoch' is the number of epochs done, where a resume starts


def capture_rng_state() -> Dict[str, Any]:
    algo, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {'python': random.getstate(), 'torch': torch.get_rng_state(),
             'numpy': {'algo': algo, 'keys': torch.from_numpy(keys.astype(np.int64)), 'pos': int(pos),
                       'has_gauss': int(has_gauss), 'cached_gaussian': float(gauss)}}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state['cuda'] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: Dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state`."""
    version, internal, gauss = state['python']
    random.setstate((version, tuple(internal), gauss))
    n = state['numpy']
    np.random.set_state((n['algo'], n['keys'].numpy().astype(np.uint32), n['pos'], n['has_gauss'],
                         n['cached_gaussian']))
    torch.set_rng_state(state['torch'])
    if 'cuda' in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state['cuda'])


def save_checkpoint(path: str, state: Dict[str, Any]) -> None:
    with atomic_write(path) as f:
        torch.save({'version': CHECKPOINT_VERSION, **state}, f)


def load_training_checkpoint(path: str) -> Dict[str, Any]:
    checkpoint = load_checkpoint_file(path)
    if not isinstance(checkpoint, dict) or 'optimizer' not in checkpoint or 'epoch' not in checkpoint:
        raise CorruptCheckpointError(
            f"'{path}' is a weight file, not a training checkpoint of ours: it cannot be resumed. "
            "Use it with --pretrained-file to start a new run from its weights.")
    return checkpoint


def _export_safetensors(path: str, state: Dict[str, Any]) -> None:
    from safetensors.torch import save
    weights = state.get('state_dict_ema') or state['state_dict']
    metadata = {'epoch': str(state['epoch'])}
    names = label_names_of(state, int(state.get('num_classes') or 0))
    if names:  # so validate.py maps class folders to outputs as training did
        metadata['label_names'] = json.dumps(names)
    write_atomic(path, save({k: v.detach().cpu().contiguous().clone() for k, v in weights.items()}, metadata))


def best_weights_epoch(run_dir: str) -> Dict[str, Optional[int]]:
    """The epoch each ``model_best`` file holds (None: missing)."""
    pth, safetensors = (os.path.join(run_dir, 'model_best' + ext) for ext in ('.pth', '.safetensors'))
    epochs = {'model_best.pth': load_checkpoint_file(pth).get('epoch') if os.path.isfile(pth) else None,
              'model_best.safetensors': None}
    if os.path.isfile(safetensors):
        from safetensors import safe_open
        with safe_open(safetensors, framework='pt') as f:
            epoch = (f.metadata() or {}).get('epoch')
        epochs['model_best.safetensors'] = int(epoch) if epoch is not None else None
    return epochs


class RunSaver(CheckpointSaver):
    """timm's ``CheckpointSaver`` (``last.pth``, the best ``max_history`` ``checkpoint-N.pth``, ``model_best.pth``)
    writing our state, each file atomically, plus ``model_best.safetensors``."""

    def __init__(self, run_dir: str, decreasing: bool, max_history: int):
        super().__init__(None, None, checkpoint_dir=run_dir, decreasing=decreasing, max_history=max_history)
        self.extension = '.pth'
        self.state: Dict[str, Any] = {}

    def _save(self, save_path, epoch, metric=None):
        save_checkpoint(save_path, {**self.state, 'metric': metric, 'saver': self.state_dict(epoch, metric)})

    def _replace(self, src, dst):  # timm unlinks dst first (for Windows): a kill there would lose last.pth
        os.replace(src, dst)

    def _duplicate(self, src, dst):  # a hard link (or a copy) under a random name, renamed over dst
        tmp = os.path.join(os.path.dirname(dst), f'.{os.path.basename(dst)}.{secrets.token_hex(8)}.tmp')
        try:
            os.link(src, tmp)
        except OSError:
            with open(src, 'rb') as source, atomic_write(dst) as target:
                shutil.copyfileobj(source, target)
            return
        os.replace(tmp, dst)

    def _path(self, name: str, extension: str = '') -> str:
        return os.path.join(self.checkpoint_dir, name + (extension or self.extension))

    def save_epoch(self, state: Dict[str, Any], metric: Optional[float]) -> None:
        """``last.pth`` and its copies (timm), then ``model_best.safetensors`` of the best (else newest) epoch."""
        self.state = state
        self.save_checkpoint(state['epoch'], metric)
        if metric is None:
            self._duplicate(self._path('last'), self._path('model_best'))
        if metric is None or self.best_epoch == state['epoch']:
            _export_safetensors(self._path('model_best', '.safetensors'), state)

    def resume(self, path: str, checkpoint: Dict[str, Any]) -> None:
        """The saver's history, repairing the copies of ``last.pth`` that a kill left behind it."""
        saved = checkpoint.get('saver') or {}
        epoch, metric = saved.get('pending', (None, None))
        own = os.path.realpath(os.path.dirname(os.path.abspath(path))) == os.path.realpath(self.checkpoint_dir)
        if own and epoch is not None and not os.path.exists(self._checkpoint_path(epoch)):
            self._duplicate(path, self._checkpoint_path(epoch))
        self.load_state_dict(saved)
        best = self.best_epoch if metric is not None else epoch
        if best is None or not own or set(best_weights_epoch(self.checkpoint_dir).values()) == {best}:
            return
        source = next((p for p in (self._checkpoint_path(best), path)
                       if os.path.isfile(p) and load_checkpoint_file(p).get('epoch') == best), None)
        if source is not None:
            self._duplicate(source, self._path('model_best'))
            _export_safetensors(self._path('model_best', '.safetensors'), load_checkpoint_file(source))
