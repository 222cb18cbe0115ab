"""Request batching: rows of concurrent requests, for any adapters, gathered into bounded batches and run
on one worker thread that owns the model.

A request is split into rows (one input each) so a batch can take part of a long request and rows of
many others. The worker takes the rows waiting when the first of them has waited ``max_wait`` seconds or
``max_batch`` rows are there, whichever comes first. Model changes (adapter loads and unloads) go through
the same queue as work items, so they happen between batches, in the order they were asked for.
"""

from __future__ import annotations

import concurrent.futures
import logging
import threading
import time
from collections import deque
from typing import Any, Callable, Optional, Sequence

from .errors import ServeError

log = logging.getLogger("deltatune.serve")


class Job:
    """One request's rows; its ``future`` gets the list of row results, or the first error.

    Attributes:
        batch_size: The largest batch its rows ran in (what the server reports).
    """

    def __init__(self, names: Sequence[Optional[str]], payloads: Sequence[Any]):
        self.names, self.payloads = list(names), list(payloads)
        self.results: list[Any] = [None] * len(self.payloads)
        self.remaining = len(self.payloads)
        self.future: concurrent.futures.Future = concurrent.futures.Future()
        self.batch_size = 0
        self.cancelled = False

    def _finish_row(self, i: int, result: Any, batch_size: int) -> None:
        if self.future.done():
            return
        if isinstance(result, BaseException):
            self.future.set_exception(result)
            return
        self.results[i] = result
        self.batch_size = max(self.batch_size, batch_size)
        self.remaining -= 1
        if self.remaining == 0:
            self.future.set_result(self.results)


class _Control:
    def __init__(self, fn: Callable[[], Any]):
        self.fn, self.future = fn, concurrent.futures.Future()


class WorkerThread:
    """The worker-thread lifecycle shared by :class:`Batcher` and the generation scheduler: a subclass sets
    ``_cond`` (a ``threading.Condition``), ``_stopping``, ``_thread`` and ``_thread_name``, and runs its
    work in ``_loop``, which ends once ``_stopping`` is set and nothing is left to do."""

    _thread_name = "deltatune-serve-worker"

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name=self._thread_name, daemon=True)
        self._thread.start()

    def alive(self) -> bool:
        """Whether the worker thread runs (``/health`` reports 503 otherwise)."""
        return self._thread is not None and self._thread.is_alive()

    def stop(self, timeout: Optional[float] = None) -> None:
        """Finish what is queued (or running), then end the worker thread."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)


class Batcher(WorkerThread):
    """The worker thread and its queue.

    Args:
        run: ``run(names, payloads)``: one result per row, or an exception for a row that failed.
        prepare: ``prepare(names)``: called before each batch on the worker (loads adapters); returns
            ``{name: exception}`` for adapters that cannot run now.
        admits: ``admits(names)``: whether adapters ``names`` may share a batch (device slots).
        max_batch: Rows per batch at most.
        max_wait: Seconds the oldest waiting row may wait for others to join.
        on_batch: ``on_batch(rows, distinct adapters, seconds)`` after each batch (metrics).
    """

    def __init__(self, run, prepare, admits, max_batch: int = 32, max_wait: float = 0.005, on_batch=None):
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        self.run_rows, self.prepare, self.admits = run, prepare, admits
        self.max_batch, self.max_wait, self.on_batch = max_batch, max_wait, on_batch
        self._queue: deque = deque()  # (job, row index, enqueue time) or _Control
        self._cond = threading.Condition()
        self._stopping = False
        self._thread: Optional[threading.Thread] = None

    # ------------------------------------------------------------------ callers' side
    def submit(self, names: Sequence[Optional[str]], payloads: Sequence[Any]) -> Job:
        """Queue a request's rows (row ``i`` runs adapter ``names[i]``)."""
        job = Job(names, payloads)
        now = time.monotonic()
        with self._cond:
            if self._stopping:
                raise ServeError(503, "the server is shutting down")
            self._queue.extend((job, i, now) for i in range(len(job.payloads)))
            self._cond.notify_all()
        return job

    def control(self, fn: Callable[[], Any]) -> concurrent.futures.Future:
        """Run ``fn`` on the worker thread between batches; the future gets its result or error."""
        item = _Control(fn)
        with self._cond:
            if self._stopping:
                raise ServeError(503, "the server is shutting down")
            self._queue.append(item)
            self._cond.notify_all()
        return item.future

    def waiting(self) -> dict[Optional[str], int]:
        """Rows waiting per adapter (a snapshot, for metrics)."""
        with self._cond:
            counts: dict[Optional[str], int] = {}
            for item in self._queue:
                if not isinstance(item, _Control):
                    name = item[0].names[item[1]]
                    counts[name] = counts.get(name, 0) + 1
            return counts

    # ------------------------------------------------------------------ worker side
    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._stopping:
                    self._cond.wait()
                if not self._queue:
                    return  # stopping, and everything queued is done
                head = self._queue[0]
                if isinstance(head, _Control):
                    self._queue.popleft()
                    work = head
                else:
                    deadline = head[2] + self.max_wait
                    while (len(self._queue) < self.max_batch and not self._stopping
                           and (left := deadline - time.monotonic()) > 0):
                        self._cond.wait(left)
                    work = self._take()
            if isinstance(work, _Control):
                self._run_control(work)
            elif work:
                self._run_batch(work)

    def _take(self) -> list:
        """Rows for the next batch, in queue order, up to the first control item; rows of cancelled
        jobs are dropped, rows whose adapter would not fit next to the others stay queued."""
        batch, kept, names = [], deque(), set()
        while self._queue and len(batch) < self.max_batch and not isinstance(self._queue[0], _Control):
            item = self._queue.popleft()
            job, i, _ = item
            if job.cancelled or job.future.done():
                continue
            name = job.names[i]
            if name in names or self.admits(names | {name}):
                names.add(name)
                batch.append(item)
            else:
                kept.append(item)
        self._queue.extendleft(reversed(kept))
        return batch

    def _run_control(self, item: _Control) -> None:
        try:
            item.future.set_result(item.fn())
        except BaseException as exc:  # handed to the caller, who turns it into a response
            item.future.set_exception(exc)

    def _run_batch(self, batch: list) -> None:
        start = time.perf_counter()
        names = [job.names[i] for job, i, _ in batch]
        try:
            failed = self.prepare(names)
        except Exception as exc:  # e.g. no device slot: these rows fail, the server goes on
            failed = {n: exc for n in names}
        ok = [k for k, n in enumerate(names) if n not in failed]
        results: list[Any] = [failed.get(n) for n in names]
        if ok:
            try:
                out = self.run_rows([names[k] for k in ok], [batch[k][0].payloads[batch[k][1]] for k in ok])
            except Exception as exc:
                log.exception("batch of %d rows failed", len(ok))
                out = [exc] * len(ok)
            for k, r in zip(ok, out):
                results[k] = r
        for (job, i, _), r in zip(batch, results):
            job._finish_row(i, r, len(batch))
        if self.on_batch is not None:
            self.on_batch(len(batch), len(set(names)), time.perf_counter() - start)
