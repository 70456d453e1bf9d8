"""Atomic file writes: a file is either its old content or its complete new content, never a part.

A fresh temporary file in the target's folder (``mkstemp``: ``O_EXCL``, a random name, so nothing planted is
opened), fsynced, renamed over the target (a symlink there is replaced, not followed), then the folder fsynced.
"""
import contextlib
import os
import tempfile
from typing import IO, Iterator, Union

__all__ = ['atomic_write', 'write_atomic']

_UMASK = os.umask(0)  # read the process umask once (mkstemp creates 0600 files; we want the usual mode)
os.umask(_UMASK)


@contextlib.contextmanager
def atomic_write(path: Union[str, os.PathLike], mode: str = 'wb', **open_kwargs) -> Iterator[IO]:
    """A file object (``mode`` ``'wb'`` or ``'w'``, ``open_kwargs`` as ``open``'s) whose content replaces
    ``path`` when the block ends without an exception; the folder must exist."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f'.{os.path.basename(path)}.', suffix='.tmp')
    try:
        with os.fdopen(fd, mode, **open_kwargs) as f:
            os.fchmod(f.fileno(), 0o666 & ~_UMASK)
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError):  # make the rename itself durable (not possible on every OS)
        dir_fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def write_atomic(path: Union[str, os.PathLike], data: Union[bytes, str]) -> None:
    """Replace ``path`` by ``data`` (bytes, or text written as UTF-8) atomically."""
    with atomic_write(path, 'wb') as f:
        f.write(data.encode('utf-8') if isinstance(data, str) else data)
