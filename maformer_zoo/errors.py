"""The errors of maformer-zoo's weight handling, all ``RuntimeError`` (a leaf: it imports nothing of ours)."""
from contextlib import contextmanager


class PretrainedWeightsNotFoundError(RuntimeError):
    """No usable weights: none are published, or a given file, folder or repo is missing."""


class CheckpointMismatchError(RuntimeError):
    """A checkpoint's keys or shapes do not fit the model it is loaded into."""


class UnsafeCheckpointError(RuntimeError):
    """A file that would need code to load (a pickle of objects, a YAML tag); refused."""


class CorruptCheckpointError(RuntimeError):
    """A weight file that cannot be read (empty, truncated, damaged, not a checkpoint)."""


@contextmanager
def download_errors(what: str, how: str, active: bool = True):
    """huggingface_hub's errors (all ``OSError``s, offline or online) inside, if ``active``, as one line."""
    try:
        yield
    except OSError as err:
        if not active:
            raise
        raise PretrainedWeightsNotFoundError(f"Could not get {what} ({type(err).__name__}): {how}") from err
