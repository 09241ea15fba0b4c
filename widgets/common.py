"""Pieces every panel shares: a progress bar with a Stop button, an error area, a plot that follows the registry.

All of them are updated by setting widget attributes only, so the worker thread of :mod:`widgets.jobs` and the
registry watcher's timer thread may call them (see the module docstring there).
"""

from __future__ import annotations

import copy
import html
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any

import anywidget
import ipywidgets as W
import pandas as pd
import plotly.graph_objects as go

from widgets.jobs import Job
from workbench.errors import WorkbenchError

# ---- progress ------------------------------------------------------------------------------------------


class ProgressBar(W.HBox):
    """A bar, a short message and a Stop button bound to the job that is running (Stop calls ``cancel``)."""

    def __init__(self, description: str = "") -> None:
        self.bar = W.FloatProgress(
            value=0.0, min=0.0, max=1.0, description=description, layout=W.Layout(width="320px")
        )
        self.label = W.HTML("")
        self.stop = W.Button(
            description="Stop",
            icon="stop",
            button_style="danger",
            disabled=True,
            tooltip="Stop the running job (it is recorded as interrupted)",
            layout=W.Layout(width="90px"),
        )
        self.stop.on_click(self._on_stop)
        self._job: Job | None = None
        self._last_report = 0.0
        super().__init__([self.bar, self.stop, self.label])
        self.layout.visibility = "hidden"

    def attach(self, job: Job) -> None:
        """Follow ``job`` from now on (called on the worker thread when the job starts)."""
        self._job = job
        self.bar.value, self.bar.bar_style = 0.0, ""
        self.label.value = html.escape(job.label)
        self.stop.disabled = False
        self.layout.visibility = "visible"

    def report(self, fraction: float, message: str) -> None:
        # A method reporting per layer can call this hundreds of times a second; the browser needs ~10.
        now = time.monotonic()
        if now - self._last_report < 0.1 and fraction < 1.0:
            return
        self._last_report = now
        self.bar.value = fraction
        text = f"{self._job.label}: {message}" if self._job and self._job.label else message
        self.label.value = html.escape(text)

    def finish(self, job: Job, status: str | None = None) -> None:
        """Show how ``job`` ended; ``status`` overrides the job's own (a run that returned 'interrupted')."""
        if job is not self._job:
            return
        status = status or job.status
        self.stop.disabled = True
        self.bar.value = 1.0 if status == "done" else self.bar.value
        self.bar.bar_style = {"done": "success", "failed": "danger", "cancelled": "warning"}.get(status, "")
        ended = {"done": "done", "failed": "failed", "cancelled": "stopped"}.get(status, status)
        self.label.value = html.escape(f"{job.label}: {ended}" if job.label else ended)
        self._job = None

    def _on_stop(self, _button: Any = None) -> None:
        if self._job is not None:
            self._job.cancel()
            self.label.value = html.escape("stopping…")


# ---- errors --------------------------------------------------------------------------------------------


class ErrorArea(W.HTML):
    """A short message for the user, details folded away.

    A :class:`~workbench.errors.WorkbenchError` (``ConfigError`` …) is the user's to fix and its text says how,
    so only the text is shown. Anything else is a bug or an environment problem: a one-line summary, and the
    traceback inside a closed ``<details>`` for whoever reports it.
    """

    def __init__(self) -> None:
        super().__init__("")

    def show(self, error: BaseException | str | None, details: str | None = None) -> None:
        if error is None:
            self.clear()
            return
        if isinstance(error, WorkbenchError):
            message, details = str(error), details if details is not None else None
        elif isinstance(error, BaseException):
            message = f"Unexpected error: {type(error).__name__}: {_first_line(str(error))}"
            if details is None:
                details = "".join(traceback.format_exception(type(error), error, error.__traceback__))
        else:
            message = str(error)
        self.value = render_error(message, details)

    def clear(self) -> None:
        self.value = ""

    @property
    def message(self) -> str:
        """The visible text (tests and the status line read this)."""
        return self.value


def _first_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[0] if lines else ""


def render_error(message: str, details: str | None = None) -> str:
    body = f'<div class="wb-error" style="color:#b00020"><b>⚠</b> {html.escape(message)}</div>'
    if details:
        body += (
            '<details><summary>Details</summary><pre style="font-size:11px;white-space:pre-wrap">'
            f"{html.escape(details)}</pre></details>"
        )
    return body


