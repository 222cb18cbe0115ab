"""The run folder of ``deltatune train``/``ab``: written under a temporary name and renamed into place on
success (SIGTERM included: it is turned into an exception while the folder is open); which process writes."""

from __future__ import annotations

import os
import shutil
import signal
import sys
import threading

import torch

from .options import UsageError


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


class Terminated(SystemExit):
    """Raised in the main thread by SIGTERM while a run folder is open, so that it is cleaned up as on
    Ctrl-C (Python's default SIGTERM action ends the process at once, leaving the ``.partial`` folder)."""


def _raise_terminated(signum, frame) -> None:
    raise Terminated(128 + signum)  # the shell's status for "killed by signal N"


class RunFolder:
    """A run folder written under a temporary name and renamed into place on success.

    While it is open, SIGTERM (``kill``, a job scheduler's stop, ``docker stop``) raises :class:`Terminated`
    instead of ending the process, so the temporary folder is removed as on any other failure.
    """

    def __init__(self, final: str, overwrite: bool):
        self.final = os.path.abspath(final)
        if os.path.exists(self.final) and os.listdir(self.final) and not overwrite:
            raise UsageError(f"output folder {final!r} already exists (pass --overwrite to replace it)")
        self.tmp = f"{self.final}.partial-{os.getpid()}"
        self._previous_handler = None

    def __enter__(self) -> str:
        if threading.current_thread() is threading.main_thread():  # (only the main thread may set handlers)
            self._previous_handler = signal.signal(signal.SIGTERM, _raise_terminated)
        if is_main_process():
            os.makedirs(self.tmp, exist_ok=True)
        return self.tmp

    def __exit__(self, kind, value, tb) -> None:
        if self._previous_handler is not None:
            # A second SIGTERM while cleaning up must not cut the cleanup short: it is ignored until done.
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        try:
            self._finish(kind)
        finally:
            if self._previous_handler is not None:
                signal.signal(signal.SIGTERM, self._previous_handler)
        if isinstance(value, Terminated) and is_main_process():
            print("deltatune: stopped by SIGTERM; no run folder was written", file=sys.stderr)

    def _finish(self, kind) -> None:
        if not is_main_process():
            return
        if kind is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return
        shutil.rmtree(os.path.join(self.tmp, "trainer"), ignore_errors=True)
        if os.path.exists(self.final):
            shutil.rmtree(self.final)
        os.replace(self.tmp, self.final)
