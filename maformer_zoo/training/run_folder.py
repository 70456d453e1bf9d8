"""One run folder per run: choosing it, refusing to overwrite it, resuming it under the same settings; the rule
of every command that writes (docs/training.md#run-folders-no-run-is-lost).
"""
import csv
import fnmatch
import glob
import os
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional

import yaml

from ..utils.atomic import atomic_write, write_atomic

__all__ = ['RUN_ARTIFACTS', 'RunFolderError', 'run_artifacts', 'check_run_folder', 'check_resume_changes',
           'default_run_name', 'find_resumable_run', 'rewrite_csv']

# What marks a folder as a run's (ours, timm's and detectron2's names): configs, logs, metrics,
# checkpoints, weights, results, evaluation outputs.
RUN_ARTIFACTS = (
    'config.yaml', 'config_changes.yaml', 'metrics.json', 'log.txt', 'log.txt.rank*', 'last_checkpoint', 'last.pth',
    'model_*.pth', 'checkpoint-*.pth', '*.safetensors', 'summary.csv', 'summary.json', 'train_steps.csv',
    'results.json', 'events.out.tfevents.*', 'inference', 'eval-*')
CHANGES_FILE = 'config_changes.yaml'


class RunFolderError(FileExistsError):
    """A command would write into another run's folder (or a path that is not a folder), or resume a run
    under other settings."""


def run_artifacts(folder: str) -> List[str]:
    """The names in ``folder`` that belong to a run (sorted; none if it does not exist)."""
    if not os.path.isdir(folder):
        return []
    return sorted(n for n in os.listdir(folder) if any(fnmatch.fnmatchcase(n, p) for p in RUN_ARTIFACTS))


def check_run_folder(folder: str, what: str, resuming: bool = False, hint: str = 'choose another folder') -> None:
    """Refuse ``folder`` if it is not a folder or holds a run (any :data:`RUN_ARTIFACTS`) this command does not
    resume (``resuming``); ``what`` names it and ``hint`` says what to do instead, in the message."""
    if os.path.lexists(folder) and not os.path.isdir(folder):
        raise RunFolderError(f"{what} is not a folder ({'a broken symlink' if os.path.islink(folder) else 'a file'}): "
                             f"give a folder path (nothing was changed).")
    found = [] if resuming else run_artifacts(folder)
    if found:
        shown = ', '.join(found[:4]) + (f' and {len(found) - 4} more' if len(found) > 4 else '')
        raise RunFolderError(f"{what} already holds a run ({shown}): {hint} (nothing was changed).")


def check_resume_changes(saved: Mapping[str, Any], current: Mapping[str, Any], ignore: Iterable[str],
                         allow_changes: bool, folder: str, at: str, record: bool = True) -> Dict[str, Any]:
    """Compare a run's ``saved`` flat settings with the ``current`` ones (but ``ignore``); refuse a change or, with
    ``allow_changes``, record it in ``<folder>/config_changes.yaml`` (if ``record``) as taking effect ``at``
    (e.g. ``'epoch 3'``). Returns ``{setting: [saved, current]}`` of the changes."""
    ignore = set(ignore)
    changed = {k: [saved[k], current[k]] for k in sorted(set(saved) & set(current))  # a setting only one
               if k not in ignore and saved[k] != current[k]}                   # version knows: unchanged
    if not changed:
        return changed
    listed = '; '.join(f'{k}: {a!r} -> {b!r}' for k, (a, b) in list(changed.items())[:6])
    if not allow_changes:
        raise RunFolderError(
            f"The resumed run in '{folder}' was trained with other settings ({listed}"
            f"{' ...' if len(changed) > 6 else ''}): resume with the run's own settings, or add --allow-changes "
            f"to change them from {at} on (recorded in {CHANGES_FILE}).")
    path = os.path.join(folder, CHANGES_FILE)
    if not record:
        return changed
    history = []
    if os.path.isfile(path):
        with open(path, encoding='utf-8') as f:
            history = yaml.safe_load(f) or []
    history.append({'from': at, 'changed': {k: {'before': a, 'after': b} for k, (a, b) in changed.items()}})
    write_atomic(path, yaml.safe_dump(history, sort_keys=False))
    return changed


def default_run_name(model: str, stamp: str) -> str:
    return f"{model.replace('/', '_').replace(':', '_')}-{stamp}"


def find_resumable_run(output: str, model: str) -> Optional[str]:
    """The newest ``<output>/<model>-*`` folder with a ``last.pth`` (what ``--resume auto`` continues)."""
    candidates = [d for d in glob.glob(os.path.join(output, default_run_name(model, '*')))
                  if os.path.isfile(os.path.join(d, 'last.pth'))]
    return max(candidates, key=lambda d: os.path.getmtime(os.path.join(d, 'last.pth')), default=None)


def _keeps(keep: Callable[[Dict[str, str]], bool], row: Dict[str, str]) -> bool:
    try:
        return keep(row)
    except (TypeError, ValueError):  # a row cut short by a kill mid-append
        return False


def rewrite_csv(path: str, keep: Callable[[Dict[str, str]], bool] = lambda row: True,
                add: Optional[Dict[str, Any]] = None) -> None:
    """Rewrite a CSV log atomically with the rows for which ``keep(row)`` holds, then ``add`` (a new row;
    new columns are added). No file and nothing to add: nothing is written."""
    rows: List[Dict[str, Any]] = []
    fields: List[str] = []
    if os.path.isfile(path):
        with open(path, newline='') as f:
            reader = csv.DictReader(f)
            fields, rows = list(reader.fieldnames or []), [r for r in reader if _keeps(keep, r)]
    elif add is None:
        return
    if add is not None:
        rows.append(add)
        fields += [k for k in add if k not in fields]
    with atomic_write(path, 'w', newline='') as f:
        writer = csv.DictWriter(f, fieldnames=fields, restval='')
        writer.writeheader()
        writer.writerows(rows)
