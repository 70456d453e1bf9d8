"""Errors of maformer-zoo's weight handling (a leaf module: it imports nothing of ours)."""

__all__ = [
    'PretrainedWeightsNotFoundError', 'CheckpointMismatchError', 'UnsafeCheckpointError',
    'CorruptCheckpointError',
]


class PretrainedWeightsNotFoundError(RuntimeError):
    """No usable weight file: the model has no published weights, or a given file/folder/repo is missing."""


class CheckpointMismatchError(RuntimeError):
    """A checkpoint's keys or shapes do not fit the model it is loaded into."""


class UnsafeCheckpointError(RuntimeError):
    """A file that would need code to load (a pickle of objects, a YAML tag); refused."""


class CorruptCheckpointError(RuntimeError):
    """A weight file that cannot be read (empty, truncated, damaged, not a checkpoint)."""
