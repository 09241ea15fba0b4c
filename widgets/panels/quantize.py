"""Quantize panel: pick a method, drag the bit width, watch quality against size fill in.

The panel only builds widgets over the method's parameter space (:mod:`workbench.techniques.space`, through
the app's :class:`~workbench.workspace.Workspace`): the widths the slider means (bnb's 8 and 4 bits are int8 and
nf4), the group sizes the loaded model takes, and the default point, which moves off a grid the weights already
sit on (the demo model's Q4_1 grid) with the reason shown. Each slider position becomes ``space.config(...)``,
goes to the app's background queue, is evaluated with the current suite and recorded; the plot gains a point.
A position already queued is not queued twice.

Once the model is loaded, two answers come on the calling thread from ``workspace.answer_now``, before anything
is queued, so they are immediate even while the queue is busy with a sweep or a GPTQ run: a position already
measured is read from the registry, and settings the model cannot take are refused by the technique's own
``check``. Before the model is loaded both happen in the queued run instead.

What the panel shows is about the current settings only: moving a control clears the last run's progress text,
a method change clears its notes, a finished bar and its Stop button go away a moment after the run ends, and
"Cancel queue" stops the running job and drops the queued ones (Stop stops one run; a sweep carries on).
"""

from __future__ import annotations

import html
import threading
from typing import TYPE_CHECKING, Any

import ipywidgets as W
import pandas as pd
import plotly.graph_objects as go

from widgets.common import ErrorArea, LivePlot, ProgressBar, render_note
from widgets.jobs import Job
from widgets.panels import Tab, register_tab
from workbench.errors import ConfigError

if TYPE_CHECKING:
    from widgets.panels import PanelHost

QUALITY_METRICS = ("metric_kl_mean", "metric_ppl", "metric_top1_agree")
# Bits per weight of the decoder linears first: counting every weight, the demo's fp32 embedding dominates and
# hides the difference between methods.
SIZE_METRICS = ("metric_bits_per_weight_linear", "metric_bits_per_weight", "metric_size_mb")
SLIDER_BITS = (2, 8)  # the slider's range for every method; widths a method lacks are refused with its list
HIDE_AFTER_S = 2.0  # a finished bar stays this long, so its outcome (done, stopped, failed) can be read


def _group_options(sizes: tuple[int, ...]) -> list[tuple[str, int]]:
    return [("per-channel" if g == -1 else str(g), g) for g in sizes]


def build_config(method: str, bits: int, group_size: int = 32, symmetric: bool = False) -> Any:
    """The config for one slider position (no model known), through the method's parameter space."""
    from workbench.techniques.space import parameter_space

    space = parameter_space(method)
    return space.config(
        bits=bits,
        group_size=group_size if space.group_sizes else None,
        symmetric=symmetric if space.symmetric else None,
    )


