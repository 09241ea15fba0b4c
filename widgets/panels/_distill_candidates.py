"""The Distill tab's untrained-student line and its "Rank candidates" box (the library decides; these show).

- :class:`UntrainedPreview`: when the student shape changes, the untrained student's size, perplexity and KL
  against the teacher (:func:`workbench.distill.preview.preview_student`: the recorded ``[prune]`` run) in a
  status line and as a ringed "untrained" point on the trade-off plot. A shape measured before answers from the
  registry at once; a new one is measured on the workspace queue. Loading a model only looks the shape up (a
  new model must not queue work in a tab nobody looks at); a shape control moved, or "Measure", measures it.
- :class:`CandidateRanking`: student shapes (text such as ``drop=2; drop=4; ffn=768``, the model's default
  candidates to start with), each distilled with the tab's settings and Steps budget, ranked by
  :func:`workbench.distill.candidates.rank_candidates` in the background; the table when it ends, each run a
  point on the trade-off plot.
"""

from __future__ import annotations

import html
from typing import TYPE_CHECKING, Any

import ipywidgets as W

from widgets.common import render_note
from widgets.jobs import Job
from workbench.errors import ConfigError, WorkbenchError

if TYPE_CHECKING:
    import plotly.graph_objects as go

UNTRAINED_TRACE = "untrained (this shape)"


class UntrainedPreview(W.HBox):
    """The untrained student of the tab's current shape: a status line, a Measure button, a point on the plot."""

    def __init__(self, panel: Any) -> None:
        self.panel, self.ws = panel, panel.ws
        self.note = W.HTML("")
        self.measure = W.Button(
            description="Measure",
            icon="tachometer",
            tooltip="Evaluate the untrained student of this shape (a recorded prune run)",
            layout=W.Layout(width="110px", display="none"),
        )
        self.measure.on_click(lambda _b: self.show(self.shape, compute=True))
        self.shape: Any = None  # the PruneConfig the tab shows, None when it prunes nothing
        self.latest: Any = None  # the StudentPreview of ``shape`` once known
        self.job: Job | None = None
        super().__init__([self.note, self.measure])

    def show(self, shape: Any, *, compute: bool) -> Job | None:
        """Follow ``shape``: its recorded preview at once, else (``compute``) a queued measurement."""
        from workbench.distill.preview import recorded_preview

        self.shape, self.latest = shape, None
        self.measure.layout.display = "none"
        if shape is None:
            self.note.value = ""
            self.panel.plot.refresh()
            return None
        try:
            found = recorded_preview(self.ws, shape)
        except (ConfigError, WorkbenchError) as err:
            self.note.value = render_note(str(err), "warn")
            return None
        if found is not None:
            self._set(found)
            return None
        if not compute:
            self.note.value = render_note("Untrained quality of this shape not measured yet.")
            self.measure.layout.display = ""
            return None
        return self._submit(shape)

    def _submit(self, shape: Any) -> Job | None:
        from workbench.distill.preview import preview_student, untrained_pipeline
        from workbench.techniques import describe_pipeline

        previous = self.job
        if previous is not None and previous.status == "queued":
            previous.cancel()  # a shape moved past before it was measured: never started
        steps = untrained_pipeline(shape)
        try:
            key = ("untrained", *self.ws.run_key(steps))
        except ConfigError as err:
            self.note.value = render_note(str(err), "warn")
            return None
        self.note.value = render_note("Untrained student: measuring perplexity and KL against the teacher…")
        bar = self.panel.progress
        self.job = self.ws.queue.submit(
            lambda progress: preview_student(self.ws, shape, progress=progress),
            label=f"untrained {describe_pipeline(steps)}",
            key=key,
            on_start=bar.attach,
            on_progress=bar.report,
            on_done=lambda job: self._done(job, shape),
        )
        return self.job

    def _done(self, job: Job, shape: Any) -> None:
        # On the worker thread: only widget attributes are set.
        self.panel.progress.finish(job)
        _poke(self.panel)
        if shape != self.shape or job.status == "cancelled":
            return  # the tab moved on to another shape, whose own answer shows
        if job.error is not None:
            self.note.value = render_note(f"Untrained student not measured: {job.error}", "warn")
            self.measure.layout.display = ""
            return
        self._set(job.result)

    def _set(self, preview: Any) -> None:
        self.latest = preview
        text = preview.summary()
        self.note.value = render_note(text[:1].upper() + text[1:] + ".", "ok")
        self.panel.plot.refresh()

    def mark(self, fig: go.Figure) -> go.Figure:
        """``fig`` (the trade-off plot) with the current shape's untrained point ringed and labelled."""
        preview = self.latest
        if preview is None or preview.shape != self.shape:
            return fig
        fig.add_scatter(
            x=[preview.size_mb],
            y=[preview.ppl],
            mode="markers+text",
            text=["untrained"],
            textposition="top center",
            name=UNTRAINED_TRACE,
            marker={"symbol": "circle-open", "size": 20, "line": {"width": 2}, "color": "#d62728"},
            hovertext=[html.escape(preview.summary())],
            hoverinfo="text",
        )
        return fig


