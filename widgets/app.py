"""The Workbench app: one notebook cell, ``Workbench()``, shows everything.

    from widgets import Workbench
    Workbench()                                   # demo model, ./workbench-runs.db, quick suite
    Workbench("sqlite:///team.db", model="tiny-llama")

Layout, top to bottom: a settings row (registry URL, evaluation suite, export folder: set here once, used by
every panel), the model bar (spec, Load, what was loaded), a first-run box while the registry is empty, and tabs:
one per panel file in ``widgets/panels/`` (Quantize, Route experts, Distill, Compare; see
:func:`widgets.panels.tabs`).

The app holds no numbers and makes no decisions: it builds widgets over a :class:`~workbench.workspace.Workspace`
(``app.workspace``: registry, suite, loaded model, run queue, parameter spaces), which decides. Panels reach the
app only through :class:`widgets.panels.PanelHost`. The back end is injectable for tests and for other front
ends: ``runner`` defaults to :func:`workbench.experiment.run_experiment` and ``loader`` to
:func:`workbench.models.load_model`.
"""

from __future__ import annotations

import html
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import ipywidgets as W
import pandas as pd

from widgets.common import (
    ErrorArea,
    ProgressBar,
    RegistryWatcher,
    fit_narrow_windows,
    fit_plots_when_shown,
    render_note,
)
from widgets.jobs import Job, Jobs

Runner = Callable[..., Any]
Loader = Callable[..., Any]

DEFAULT_MODELS = ("demo", "tiny-llama", "tiny-moe")


def _suite_options(suite: Any) -> list[tuple[str, Any]]:
    """The named suites, plus ``suite`` itself when it is a custom :class:`~workbench.evaluate.Suite` object."""
    from workbench.evaluate import SUITES

    options: list[tuple[str, Any]] = [(name, name) for name in SUITES]
    if not isinstance(suite, str):
        options.append((f"{suite.name} (custom)", suite))
    return options