class QuantizePanel(W.VBox):
    """Method, bits, group size, symmetry; a run per slider position; a live quality-vs-size plot."""

    def __init__(self, app: PanelHost, methods: list[str] | None = None) -> None:
        from workbench.techniques import technique_names
        from workbench.views import title

        self.app = app
        self.ws = app.workspace
        names = list(methods) if methods is not None else technique_names(kind="quantize")
        self.method = W.Dropdown(
            options=names,
            value="rtn" if "rtn" in names else (names[0] if names else None),
            description="Method",
            layout=W.Layout(width="220px"),
        )
        self.bits = W.IntSlider(
            value=4,
            min=SLIDER_BITS[0],
            max=SLIDER_BITS[1],
            step=1,
            continuous_update=False,
            description="Bits",
            layout=W.Layout(width="320px"),
        )
        self.group_size = W.Dropdown(
            options=[("32", 32)], value=32, description="Group", layout=W.Layout(width="200px")
        )
        self.symmetric = W.Checkbox(
            value=False, description="symmetric", indent=False, layout=W.Layout(width="110px")
        )
        self.run_button = W.Button(
            description="Run",
            icon="play",
            button_style="primary",
            tooltip="Evaluate these settings",
            layout=W.Layout(width="90px"),
        )
        self.sweep_button = W.Button(
            description="Sweep all bits",
            icon="forward",
            tooltip="Queue every bit width this method takes",
            layout=W.Layout(width="140px"),
        )
        self.cancel_button = W.Button(
            description="Cancel queue",
            icon="times",
            disabled=True,
            tooltip="Stop the running job and drop every queued one (Stop stops one run)",
            layout=W.Layout(width="130px"),
        )
        self.quality = W.Dropdown(
            options=[(title(m), m) for m in QUALITY_METRICS],
            value="metric_kl_mean",
            description="Quality",
            layout=W.Layout(width="330px"),
        )
        self.size_axis = W.Dropdown(
            options=[(title(m), m) for m in SIZE_METRICS],
            value=SIZE_METRICS[0],
            description="against",
            layout=W.Layout(width="330px"),
        )
        self.log_y = W.Checkbox(
            value=False,
            description="log scale",
            indent=False,
            tooltip="Logarithmic quality axis (one 2-bit point no longer flattens the rest)",
            layout=W.Layout(width="110px"),
        )
        from workbench.runtimes import SIMULATED, runtime_choices

        self.runtime = W.Dropdown(
            options=list(runtime_choices()),
            value=SIMULATED,
            description="Runtime",
            tooltip="Where the variant is measured: simulated in torch (float weights), or exported and run "
            "in llama.cpp / with torch's packed kernels (real size and latency)",
            layout=W.Layout(width="300px"),
        )
        self.grid_warning = W.HTML("")
        self.space_note = W.HTML("")  # what the method takes, and why the default point is what it is
        self.message = W.HTML("")  # the last point: recorded, found again, or stopped
        self.sweep_message = W.HTML("")
        self.progress = ProgressBar()
        self.errors = ErrorArea()
        self.plot = LivePlot(self._figure)
        self.results: list[Any] = []  # every RunResult this panel received, newest last
        self.space: Any = None  # the ParameterSpace the controls show
        self._syncing = False  # True while the panel itself sets controls (no clearing, no runs)
        self._hide_timer: threading.Timer | None = None
        self.provisional: dict[str, Any] | None = (
            None  # the running run's first estimate, until it is recorded
        )

        self.bits.observe(self._on_bits, names="value")
        self.method.observe(self._on_method, names="value")
        for control in (self.group_size, self.symmetric):
            control.observe(self._on_setting, names="value")
        self.runtime.observe(self._on_runtime, names="value")
        for control in (self.quality, self.size_axis, self.log_y):
            control.observe(lambda _c: self.plot.refresh(), names="value")
        self.run_button.on_click(lambda _b: self.submit())
        self.sweep_button.on_click(lambda _b: self.sweep())
        self.cancel_button.on_click(lambda _b: self.cancel_queue())
        self.ws.queue.on_change(self._on_queue_change)
        app.watcher.subscribe(self.plot.refresh)
        app.on_model_loaded(self._on_model_loaded)
        self._apply_space()

        super().__init__(
            [
                W.HBox([self.method, self.bits, self.group_size, self.symmetric, self.runtime]),
                W.HBox([self.run_button, self.sweep_button, self.cancel_button, self.progress]),
                self.errors,
                self.grid_warning,
                self.space_note,
                self.sweep_message,
                self.message,
                W.HBox([self.quality, self.size_axis, self.log_y]),
                self.plot,
            ]
        )

    # ---- controls over the space ---------------------------------------------------------------------

    def _apply_space(self) -> None:
        """Show the method's space for the loaded model: group sizes it takes, its default point, its note."""
        if not self.method.value:
            return
        try:
            space = self.ws.space(self.method.value)
        except ConfigError as err:  # a method without a bit-width setting
            self.space = None
            self.group_size.disabled = self.symmetric.disabled = True
            self.space_note.value = render_note(str(err), "warn")
            return
        self.space = space
        self._syncing = True
        try:
            if space.group_sizes:
                self.group_size.options = _group_options(space.group_sizes)
                self.group_size.value = space.default["group_size"]
            self.group_size.disabled = not space.group_sizes
            if space.symmetric:
                self.symmetric.value = bool(space.default["symmetric"])
            self.symmetric.disabled = not space.symmetric
        finally:
            self._syncing = False
        notes = []
        if space.labels:
            notes.append(f"{self.method.value} takes {space.widths_text()} bits.")
        if space.reason:
            notes.append(space.reason)
        self.space_note.value = (
            render_note(" ".join(notes), "warn" if space.reason else "info") if notes else ""
        )

    def _on_method(self, _change: Any = None) -> None:
        # A new method: the last method's notes and progress say nothing about it.
        self.message.value = self.sweep_message.value = ""
        self.errors.clear()
        self._clear_progress()
        self._apply_space()

    def _on_setting(self, _change: Any) -> None:
        if not self._syncing:
            self._clear_progress()

    def _on_runtime(self, _change: Any) -> None:
        self.message.value = ""
        self.errors.clear()
        self._clear_progress()
        self.plot.refresh()

    def _on_bits(self, _change: Any) -> None:
        self.submit()

    def _on_model_loaded(self, loaded: Any) -> None:
        self._check_grid(loaded)
        self._apply_space()

    def config(self, bits: int | None = None) -> Any:
        """The config of the controls' settings (or of ``bits``), through the method's space."""
        if self.space is None:
            self._apply_space()
        if self.space is None:
            raise ConfigError(
                f"{self.method.value}: has no bit-width setting; use it from code with "
                f"make_config({self.method.value!r}, ...)."
            )
        space = self.space
        return space.config(
            bits=self.bits.value if bits is None else bits,
            group_size=self.group_size.value if space.group_sizes else None,
            symmetric=self.symmetric.value if space.symmetric else None,
        )

    def pipeline(self, bits: int | None = None) -> list[Any]:
        """What one slider position runs: the method's config, then the chosen runtime's deploy step (the
        library's :func:`workbench.runtimes.with_runtime`, which refuses a variant the runtime cannot hold)."""
        from workbench.runtimes import with_runtime

        return with_runtime([self.config(bits)], self.runtime.value)

    # ---- stale state ---------------------------------------------------------------------------------

    def _running(self) -> bool:
        return not self.progress.stop.disabled  # the bar's Stop is live exactly while it follows a job

    def _clear_progress(self) -> None:
        """Forget a finished run's bar and label (a "done" next to other settings would mislead)."""
        if self._running():
            return
        self.progress.label.value = ""
        self.progress.layout.visibility = "hidden"

    def _hide_later(self) -> None:
        """Hide the bar a moment after a run ends, unless another run has taken it over by then."""
        if self._hide_timer is not None:
            self._hide_timer.cancel()
        if HIDE_AFTER_S <= 0:
            self._clear_progress()
            return
        self._hide_timer = threading.Timer(HIDE_AFTER_S, self._clear_progress)
        self._hide_timer.daemon = True
        self._hide_timer.start()

    def _on_queue_change(self) -> None:
        self.cancel_button.disabled = not self.ws.queue.busy

    # ---- running --------------------------------------------------------------------------------------

    def submit(self, bits: int | None = None, *, from_sweep: bool = False) -> Job | None:
        """Evaluate the current settings (or ``bits``) in the background; bad settings show why, run nothing.

        Returns the queued job, or None when nothing was queued: the settings were refused, or the point was
        already measured and its run was shown at once (it is then the last of ``results``).
        """
        self.errors.clear()
        if not from_sweep:
            self.sweep_message.value = ""
            self.message.value = ""
            self._clear_progress()
        try:
            steps = self.pipeline(bits)
            found = self.ws.answer_now(steps)
            if found is not None:
                self._show_result(found)
                return None
            return self.app.run(
                steps,
                progress_bar=self.progress,
                errors=self.errors,
                on_result=self._on_result,
                on_partial=self._partial_listener(steps),
            )
        except ConfigError as err:  # bad settings, settings the model cannot take, or no registry open
            self.errors.show(err)
            return None

    def sweep(self) -> list[Job]:
        """Queue every width of the method's space (widest first, the other settings as they are).

        Widths already measured are shown from the registry instead of queued; widths the loaded model cannot
        take are refused with the first reason shown, so a group size no layer divides queues nothing. The
        configs are the ones ``workbench sweep`` runs for the same method and settings.
        """
        self.errors.clear()
        self.message.value = ""
        try:
            _ = self.ws.registry  # no registry open: say so once, queue nothing
            if self.space is None:
                self._apply_space()
            if self.space is None:
                self.config()  # raises: the method has no bit-width setting
        except ConfigError as err:
            self.errors.show(err)
            return []
        space = self.space
        widths = sorted(space.bits, reverse=True)
        skipped = [str(b) for b in range(self.bits.max, self.bits.min - 1, -1) if b not in space.bits]
        jobs, found, refused = [], [], []
        reason: ConfigError | None = None
        for bits in widths:
            try:
                steps = self.pipeline(bits)
                if self.ws.answer_now(steps) is not None:
                    self._show_result(self.ws.last_result)
                    found.append(str(bits))
                    continue
            except ConfigError as err:  # the loaded model cannot take these settings
                reason = reason or err
                refused.append(str(bits))
                continue
            try:
                jobs.append(
                    self.app.run(
                        steps,
                        progress_bar=self.progress,
                        errors=self.errors,
                        on_result=self._on_result,
                        on_partial=self._partial_listener(steps),
                    )
                )
            except ConfigError as err:  # no registry open
                self.errors.show(err)
                return jobs
        note = f"Queued {len(jobs)} bit widths of {self.method.value}."
        if found:
            note += f" Found {', '.join(found)} bits in the registry."
        if refused:
            note += f" Refused {', '.join(refused)} bits (see the message above)."
        if skipped:
            note += f" Skipped {', '.join(skipped)} bits ({self.method.value} does not take them)."
        if jobs:
            note += " Cancel queue stops them all."
        self.sweep_message.value = render_note(note)
        if reason is not None:  # shown last: queueing a run clears the error area
            self.errors.show(reason)
        return jobs

    def cancel_queue(self) -> int:
        """Stop the running job and drop the queued ones (the library's ``Workspace.cancel_queue``)."""
        cancelled = self.ws.cancel_queue()
        self.sweep_message.value = (
            render_note(f"Cancelled {len(cancelled)} queued or running job(s).", "warn") if cancelled else ""
        )
        return len(cancelled)

    def _on_result(self, job: Job) -> None:
        if self.provisional is not None:
            self.provisional = None
            self.plot.refresh()  # the recorded point (or nothing, if stopped) replaces the estimate
        if job.result is not None:
            self._show_result(job.result)
        self._hide_later()

    def _partial_listener(self, steps: list[Any]) -> Any:
        """What hears a run's provisional metrics: a hollow point on the plot, refined as chunks finish."""
        from workbench.techniques import describe_pipeline
        from workbench.techniques.base import technique_for

        label, technique = describe_pipeline(steps), technique_for(steps[0]).name

        def listen(metrics: dict[str, Any]) -> None:
            point = {f"metric_{k}": v for k, v in metrics.items() if k != "provisional"}
            self.provisional = {
                **point,
                "label": label,
                "technique": technique,
                "provisional": metrics.get("provisional", 0.0),
            }
            self.plot.refresh()

        return listen

    def _show_result(self, result: Any) -> None:
        self.results.append(result)
        if result.status == "done":
            how = "found in the registry (no new run)" if result.reused else "evaluated and recorded"
            self.message.value = render_note(f"Run {result.run_id} · {result.label}: {how}.", "ok")
        elif result.status == "interrupted":
            self.message.value = render_note(
                f"Run {result.run_id} · {result.label}: stopped, recorded as interrupted.", "warn"
            )

    # ---- grid check -----------------------------------------------------------------------------------

    def _check_grid(self, loaded: Any) -> None:
        """Warn when the weights already sit on a low-bit grid (then that grid's RTN is lossless by accident)."""
        if loaded is self.ws.loaded_model():
            report = self.ws.grid()  # detected once per model, shared with the parameter spaces
        else:
            from workbench.quant_analysis import detect_grid

            report = detect_grid(loaded.model)
        self.grid_warning.value = (
            ""
            if report is None
            else (
                '<div style="background:#fff8e1;border-left:4px solid #f9a825;padding:4px 8px">'
                f"<b>Grid detected.</b> {html.escape(report.message)}</div>"
            )
        )

    # ---- the plot -------------------------------------------------------------------------------------

    def frame(self) -> pd.DataFrame:
        """The runs this panel plots: the loaded model (once known), the current suite, quantizers measured in
        the chosen runtime, and the baseline (the simulated one: the float model every runtime is compared to)."""
        from workbench.runtimes import SIMULATED

        frame = self.ws.runs_frame(model=self.ws.fingerprint, suite=self.ws.suite_filter)
        if frame.empty:
            return frame
        runtime = frame["runtime"] if "runtime" in frame else pd.Series(SIMULATED, index=frame.index)
        methods = frame["technique"].isin(set(self.method.options)) & (runtime == self.runtime.value)
        baseline = (frame["technique"] == "baseline") & (runtime == SIMULATED)
        return frame[methods | baseline]

    def _figure(self) -> go.Figure:
        from workbench.views import bits_figure

        fig = bits_figure(
            self.frame(),
            y=self.quality.value,
            x=self.size_axis.value,
            log_y=self.log_y.value,
            provisional=self.provisional,
        )
        return fig.update_layout(legend_title_text="method")


register_tab(Tab("Quantize", attr="quantize", build=QuantizePanel, order=10))

__all__ = ["QuantizePanel", "build_config"]
