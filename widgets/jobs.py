"""Background work for the panels: the library's queue (:mod:`workbench.jobs`), as the widgets use it.

The queue itself (one worker thread, de-duplicated requests, cancelling one job or all of them) lives in the
library, so the command line and other front ends queue work the same way; what shows a job (a bar, its Stop
button) is :class:`widgets.common.ProgressBar`.

Rules the widgets follow on the worker thread (ipywidgets' "Widget Asynchronous" and "Output Widget" notes):
callbacks only *set widget attributes* (a progress value, an HTML string, FigureWidget data), which ipywidgets
sends as messages from any thread; they never use ``with output:``, which captures the kernel's current cell
and would print into the wrong place from a thread.
"""

from __future__ import annotations

from workbench.jobs import Job, JobQueue

# The name the app and tests have always used for the queue.
Jobs = JobQueue

__all__ = ["Job", "Jobs"]