class Workbench(W.VBox):
    """The whole workbench as one widget; see the module docstring.

    Args:
        registry: a SQLAlchemy URL or file path, a :class:`~workbench.registry.Registry`, or None for the default
            (``$WORKBENCH_REGISTRY`` or ``./workbench-runs.db``).
        model: the model spec in the model bar (``"demo"``, ``"tiny-llama"``, a Hugging Face id, a folder, a
            ``.gguf`` file).
        suite: the evaluation suite every panel uses (``"quick"``, ``"standard"`` or a custom ``Suite``).
        runner, loader: the back end (defaults: ``run_experiment`` and ``load_model``).
        export_dir: where Compare writes exports.
        poll_interval: seconds between registry checks (runs from other processes appear); 0 turns polling off.
        load: start loading ``model`` in the background right away.
    """

    def __init__(
        self,
        registry: Any = None,
        *,
        model: str = "demo",
        suite: Any = "quick",
        runner: Runner | None = None,
        loader: Loader | None = None,
        export_dir: str | Path = "exports",
        poll_interval: float = 2.0,
        load: bool = False,
    ) -> None:
        from workbench.workspace import NO_REGISTRY, Workspace

        self.workspace = Workspace(
            NO_REGISTRY, model=model, suite=suite, runner=runner, loader=loader, queue=Jobs()
        )

        # Settings row: the one place for registry, suite and export folder.
        self.settings_errors = ErrorArea()
        self.registry_url = W.Text(
            description="Registry",
            layout=W.Layout(width="420px"),
            tooltip="SQLAlchemy URL or file path of the run registry",
        )
        self.open_registry_button = W.Button(
            description="Open", tooltip="Open this registry", layout=W.Layout(width="70px")
        )
        self.open_registry_button.on_click(lambda _b: self.open_registry(self.registry_url.value))
        self.suite_picker = W.Dropdown(
            options=_suite_options(suite),
            value=suite,
            description="Suite",
            tooltip="Evaluation suite used by every run",
            layout=W.Layout(width="200px"),
        )
        self.export_dir = W.Text(
            value=str(export_dir),
            description="Exports",
            layout=W.Layout(width="260px"),
            tooltip="Folder where Compare writes tables and plots",
        )
        settings = W.VBox(
            [
                W.HBox([self.registry_url, self.open_registry_button, self.suite_picker, self.export_dir]),
                self.settings_errors,
            ]
        )

        # Model bar.
        self.model_box = W.Combobox(
            value=model,
            options=DEFAULT_MODELS,
            description="Model",
            placeholder="demo, tiny-llama, org/name, a folder or a .gguf file",
            ensure_option=False,
            layout=W.Layout(width="420px"),
        )
        self.load_button = W.Button(
            description="Load", icon="download", button_style="primary", layout=W.Layout(width="90px")
        )
        self.load_button.on_click(lambda _b: self.load())
        self.model_info = W.HTML(render_note("No model loaded yet: press Load (runs load it too)."))
        self.model_progress = ProgressBar()
        self.model_errors = ErrorArea()
        model_bar = W.VBox(
            [
                W.HBox([self.model_box, self.load_button, self.model_progress]),
                self.model_info,
                self.model_errors,
            ]
        )

        # First-run box: one click records the baseline every comparison needs.
        self.baseline_button = W.Button(
            description="Run baseline",
            icon="play",
            button_style="success",
            tooltip="Evaluate the unmodified model and record it",
            layout=W.Layout(width="220px", height="48px"),
        )
        self.baseline_button.on_click(lambda _b: self.run_baseline())
        self.baseline_progress = ProgressBar()
        self.baseline_errors = ErrorArea()
        self.first_run = W.VBox(
            [
                W.HTML(
                    "<h3 style='margin:4px 0'>Welcome: the registry has no runs yet</h3>"
                    "<p>Start with the baseline: the unmodified model evaluated on the suite. Every quantized "
                    "variant is then measured against it (KL divergence, same top token).</p>"
                ),
                W.HBox([self.baseline_button, self.baseline_progress]),
                self.baseline_errors,
            ],
            layout=W.Layout(border="2px solid #2e7d32", padding="8px", margin="6px 0"),
        )

        self.status = W.HTML("")
        self.jobs.on_change(self._show_status)
        self.workspace.on_model_loaded(self._show_model)
        self.workspace.on_listener_error = lambda err: self.model_errors.show(err)
        self.model_box.observe(self._on_spec, names="value")
        self.suite_picker.observe(self._on_suite, names="value")

        self.watcher = RegistryWatcher(
            lambda: self.workspace.registry if self.workspace.has_registry else None, interval=poll_interval
        )
        self.watcher.on_error = lambda err: self.settings_errors.show(err)
        self.watcher.subscribe(self._update_first_run)

        try:
            self._set_registry(registry)
        except Exception as err:  # noqa: BLE001 - a bad URL is shown, the app still opens
            self.settings_errors.show(err)
            self.registry_url.value = "" if registry is None else str(registry)

        from widgets.panels import tabs

        # One tab per panel file; each panel is also kept as app.<attr> (app.quantize, app.compare).
        self.panels: dict[str, W.Widget] = {}
        for tab in tabs():
            panel = tab.build(self)
            setattr(self, tab.attr, panel)
            self.panels[tab.attr] = panel
        self.tabs = W.Tab(children=list(self.panels.values()))
        self.tabs.titles = tuple(tab.title for tab in tabs())

        super().__init__(
            [
                W.HTML("<h2 style='margin:4px 0'>Efficiency Workbench</h2>"),
                settings,
                model_bar,
                self.first_run,
                self.status,
                self.tabs,
            ]
        )
        fit_narrow_windows(self)
        fit_plots_when_shown(self.tabs)
        self.suite_picker.observe(lambda _c: self.watcher.notify(), names="value")
        self.refresh()
        self.watcher.start()
        if load:
            self.load()

    # ---- registry -------------------------------------------------------------------------------------

    # ---- the workspace, read through (the PanelHost interface) ------------------------------------------

    @property
    def jobs(self) -> Any:
        """The run queue (``workspace.queue``): ``jobs.wait()`` in tests and scripts."""
        return self.workspace.queue

    @property
    def runner(self) -> Any:
        return self.workspace.runner

    @property
    def loader(self) -> Any:
        return self.workspace.loader

    @property
    def loaded(self) -> Any:
        """The LoadedModel in use (set on the worker thread), or None."""
        return self.workspace.loaded

    @property
    def last_result(self) -> Any:
        return self.workspace.last_result

    @last_result.setter
    def last_result(self, value: Any) -> None:
        self.workspace.last_result = value

    @property
    def registry(self) -> Any:
        """The open Registry; ConfigError (saying what to do) when none is open."""
        return self.workspace.registry

    def _set_registry(self, registry: Any) -> None:
        self.workspace.open_registry(registry)
        self.registry_url.value = self.workspace.registry_url
        self.watcher.reset()

    def open_registry(self, url: str) -> bool:
        """Switch every panel to the registry at ``url``; a bad URL is shown and the old one kept."""
        try:
            self._set_registry(url.strip() or None)
        except Exception as err:  # noqa: BLE001 - RegistryError says what is wrong; others are shown folded
            self.settings_errors.show(err)
            return False
        self.settings_errors.clear()
        self.refresh()
        return True

    def runs_frame(self, **filters: Any) -> pd.DataFrame:
        """``workspace.runs_frame`` for the views (done runs; stale ones are marked when the registry opens)."""
        return self.workspace.runs_frame(**filters)

    @property
    def suite(self) -> Any:
        """The suite runs use: a name, or the custom Suite object given to the app."""
        return self.workspace.suite

    @property
    def suite_filter(self) -> str:
        """What ``runs_frame(suite=...)`` matches: the name of a named suite, the key of a custom one."""
        return self.workspace.suite_filter

    @property
    def fingerprint(self) -> str | None:
        """The fingerprint of the model in use, once it is loaded (panels filter their plots by it)."""
        return self.workspace.fingerprint

    def _on_spec(self, _change: Any) -> None:
        self.workspace.model_spec = str(self.model_box.value or "").strip()

    def _on_suite(self, _change: Any) -> None:
        self.workspace.suite = self.suite_picker.value

    # ---- the model ------------------------------------------------------------------------------------

    def on_model_loaded(self, listener: Callable[[Any], None]) -> None:
        """Call ``listener(loaded)`` on the worker thread after a (different) model is loaded."""
        self.workspace.on_model_loaded(listener)

    def _show_model(self, loaded: Any) -> None:
        size = loaded.size
        self.model_info.value = (
            f"<b>{html.escape(str(loaded.description))}</b><br>"
            f"{size.n_params:,} parameters · {size.size_mb:.1f} MB · {size.bits_per_weight:.2f} bits per weight · "
            f"fingerprint <code>{html.escape(str(loaded.fingerprint))}</code>"
        )
        self.watcher.notify()

    def load(self) -> Job:
        """Load the model named in the model bar, in the background."""
        self.model_errors.clear()

        def done(job: Job) -> None:
            self.model_progress.finish(job)
            if job.error is not None and job.status != "cancelled":
                self.model_errors.show(job.error, None if _user_error(job.error) else job.traceback)

        return self.workspace.submit_load(
            on_done=done, on_start=self.model_progress.attach, on_progress=self.model_progress.report
        )

    # ---- runs -----------------------------------------------------------------------------------------

    def run(
        self,
        pipeline: Sequence[Any],
        *,
        label: str = "",
        progress_bar: ProgressBar | None = None,
        errors: ErrorArea | None = None,
        on_result: Callable[[Any], None] | None = None,
        tags: Sequence[str] = (),
        on_partial: Callable[[dict[str, Any]], None] | None = None,
    ) -> Job:
        """Evaluate ``pipeline`` on the model in the model bar with the chosen suite, in the background.

        ``on_partial(metrics)`` receives provisional metrics while the run evaluates (see ``Progress``).

        The same work already queued or running is not queued again (the same job comes back); a pipeline
        already in the registry is answered by the runner's lookup at once.
        """
        bar = progress_bar
        if errors is not None:
            errors.clear()

        def done(job: Job) -> None:
            result = job.result
            if bar is not None:
                # run_experiment reports a stopped or failed run in its result instead of raising.
                ended = {"interrupted": "cancelled", "failed": "failed"}.get(getattr(result, "status", ""))
                bar.finish(job, ended)
            if result is not None:
                if errors is not None and getattr(result, "error", None):
                    # A failed run says why in one line; the stored error has the traceback.
                    errors.show(f"Run {result.run_id} {result.status}: {_first_line(result.error)}")
            elif job.error is not None and errors is not None and job.status != "cancelled":
                errors.show(job.error, None if _user_error(job.error) else job.traceback)
            if on_result is not None:
                on_result(job)
            self.watcher.poke()

        return self.workspace.submit_run(
            pipeline,
            label=label,
            tags=tags,
            on_done=done,
            on_start=bar.attach if bar is not None else None,
            on_progress=bar.report if bar is not None else None,
            on_partial=on_partial,
        )

    def run_baseline(self) -> Job:
        """The first-run button: evaluate the unmodified model and record it."""
        return self.run(
            [], label="baseline", progress_bar=self.baseline_progress, errors=self.baseline_errors
        )

    # ---- refresh and status ---------------------------------------------------------------------------

    def refresh(self) -> None:
        """Redraw every panel from the registry now (the watcher does this by itself on changes)."""
        self.watcher.notify()

    def _update_first_run(self) -> None:
        try:
            empty = self.registry.runs_frame(status="done").empty
        except Exception:  # noqa: BLE001 - no registry: the settings row already says so
            empty = True
        self.first_run.layout.display = "flex" if empty else "none"

    def _show_status(self) -> None:
        current, pending = self.jobs.current, len(self.jobs.pending)
        if current is None and not pending:
            self.status.value = ""
            return
        parts = [f"running: {html.escape(current.label)}"] if current is not None else []
        if pending:
            parts.append(f"{pending} queued")
        self.status.value = "<span style='color:#555'>" + " · ".join(parts) + "</span>"

    def close(self) -> None:
        """Stop the registry watcher and the worker, close the registry if the app opened it."""
        self.watcher.stop()
        self.workspace.close()
        super().close()


def _first_line(text: str | None) -> str:
    lines = [line for line in str(text or "").strip().splitlines() if line.strip()]
    return lines[0] if lines else ""


def _user_error(err: BaseException) -> bool:
    from workbench.errors import WorkbenchError

    return isinstance(err, WorkbenchError)


__all__ = ["DEFAULT_MODELS", "Workbench"]