def render_note(message: str, kind: str = "info") -> str:
    color = {"info": "#333", "ok": "#1b5e20", "warn": "#8a6d00"}.get(kind, "#333")
    return f'<div style="color:{color}">{html.escape(message)}</div>'


# ---- a plot that follows the registry ------------------------------------------------------------------


def replace_figure(widget: go.FigureWidget, figure: go.Figure) -> None:
    """Show ``figure`` in ``widget``, sent to the browser as one message (plotly's ``batch_update``).

    The browser merges a new layout into the one it shows, so what the new layout leaves unset would stay on
    screen (an empty plot's note, hidden axes): those are cleared first, in a message of their own.
    """
    stale = widget.layout
    with widget.batch_update():
        # Lists of annotations and shapes are merged element by element: a shorter or reordered list would leave
        # stale entries (plotly draws an entry that lost its text as "new text"). Empty them first whenever
        # they change, so the browser starts the new ones from nothing.
        if stale.annotations and stale.annotations != figure.layout.annotations:
            widget.layout.annotations = ()
        if stale.shapes and stale.shapes != figure.layout.shapes:
            widget.layout.shapes = ()
        for axis in ("xaxis", "yaxis"):
            if stale[axis].visible is False and figure.layout[axis].visible is not False:
                widget.layout[axis].visible = True
    with widget.batch_update():
        widget.data = ()
        widget.add_traces(list(figure.data))
        widget.layout = figure.layout
    sync_figure_state(widget)


def sync_figure_state(widget: go.FigureWidget) -> None:
    """Make the figure's synced state what the kernel shows now, so that a view created later draws it.

    A browser view of a FigureWidget draws the synced ``_widget_data`` / ``_widget_layout`` traits when it is
    created, and only then applies the edit messages that follow. plotly sets those two traits when the figure
    is built and when it is displayed on its own, not when it sits inside a box, and edits made before any view
    exists reach no view. So a view created after the kernel drew (a Voilà page, which connects once the
    notebook has run; a reloaded JupyterLab page) showed the figure as first built, "Reading the registry…",
    and kept that note above the points of later edits.
    """
    with widget.hold_sync():
        widget._widget_layout = copy.deepcopy(widget._layout_obj._props)
        widget._widget_data = copy.deepcopy(widget._data)


