"""Atomic writes: a file (or a folder of files) is either its old content or its complete new content.

A leaf module (it imports nothing from deltatune) so that configs and checkpoints can both write files
without importing each other.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import shutil
import tempfile
from typing import Callable, Iterable, Iterator


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


#: What names the staging folders of :func:`staged_folder` (``.<folder name><this><pid>-<random>``).
STAGING_MARK = ".deltatune-staging-"


@contextlib.contextmanager
def staged_folder(directory: str, replaced: Iterable[str] = ()) -> Iterator[str]:
    """Fill a new version of ``directory`` and put it in place in one step (a folder-level atomic write).

    Yields a staging folder next to ``directory`` that already holds everything ``directory`` holds except
    the entries named in ``replaced`` (files hard-linked, so nothing big is copied). Whatever the caller
    writes there then takes ``directory``'s place with a single atomic exchange (Linux ``renameat2``
    ``RENAME_EXCHANGE``), so a reader, or a process killed at any moment, sees the old folder or the
    new one, never some files of each. If the caller raises, ``directory`` is left as it was.

    Where no exchange is possible (another OS or file system, ``directory`` being the working directory or
    a mount point), the staged files are moved in one by one, each atomically: every file is then whole,
    but a kill between two files leaves old and new files side by side.

    A process killed mid-save leaves a hidden ``.<name>.deltatune-staging-<pid>-*`` folder next to
    ``directory``; it is never read, and the next save into the same parent folder removes those of
    processes that no longer run (on POSIX systems).
    """
    directory = os.path.realpath(directory)  # (a symlink to a folder: the folder is replaced, the link stays)
    parent, name = os.path.split(directory)
    os.makedirs(parent, exist_ok=True)
    _remove_abandoned(parent)
    staged = tempfile.mkdtemp(prefix=f".{name}{STAGING_MARK}{os.getpid()}-", dir=parent)
    try:
        old_mode = os.stat(directory).st_mode & 0o7777 if os.path.isdir(directory) else None
        if old_mode is not None:
            _link_tree(directory, staged, skip=set(replaced))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(staged, old_mode if old_mode is not None else 0o777 & ~umask)  # (mkdtemp makes 0700)
        yield staged
        _put_in_place(staged, directory)
    finally:
        if os.path.isdir(staged):  # the failed new version, or the old one after the exchange
            shutil.rmtree(staged, ignore_errors=True)


def _remove_abandoned(parent: str) -> None:
    """Remove the staging folders in ``parent`` (``...deltatune-staging-<pid>-*``) whose process is gone."""
    if os.name != "posix":  # (elsewhere os.kill(pid, 0) does not just probe)
        return
    for entry in os.scandir(parent):
        if STAGING_MARK not in entry.name:
            continue
        pid = entry.name.rsplit(STAGING_MARK, 1)[1].split("-", 1)[0]
        if pid.isdigit() and not _running(int(pid)):
            shutil.rmtree(entry.path, ignore_errors=True)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # (another user's process)
        return True
    return True


def _link_tree(source: str, target: str, skip: set) -> None:
    """``source``'s entries (except ``skip`` and stale staging folders) recreated in ``target``: folders
    anew, files hard-linked (copied where the file system has no hard links), symlinks as links."""
    for entry in os.scandir(source):
        if entry.name in skip or STAGING_MARK in entry.name:
            continue
        dest = os.path.join(target, entry.name)
        if entry.is_symlink():
            os.symlink(os.readlink(entry.path), dest)
        elif entry.is_dir():
            os.mkdir(dest, entry.stat().st_mode & 0o7777)
            _link_tree(entry.path, dest, set())
        else:
            try:
                os.link(entry.path, dest)
            except OSError:
                shutil.copy2(entry.path, dest)


def _put_in_place(staged: str, directory: str) -> None:
    """Make ``staged`` be ``directory`` (its old content ends up at ``staged``, or gone)."""
    if not os.path.exists(directory):
        try:
            os.rename(staged, directory)  # one atomic step; fails if the folder appeared meanwhile
            return
        except OSError as exc:
            if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                raise
    if not _is_cwd(directory) and _exchange(staged, directory):
        return
    for entry in os.scandir(staged):  # the fallback: each file whole, the folder not as one
        dest = os.path.join(directory, entry.name)
        if entry.is_dir(follow_symlinks=False) and os.path.isdir(dest) and not os.path.islink(dest):
            _put_in_place(entry.path, dest)
        else:
            os.replace(entry.path, dest)


def _is_cwd(directory: str) -> bool:
    # Exchanging the working directory would leave the process in the old (then deleted) folder.
    try:
        return os.path.samefile(directory, os.getcwd())
    except OSError:
        return False


def _exchange(a: str, b: str) -> bool:
    """Swap two paths atomically (Linux ``renameat2(RENAME_EXCHANGE)``); False where that is unsupported."""
    renameat2 = getattr(_libc(), "renameat2", None)
    if renameat2 is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EBUSY, errno.EXDEV, errno.EPERM, errno.ENOTSUP):
        return False  # (a file system or kernel without it, or a mount point)
    raise OSError(code, f"cannot exchange {a!r} and {b!r}: {os.strerror(code)}")


def _libc():
    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:  # (no C library to load, e.g. on Windows)
        return None


__all__ = ["STAGING_MARK", "atomic_write", "atomic_write_bytes", "staged_folder"]
