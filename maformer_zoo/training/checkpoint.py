"""Training checkpoints that resume exactly.

A checkpoint holds everything the next step depends on: model, EMA, optimizer, scheduler and
loss-scaler states, epoch and optimizer-step counters, the run config, the class map, and the
random-number states (Python, NumPy, torch CPU and CUDA) of *every* process, gathered to the
primary one. The data order needs no state: samplers derive it from ``(seed, epoch)``.

Checkpoints are plain tensors and built-in types only, so they load with
``torch.load(weights_only=True)``; the model weights sit under ``state_dict`` /
``state_dict_ema``, the keys timm's ``load_checkpoint`` and ``load_state_dict`` read, so a
checkpoint is also a weight file for fine-tuning and validation.
"""
import os
import random
from typing import Any, Dict, List

import numpy as np
import torch

from ..errors import CorruptCheckpointError
from ..utils.atomic import atomic_write
from ..weights import load_checkpoint_file

__all__ = ['CHECKPOINT_VERSION', 'capture_rng_state', 'restore_rng_state', 'save_checkpoint',
           'load_training_checkpoint',
           'prune_checkpoints']

CHECKPOINT_VERSION = 1


def capture_rng_state() -> Dict[str, Any]:
    """This process's random-number states, as weights_only-loadable objects."""
    np_state = np.random.get_state()
    state = {
        'python': random.getstate(),
        'numpy': {'algo': np_state[0], 'keys': torch.from_numpy(np_state[1].astype(np.int64)),
                  'pos': int(np_state[2]), 'has_gauss': int(np_state[3]), 'cached_gaussian': float(np_state[4])},
        'torch': torch.get_rng_state(),
    }
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
    """Write ``state`` atomically (a kill mid-write leaves the previous file intact)."""
    with atomic_write(path) as f:
        torch.save({'version': CHECKPOINT_VERSION, **state}, f)


def load_training_checkpoint(path: str) -> Dict[str, Any]:
    """A training checkpoint written by :func:`save_checkpoint`, read by the one weight reader."""
    checkpoint = load_checkpoint_file(path)
    if not isinstance(checkpoint, dict) or 'optimizer' not in checkpoint or 'epoch' not in checkpoint:
        raise CorruptCheckpointError(
            f"'{path}' is a weight file, not a training checkpoint of ours: it cannot be resumed. "
            "Use it with --pretrained-file to start a new run from its weights.")
    return checkpoint


def prune_checkpoints(folder: str, keep: int, prefix: str = 'checkpoint-', suffix: str = '.pth') -> List[str]:
    """Delete all but the ``keep`` newest per-epoch checkpoints; returns the deleted paths."""
    found = []
    for name in os.listdir(folder):
        if name.startswith(prefix) and name.endswith(suffix):
            stem = name[len(prefix):-len(suffix)]
            if stem.isdigit():
                found.append((int(stem), os.path.join(folder, name)))
    found.sort()
    doomed = [p for _, p in found[:max(0, len(found) - keep)]]
    for p in doomed:
        os.remove(p)
    return doomed
