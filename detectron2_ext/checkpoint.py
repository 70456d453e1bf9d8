"""detectron2's ``DetectionCheckpointer`` reading weights without running code and writing atomically.

* Reading: every file, whatever its name, goes through ``maformer_zoo.weights.load_checkpoint_file``
  (by content: safetensors, ``torch.load(weights_only=True)``, numpy-only pickles). detectron2's own
  ``_load_file`` is never called: its ``.pkl`` and ``.pyth`` branches unpickle without limits.
  The layouts it knows (detectron2 / Detectron model zoo, pycls) are unwrapped here the same way.
* Writing: ``save`` and ``last_checkpoint`` are written with ``maformer_zoo.utils.atomic``, so a
  kill mid-save leaves the previous checkpoint and a ``last_checkpoint`` naming a complete file.
"""
import os
from urllib.parse import parse_qs

import torch
from detectron2.checkpoint import DetectionCheckpointer

from maformer_zoo.errors import CheckpointMismatchError, CorruptCheckpointError
from maformer_zoo.utils.atomic import atomic_write, write_atomic
from maformer_zoo.weights import load_checkpoint_file, weight_file_format

__all__ = ['SafeDetectionCheckpointer']


class SafeDetectionCheckpointer(DetectionCheckpointer):
    """``DetectionCheckpointer`` with safe reading and atomic writing (module docstring); same arguments."""

    def _load_file(self, filename: str):
        data = load_checkpoint_file(filename)
        if not isinstance(data, dict):
            raise CorruptCheckpointError(f"'{filename}' holds a {type(data).__name__}, not a checkpoint dict.")
        if 'model_state' in data:  # pycls
            loaded = {'model': {k: v for k, v in data['model_state'].items() if not k.endswith('num_batches_tracked')},
                      '__author__': 'pycls', 'matching_heuristics': True}
        elif weight_file_format(filename) == 'pickle' and not ('model' in data and '__author__' in data):
            data = data.get('blobs', data)  # Caffe2 / Detectron1: detection models keep weights in 'blobs'
            loaded = {'model': {k: v for k, v in data.items() if not k.endswith('_momentum')},
                      '__author__': 'Caffe2', 'matching_heuristics': True}
        else:
            loaded = data if 'model' in data else {'model': data}
        url = getattr(self, '_parsed_url_during_load', None)  # detectron2's `path?matching_heuristics=True`
        if url is not None and parse_qs(url.query).get('matching_heuristics') == ['True']:
            loaded['matching_heuristics'] = True
        return loaded

    # Issue 20: weights of another model loaded with strict=False leave a random detector that is
    # evaluated as if trained. Refuse a file whose keys mostly do not fit, with the counts.
    def load(self, path: str, *args, **kwargs):
        self._loading = path
        return super().load(path, *args, **kwargs)

    def _load_model(self, checkpoint):
        # parameters only: buffers such as BatchNorm's num_batches_tracked are filled in when absent
        params = {name for name, _ in self.model.named_parameters()}
        incompatible = super()._load_model(checkpoint)
        missing = params & set(incompatible.missing_keys)
        matched = len(params) - len(missing)
        unexpected = len(incompatible.unexpected_keys)
        if matched == 0 or unexpected > matched:
            first = sorted(incompatible.unexpected_keys)[:2]
            raise CheckpointMismatchError(
                f"Refused weights '{getattr(self, '_loading', '?')}': they do not fit this model ({matched} of its "
                f"{len(params)} parameters matched, {len(missing)} missing, {unexpected} keys of the file unused, "
                f"e.g. {first}); are they for another architecture? Give weights of this config's model.")
        return incompatible

    def save(self, name: str, **kwargs) -> None:
        """fvcore's ``save`` (model + checkpointables + ``kwargs`` as ``<name>.pth``), written atomically."""
        if not self.save_dir or not self.save_to_disk:
            return
        data = {'model': self.model.state_dict(), **{k: v.state_dict() for k, v in self.checkpointables.items()}}
        data.update(kwargs)
        basename = f'{name}.pth'
        os.makedirs(self.save_dir, exist_ok=True)
        self.logger.info(f'Saving checkpoint to {os.path.join(self.save_dir, basename)}')
        with atomic_write(os.path.join(self.save_dir, basename)) as f:
            torch.save(data, f)
        self.tag_last_checkpoint(basename)

    def tag_last_checkpoint(self, last_filename_basename: str) -> None:
        write_atomic(os.path.join(self.save_dir, 'last_checkpoint'), last_filename_basename)
