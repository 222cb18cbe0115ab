"""Atomic file writes: a file is either its old content or its complete new content, never half-written.

A leaf module (it imports nothing from deltatune) so that configs and checkpoints can both write files
without importing each other.
"""

from __future__ import annotations

import os
import tempfile
from typing import Callable


def atomic_write_bytes(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file and a rename (never a half-written file)."""
    def write(tmp: str) -> None:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())

    atomic_write(path, write)


def atomic_write(path: str, write: Callable[[str], None]) -> None:
    """Let ``write(tmp)`` fill a temporary file next to ``path``, then rename it over ``path``.

    The temporary file lives in the target's folder so the rename stays on one file system (and is
    atomic there); it is removed again if ``write`` raises, leaving ``path`` as it was.
    """
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=os.path.basename(path), dir=directory)
    os.close(fd)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


__all__ = ["atomic_write", "atomic_write_bytes"]
