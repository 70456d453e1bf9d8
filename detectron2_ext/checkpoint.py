"""detectron2's ``DetectionCheckpointer`` reading every file with :func:`maformer_zoo.weights.load_checkpoint_file`
(by content: its ``.pkl`` / ``.pyth`` branches, which unpickle without limits, are never reached), refusing weights
that mostly do not fit, and writing atomically. docs/weights.md#safety.
"""
import os
from urllib.parse import parse_qs

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.utils.file_io import PathManager

from maformer_zoo.errors import CorruptCheckpointError
from maformer_zoo.utils.atomic import atomic_write
from maformer_zoo.weights import load_checkpoint_file, mismatch_error, weight_file_format

__all__ = ['SafeDetectionCheckpointer']


class _AtomicWrites:
    """detectron2's ``PathManager`` (fvcore's ``save`` and ``tag_last_checkpoint`` write through it), whose ``open``
    for writing is :func:`atomic_write`: a kill keeps the last good file."""

    def __getattr__(self, name: str):
        return getattr(PathManager, name)

    def open(self, path: str, mode: str = 'r', **kwargs):
        if 'w' not in mode:
            return PathManager.open(path, mode, **kwargs)
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        return atomic_write(path, mode, **kwargs)


class SafeDetectionCheckpointer(DetectionCheckpointer):
    """``DetectionCheckpointer(model, save_dir='', *, save_to_disk=None, **checkpointables)``, reading safely and
    writing atomically (see the module docstring)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.path_manager = _AtomicWrites()

    def _load_file(self, filename: str):
        data = load_checkpoint_file(filename)
        if not isinstance(data, dict):
            raise CorruptCheckpointError(f"'{filename}' holds a {type(data).__name__}, not a checkpoint dict.")
        if 'model_state' in data:  # pycls
            return {'model': {k: v for k, v in data['model_state'].items() if not k.endswith('num_batches_tracked')},
                    '__author__': 'pycls', 'matching_heuristics': True}
        if weight_file_format(filename) == 'pickle' and not ('model' in data and '__author__' in data):
            data = data.get('blobs', data)  # Caffe2 / Detectron1: detection models keep their weights in 'blobs'
            return {'model': {k: v for k, v in data.items() if not k.endswith('_momentum')},
                    '__author__': 'Caffe2', 'matching_heuristics': True}
        loaded = data if 'model' in data else {'model': data}
        if parse_qs(self._parsed_url_during_load.query).get('matching_heuristics') == ['True']:  # `path?...=True`
            loaded['matching_heuristics'] = True
        return loaded

    def _load_model(self, checkpoint):
        params = {name for name, _ in self.model.named_parameters()}  # buffers (BatchNorm counts) may be absent
        incompatible = super()._load_model(checkpoint)
        missing = sorted(params & set(incompatible.missing_keys))
        if len(missing) == len(params) or len(incompatible.unexpected_keys) > len(params) - len(missing):
            raise mismatch_error(self.model, f"'{self._parsed_url_during_load.path}'", len(params), missing,
                                 sorted(incompatible.unexpected_keys))
        return incompatible
