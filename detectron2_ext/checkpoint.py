"""detectron2's ``DetectionCheckpointer`` reading weight files without running code from them.

detectron2 reads ``.pkl`` files with plain ``pickle.load`` and leaves ``torch.load`` to fvcore.
:class:`SafeDetectionCheckpointer` reads ``.pkl`` with maformer-zoo's numpy-only unpickler (the
Detectron / detectron2 model-zoo formats are numpy arrays in plain containers) and every other
file with ``torch.load(weights_only=True)``; anything needing other code is refused with
``maformer_zoo.errors.UnsafeCheckpointError``.
"""
from detectron2.checkpoint import DetectionCheckpointer

from maformer_zoo.weights import load_checkpoint_file

__all__ = ['SafeDetectionCheckpointer']


class SafeDetectionCheckpointer(DetectionCheckpointer):
    """``DetectionCheckpointer`` with safe reading (see the module docstring); same arguments."""

    def _load_file(self, filename: str):
        if not filename.endswith('.pkl'):
            return super()._load_file(filename)  # -> _torch_load below, plus detectron2's URL handling
        data = load_checkpoint_file(filename)
        if 'model' in data and '__author__' in data:  # detectron2 model-zoo format
            return data
        data = data.get('blobs', data)  # Caffe2 / Detectron1: detection models keep weights in 'blobs'
        return {'model': {k: v for k, v in data.items() if not k.endswith('_momentum')},
                '__author__': 'Caffe2', 'matching_heuristics': True}

    def _torch_load(self, f: str):
        return load_checkpoint_file(f)
