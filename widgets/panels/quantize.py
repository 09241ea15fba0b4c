"""Quantize panel: pick a method, drag the bit width, watch quality against size fill in.

Each slider position becomes a technique config built by ``make_config`` (bad parameters come back as the
library's ``ConfigError`` text), goes to the app's background queue, is evaluated with the current suite by
``run_experiment`` and recorded; the plot then gains a point. A position already queued is not queued twice.

Once the model is loaded, two answers come on the calling thread, before anything is queued, so they are
immediate even while the queue is busy with a sweep or a GPTQ run: a position already measured is read from the
registry (the same lookup ``run_experiment`` makes), and settings the model cannot take (a group size that
does not divide a layer) are refused by the technique's own ``check``. Before the model is loaded both happen in
the queued run instead.
"""

from __future__ import annotations

import dataclasses
import html
from typing import TYPE_CHECKING, Any

import ipywidgets as W
import pandas as pd
import plotly.graph_objects as go

from widgets.common import ErrorArea, LivePlot, ProgressBar, render_note
from widgets.jobs import Job
from workbench.errors import ConfigError, RegistryError

if TYPE_CHECKING:
    from widgets.app import Workbench

GROUP_SIZES = (("32", 32), ("64", 64), ("128", 128), ("per-channel", -1))
QUALITY_METRICS = ("metric_kl_mean", "metric_ppl", "metric_top1_agree")
# Bits per weight of the decoder linears first: counting every weight, the demo's fp32 embedding dominates and
# hides the difference between methods.
SIZE_METRICS = ("metric_bits_per_weight_linear", "metric_bits_per_weight", "metric_size_mb")


def _format_choices(method: str) -> tuple[str, list[str]] | None:
    """Methods whose bit width is a storage format rather than a number: the field and its formats.

    The formats come from the technique modules themselves (bitsandbytes' modes, quanto's weight types), so a
    format added there shows up here.
    """
    if method == "bnb":
        from workbench.techniques.bnb import MODES

        return "mode", list(MODES)
    if method == "quanto":
        from workbench.techniques.quanto import WEIGHTS

        return "weights", list(WEIGHTS)
    return None


def build_config(method: str, bits: int, group_size: int = 32, symmetric: bool = False) -> Any:
    """The config for one slider position, through ``make_config``; impossible settings raise ConfigError.

    Methods with a ``bits`` field get bits, group size and symmetry (those they have). Format-based methods
    (bnb, quanto) get the first of their formats whose ``bits`` equals the slider's value; a value none has is
    refused with the widths that exist.
    """
    from workbench.techniques import get_technique, make_config

    fields = {f.name for f in dataclasses.fields(get_technique(method).config_cls)}
    if "bits" in fields:
        params: dict[str, Any] = {"bits": int(bits)}
        if "group_size" in fields:
            params["group_size"] = int(group_size)
        if "symmetric" in fields:
            params["symmetric"] = bool(symmetric)
        return make_config(method, **params)
    choices = _format_choices(method)
    if choices is None:
        raise ConfigError(f"{method}: has no bit-width setting; use it from code with make_config({method!r}, ...).")
    field, formats = choices
    widths: dict[int, str] = {}
    for fmt in formats:
        widths.setdefault(int(make_config(method, **{field: fmt}).bits), fmt)
    if int(bits) not in widths:
        listed = ", ".join(f"{b} ({widths[b]})" for b in sorted(widths))
        raise ConfigError(f"{method} takes {listed} bits, not {bits}; move the slider to one of those.")
    return make_config(method, **{field: widths[int(bits)]})


def method_fields(method: str) -> set[str]:
    from workbench.techniques import get_technique

    return {f.name for f in dataclasses.fields(get_technique(method).config_cls)}