class CandidateRanking(W.VBox):
    """Candidate shapes, a "Rank candidates" button and the ranked table (see the module docstring)."""

    def __init__(self, panel: Any) -> None:
        self.panel, self.ws = panel, panel.ws
        self.text = W.Text(
            value="",
            description="Candidates",
            placeholder="drop=2; drop=4; ffn=768",
            tooltip="Student shapes separated by ';' (drop=N layers, ffn=WIDTH, heads=N, or several together)",
            layout=W.Layout(width="460px"),
        )
        self.button = W.Button(
            description="Rank candidates",
            icon="sort-amount-desc",
            tooltip="Distil every candidate with the settings above and the same Steps budget, then rank "
            "them by quality per parameter (recorded runs: a ranking made before answers at once)",
        )
        self.table = W.HTML("")
        self.ranking: Any = None
        self.job: Job | None = None
        self.button.on_click(lambda _b: self.rank())
        panel.app.on_model_loaded(lambda _loaded: self.fill_defaults())
        self.fill_defaults()
        super().__init__([W.HBox([self.text, self.button]), self.table])

    def fill_defaults(self) -> None:
        """Start the candidates field with the loaded model's default candidates (a field already filled is
        the user's and stays)."""
        from workbench.distill.candidates import candidate_text, default_candidates

        loaded = self.ws.loaded_model()
        if loaded is not None and not self.text.value.strip():
            self.text.value = "; ".join(candidate_text(c) for c in default_candidates(loaded.model))

    def config(self) -> Any:
        """The RankConfig of the field and the tab's training settings (the Steps box is every candidate's
        budget)."""
        from workbench.distill.candidates import RankConfig, parse_candidates

        distill = self.panel.pipeline()[-1]
        return RankConfig(
            candidates=parse_candidates(self.text.value),
            steps=int(self.panel.steps.value),
            tokens=int(distill.tokens),
            distill=distill,
        )

    def rank(self) -> Job | None:
        """Queue the ranking (refused at once, in the error area, for bad candidates or settings)."""
        from workbench.distill.candidates import check_candidates, rank_candidates

        panel = self.panel
        panel.errors.clear()
        try:
            config = self.config()
            loaded = self.ws.loaded_model()
            if loaded is not None:
                check_candidates(loaded.model, config)
            key = ("rank", self.ws.model_spec.strip(), self.ws.suite_filter, repr(config))
        except ConfigError as err:
            panel.errors.show(err)
            return None
        n = len(config.candidates)
        panel.message.value = render_note(f"Ranking {n} candidates: each distilled for {config.steps} steps…")
        measured: list[Any] = []

        def heard(row: Any) -> None:
            measured.append(row)
            panel.message.value = render_note(f"Ranking candidates: {len(measured)} of {n} measured.")
            panel.plot.refresh()

        self.job = self.ws.queue.submit(
            lambda progress: rank_candidates(self.ws, config, progress=progress, on_candidate=heard),
            label=f"rank {n} candidates",
            key=key,
            on_start=panel.progress.attach,
            on_progress=panel.progress.report,
            on_done=self._done,
        )
        return self.job

    def _done(self, job: Job) -> None:
        panel = self.panel
        panel.progress.finish(job)
        _poke(panel)
        if job.status == "cancelled":
            panel.message.value = render_note(
                "Ranking stopped; the runs finished so far are recorded.", "warn"
            )
            return
        if job.error is not None:
            user = isinstance(job.error, WorkbenchError)
            panel.errors.show(job.error, None if user else job.traceback)
            return
        ranking = self.ranking = job.result
        self.table.value = ranking.table("html")
        how = "found in the registry (no training)" if ranking.reused else "distilled, evaluated and recorded"
        panel.message.value = render_note(f"{ranking.summary()} Runs {how}.", "ok")
        panel.plot.refresh()


def _poke(panel: Any) -> None:
    """Tell the registry watcher that runs were recorded (the other tabs redraw)."""
    poke = getattr(panel.app.watcher, "poke", None)
    if poke is not None:
        poke()


__all__ = ["UNTRAINED_TRACE", "CandidateRanking", "UntrainedPreview"]
