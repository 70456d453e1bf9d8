"""detectron2's ``DetectionCheckpointer`` reading weight files without running code from them.

detectron2 reads ``.pkl`` files with plain ``pickle.load`` and leaves ``torch.load`` to fvcore.
:class:`SafeDetectionCheckpointer` reads ``.pkl`` with maformer-zoo's numpy-only unpickler (the
Detectron / detectron2 model-zoo formats are numpy arrays in plain containers) and every other
file with ``torch.load(weights_only=True)``; anything needing other code is refused with
``maformer_zoo.errors.UnsafeCheckpointError``.
"""
from detectron2.checkpoint import DetectionCheckpointer

from maformer_zoo.errors import CheckpointMismatchError
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
