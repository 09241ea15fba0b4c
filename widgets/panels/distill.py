"""Distill panel: cut a student from the loaded model, train it against the model as teacher, watch it recover.

The controls build a pipeline the library runs like any other: ``prune`` (layers dropped by Block Influence,
FFN width) then ``distill`` (loss, T, alpha, teacher targets, budget), and optionally a quantizer stacked on
the student ("Quantize student", which reuses the distilled student through the prefix cache). While a run
trains, its progress partials draw the training loss and the evaluation points (perplexity against training
tokens: the recovery curve) live; the recorded curves replace them when the run ends. "Hard baseline" runs the
same student, budget and data order on labels only, its curves beside the KD ones. "Run as sweep" runs the
settings at every depth of the Drop layers slider (the workspace decides the pipelines). Stop keeps the student
trained so far (the run is recorded interrupted with its checkpoint) and "Resume" continues it. "Data" trains on
the corpus or on sequences the teacher writes first (sequence-level KD; its progress shows in the bar and the
message, and the generated corpus is kept for later runs).
Moving a shape control shows the untrained student's size, perplexity and KL (its recorded prune run), ringed
on the trade-off plot; "Rank candidates" distils several shapes with the same Steps budget and ranks them.
"""

from __future__ import annotations

import html
import threading
import time
from typing import TYPE_CHECKING, Any

import ipywidgets as W
import pandas as pd
import plotly.graph_objects as go

from widgets.common import ErrorArea, LivePlot, ProgressBar, render_note
from widgets.jobs import Job
from widgets.panels import Tab, register_tab
from widgets.panels._distill_candidates import CandidateRanking, UntrainedPreview
from workbench.errors import ConfigError

if TYPE_CHECKING:
    from widgets.panels import PanelHost

REDRAW_S = 0.3  # live curves redraw at most this often: a tiny model trains faster than a plot redraws