class QuantizePanel(W.VBox):
    """Method, bits, group size, symmetry; a run per slider position; a live quality-vs-size plot."""

    def __init__(self, app: Workbench, methods: list[str] | None = None) -> None:
        from workbench.techniques import technique_names
        from workbench.views import title

        self.app = app
        names = list(methods) if methods is not None else technique_names(kind="quantize")
        self.method = W.Dropdown(options=names, value="rtn" if "rtn" in names else (names[0] if names else None),
                                 description="Method", layout=W.Layout(width="220px"))
        self.bits = W.IntSlider(value=4, min=2, max=8, step=1, continuous_update=False, description="Bits",
                                layout=W.Layout(width="320px"))
        self.group_size = W.Dropdown(options=GROUP_SIZES, value=32, description="Group",
                                     layout=W.Layout(width="200px"))
        self.symmetric = W.Checkbox(value=False, description="symmetric", indent=False,
                                    layout=W.Layout(width="110px"))
        self.run_button = W.Button(description="Run", icon="play", button_style="primary",
                                   tooltip="Evaluate these settings", layout=W.Layout(width="90px"))
        self.sweep_button = W.Button(description="Sweep all bits", icon="forward",
                                     tooltip="Queue every bit width this method takes", layout=W.Layout(width="140px"))
        self.quality = W.Dropdown(options=[(title(m), m) for m in QUALITY_METRICS], value="metric_kl_mean",
                                  description="Quality", layout=W.Layout(width="330px"))
        self.size_axis = W.Dropdown(options=[(title(m), m) for m in SIZE_METRICS], value=SIZE_METRICS[0],
                                    description="against", layout=W.Layout(width="330px"))
        self.grid_warning = W.HTML("")
        self.message = W.HTML("")  # the last point: recorded, found again, or stopped
        self.sweep_message = W.HTML("")
        self.progress = ProgressBar()
        self.errors = ErrorArea()
        self.plot = LivePlot(self._figure)
        self.results: list[Any] = []  # every RunResult this panel received, newest last

        self.bits.observe(self._on_bits, names="value")
        self.method.observe(self._on_method, names="value")
        for control in (self.quality, self.size_axis):
            control.observe(lambda _c: self.plot.refresh(), names="value")
        self.run_button.on_click(lambda _b: self.submit())
        self.sweep_button.on_click(lambda _b: self.sweep())
        app.watcher.subscribe(self.plot.refresh)
        app.on_model_loaded(self._check_grid)
        self._on_method()

        super().__init__([
            W.HBox([self.method, self.bits, self.group_size, self.symmetric]),
            W.HBox([self.run_button, self.sweep_button, self.progress]),
            self.errors, self.grid_warning, self.sweep_message, self.message,
            W.HBox([self.quality, self.size_axis]),
            self.plot,
        ])

    # ---- controls -------------------------------------------------------------------------------------

    def _on_method(self, _change: Any = None) -> None:
        # Group size and symmetry only where the method's config has them (bnb and quanto fix their own).
        fields = method_fields(self.method.value) if self.method.value else set()
        self.group_size.disabled = "group_size" not in fields
        self.symmetric.disabled = "symmetric" not in fields

    def _on_bits(self, _change: Any) -> None:
        self.submit()

    def config(self, bits: int | None = None) -> Any:
        return build_config(self.method.value, self.bits.value if bits is None else bits, self.group_size.value,
                            self.symmetric.value)

    # ---- running --------------------------------------------------------------------------------------

    def submit(self, bits: int | None = None) -> Job | None:
        """Evaluate the current settings (or ``bits``) in the background; bad settings show why, run nothing.

        Returns the queued job, or None when nothing was queued: the settings were refused, or the point was
        already measured and its run was shown at once (it is then the last of ``results``).
        """
        self.errors.clear()
        try:
            config = self.config(bits)
            if self._answer_now(config):
                return None
            return self.app.run([config], progress_bar=self.progress, errors=self.errors,
                                on_result=self._on_result)
        except ConfigError as err:  # bad settings, settings the model cannot take, or no registry open
            self.errors.show(err)
            return None

    def sweep(self) -> list[Job]:
        """Queue every bit width of the slider's range that the method takes (the queue runs them in turn).

        Widths already measured are shown from the registry instead of queued; widths the loaded model cannot
        take are refused with the first reason shown, so a group size no layer divides queues nothing.
        """
        self.errors.clear()
        try:
            _ = self.app.registry  # no registry open: say so once, queue nothing
        except ConfigError as err:
            self.errors.show(err)
            return []
        jobs, skipped, found, refused = [], [], [], []
        reason: ConfigError | None = None
        for bits in range(self.bits.max, self.bits.min - 1, -1):
            try:
                config = self.config(bits)
            except ConfigError:
                skipped.append(str(bits))
                continue
            try:
                if self._answer_now(config):
                    found.append(str(bits))
                    continue
            except ConfigError as err:  # the loaded model cannot take these settings
                reason = reason or err
                refused.append(str(bits))
                continue
            try:
                jobs.append(self.app.run([config], progress_bar=self.progress, errors=self.errors,
                                         on_result=self._on_result))
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
        self.sweep_message.value = render_note(note)
        if reason is not None:  # shown last: queueing a run clears the error area
            self.errors.show(reason)
        return jobs

    def _loaded(self) -> Any:
        """The loaded model when it is the one in the model bar (a run would use it), else None."""
        loaded = self.app.loaded
        spec = str(self.app.model_box.value or "").strip()
        if loaded is None or str(getattr(loaded.spec, "source", "")) != spec:
            return None
        return loaded

    def _answer_now(self, config: Any) -> bool:
        """On the calling thread, without the queue: show a run of ``config`` the registry already has (True),
        or raise ConfigError for settings the loaded model cannot take. False: the run must be queued.

        The same lookup and check, in the same order, as ``run_experiment`` makes before any heavy work; before
        the model is loaded (its fingerprint unknown) there is nothing to look up and the queued run does both.
        """
        loaded = self._loaded()
        if loaded is None:
            return False
        from workbench.experiment import find_recorded
        from workbench.techniques import check

        registry = self.app.registry  # ConfigError when none is open
        try:
            result = find_recorded(loaded, [config], self.app.suite, registry)
        except RegistryError:
            result = None  # the queued run looks again and reports what is wrong with the registry
        if result is None:
            check(loaded.model, config)
            return False
        self.app.last_result = result
        self._show_result(result)
        return True

    def _on_result(self, job: Job) -> None:
        if job.result is not None:
            self._show_result(job.result)

    def _show_result(self, result: Any) -> None:
        self.results.append(result)
        if result.status == "done":
            how = "found in the registry (no new run)" if result.reused else "evaluated and recorded"
            self.message.value = render_note(f"Run {result.run_id} · {result.label}: {how}.", "ok")
        elif result.status == "interrupted":
            self.message.value = render_note(f"Run {result.run_id} · {result.label}: stopped, recorded as "
                                             "interrupted.", "warn")

    # ---- grid check -----------------------------------------------------------------------------------

    def _check_grid(self, loaded: Any) -> None:
        """Warn when the weights already sit on a low-bit grid (then that grid's RTN is lossless by accident)."""
        try:
            from workbench.quant_analysis import detect_grid
        except ImportError:
            self.grid_warning.value = ""
            return
        report = detect_grid(loaded.model)
        self.grid_warning.value = "" if report is None else (
            '<div style="background:#fff8e1;border-left:4px solid #f9a825;padding:4px 8px">'
            f"<b>Grid detected.</b> {html.escape(report.message)}</div>")

    # ---- the plot -------------------------------------------------------------------------------------

    def frame(self) -> pd.DataFrame:
        """The runs this panel plots: the loaded model (once known), the current suite, quantizers + baseline."""
        frame = self.app.runs_frame(model=self.app.fingerprint, suite=self.app.suite_filter)
        if frame.empty:
            return frame
        keep = set(self.method.options) | {"baseline"}
        return frame[frame["technique"].isin(keep)]

    def _figure(self) -> go.Figure:
        from workbench.views import bits_figure

        fig = bits_figure(self.frame(), y=self.quality.value, x=self.size_axis.value)
        return fig.update_layout(legend_title_text="method")


__all__ = ["GROUP_SIZES", "QuantizePanel", "build_config"]
