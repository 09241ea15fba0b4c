"""Deploy panel: pick a recorded run, export its variant (GGUF, compressed-tensors, safetensors), see where it fits.

The panel is thin over the library: an export is :func:`workbench.runtimes.exporting.export_run`, the same call
``workbench export`` makes (rebuild the variant, write the format, write the model card), queued on the app's
job queue like a run, since rebuilding a calibrated variant of the demo model takes seconds to minutes. Each
export goes to a new folder under the export folder of the app's settings row (``exports/run-12-gguf/``;
``-2``, ``-3`` … when that one is taken). When it ends the panel lists the files written with their sizes and
shows the model card; a variant the format cannot hold (GGUF: no type holds its grid exactly) is refused with
the library's message, and nothing is left on disk.

Below, the fit planner (:class:`widgets.panels.fit.FitBox`) follows the picked run: what it needs in memory at
a context length and batch, and which devices hold it. A note says where the picked run was measured (the
runs frame's ``runtime`` column): a simulated run's speed is the float model's, and the Quantize tab's Runtime
choice measures the same variant in llama.cpp or torch's packed kernels.
"""

from __future__ import annotations

import html
import math
import threading
from pathlib import Path
from typing import Any

import ipywidgets as W
import pandas as pd

from widgets.common import ErrorArea, ProgressBar, render_note
from widgets.jobs import Job
from widgets.panels import PanelHost, Tab, register_tab
from widgets.panels.fit import FitBox
from workbench.errors import ConfigError, WorkbenchError

# (button label, export format of workbench.runtimes.exporting.EXPORT_FORMATS, what it is for)
FORMATS = (
    ("GGUF", "gguf", "llama.cpp and everything built on it (bit-exact where a GGUF type holds the grid)"),
    ("compressed-tensors", "compressed-tensors", "transformers and vLLM (packed int4/int8)"),
    ("safetensors", "safetensors", "plain float weights for transformers (quantized values dequantized)"),
)
# Key metrics in the run picker's labels: (column, short name, digits).
PICKER_METRICS = (
    ("metric_kl_mean", "KL", 4),
    ("metric_bits_per_weight", "bpw", 2),
    ("metric_size_mb", "MB", 1),
)
SIMULATED_HINT = (
    "Its speed and memory are the float model's: the Quantize tab's Runtime choice measures the same variant "
    "in llama.cpp or with torch's packed kernels."
)


def run_label(row: Any) -> str:
    """``12 · rtn 4b g32 sym · KL 0.0123 · bpw 4.50 · MB 1.2``: id, pipeline, key metrics (as Compare's picker,
    with the metrics that tell variants apart)."""
    parts = [str(int(row["run_id"])), str(row.get("pipeline") or "baseline")]
    for column, name, digits in PICKER_METRICS:
        value = row.get(column)
        if isinstance(value, (int, float)) and not (isinstance(value, float) and math.isnan(value)):
            parts.append(f"{name} {value:.{digits}f}")
    return " · ".join(parts)


def runtime_note(runtime: str) -> str:
    """One line on where a run was measured, with the way to a real runtime for a simulated one."""
    from workbench.runtimes import SIMULATED

    if not runtime or runtime == SIMULATED:
        return f"Measured simulated (torch float). {SIMULATED_HINT}"
    return f"Measured in the runtime {runtime}: its size, speed and memory are that runtime's."


def _card_html(text: str) -> str:
    """The model card as HTML: mistune's rendering (escaped) when installed, else the Markdown as text."""
    try:
        import mistune

        body = mistune.create_markdown(escape=True, plugins=["table"])(text)
    except Exception:  # noqa: BLE001 - not installed or another major version: the text itself reads fine
        body = f"<pre style='white-space:pre-wrap'>{html.escape(text)}</pre>"
    return f'<div class="wb-card" style="max-height:480px;overflow:auto;font-size:12px">{body}</div>'


