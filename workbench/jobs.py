"""A queue of background work: one worker thread, de-duplicated requests, progress and a stop switch per job.

A run on the demo model takes seconds; done on the caller's thread it would freeze a notebook (no slider, no
Stop button). So front ends hand long calls to a :class:`JobQueue`, which runs them one at a time on a daemon
thread: two runs at once would only fight over the same CPU cores and skew each other's speed metrics.
A request whose ``key`` is already queued or running gets that job back instead of a second copy (a slider
dragged back and forth), and the whole queue can be cancelled at once (a sweep the user gave up on).

Callbacks (``on_start``, ``on_progress``, ``on_done``, ``on_change`` listeners) run on the worker thread; a
front end that draws must only do what is safe from another thread there (ipywidgets: set attributes).
"""

from __future__ import annotations

import threading
import time
import traceback
from collections import deque
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any

from workbench.progress import Progress

ProgressFn = Callable[[float, str], None]


@dataclass(eq=False)
class Job:
    """One unit of background work: ``fn(progress)`` plus what to do with its result.

    ``status`` goes ``queued → running → done | failed | cancelled``. ``result`` holds the return value and
    ``error`` the exception (with ``traceback`` text) when ``fn`` raised; callbacks run on the worker thread.
    """

    fn: Callable[[Progress], Any]
    label: str = ""
    key: Hashable | None = None
    on_done: Callable[[Job], None] | None = None
    on_progress: ProgressFn | None = None
    on_start: Callable[[Job], None] | None = None
    # Provisional results while the job runs (e.g. metrics over the chunks evaluated so far); see Progress.
    on_partial: Callable[[dict[str, Any]], None] | None = None
    status: str = "queued"
    result: Any = None
    error: BaseException | None = None
    traceback: str = ""
    progress: Progress = field(init=False)
    _finished: threading.Event = field(default_factory=threading.Event, repr=False)

    def __post_init__(self) -> None:
        # The callback goes through the job so a bar can be re-bound to whichever job is running.
        # Partial results are computed only when someone listens (on_partial given).
        self.progress = Progress(self._report, on_partial=self._partial if self.on_partial else None)
        self.fraction, self.message = 0.0, ""
        self.partial: dict[str, Any] | None = None  # the latest provisional result

    def _partial(self, metrics: dict[str, Any]) -> None:
        self.partial = metrics
        if self.on_partial is not None:
            self.on_partial(metrics)

    def _report(self, fraction: float, message: str) -> None:
        self.fraction, self.message = fraction, message
        if self.on_progress is not None:
            self.on_progress(fraction, message)

    def cancel(self) -> None:
        """Ask the job to stop: a queued job never starts, a running one stops at its next progress check."""
        self.progress.cancel()

    @property
    def cancelled(self) -> bool:
        return self.progress.cancelled

    @property
    def finished(self) -> bool:
        return self._finished.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        return self._finished.wait(timeout)


class JobQueue:
    """A queue of :class:`Job` served by one daemon worker thread (started on first use).

    ``submit`` with a ``key`` that is already queued or running returns that job instead of queueing the same
    work twice (a slider dragged back and forth). ``wait(timeout)`` blocks until everything submitted is
    finished, which is what tests and scripts use; the notebook itself never waits.
    """

    def __init__(self, name: str = "workbench-jobs") -> None:
        self._name = name
        self._queue: deque[Job] = deque()
        self._lock = threading.Condition()
        self._thread: threading.Thread | None = None
        self._current: Job | None = None
        self._closed = False
        self.history: list[Job] = []  # every finished job, newest last (for tests and the status line)
        self._listeners: list[Callable[[], None]] = []

    # ---- submitting ------------------------------------------------------------------------------------

    def submit(
        self,
        fn: Callable[[Progress], Any],
        *,
        label: str = "",
        key: Hashable | None = None,
        on_done: Callable[[Job], None] | None = None,
        on_progress: ProgressFn | None = None,
        on_start: Callable[[Job], None] | None = None,
        on_partial: Callable[[dict[str, Any]], None] | None = None,
    ) -> Job:
        with self._lock:
            if self._closed:
                raise RuntimeError(
                    "This job queue was closed; create a new one (a new Workspace or Workbench)."
                )
            if key is not None:
                for job in ([self._current] if self._current else []) + list(self._queue):
                    if job.key == key and not job.cancelled:
                        return job
            job = Job(
                fn,
                label=label,
                key=key,
                on_done=on_done,
                on_progress=on_progress,
                on_start=on_start,
                on_partial=on_partial,
            )
            self._queue.append(job)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._loop, name=self._name, daemon=True)
                self._thread.start()
            self._lock.notify_all()
        self._changed()
        return job

    def on_change(self, listener: Callable[[], None]) -> None:
        """Call ``listener()`` (on any thread) whenever a job is queued, starts or finishes."""
        self._listeners.append(listener)

    def _changed(self) -> None:
        for listener in list(self._listeners):
            try:
                listener()
            except Exception:  # noqa: BLE001 - a broken display must not stop the queue
                traceback.print_exc()

    # ---- state -----------------------------------------------------------------------------------------

    @property
    def current(self) -> Job | None:
        return self._current

    @property
    def pending(self) -> list[Job]:
        with self._lock:
            return list(self._queue)

    @property
    def busy(self) -> bool:
        with self._lock:
            return self._current is not None or bool(self._queue)

    def find(self, key: Hashable) -> Job | None:
        """The queued or running job with this key, if any."""
        with self._lock:
            for job in ([self._current] if self._current else []) + list(self._queue):
                if job.key == key and not job.cancelled:
                    return job
        return None

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the queue is empty and nothing runs; False if ``timeout`` seconds passed first."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            while self._current is not None or self._queue:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._lock.wait(left)
        return True

    # ---- stopping --------------------------------------------------------------------------------------

    def cancel_all(self) -> list[Job]:
        """Stop the running job and drop the queued ones (each still finishes as ``cancelled`` and calls its
        ``on_done``, so whoever waits on it hears); returns the jobs cancelled."""
        with self._lock:
            jobs = [
                job
                for job in ([self._current] if self._current else []) + list(self._queue)
                if not job.cancelled
            ]
        for job in jobs:
            job.cancel()
        self._changed()
        return jobs

    def close(self) -> None:
        self.cancel_all()
        with self._lock:
            self._closed = True
            self._lock.notify_all()

    # ---- the worker ------------------------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._lock:
                while not self._queue and not self._closed:
                    self._lock.wait()
                if not self._queue:
                    return
                job = self._queue.popleft()
                self._current = job
            self._run(job)
            with self._lock:
                self._current = None
                self.history.append(job)
                self._lock.notify_all()
            self._changed()

    def _run(self, job: Job) -> None:
        if job.cancelled:
            job.status = "cancelled"
        else:
            job.status = "running"
            self._changed()
            try:
                if job.on_start is not None:
                    job.on_start(job)
                job.result = job.fn(job.progress)
                job.status = "done"
            except BaseException as err:  # noqa: BLE001 - shown in the panel, never lost in a thread
                job.error, job.traceback = err, traceback.format_exc()
                job.status = "cancelled" if job.cancelled else "failed"
        try:
            if job.on_done is not None:
                job.on_done(job)
        except Exception:  # noqa: BLE001 - a failing callback must not stop the queue
            traceback.print_exc()
        finally:
            job._finished.set()


__all__ = ["Job", "JobQueue"]
