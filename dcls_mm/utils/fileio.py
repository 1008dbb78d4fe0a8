"""Atomic file writes: a file is either complete or absent, whatever kills the writer.

Every tool that leaves results, records or checkpoints on disk writes through
:func:`atomic_open`: a temporary file in the destination folder, flushed and fsynced,
then renamed over the destination (``os.replace`` is atomic on POSIX), then the folder
entry made durable. A kill at any point leaves the previous file (or none) and at most a
stray ``.<name>.*.tmp`` file, never a truncated destination. Standard library only, so
every layer of dcls_mm (``ops`` included) may use it.
"""
from __future__ import annotations

import contextlib
import os
import os.path as osp
import tempfile
from typing import IO, Iterator, Union

__all__ = ['atomic_open', 'atomic_write']

PathLike = Union[str, os.PathLike]


def _umask() -> int:
    """The process's umask, read without changing it where Linux tells it (setting it
    to read it back is process-wide, racing other threads' file creation)."""
    try:
        with open('/proc/self/status') as f:
            for line in f:
                if line.startswith('Umask:'):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    umask = os.umask(0o022)
    os.umask(umask)
    return umask


@contextlib.contextmanager
def atomic_open(path: PathLike, mode: str = 'wb', **kwargs) -> Iterator[IO]:
    """Open a temporary file that replaces ``path`` when the ``with`` block succeeds.

    Args:
        path: final path; its folder is created if missing.
        mode: ``'wb'`` or ``'w'`` (text).
        **kwargs: passed to :func:`os.fdopen` (e.g. ``newline=''`` for CSV).

    Yields:
        The open temporary file. If the block raises, it is deleted and ``path`` is
        left as it was.
    """
    if mode not in ('w', 'wb'):
        raise ValueError(f"atomic_open writes whole files: mode must be 'w' or 'wb', got {mode!r}")
    path = os.fspath(path)
    folder = osp.dirname(osp.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f'.{osp.basename(path)}.', suffix='.tmp', dir=folder)
    try:
        # mkstemp makes the file 0600 and the rename keeps that: the mode open() would
        # give (0666 less the umask), so that checkpoints stay readable to the group
        if hasattr(os, 'fchmod'):
            os.fchmod(fd, 0o666 & ~_umask())
        f = os.fdopen(fd, mode, **kwargs)
    except BaseException:
        os.close(fd)
        os.unlink(tmp)
        raise
    try:
        with f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if osp.exists(tmp):
            os.unlink(tmp)
        raise
    try:  # make the rename itself durable (not possible on every file system)
        dir_fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)


def atomic_write(path: PathLike, data: Union[bytes, str]) -> None:
    """Write ``data`` (bytes, or text as UTF-8) to ``path`` atomically."""
    with atomic_open(path, 'wb') as f:
        f.write(data.encode('utf-8') if isinstance(data, str) else data)