class DeployPanel(W.VBox):
    """A run picker, export buttons with a bar, what an export wrote (files, sizes, the card), the fit planner."""

    def __init__(self, app: PanelHost) -> None:
        self.app = app
        self.frame = pd.DataFrame()  # done runs, newest first
        self._lock = threading.RLock()  # the watcher thread and the kernel may refresh at the same time
        self.last_export: Any = None  # the latest export's RunExport
        self.run_picker = W.Dropdown(options=[], description="Run", layout=W.Layout(width="560px"))
        self.runtime_html = W.HTML("")
        self.export_buttons = {
            fmt: W.Button(
                description=label,
                icon="download",
                tooltip=f"Export the picked run's variant as {label}: {why}",
                layout=W.Layout(width="170px"),
            )
            for label, fmt, why in FORMATS
        }
        for fmt, button in self.export_buttons.items():
            button.on_click(lambda _b, fmt=fmt: self.export(fmt))
        self.progress = ProgressBar()
        self.errors = ErrorArea()
        self.written = W.HTML("")
        self.card = W.HTML("")
        self.fit = FitBox(app)
        self.run_picker.observe(lambda _c: self._on_pick(), names="value")
        super().__init__(
            [
                W.HTML("<b>Take a variant out</b>: pick a recorded run, export it, see where it fits."),
                self.run_picker,
                self.runtime_html,
                W.HBox(list(self.export_buttons.values())),
                self.progress,
                self.errors,
                self.written,
                self.card,
                W.HTML("<h4 style='margin:12px 0 4px'>Where it fits</h4>"),
                self.fit,
            ],
            layout=W.Layout(padding="8px"),
        )
        app.watcher.subscribe(self.refresh)
        self.refresh()

    # ---- runs -----------------------------------------------------------------------------------------

    def refresh(self) -> None:
        """Re-read the registry's done runs into the picker (newest first), keeping the picked one."""
        with self._lock:
            try:
                frame = self.app.runs_frame()
            except WorkbenchError:  # no registry open: the settings row says so
                frame = pd.DataFrame()
            if not frame.empty:
                frame = frame.sort_values("run_id", ascending=False).reset_index(drop=True)
            self.frame = frame
            options = [(run_label(row), int(row["run_id"])) for _, row in frame.iterrows()]
            if list(self.run_picker.options) != options:
                picked = self.run_picker.value
                self.run_picker.options = options
                values = [v for _, v in options]
                # A new run is picked when nothing was (the newest); otherwise the pick stays.
                self.run_picker.value = picked if picked in values else (values[0] if values else None)
            self._on_pick()

    def select(self, run_id: int) -> None:
        """Pick ``run_id`` (ConfigError when it is not a done run of the registry)."""
        if run_id not in [v for _, v in self.run_picker.options]:
            self.refresh()
        if run_id not in [v for _, v in self.run_picker.options]:
            raise ConfigError(f"Run {run_id} is not a done run of this registry; pick one from the Run menu.")
        self.run_picker.value = run_id

    def _row(self, run_id: Any) -> Any:
        if run_id is None or self.frame.empty:
            return None
        rows = self.frame[self.frame["run_id"] == run_id]
        return None if rows.empty else rows.iloc[0]

    def _on_pick(self) -> None:
        run_id = self.run_picker.value
        row = self._row(run_id)
        for button in self.export_buttons.values():
            button.disabled = row is None
        if row is None:
            self.runtime_html.value = render_note(
                "No recorded run yet: run a variant (Quantize, Route experts, Distill), then export it here."
            )
            return
        self.runtime_html.value = render_note(f"Run {run_id}: " + runtime_note(str(row.get("runtime") or "")))
        self._follow_in_fit(int(run_id))

    def _follow_in_fit(self, run_id: int) -> None:
        """Show the picked run in the fit planner (its list refreshes first when the run is new to it)."""
        if run_id not in [v for _, v in self.fit.runs.options]:
            self.fit.refresh()
        if run_id in [v for _, v in self.fit.runs.options] and self.fit.runs.value != (run_id,):
            self.fit.select(run_id)

    # ---- exporting ------------------------------------------------------------------------------------

    def export_folder(self, run_id: int, fmt: str) -> Path:
        """A new folder for this export under the settings row's export folder: ``run-12-gguf``, then ``-2`` …"""
        root = Path(str(self.app.export_dir.value or "exports")).expanduser()
        folder = root / f"run-{run_id}-{fmt}"
        n = 1
        while folder.exists():
            n += 1
            folder = root / f"run-{run_id}-{fmt}-{n}"
        return folder

    def _model(self) -> Any:
        """What to rebuild the variant on: the loaded model (cached), else the model bar's spec."""
        ws = self.app.workspace
        loaded = ws.loaded_model() if hasattr(ws, "loaded_model") else None
        return loaded.spec if loaded is not None else str(ws.model_spec).strip()

    def export(self, fmt: str) -> Job | None:
        """Queue an export of the picked run as ``fmt``; the job's result is the library's ``RunExport``."""
        from workbench.runtimes.exporting import export_run

        self.errors.clear()
        run_id = self.run_picker.value
        if run_id is None:
            self.errors.show(ConfigError("Pick a run first (record one in another tab if there is none)."))
            return None
        try:
            registry = self.app.registry
        except WorkbenchError as err:
            self.errors.show(err)
            return None
        folder = self.export_folder(int(run_id), fmt)
        model, suite = self._model(), self.app.suite  # a custom suite is known by name only in the registry
        self.written.value = self.card.value = ""

        def work(progress: Any) -> Any:
            return export_run(
                int(run_id), fmt, folder, registry=registry, model=model, suite=suite, progress=progress
            )

        return self.app.workspace.queue.submit(
            work,
            label=f"export run {run_id} as {fmt}",
            key=("export", int(run_id), fmt),
            on_start=self.progress.attach,
            on_progress=self.progress.report,
            on_done=self._done,
        )

    def _done(self, job: Job) -> None:
        # On the worker thread: only widget attributes are set here.
        self.progress.finish(job)
        if job.status == "cancelled":
            return
        if job.error is not None:
            user = isinstance(job.error, WorkbenchError)
            self.errors.show(job.error, None if user else job.traceback)
            return
        done = job.result
        self.last_export = done
        self.written.value = _written_html(done)
        self.card.value = _card_html(done.card.read_text(encoding="utf-8"))


def _written_html(done: Any) -> str:
    """What an export wrote: the folder, each file with its size, the reload check and the exporter's notes."""
    folder = html.escape(str(done.folder.resolve()))
    items = "".join(
        f"<li><code>{html.escape(name)}</code> ({size / 1e6:.2f} MB)</li>"
        for name, size in done.sizes.items()
    )
    text = (
        f"<div style='color:#1b5e20'>Exported run {done.run.id} ({html.escape(done.run.pipeline_label or 'baseline')})"
        f" as {html.escape(done.info.format)} to <code>{folder}</code>:</div><ul style='margin:4px 0'>{items}</ul>"
    )
    if done.reload_check is not None:
        diff = done.info.details.get("reload_max_abs_logit_diff")
        shown = f" (max |logit difference| {diff:.3g})" if isinstance(diff, (int, float)) else ""
        text += render_note(f"Reloaded through transformers: {done.reload_check}{shown}.")
    for note in done.info.notes:
        text += render_note(f"Note: {note}", "warn")
    return text


register_tab(Tab("Deploy", attr="deploy", build=DeployPanel, order=95))

__all__ = ["FORMATS", "DeployPanel", "run_label", "runtime_note"]
