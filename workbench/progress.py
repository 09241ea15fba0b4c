"""Progress reporting and cancellation shared by every long step.

Library code reports progress once through a :class:`Progress`; the CLI turns it into a tqdm bar, a panel into a
progress widget. Cancellation is cooperative: long loops call :meth:`Progress.check` between chunks (or use
:meth:`Progress.iter`, which does), and a cancelled run raises :class:`RunInterrupted` there.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

from workbench.errors import RunInterrupted

T = TypeVar("T")
ProgressCallback = Callable[[float, str], None]
# Receives provisional results while a step runs (e.g. metrics over the chunks evaluated so far).
PartialCallback = Callable[[dict[str, Any]], None]


class Progress:
    """A fraction in [0, 1] plus a short message, mapped onto a sub-range of a parent's bar.

    ``Progress(callback)`` reports to ``callback(fraction, message)``; ``progress.span(0.2, 0.9)`` gives a child
    whose 0..1 maps to 0.2..0.9 of the parent, so nested steps need not know where they sit. All children share
    one cancel event: ``cancel()`` on any of them stops the whole run at the next ``check()``.

    ``on_partial(metrics)``, shared by all children too, receives provisional results while a step runs: the
    evaluation sends its metrics over the chunks scored so far, with ``provisional`` (the fraction of the text
    they cover), so a plot can show a first estimate long before the run ends.
    """

    def __init__(
        self,
        callback: ProgressCallback | None = None,
        *,
        cancel_event: threading.Event | None = None,
        on_partial: PartialCallback | None = None,
        _start: float = 0.0,
        _end: float = 1.0,
    ) -> None:
        self._callback = callback
        self.cancel_event = cancel_event if cancel_event is not None else threading.Event()
        self.on_partial = on_partial
        self._start, self._end = _start, _end

    @classmethod
    def null(cls) -> Progress:
        return cls(None)

    def update(self, fraction: float, message: str = "") -> None:
        """Report ``fraction`` (0..1 of this step) and check for cancellation."""
        self.check()
        if self._callback is not None:
            f = min(max(float(fraction), 0.0), 1.0)
            self._callback(self._start + (self._end - self._start) * f, message)

    def span(self, start: float, end: float) -> Progress:
        """A child progress covering ``start..end`` (fractions of this one)."""
        width = self._end - self._start
        return Progress(
            self._callback,
            cancel_event=self.cancel_event,
            on_partial=self.on_partial,
            _start=self._start + width * start,
            _end=self._start + width * end,
        )

    def iter(self, items: Iterable[T], desc: str = "", total: int | None = None) -> Iterator[T]:
        """Yield ``items``, reporting progress and checking cancellation before each one."""
        if total is None:
            try:
                total = len(items)  # type: ignore[arg-type]
            except TypeError:
                total = None
        started = time.monotonic()
        for i, item in enumerate(items):
            message = f"{desc} {i + 1}/{total}" if total else desc
            if total and i:
                # After the first item, the time left at the pace so far (a GPTQ run takes minutes).
                message += f" · {_eta(time.monotonic() - started, i, total)}"
            self.update(i / total if total else 0.0, message)
            yield item
        self.update(1.0, desc)

    def partial(self, metrics: dict[str, Any]) -> None:
        """Send provisional ``metrics`` to ``on_partial`` (nothing when no one listens)."""
        if self.on_partial is not None:
            self.on_partial(dict(metrics))

    def adding(self, extra: dict[str, Any]) -> Progress:
        """This progress, with ``extra`` merged into every provisional result sent through it."""
        parent = self.on_partial
        return Progress(
            self._callback,
            cancel_event=self.cancel_event,
            on_partial=None if parent is None else (lambda metrics: parent({**extra, **metrics})),
            _start=self._start,
            _end=self._end,
        )

    @property
    def wants_partial(self) -> bool:
        """Whether anyone listens for provisional results (computing them is then worth it)."""
        return self.on_partial is not None

    def cancel(self) -> None:
        self.cancel_event.set()

    @property
    def cancelled(self) -> bool:
        return self.cancel_event.is_set()

    def check(self) -> None:
        """Raise :class:`RunInterrupted` if the run was cancelled."""
        if self.cancel_event.is_set():
            raise RunInterrupted("Run stopped by the user.")


def _eta(elapsed: float, done: int, total: int) -> str:
    """'about 40 s left' / 'about 3 min left' at the mean pace of the ``done`` items so far."""
    left = elapsed / done * (total - done)
    if left < 1:
        return "under 1 s left"
    if left < 90:
        return f"about {left:.0f} s left"
    return f"about {left / 60:.0f} min left"


def as_progress(progress: Progress | ProgressCallback | None) -> Progress:
    """Accept a Progress, a plain ``callback(fraction, message)`` or None."""
    if isinstance(progress, Progress):
        return progress
    return Progress(progress)


__all__ = ["PartialCallback", "Progress", "ProgressCallback", "as_progress"]
