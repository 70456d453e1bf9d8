"""One run folder per run: choosing it, refusing to overwrite it, resuming it without duplicate rows,
and keeping ``model_best`` consistent with the run's record after a kill (docs/training.md, "Run folders").

* A folder that already holds a run is never written by a run that does not resume it.
* ``--resume auto`` continues ``<output>/<experiment>``, or without ``--experiment`` the newest
  ``<output>/<model>-<date>`` folder that has a ``last.pth`` (the same plain command continues).
* Files are written atomically (temporary file + ``os.replace``), and each epoch in the order
  ``model_best.*`` -> ``checkpoint-N.pth`` -> ``last.pth``: ``last.pth`` never records a best
  epoch whose ``model_best`` files are not yet written. A kill after ``model_best`` but before
  ``last.pth`` reruns that epoch on resume (deterministically), and :func:`recover_best` rewrites
  ``model_best`` from ``checkpoint-<best_epoch>.pth`` / ``last.pth`` if the two ever disagree.
"""
import csv
import glob
import json
import os
from typing import Any, Callable, Dict, Optional

import torch

from ..weights import label_names_of
from .checkpoint import load_checkpoint_file, save_checkpoint

__all__ = ['RUN_FILES', 'default_run_name', 'find_resumable_run', 'holds_run', 'truncate_csv', 'write_json_atomic',
           'best_weights_epoch', 'recover_best']

RUN_FILES = ('last.pth', 'config.yaml', 'summary.csv', 'train_steps.csv', 'summary.json', 'model_best.pth')


def default_run_name(model: str, stamp: str) -> str:
    return f"{model.replace('/', '_').replace(':', '_')}-{stamp}"


def find_resumable_run(output: str, model: str) -> Optional[str]:
    """The newest ``<output>/<model>-*`` folder with a ``last.pth`` (what ``--resume auto`` continues)."""
    candidates = [d for d in glob.glob(os.path.join(output, default_run_name(model, '*')))
                  if os.path.isfile(os.path.join(d, 'last.pth'))]
    return max(candidates, key=lambda d: os.path.getmtime(os.path.join(d, 'last.pth')), default=None)


def holds_run(run_dir: str) -> bool:
    return any(os.path.exists(os.path.join(run_dir, name)) for name in RUN_FILES)


def truncate_csv(path: str, keep: Callable[[Dict[str, str]], bool]) -> None:
    """Keep only the rows of a CSV log for which ``keep(row)`` holds (atomically; no file: nothing)."""
    if not os.path.isfile(path):
        return
    with open(path, newline='') as f:
        reader = csv.DictReader(f)
        fields, rows = reader.fieldnames, [r for r in reader if keep(r)]
    tmp = path + '.tmp'
    with open(tmp, 'w', newline='') as f:
        if fields:
            writer = csv.DictWriter(f, fieldnames=fields)
            writer.writeheader()
            writer.writerows(rows)
    os.replace(tmp, path)


def write_json_atomic(path: str, data: Any) -> None:
    tmp = path + '.tmp'
    with open(tmp, 'w') as f:
        json.dump(data, f, indent=2)
    os.replace(tmp, path)


def best_weights_epoch(run_dir: str) -> Dict[str, Optional[int]]:
    """The epoch each ``model_best`` file holds (None: missing)."""
    epochs: Dict[str, Optional[int]] = {'model_best.pth': None, 'model_best.safetensors': None}
    pth = os.path.join(run_dir, 'model_best.pth')
    if os.path.isfile(pth):
        epochs['model_best.pth'] = torch.load(pth, map_location='cpu', weights_only=True).get('epoch')
    st = os.path.join(run_dir, 'model_best.safetensors')
    if os.path.isfile(st):
        from safetensors import safe_open
        with safe_open(st, framework='pt') as f:
            epoch = (f.metadata() or {}).get('epoch')
        epochs['model_best.safetensors'] = int(epoch) if epoch is not None else None
    return epochs


def recover_best(run_dir: str, best_epoch: Optional[int], write_best: Callable[[Dict[str, Any]], None]) -> bool:
    """Rewrite ``model_best.*`` from the checkpoint of ``best_epoch`` if they hold another epoch; True if rewritten."""
    if best_epoch is None or set(best_weights_epoch(run_dir).values()) == {best_epoch}:
        return False
    for name in (f'checkpoint-{best_epoch}.pth', 'last.pth'):
        path = os.path.join(run_dir, name)
        if os.path.isfile(path):
            state = load_checkpoint_file(path)
            if state.get('epoch') == best_epoch:
                write_best(state)
                return True
    return False


def save_best(run_dir: str, state: Dict[str, Any], export: Callable[[str, Dict[str, torch.Tensor], Dict[str, str]], None]) -> None:
    """``model_best.pth`` (weights + run metadata) and ``model_best.safetensors`` (EMA weights if any)."""
    weights = {k: state[k] for k in ('arch', 'epoch', 'state_dict', 'state_dict_ema', 'num_classes', 'class_to_idx',
                                     'data_config', 'metrics') if k in state}
    save_checkpoint(os.path.join(run_dir, 'model_best.pth'), weights)
    metadata = {'epoch': str(state['epoch'])}
    names = label_names_of(state, int(state.get('num_classes') or 0))
    if names:  # so validate.py maps class folders to outputs as training did
        metadata['label_names'] = json.dumps(names)
    export(os.path.join(run_dir, 'model_best.safetensors'), state.get('state_dict_ema') or state['state_dict'], metadata)