class RegistryWatcher:
    """Calls listeners when the registry changes, from this kernel or any other process.

    A daemon timer thread compares ``registry.change_token()`` (one cheap aggregate query) every ``interval``
    seconds; ``poke()`` checks at once (after a run of our own). ``stop()`` ends the thread; it also ends when
    the registry cannot be read, after telling the listeners' error handler.
    """

    def __init__(self, registry_fn: Callable[[], Any], interval: float = 2.0) -> None:
        self._registry_fn = registry_fn
        self.interval = interval
        self._listeners: list[Callable[[], None]] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._token: str | None = None
        self._thread: threading.Thread | None = None
        self.on_error: Callable[[BaseException], None] | None = None

    def subscribe(self, listener: Callable[[], None]) -> None:
        self._listeners.append(listener)

    def start(self) -> None:
        if self.interval <= 0 or (self._thread is not None and self._thread.is_alive()):
            return
        self._stop.clear()
        self._token = self._read_token()
        self._thread = threading.Thread(target=self._loop, name="workbench-registry-watch", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stop.is_set()

    def reset(self) -> None:
        """Forget the token (a different registry was opened): the next check notifies."""
        self._token = None

    def _read_token(self) -> str | None:
        try:
            registry = self._registry_fn()
            if registry is None:  # no registry open: the settings row already says why
                return None
            return str(registry.change_token())
        except Exception as err:  # noqa: BLE001 - reported, the timer keeps trying
            if self.on_error is not None:
                self.on_error(err)
            return None

    def poke(self) -> bool:
        """Check now; notify and return True when the token moved."""
        with self._lock:
            token = self._read_token()
            if token is None or token == self._token:
                return False
            self._token = token
        self._notify()
        return True

    def notify(self) -> None:
        """Refresh every listener whether or not the registry changed (a filter moved)."""
        self._notify()

    def _notify(self) -> None:
        for listener in list(self._listeners):
            try:
                listener()
            except Exception as err:  # noqa: BLE001 - one broken view must not stop the others
                if self.on_error is not None:
                    self.on_error(err)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.poke()


def _placeholder_figure() -> go.Figure:
    from workbench.views import TEMPLATE

    fig = go.Figure()
    fig.add_annotation(
        text="Reading the registry…",
        showarrow=False,
        x=0.5,
        y=0.5,
        xref="paper",
        yref="paper",
        font={"size": 14, "color": "#888"},
    )
    fig.update_xaxes(visible=False)
    fig.update_yaxes(visible=False)
    return fig.update_layout(height=420, template=TEMPLATE)


# The browser side of _WidthWatcher. plotly's widget view calls Plotly.newPlot as soon as the view exists, before
# ipywidgets attaches it to the page (and in a hidden tab it stays at zero width): plotly then draws at its 700 px
# fallback and, with `responsive`, measures again only on a window "resize" event. This watches the plot
# elements (.wb-figure, 100 % of the panel) in the LivePlot's box; whenever one is laid out at a width its drawn
# svg does not have (just attached, its tab shown, the panel resized without the window), it fires that event,
# once per frame. A resize makes the svg as wide as its element, so the check then holds and nothing loops.
# Before that it drops the plot's width from the view's layout: a relayout from the kernel that sets the height
# (every replace_figure does) makes plotly.js pin the width it had then, and plotly does not resize a plot whose
# width and height are both set. No LivePlot has a width of its own, so there is nothing else to lose.
_WIDTH_WATCHER_ESM = """
export default {
  render({ el }) {
    let box = null, frame = 0, tries = 0, timer = 0;
    const misdrawn = (gd) => {
      const svg = gd.querySelector(".main-svg");
      return gd.clientWidth > 0 && svg && Math.abs(svg.getBoundingClientRect().width - gd.clientWidth) > 1;
    };
    const check = () => {
      if (frame) return;
      frame = requestAnimationFrame(() => {
        frame = 0;
        const plots = [...box.querySelectorAll(".wb-figure")].filter(misdrawn);
        for (const gd of plots) if (gd.layout) delete gd.layout.width;
        if (plots.length) window.dispatchEvent(new Event("resize"));
      });
    };
    const sizes = new ResizeObserver(check);
    const watch = () => {
      sizes.disconnect();
      for (const gd of box.querySelectorAll(".wb-figure")) sizes.observe(gd);
    };
    const children = new MutationObserver(watch);
    const attach = () => {
      box = el.parentElement;
      if (box) {
        children.observe(box, { childList: true });
        watch();
      } else if (tries++ < 200) {
        timer = setTimeout(attach, 50);
      }
    };
    attach();
    return () => {
      clearTimeout(timer);
      cancelAnimationFrame(frame);
      sizes.disconnect();
      children.disconnect();
    };
  },
};
"""


class _WidthWatcher(anywidget.AnyWidget):
    """Makes the plots of the box it sits in fill their panel (see _WIDTH_WATCHER_ESM); shows nothing.

    Its stylesheet gives a plot's element the panel's width (a widget box otherwise sizes it to its content:
    the figure's first, fallback width); anywidget adds it to the page with the widget's model, so it applies
    in a hidden tab too.
    """

    _esm = _WIDTH_WATCHER_ESM
    _css = ".wb-figure { width: 100%; align-self: stretch; }"


class LivePlot(W.VBox):
    """A ``go.FigureWidget`` redrawn from ``figure_fn()`` whenever :meth:`refresh` is called.

    ``figure_fn`` does the library work (runs_frame → views); a failure shows in the error area under the plot
    instead of vanishing in a thread.
    """

    def __init__(
        self, figure_fn: Callable[[], go.Figure], *, on_click: Callable[[int], None] | None = None
    ) -> None:
        self._figure_fn = figure_fn
        # Until the first refresh draws the real figure, a blank white frame (an empty FigureWidget would show
        # plotly's grey default axes, which look like a broken plot).
        self.figure = self._new_figure_widget(_placeholder_figure())
        self.errors = ErrorArea()
        self.refreshes = 0
        self._lock = threading.Lock()
        self._on_click = on_click
        # First, so that a new figure widget (redraw_view) leaves its browser view in place.
        watcher = _WidthWatcher(layout=W.Layout(display="none"))
        super().__init__([watcher, self.figure, self.errors])

    def refresh(self) -> None:
        with self._lock:  # the watcher thread and a worker may both refresh; draw one at a time
            try:
                figure = self._figure_fn()
            except Exception as err:  # noqa: BLE001 - shown under the plot
                self.errors.show(err)
                return
            replace_figure(self.figure, figure)
            self._bind_clicks()
            self.errors.clear()
            self.refreshes += 1

    def _new_figure_widget(self, figure: Any) -> go.FigureWidget:
        widget = go.FigureWidget(figure)
        # Responsive: with no fixed width the plot fills its panel and follows the window...
        widget._config = {**widget._config, "responsive": True, "displaylogo": False}
        # ...and its element is as wide as the panel (the class _WidthWatcher styles and watches).
        widget.add_class("wb-figure")
        return widget

    def redraw_view(self) -> None:
        """A fresh browser view of the current figure, for a plot whose tab has just been shown.

        Edits a view received while its tab was hidden may be missing from it. The new widget starts from the
        figure as the kernel has it, and its view is created in the now visible tab (and sized to the panel by
        the box's _WidthWatcher once it is attached).
        """
        with self._lock:
            old = self.figure
            self.figure = self._new_figure_widget(old)
            self.children = tuple(self.figure if child is old else child for child in self.children)
            self._bind_clicks()
        old.close()

    def _bind_clicks(self) -> None:
        if self._on_click is None:
            return
        for trace in self.figure.data:
            if getattr(trace, "customdata", None) is not None:
                trace.on_click(self._clicked)

    def _clicked(self, trace: Any, points: Any, _state: Any) -> None:
        if self._on_click is not None and points.point_inds:
            run_id = trace.customdata[points.point_inds[0]]
            self._on_click(int(run_id))

    def trace_points(self, name: str | None = None) -> int:
        """How many points the plot shows (in traces called ``name``, or all): tests count with this."""
        return sum(0 if t.x is None else len(t.x) for t in self.figure.data if name is None or t.name == name)


def plots_under(root: W.Widget) -> list[LivePlot]:
    """Every :class:`LivePlot` inside ``root``."""
    found, stack, seen = [], [root], set()
    while stack:
        widget = stack.pop()
        if id(widget) in seen:
            continue
        seen.add(id(widget))
        if isinstance(widget, LivePlot):
            found.append(widget)
        stack.extend(c for c in getattr(widget, "children", ()) if isinstance(c, W.Widget))
    return found


def fit_plots_when_shown(tabs: W.Tab) -> None:
    """When a tab is selected, its plots get fresh views (they were drawn while hidden: see redraw_view)."""

    def shown(change: dict[str, Any]) -> None:
        index = change.get("new")
        if index is not None and 0 <= index < len(tabs.children):
            for plot in plots_under(tabs.children[index]):
                plot.redraw_view()

    tabs.observe(shown, names="selected_index")


def fit_narrow_windows(root: W.Widget) -> None:
    """Let every row of controls under ``root`` wrap, and every label keep its full text.

    ipywidgets gives descriptions a fixed width and rows no wrapping, so in a narrow window "Registry" shrank to
    "R…" and controls were cut off at the right edge. Rows now wrap onto the next line and each description is
    as wide as its text. Applied once to the whole app, so a new panel gets it too.
    """
    seen: set[int] = set()
    stack = [root]
    while stack:
        widget = stack.pop()
        if id(widget) in seen:
            continue
        seen.add(id(widget))
        if isinstance(widget, W.HBox) and not widget.layout.flex_flow:
            widget.layout.flex_flow = "row wrap"
        style = getattr(widget, "style", None)
        labelled = getattr(widget, "description", "") and hasattr(style, "description_width")
        if labelled and not style.description_width:
            style.description_width = "initial"
        stack.extend(child for child in getattr(widget, "children", ()) if isinstance(child, W.Widget))


def frame_or_empty(fn: Callable[[], pd.DataFrame]) -> pd.DataFrame:
    """``fn()`` or an empty frame; for places where a missing registry should show 'no runs', not a crash."""
    try:
        return fn()
    except WorkbenchError:
        return pd.DataFrame()


__all__ = [
    "ErrorArea",
    "LivePlot",
    "ProgressBar",
    "RegistryWatcher",
    "fit_narrow_windows",
    "fit_plots_when_shown",
    "frame_or_empty",
    "plots_under",
    "render_error",
    "render_note",
    "replace_figure",
    "sync_figure_state",
]
