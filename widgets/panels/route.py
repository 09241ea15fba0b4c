"""Route experts panel: drag the number of active experts per token, watch quality against active parameters.

The controls come from the loaded model's routing space (:func:`workbench.techniques.route.route_space`): a k
slider from 1 to E, the renormalisation choices the family takes, and whether dynamic routing (top-p, NAEE
skipping) is available; the budget mode keeps a share of the active parameters per token and lets each
layer's k follow from its measured sensitivity. Each setting becomes one ``route`` config run through the app's
queue; the run records the measured mean active experts, active parameters and FLOPs per token next to the
quality metrics, and the expert-load matrix, drawn here as a heatmap. Pruning controls run ``prune_experts``
(the heatmap then shows the experts that are left, with the load before beside it), and "Balance load" fits
``balance_experts``. On a dense model the panel says it has no experts and, where the library has the
``moefy`` technique, offers to convert it. On a model converted by ``moefy`` (``demo-moe``) it shows how the
model was made and how good it is at each k, as :func:`workbench.models.demo_moe.quality_summary` decides (the
user's runs, else the table shipped with the recipe), and "Recover at k" distils it at the slider's k.
"""

from __future__ import annotations

import html
from typing import TYPE_CHECKING, Any

import ipywidgets as W
import pandas as pd
import plotly.graph_objects as go

from widgets.common import ErrorArea, LivePlot, ProgressBar, render_note
from widgets.panels import Tab, register_tab
from workbench.errors import ConfigError

if TYPE_CHECKING:
    from widgets.panels import PanelHost

MODES = (("fixed k", "k"), ("top-p", "top_p"), ("skip (NAEE)", "skip"), ("budget", "budget"))
TECHNIQUES = ("route", "prune_experts", "baseline")
X_METRICS = ("metric_active_params", "metric_flops_per_token", "metric_active_experts")
Y_METRICS = ("metric_kl_mean", "metric_ppl", "metric_top1_agree")


def parse_per_layer(text: str) -> dict[int, int]:
    """``"0:1, 3:2"`` as {0: 1, 3: 2}; a bad entry says how to write it."""
    out: dict[int, int] = {}
    for part in (p.strip() for p in text.replace(";", ",").split(",")):
        if not part:
            continue
        layer, sep, k = part.partition(":")
        try:
            if not sep:
                raise ValueError
            out[int(layer)] = int(k)
        except ValueError:
            raise ConfigError(f"Per-layer k: {part!r} is not layer:k; write e.g. '0:1, 3:2'.") from None
    return out


def expert_load_figure_for(matrix: list[list[float]], layers: list[int] | None, title_text: str) -> go.Figure:
    from workbench.views import expert_load_figure

    return expert_load_figure(matrix, layers=layers, title_text=title_text)


def _summary_html(summary: Any) -> str:
    """The recipe as a two-column table and the quality points as one row each."""
    esc = html.escape
    recipe = "".join(
        f"<tr><th style='text-align:left'>{esc(k)}</th><td>{esc(v)}</td></tr>" for k, v in summary.recipe
    )
    parts = [f"<b>How this model was made</b><table>{recipe}</table>"]
    if summary.points:
        head = "".join(f"<th>{h}</th>" for h in ("setting", "FFN active", "ppl", "Δppl", "KL mean", "run"))
        rows = []
        for p in summary.points:
            delta = f"{100 * p.delta_ppl:+.1f}%" if p.delta_ppl is not None else "–"
            kl = f"{p.kl_mean:.3f}" if p.kl_mean is not None else "–"
            run = str(p.run_id) if p.run_id is not None else "shipped"
            cells = (esc(p.label), f"{p.ffn_active:.1%}", f"{p.ppl:.3f}", delta, kl, run)
            rows.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
        parts.append(f"<b>How good it is</b><table><tr>{head}</tr>{''.join(rows)}</table>")
    parts.append(f"<i>{esc(summary.note)}</i>")
    return "<div class='wb-moe-summary'>" + "".join(parts) + "</div>"


def _set_range(slider: W.IntSlider, low: int, high: int, value: int) -> None:
    """Move a slider to [low, high] at ``value`` (a traitlets slider refuses min > max at every step)."""
    slider.max = max(high, slider.min)
    slider.min = low
    slider.max = high
    slider.value = value