class DistillPanel(W.VBox):
    """Student shape, loss, T, alpha, teacher targets, budget; live curves; stop, resume, quantize the student."""

    def __init__(self, app: PanelHost) -> None:
        from workbench.distill.losses import LOSSES
        from workbench.techniques.distill import TEACHERS

        self.app = app
        self.ws = app.workspace
        short = W.Layout(width="230px")
        self.drop = W.IntSlider(
            value=1,
            min=0,
            max=29,
            description="Drop layers",
            continuous_update=False,
            tooltip="Decoder layers dropped, least Block Influence first",
            layout=short,
        )
        self.ffn = W.IntText(
            value=0,
            description="FFN width",
            tooltip="FFN neurons kept per layer (0: all)",
            layout=W.Layout(width="180px"),
        )
        self.loss = W.Dropdown(
            options=[n for n in LOSSES if n != "hard"], value="forward_kl", description="Loss", layout=short
        )
        self.temperature = W.FloatSlider(
            value=2.0, min=0.5, max=8.0, step=0.5, description="T", continuous_update=False, layout=short
        )
        self.alpha = W.FloatSlider(
            value=0.5, min=0.0, max=1.0, step=0.05, description="alpha", continuous_update=False, layout=short
        )
        self.teacher = W.Dropdown(
            options=list(TEACHERS),
            value="live",
            description="Teacher",
            layout=short,
            tooltip="live teacher, or cached top-k / sampled targets (computed once)",
        )
        self.data = W.Dropdown(
            options=["corpus", "teacher-generated"],
            value="corpus",
            description="Data",
            layout=short,
            tooltip="train on the corpus's training part, or on sequences the teacher writes from its prompts "
            "(sequence-level KD: generated once, then reused)",
        )
        self.steps = W.IntText(value=50, description="Steps", layout=W.Layout(width="160px"))
        self.eval_every = W.IntText(
            value=0,
            description="Eval every",
            tooltip="training tokens between evaluation points (0: before and after only)",
            layout=W.Layout(width="200px"),
        )
        self.train_button = W.Button(
            description="Train",
            icon="play",
            button_style="primary",
            tooltip="Distil the student from the loaded model",
        )
        self.hard_button = W.Button(
            description="Hard baseline",
            icon="balance-scale",
            tooltip="The same student, budget and data on hard labels only",
        )
        self.sweep_button = W.Button(
            description="Run as sweep",
            icon="forward",
            tooltip="These settings at every depth of the Drop layers slider (measured ones answer at once)",
        )
        self.resume_button = W.Button(
            description="Resume",
            icon="step-forward",
            disabled=True,
            tooltip="Continue the stopped run from its checkpoint",
        )
        self.quant_bits = W.Dropdown(
            options=[8, 4, 3, 2], value=4, description="bits", layout=W.Layout(width="130px")
        )
        self.quantize_button = W.Button(
            description="Quantize student",
            icon="compress",
            disabled=True,
            tooltip="Stack round-to-nearest on the last distilled student",
        )
        self.shape_note = W.HTML("")
        self.message = W.HTML("")
        self.progress = ProgressBar()
        self.errors = ErrorArea()
        self.curves_plot = LivePlot(self._curves_figure)
        self.plot = LivePlot(self._tradeoff_figure)
        # The untrained student's line and the candidate ranking (_distill_candidates.py beside this file).
        self.untrained = UntrainedPreview(self)
        self.candidates = CandidateRanking(self)
        # Settings the panel has no control for (seq_len, batch_size, lr...), passed to DistillConfig as they are.
        self.overrides: dict[str, Any] = {}
        self.results: list[Any] = []
        self.curves: dict[
            str, dict[str, list[float]]
        ] = {}  # run label -> tokens / loss / eval_tokens / eval_ppl
        self.student_pipeline: list[Any] | None = None  # the last distilled student's pipeline
        self._stopped: list[Any] | None = None  # the pipeline of the last stopped run, for Resume
        self._lock = threading.Lock()
        self._last_draw = 0.0

        self.train_button.on_click(lambda _b: self.train())
        self.hard_button.on_click(lambda _b: self.train(hard=True))
        self.sweep_button.on_click(lambda _b: self.sweep())
        self.resume_button.on_click(lambda _b: self.resume())
        self.quantize_button.on_click(lambda _b: self.quantize_student())
        for control in (self.drop, self.ffn):
            control.observe(lambda _c: self._show_shape(compute=True), names="value")
        app.watcher.subscribe(self.plot.refresh)
        app.on_model_loaded(lambda _loaded: self._show_shape())
        self._show_shape()
        self.curves_plot.refresh()  # the empty curves figure, not the "reading the registry" placeholder
        super().__init__(
            [
                W.HTML("<b>Student</b>"),
                W.HBox([self.drop, self.ffn]),
                self.shape_note,
                self.untrained,
                W.HTML("<b>Training</b>"),
                W.HBox([self.loss, self.temperature, self.alpha]),
                W.HBox([self.teacher, self.data, self.steps, self.eval_every]),
                W.HBox(
                    [
                        self.train_button,
                        self.hard_button,
                        self.sweep_button,
                        self.resume_button,
                        self.progress,
                    ]
                ),
                W.HBox([self.quant_bits, self.quantize_button]),
                self.candidates,
                self.errors,
                self.message,
                self.curves_plot,
                self.plot,
            ]
        )

    # ---- configs ---------------------------------------------------------------------------------------

    def pipeline(self, *, hard: bool = False) -> list[Any]:
        """The steps of the controls' settings: ``prune`` (when it prunes anything) then ``distill``."""
        from workbench.techniques.distill import DistillConfig
        from workbench.techniques.prune_layers import PruneConfig

        steps: list[Any] = []
        if self.drop.value or self.ffn.value:
            steps.append(PruneConfig(drop=int(self.drop.value), ffn_size=int(self.ffn.value) or None))
        params: dict[str, Any] = {
            "loss": "hard" if hard else self.loss.value,
            "temperature": float(self.temperature.value),
            "alpha": float(self.alpha.value),
            "teacher": "live" if hard else self.teacher.value,
            "data": self.data.value,  # the hard baseline trains on the same data
            "steps": int(self.steps.value),
            "eval_every": int(self.eval_every.value),
            **self.overrides,
        }
        try:
            steps.append(DistillConfig(**params))
        except TypeError as err:
            raise ConfigError(f"distill: {err}") from None
        return steps

    def _show_shape(self, compute: bool = False) -> None:
        """The student's size before training: layers and FFN width kept, parameters against the teacher's;
        then its untrained quality, from the registry, else measured in the background when ``compute`` (a
        shape control moved; a model loading only looks it up)."""
        loaded = self.ws.loaded_model()
        if loaded is None:
            self.shape_note.value = render_note(
                "Load a model: it is the teacher, and the student is cut from it."
            )
            return
        config = loaded.model.config
        n, width = int(config.num_hidden_layers), int(config.intermediate_size)
        if self.drop.max != n - 1:
            self.drop.max = n - 1
        try:
            steps = self.pipeline()
            self.ws.check(steps)
        except ConfigError as err:
            self.shape_note.value = render_note(str(err), "warn")
            self.untrained.show(None, compute=False)
            return
        from workbench.distill import n_parameters
        from workbench.techniques.base import stacking_for

        preview = stacking_for(steps[0]).preview(loaded.model, steps[0]) if len(steps) > 1 else loaded.model
        teacher_n, student_n = n_parameters(loaded.model), n_parameters(preview)
        kept = int(preview.config.num_hidden_layers)
        self.shape_note.value = render_note(
            f"Student: {kept} of {n} layers, FFN width {int(preview.config.intermediate_size)} of {width}; "
            f"{student_n / 1e6:.2f}M parameters ({100 * student_n / teacher_n:.0f}% of the teacher's "
            f"{teacher_n / 1e6:.2f}M)."
        )
        self.untrained.show(steps[0] if len(steps) > 1 else None, compute=compute)

    # ---- running ---------------------------------------------------------------------------------------

    def train(self, *, hard: bool = False) -> Job | None:
        """Queue the controls' pipeline (the hard-label baseline with ``hard``); None if refused or recorded."""
        self.errors.clear()
        self.message.value = ""
        try:
            return self._submit(self.pipeline(hard=hard))
        except ConfigError as err:
            self.errors.show(err)
            return None

    def sweep(self) -> list[Job]:
        """Run as sweep: the controls' settings at every student depth of the Drop layers slider (0 to L-1
        layers dropped). Which pipelines the range means (no prune step at depth 0 unless the FFN width is
        cut) and which the registry already answers come from the workspace; the rest are queued."""
        self.errors.clear()
        self.message.value = ""
        try:
            plan = self.ws.plan_sweep(self.ws.slider_sweep(self.pipeline(), "prune", "drop"))
        except ConfigError as err:
            self.errors.show(err)
            return []
        for steps, result in plan.found:
            self._show_result(result, steps)
        jobs = []
        try:
            for steps in plan.to_run:
                job = self._submit(steps)
                if job is not None:
                    jobs.append(job)
        except ConfigError as err:
            self.errors.show(err)
        note = f"Sweep over student depths: queued {len(jobs)}, found {len(plan.found)} in the registry"
        if plan.refused:
            note += f", refused {len(plan.refused)} (see the message above)"
        self.message.value = render_note(note + ".")
        if plan.first_refusal is not None:
            self.errors.show(plan.first_refusal)
        return jobs

    def resume(self) -> Job | None:
        """Run the stopped pipeline again: the distill step continues from its checkpoint."""
        if self._stopped is None:
            self.errors.show("Nothing to resume: no run of this panel was stopped.")
            return None
        self.errors.clear()
        return self._submit(self._stopped)

    def quantize_student(self) -> Job | None:
        """Stack round-to-nearest (the bits chosen, the group size the model's space suggests) on the student."""
        if self.student_pipeline is None:
            self.errors.show("Train a student first: Quantize stacks on the last distilled student.")
            return None
        self.errors.clear()
        try:
            space = self.ws.space("rtn")
            config = space.config(
                bits=int(self.quant_bits.value),
                group_size=space.default["group_size"],
                symmetric=space.default.get("symmetric"),
            )
            return self._submit([*self.student_pipeline, config])
        except ConfigError as err:
            self.errors.show(err)
            return None

    def _submit(self, steps: list[Any]) -> Job | None:
        from workbench.techniques import describe_pipeline

        found = self.ws.answer_now(steps)
        if found is not None:
            self._show_result(found, steps)
            return None
        label = describe_pipeline(steps)
        with self._lock:
            self.curves[label] = {"tokens": [], "loss": [], "eval_tokens": [], "eval_ppl": []}
        return self.app.run(
            steps,
            progress_bar=self.progress,
            errors=self.errors,
            on_result=lambda job: self._on_result(job, steps),
            on_partial=self._listener(label),
        )

    def _listener(self, label: str) -> Any:
        def listen(metrics: dict[str, Any]) -> None:
            if "generation_sequences" in metrics:  # before training: the teacher writing its corpus
                self.message.value = render_note(
                    f"Teacher writing the training corpus: {metrics['generation_sequences']} of "
                    f"{metrics['generation_of']} sequences done (kept for later runs)."
                )
            with self._lock:
                curve = self.curves.setdefault(
                    label, {"tokens": [], "loss": [], "eval_tokens": [], "eval_ppl": []}
                )
                if "train_loss" in metrics:
                    curve["tokens"].append(float(metrics["distill_tokens"]))
                    curve["loss"].append(float(metrics["train_loss"]))
                if "eval_perplexity" in metrics:
                    curve["eval_tokens"].append(float(metrics["distill_tokens"]))
                    curve["eval_ppl"].append(float(metrics["eval_perplexity"]))
            now = time.monotonic()
            if now - self._last_draw >= REDRAW_S:
                self._last_draw = now
                self.curves_plot.refresh()

        return listen

    def _on_result(self, job: Job, steps: list[Any]) -> None:
        if job.result is not None:
            self._show_result(job.result, steps)

    def _show_result(self, result: Any, steps: list[Any]) -> None:
        from workbench.techniques.base import technique_for

        self.results.append(result)
        names = [technique_for(s).name for s in steps]
        if result.status == "done":
            how = "found in the registry (no new run)" if result.reused else "trained, evaluated and recorded"
            self.message.value = render_note(f"Run {result.run_id} · {result.label}: {how}.", "ok")
            loss, evals = result.extras.get("loss_curve"), result.extras.get("eval_curve")
            if loss:  # the recorded curves replace the live ones
                with self._lock:
                    self.curves[result.label] = {
                        "tokens": list(loss["tokens"]),
                        "loss": list(loss["loss"]),
                        "eval_tokens": list((evals or {}).get("tokens", [])),
                        "eval_ppl": list((evals or {}).get("perplexity", [])),
                    }
            if names and names[-1] == "distill":
                self.student_pipeline = list(steps)
                self.quantize_button.disabled = False
            self._stopped = None
            self.resume_button.disabled = True
        elif result.status == "interrupted":
            self._stopped = list(steps)
            self.resume_button.disabled = False
            self.message.value = render_note(
                f"Run {result.run_id} · {result.label}: stopped. {html.escape(result.error or '')}", "warn"
            )
        self.curves_plot.refresh()
        self.plot.refresh()

    # ---- plots -----------------------------------------------------------------------------------------

    def _curves_figure(self) -> go.Figure:
        """Training loss (lines) and evaluation perplexity (dotted, right axis) against training tokens."""
        from workbench.views import loss_curve_figure

        with self._lock:
            curves = {k: {n: list(v) for n, v in c.items()} for k, c in self.curves.items()}
        if not any(c["tokens"] for c in curves.values()):
            return loss_curve_figure([], [])
        fig = go.Figure()
        for label, curve in curves.items():
            fig.add_scatter(x=curve["tokens"], y=curve["loss"], mode="lines", name=f"{label}: train loss")
            if curve["eval_tokens"]:
                fig.add_scatter(
                    x=curve["eval_tokens"],
                    y=curve["eval_ppl"],
                    mode="lines+markers",
                    yaxis="y2",
                    line={"dash": "dot"},
                    name=f"{label}: eval perplexity",
                )
        return fig.update_layout(
            xaxis_title="Training tokens",
            yaxis_title="Loss",
            height=360,
            yaxis2={"title": "Perplexity", "overlaying": "y", "side": "right", "type": "log"},
            legend={"orientation": "h", "y": -0.25},
        )

    def frame(self) -> pd.DataFrame:
        """The runs this panel plots: the loaded model's, on the current suite, with a prune or distill step
        (and the baseline, the teacher)."""
        frame = self.ws.runs_frame(model=self.ws.fingerprint, suite=self.ws.suite_filter)
        if frame.empty or "pipeline_json" not in frame.columns:
            return frame
        keep = frame["pipeline_json"].fillna("").str.contains('"technique":"(?:distill|prune)"', regex=True)
        return frame[keep | (frame["technique"] == "baseline")]

    def _tradeoff_figure(self) -> go.Figure:
        from workbench.views import tradeoff_figure

        fig = tradeoff_figure(
            self.frame(),
            x="metric_size_mb",
            y="metric_ppl",
            empty_message="No distilled students yet: press Train.",
        )
        return self.untrained.mark(fig)


register_tab(Tab("Distill", attr="distill", build=DistillPanel, order=30))

__all__ = ["DistillPanel"]
