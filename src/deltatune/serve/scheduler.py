"""Iteration-level (continuous) batching for generation: the worker runs one decode step at a time for
the running sequences; a new request joins at the next step and a finished one leaves at once, instead
of a batch waiting for its longest member.

Like :class:`~.batcher.Batcher` it owns the model's thread: adapter loads and unloads queued with
:meth:`Scheduler.control` run between steps.
"""

from __future__ import annotations

import concurrent.futures
import logging
import threading
import time
from collections import deque
from typing import Any, Callable, Optional

from .batcher import WorkerThread, _Control
from .errors import ServeError
from .generation import GenerationEngine, GenSequence

log = logging.getLogger("deltatune.serve")


class Scheduler(WorkerThread):
    """The generation worker: waiting queue, running set, one step per loop.

    Args:
        engine: Runs the steps.
        prepare: ``prepare(names)`` before a step (loads adapters); ``{name: exception}`` for failures.
        admits: ``admits(names)``: whether adapters ``names`` may run together.
        max_batch: Sequences running at once at most.
        max_wait: Seconds a lone new sequence waits for company before the first step (when idle).
        on_batch: ``on_batch(rows, distinct adapters, seconds)`` after each step.
    """

    _thread_name = "deltatune-serve-generate"

    def __init__(self, engine: GenerationEngine, prepare, admits, max_batch: int = 32, max_wait: float = 0.005,
                 on_batch=None):
        self.engine, self.prepare, self.admits = engine, prepare, admits
        self.max_batch, self.max_wait, self.on_batch = max_batch, max_wait, on_batch
        self._waiting: deque = deque()  # GenSequence or _Control
        self._running: list[GenSequence] = []
        self._cond = threading.Condition()
        self._stopping = False
        self._thread: Optional[threading.Thread] = None
        self.steps = 0

    def submit(self, seqs: list[GenSequence]) -> None:
        with self._cond:
            if self._stopping:
                raise ServeError(503, "the server is shutting down")
            self._waiting.extend(seqs)
            self._cond.notify_all()

    def control(self, fn: Callable[[], Any]) -> concurrent.futures.Future:
        """Run ``fn`` on the worker thread between steps."""
        item = _Control(fn)
        with self._cond:
            if self._stopping:
                raise ServeError(503, "the server is shutting down")
            self._waiting.append(item)
            self._cond.notify_all()
        return item.future

    def waiting(self) -> dict[Optional[str], int]:
        with self._cond:
            return _count(s for s in self._waiting if isinstance(s, GenSequence))

    def running(self) -> dict[Optional[str], int]:
        with self._cond:
            return _count(self._running)

    # ------------------------------------------------------------------ worker side
    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._waiting and not self._running and not self._stopping:
                    self._cond.wait()
                if not self._waiting and not self._running:
                    return
                if not self._running and self._waiting and not isinstance(self._waiting[0], _Control):
                    # Idle: let concurrent arrivals gather so the first step already batches them.
                    deadline = time.monotonic() + self.max_wait
                    while len(self._waiting) < self.max_batch and not self._stopping and (
                            left := deadline - time.monotonic()) > 0:
                        self._cond.wait(left)
                control = self._waiting.popleft() if isinstance(self._waiting[0] if self._waiting else None,
                                                                _Control) else None
                if control is None:
                    self._admit()
                running = [s for s in self._running if not s.cancelled]
                self._running = running
            if control is not None:
                try:
                    control.future.set_result(control.fn())
                except BaseException as exc:
                    control.future.set_exception(exc)
                continue
            if running:
                self._step(running)

    def _admit(self) -> None:
        """Move waiting sequences into the running set, in queue order, up to the first control item or
        the first sequence whose adapter has no device slot next to the running ones: that one waits for
        the running set to drain, and nothing behind it overtakes it (no adapter starves)."""
        names = {s.adapter for s in self._running}
        while self._waiting and len(self._running) < self.max_batch and not isinstance(self._waiting[0], _Control):
            seq = self._waiting[0]
            if not seq.cancelled:
                if seq.adapter not in names and not self.admits(names | {seq.adapter}):
                    return
                names.add(seq.adapter)
                self._running.append(seq)
            self._waiting.popleft()

    def _step(self, running: list[GenSequence]) -> None:
        start = time.perf_counter()
        names = [s.adapter for s in running]
        try:
            failed = self.prepare(names)
        except Exception as exc:
            failed = {n: exc for n in names}
        ok = [s for s in running if s.adapter not in failed]
        for s in running:
            if s.adapter in failed:
                s.emit(s, failed[s.adapter], True)
        if ok:
            try:
                self.engine.step(ok)
            except Exception as exc:
                log.exception("decode step of %d sequences failed", len(ok))
                for s in ok:
                    s.emit(s, exc, True)
                    s.finish_reason = "error"
        self.steps += 1
        with self._cond:
            self._running = [s for s in self._running if s.finish_reason is None and s.adapter not in failed
                             and not s.cancelled]
        if self.on_batch is not None:
            self.on_batch(len(running), len(set(names)), time.perf_counter() - start)


def _count(seqs) -> dict[Optional[str], int]:
    out: dict[Optional[str], int] = {}
    for s in seqs:
        out[s.adapter] = out.get(s.adapter, 0) + 1
    return out