class RoutePanel(W.VBox):
    """k slider (or top-p / skip threshold), per-layer k, pruning; the load heatmap and the trade-off plot."""

    def __init__(self, app: PanelHost) -> None:
        from workbench.views import title

        self.app = app
        self.ws = app.workspace
        self.space: Any = None
        self.results: list[Any] = []
        self.summary: Any = None  # the loaded model's MoeSummary (None unless moefy made it)
        self.load_matrix: list[list[float]] = []
        self._syncing = False

        self.status = W.HTML("")
        self.about = W.HTML("")  # recipe and measured quality of a model converted by moefy
        self.mode = W.ToggleButtons(
            options=MODES, value="k", description="Routing", style={"button_width": "110px"}
        )
        self.k = W.IntSlider(
            value=2,
            min=1,
            max=2,
            step=1,
            continuous_update=False,
            description="k",
            layout=W.Layout(width="320px"),
        )
        self.per_layer = W.Text(
            value="", description="per layer", placeholder="e.g. 0:1, 3:2", layout=W.Layout(width="260px")
        )
        self.renormalize = W.Dropdown(
            options=[("model's rule", "model")],
            value="model",
            description="weights",
            layout=W.Layout(width="230px"),
        )
        self.top_p = W.FloatSlider(
            value=0.8,
            min=0.05,
            max=1.0,
            step=0.05,
            continuous_update=False,
            description="top-p",
            layout=W.Layout(width="320px"),
        )
        self.skip_beta = W.FloatSlider(
            value=0.3,
            min=0.05,
            max=1.0,
            step=0.05,
            continuous_update=False,
            description="skip β",
            layout=W.Layout(width="320px"),
        )
        self.budget = W.FloatSlider(
            value=0.7,
            min=0.1,
            max=1.0,
            step=0.05,
            continuous_update=False,
            description="budget",
            readout_format=".0%",
            tooltip="Share of the active parameters per token to keep; each layer's k is "
            "chosen from its measured sensitivity",
            layout=W.Layout(width="320px"),
        )
        self.run_button = W.Button(
            description="Run", icon="play", button_style="primary", layout=W.Layout(width="90px")
        )
        self.sweep_button = W.Button(
            description="Run as sweep",
            icon="forward",
            tooltip="These settings at every k of the slider, E down to 1 (measured ones answer at once)",
            layout=W.Layout(width="130px"),
        )
        self.prune_method = W.Dropdown(
            options=[
                ("REAP", "reap"),
                ("frequency", "frequency"),
                ("router mass", "router_mass"),
                ("NAEE search", "naee"),
            ],
            value="reap",
            description="prune by",
            layout=W.Layout(width="230px"),
        )
        self.prune_keep = W.IntSlider(
            value=1, min=1, max=1, description="keep", continuous_update=False, layout=W.Layout(width="300px")
        )
        self.prune_button = W.Button(
            description="Prune experts", icon="scissors", layout=W.Layout(width="140px")
        )
        self.recover_steps = W.BoundedIntText(
            value=12, min=1, max=100_000, description="steps", layout=W.Layout(width="160px")
        )
        self.recover_button = W.Button(
            description="Recover at k",
            icon="graduation-cap",
            tooltip="Distil the converted model at the slider's k from the model as loaded (route k → distill)",
            layout=W.Layout(width="140px"),
        )
        # shown only on a model moefy made (recovery trains its carved experts)
        self.recover_box = W.HBox([self.recover_steps, self.recover_button], layout=W.Layout(display="none"))
        self.moefy_button = W.Button(
            description="Convert to MoE (moefy)",
            icon="random",
            layout=W.Layout(width="200px", display="none"),
        )
        self.x_axis = W.Dropdown(
            options=[(title(m), m) for m in X_METRICS],
            value=X_METRICS[0],
            description="against",
            layout=W.Layout(width="330px"),
        )
        self.y_axis = W.Dropdown(
            options=[(title(m), m) for m in Y_METRICS],
            value=Y_METRICS[0],
            description="Quality",
            layout=W.Layout(width="330px"),
        )
        self.message = W.HTML("")
        self.progress = ProgressBar()
        self.errors = ErrorArea()
        self.heatmap = go.FigureWidget(self._heatmap_figure())
        # the load before the last pruning or balancing run (hidden for plain routing runs)
        self.before_matrix: list[list[float]] = []
        self.before_heatmap = go.FigureWidget(self._heatmap_figure())
        self.before_box = W.VBox([self.before_heatmap], layout=W.Layout(display="none"))
        self.balance_button = W.Button(
            description="Balance load",
            icon="balance-scale",
            tooltip="Fit DeepSeek-V3's per-expert selection bias on calibration text",
            layout=W.Layout(width="140px"),
        )
        self.plot = LivePlot(self._figure)

        self.k.observe(lambda _c: self._auto_submit(), names="value")
        self.top_p.observe(lambda _c: self._auto_submit(), names="value")
        self.skip_beta.observe(lambda _c: self._auto_submit(), names="value")
        self.budget.observe(lambda _c: self._auto_submit(), names="value")
        self.mode.observe(lambda _c: self._show_mode(), names="value")
        for control in (self.x_axis, self.y_axis):
            control.observe(lambda _c: self.plot.refresh(), names="value")
        self.run_button.on_click(lambda _b: self.submit())
        self.sweep_button.on_click(lambda _b: self.sweep())
        self.prune_button.on_click(lambda _b: self.prune())
        self.balance_button.on_click(lambda _b: self.balance())
        self.moefy_button.on_click(lambda _b: self.moefy())
        self.recover_button.on_click(lambda _b: self.recover())
        app.watcher.subscribe(self.plot.refresh)
        app.watcher.subscribe(self.refresh_about)
        app.on_model_loaded(lambda _loaded: self.refresh_space())

        self.controls = W.VBox(
            [
                self.mode,
                W.HBox([self.k, self.top_p, self.skip_beta, self.budget, self.renormalize]),
                W.HBox([self.per_layer, self.run_button, self.sweep_button, self.progress]),
                W.HBox([self.prune_method, self.prune_keep, self.prune_button, self.balance_button]),
                self.recover_box,
            ]
        )
        super().__init__(
            [
                self.status,
                self.about,
                self.moefy_button,
                self.controls,
                self.errors,
                self.message,
                W.HBox([self.y_axis, self.x_axis]),
                self.plot,
                self.before_box,
                self.heatmap,
            ]
        )
        self.refresh_space()

    # ---- the model's routing space ----------------------------------------------------------------------

    def refresh_space(self) -> None:
        """Fit the controls to the loaded model (k range, renormalisation choices); dense: say so."""
        from workbench.techniques.route import route_space

        self.refresh_about()
        loaded = self.ws.loaded_model()
        if loaded is None:
            self.space = None
            self.controls.layout.display = "none"
            self.status.value = render_note(
                "Load a Mixture-of-Experts model (e.g. tiny-moe) to route its experts."
            )
            return
        try:
            space = route_space(loaded.model)
        except ConfigError:
            self.space = None
            self.controls.layout.display = "none"
            from workbench.techniques import technique_names

            has_moefy = "moefy" in technique_names()
            text = "This model has no experts (no Mixture-of-Experts layers), so there is nothing to route."
            if has_moefy:
                text += " Convert it into a Mixture-of-Experts model with moefy, then route the result."
            self.status.value = render_note(text, "warn")
            self.moefy_button.layout.display = "" if has_moefy else "none"
            return
        self.space = space
        self.moefy_button.layout.display = "none"
        self.controls.layout.display = ""
        self._syncing = True
        try:
            _set_range(self.k, space.ks[0], space.ks[-1], space.default_k)
            self.k.disabled = not space.settable
            labels = {"model": "model's rule", True: "renormalise", False: "no renormalising"}
            self.renormalize.options = [(labels[c], c) for c in space.renormalize]
            self.renormalize.value = "model"
            low, high = max(1, space.default_k), max(1, space.default_k, space.n_experts - 1)
            _set_range(self.prune_keep, low, high, min(high, max(low, (3 * space.n_experts) // 4)))
            dynamic = [
                m
                for m in MODES
                if m[1] == "k"
                or (m[1] == "budget" and space.settable)
                or (m[1] in ("top_p", "skip") and space.dynamic)
            ]
            self.mode.options = dynamic
            self.mode.value = "k"
        finally:
            self._syncing = False
        layers = ", ".join(str(i) for i in space.moe_layers)
        note = (
            f"{space.n_experts} experts per MoE layer (layers {layers}); the model routes each token to "
            f"{space.default_k}."
        )
        if space.reason:
            note += " " + space.reason
        if not space.dynamic:
            note += " Dynamic routing (top-p, skipping) is not available for this router."
        self.status.value = render_note(note)
        self._show_mode()

    def refresh_about(self) -> None:
        """How the loaded model was made and how good it is, when moefy made it (else nothing)."""
        from workbench.models.demo_moe import quality_summary
        from workbench.moefy import moe_blocks

        loaded = self.ws.loaded_model()
        summary = None
        if loaded is not None and moe_blocks(loaded.model):  # the registry is read only for converted models
            runs = self.ws.runs_frame(model=self.ws.fingerprint, suite=self.ws.suite_filter)
            summary = quality_summary(loaded.model, source=str(loaded.spec.source), runs=runs)
        self.summary = summary
        self.about.value = "" if summary is None else _summary_html(summary)
        self.recover_box.layout.display = "none" if summary is None else ""

    def _show_mode(self) -> None:
        mode = self.mode.value
        self.k.layout.display = "" if mode == "k" else "none"
        self.top_p.layout.display = "" if mode == "top_p" else "none"
        self.skip_beta.layout.display = "" if mode == "skip" else "none"
        self.budget.layout.display = "" if mode == "budget" else "none"
        self.per_layer.disabled = mode == "budget"  # the budget chooses every layer's k

    # ---- configs and runs -----------------------------------------------------------------------------

    def config(self, k: int | None = None) -> Any:
        """The ``route`` config of the controls (or of ``k`` in fixed-k mode)."""
        from workbench.techniques import make_config

        params: dict[str, Any] = {"renormalize": self.renormalize.value}
        if self.mode.value == "budget":
            return make_config("route", budget=float(self.budget.value), **params)
        per_layer = parse_per_layer(self.per_layer.value)
        if per_layer:
            params["k_per_layer"] = per_layer
        if self.mode.value == "k":
            params["k"] = int(self.k.value if k is None else k)
        elif self.mode.value == "top_p":
            params["top_p"] = float(self.top_p.value)
        else:
            params["skip_beta"] = float(self.skip_beta.value)
        return make_config("route", **params)

    def _auto_submit(self) -> None:
        if not self._syncing and self.space is not None:
            self.submit()

    def _run(self, pipeline: list[Any]) -> Any:
        self.errors.clear()
        self.message.value = ""
        try:
            found = self.ws.answer_now(pipeline)
            if found is not None:
                self._show_result(found)
                return None
            return self.app.run(
                pipeline, progress_bar=self.progress, errors=self.errors, on_result=self._on_result
            )
        except ConfigError as err:
            self.errors.show(err)
            return None

    def submit(self, k: int | None = None) -> Any:
        """Evaluate the routing the controls describe; bad settings show why and run nothing."""
        try:
            config = self.config(k)
        except ConfigError as err:
            self.errors.show(err)
            return None
        return self._run([config])

    def sweep(self) -> list[Any]:
        """Run as sweep: the controls' settings at every k of the slider's range (E down to 1) as fixed-k
        routing. Which configs the range means and which the registry already answers come from the workspace
        (``slider_sweep``, ``plan_sweep``); the rest go to the app's queue, which runs a request once."""
        if self.space is None:
            return []
        self.errors.clear()
        self.message.value = ""
        try:
            plan = self.ws.plan_sweep(self.ws.slider_sweep([self.config()], "route", "k"))
        except ConfigError as err:
            self.errors.show(err)
            return []
        for _steps, result in plan.found:
            self._show_result(result)
        jobs = []
        try:
            for steps in plan.to_run:
                jobs.append(
                    self.app.run(
                        steps, progress_bar=self.progress, errors=self.errors, on_result=self._on_result
                    )
                )
        except ConfigError as err:  # the registry went away meanwhile
            self.errors.show(err)
        note = f"Sweep over k: queued {len(jobs)}, found {len(plan.found)} in the registry"
        if plan.refused:
            note += f", refused {len(plan.refused)} (see the message above)"
        self.message.value = render_note(note + ".")
        if plan.first_refusal is not None:
            self.errors.show(plan.first_refusal)
        return jobs

    def prune(self) -> Any:
        """Prune to ``keep`` experts per layer by the chosen score, then evaluate."""
        from workbench.techniques import make_config

        try:
            config = make_config(
                "prune_experts", keep=int(self.prune_keep.value), method=self.prune_method.value
            )
        except ConfigError as err:
            self.errors.show(err)
            return None
        return self._run([config, make_config("route")])  # route (as built) records the load after pruning

    def balance(self) -> Any:
        """Fit the post-hoc balancing bias, then evaluate (the heatmaps show the load before and after)."""
        from workbench.techniques import make_config

        return self._run([make_config("balance_experts"), make_config("route")])

    def recover(self) -> Any:
        """Recovery of a converted model at the slider's k: ``route k → distill`` (recovery_pipeline)."""
        from workbench.techniques.moefy import recovery_pipeline

        try:
            pipeline = recovery_pipeline(int(self.k.value), int(self.recover_steps.value))
        except ConfigError as err:
            self.errors.show(err)
            return None
        return self._run(pipeline)

    def moefy(self) -> Any:
        from workbench.techniques import make_config

        return self._run([make_config("moefy")])

    def _on_result(self, job: Any) -> None:
        if job.result is not None:
            self._show_result(job.result)

    def _show_result(self, result: Any) -> None:
        self.results.append(result)
        routing = (result.extras or {}).get("routing")
        if routing is None:  # a stacked run's stages keep their extras under stage<i>_routing
            routing = next((v for key, v in (result.extras or {}).items() if key.endswith("_routing")), None)
        if isinstance(routing, dict) and routing.get("load"):
            self.load_matrix = routing["load"]
            fig = self._heatmap_figure(routing.get("layers"))
            with self.heatmap.batch_update():
                self.heatmap.data = []
                self.heatmap.add_traces(fig.data)
                self.heatmap.layout = fig.layout
        before = next(
            (
                v
                for key, v in (result.extras or {}).items()
                if isinstance(v, dict)
                and v.get("load_before")
                and key.endswith(("prune_experts", "balance_experts"))
            ),
            None,
        )
        self.before_matrix = before["load_before"] if before else []
        if before:
            fig = expert_load_figure_for(self.before_matrix, before.get("layers"), "Expert load before")
            with self.before_heatmap.batch_update():
                self.before_heatmap.data = []
                self.before_heatmap.add_traces(fig.data)
                self.before_heatmap.layout = fig.layout
        self.before_box.layout.display = "" if before else "none"
        if result.status == "done":
            active = result.metrics.get("active_experts")
            extra = f" · {active:.2f} active experts per token" if active is not None else ""
            how = "found in the registry" if result.reused else "evaluated and recorded"
            self.message.value = render_note(
                f"Run {result.run_id} · {html.escape(result.label)}: {how}{extra}.", "ok"
            )
        elif result.status == "interrupted":
            self.message.value = render_note(f"Run {result.run_id}: stopped.", "warn")

    # ---- figures ----------------------------------------------------------------------------------------

    def _heatmap_figure(self, layers: list[int] | None = None) -> go.Figure:
        from workbench.views import expert_load_figure

        return expert_load_figure(
            self.load_matrix, layers=layers, title_text="Expert load (share of routed picks per layer)"
        )

    def frame(self) -> pd.DataFrame:
        """Routing and pruning runs (and the baseline) of the loaded model on the current suite."""
        frame = self.ws.runs_frame(model=self.ws.fingerprint, suite=self.ws.suite_filter)
        if frame.empty:
            return frame
        return frame[frame["technique"].isin(TECHNIQUES)]

    def _figure(self) -> go.Figure:
        from workbench.views import tradeoff_figure

        frame = self.frame()
        if not frame.empty and self.x_axis.value not in frame.columns:
            frame = frame.iloc[0:0]
        return tradeoff_figure(frame, x=self.x_axis.value, y=self.y_axis.value)


register_tab(Tab("Route experts", attr="route", build=RoutePanel, order=20))

__all__ = ["RoutePanel", "parse_per_layer"]
