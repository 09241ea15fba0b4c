"""What a front end works with, below any UI: the registry, the suite, the loaded model, a run queue, and the
decisions a panel would otherwise make itself.

    from workbench.workspace import Workspace
    with Workspace("sqlite:///runs.db", model="tiny-llama", suite="quick") as ws:
        space = ws.space("rtn")                     # what a slider offers for the loaded model (loads it)
        config = space.config(bits=3)
        ws.answer_now([config])                     # a recorded run at once, None, or ConfigError
        job = ws.submit_run([config])               # background; the same request queued twice is one job
        ws.queue.wait()

The Quantize panel, the app and ``workbench sweep`` all go through one of these, so what a panel can decide
the library can decide in code: which config a slider position means (:mod:`workbench.techniques.space`),
whether the registry already answers it (the lookup ``run_experiment`` makes first), whether the loaded model
can take it (the technique's own ``check``), and what runs next (:class:`workbench.jobs.JobQueue`). A panel's
"Run as sweep" asks it too: which pipelines one slider's whole range means (``slider_sweep``, from
:mod:`workbench.sweep`) and which of them the registry answers at once (``plan_sweep``).

Threads: ``submit_run`` work and model-loaded listeners run on the queue's worker thread; ``answer_now``,
``check`` and ``space`` run on the caller's thread and touch nothing the worker writes except ``loaded``
(one attribute, replaced whole). A workspace is not meant to be shared between processes; the registry is.
"""

from __future__ import annotations

import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from dataclasses import field as dataclass_field
from pathlib import Path
from typing import Any, Self

from workbench.errors import ConfigError, RegistryError
from workbench.jobs import Job, JobQueue

Runner = Callable[..., Any]
Loader = Callable[..., Any]


class _NoRegistry:
    """``Workspace(NO_REGISTRY)``: start without one (a front end opens it later and shows what went wrong)."""

    def __repr__(self) -> str:
        return "NO_REGISTRY"


NO_REGISTRY: Any = _NoRegistry()


def _default_runner() -> Runner:
    from workbench.experiment import run_experiment

    return run_experiment


def _default_loader() -> Loader:
    from workbench.models import load_model

    return load_model


class Workspace:
    """The registry, suite, model and run queue one front end shares between its parts; see the module docstring.

    Args:
        registry: a SQLAlchemy URL or file path, a :class:`~workbench.registry.Registry` (the caller's: it is not
            closed here), None for the default (``$WORKBENCH_REGISTRY`` or ``./workbench-runs.db``), or
            :data:`NO_REGISTRY` to open one later with :meth:`open_registry`.
        model: the model spec runs use (``"demo"``, ``"tiny-llama"``, a Hugging Face id, a folder, a ``.gguf``).
        suite: ``"quick"``, ``"standard"`` or a :class:`~workbench.evaluate.Suite`.
        runner, loader: the back end (defaults: :func:`~workbench.experiment.run_experiment` and
            :func:`~workbench.models.load_model`, which caches loaded models by spec).
        queue: the :class:`~workbench.jobs.JobQueue` background runs go to (a new one by default).
    """

    def __init__(
        self,
        registry: Any = None,
        *,
        model: str = "demo",
        suite: Any = "quick",
        runner: Runner | None = None,
        loader: Loader | None = None,
        queue: JobQueue | None = None,
    ) -> None:
        self.runner = runner or _default_runner()
        self.loader = loader or _default_loader()
        self.queue = queue if queue is not None else JobQueue()
        self.model_spec = str(model)
        self.suite = suite
        self.loaded: Any = None  # the LoadedModel last loaded (replaced whole, on the worker thread)
        self.last_result: Any = None  # the RunResult a run or an answer from the registry gave last
        self.on_listener_error: Callable[[BaseException], None] | None = None
        self._listeners: list[Callable[[Any], None]] = []
        self._registry: Any = None
        self._owns_registry = False
        self._grids: dict[str, Any] = {}  # fingerprint -> GridReport | None (detection reads weights: once)
        self._spaces: dict[tuple[str, str | None], Any] = {}
        if registry is not NO_REGISTRY:
            self.open_registry(registry)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    # ---- registry -------------------------------------------------------------------------------------

    @property
    def registry(self) -> Any:
        """The open :class:`~workbench.registry.Registry`; ConfigError when none is open."""
        if self._registry is None:
            raise ConfigError(
                "No registry is open. Enter a URL such as sqlite:///runs.db and press Open "
                "(in code: workspace.open_registry('sqlite:///runs.db'))."
            )
        return self._registry

    @property
    def has_registry(self) -> bool:
        return self._registry is not None

    def open_registry(self, registry: Any = None) -> Any:
        """Switch to ``registry`` (URL, path, Registry or None for the default) and return it.

        A URL that cannot be opened raises (RegistryError says what is wrong) and the old registry stays open.
        """
        if registry is None or isinstance(registry, (str, Path)):
            from workbench.registry import Registry

            new, owned = Registry.open(None if registry is None else str(registry)), True
        else:
            new, owned = registry, False
        old, old_owned = self._registry, self._owns_registry
        self._registry, self._owns_registry = new, owned
        if old is not None and old_owned and old is not new:
            old.close()
        return new

    @property
    def registry_url(self) -> str:
        url = getattr(self._registry, "url", None)
        return str(url) if url is not None else ("" if self._registry is None else repr(self._registry))

    def runs_frame(self, **filters: Any) -> Any:
        """``registry.runs_frame`` for views. Stale runs are marked when the registry is opened, not on every
        redraw: marking is a write, and views show ``done`` runs, which it never changes."""
        return self.registry.runs_frame(**filters, mark_stale=False)

    @property
    def suite_filter(self) -> str:
        """What ``runs_frame(suite=...)`` matches: the name of a named suite, the key of a custom one."""
        return self.suite if isinstance(self.suite, str) else str(self.suite.key)

    # ---- the model ------------------------------------------------------------------------------------

    @property
    def fingerprint(self) -> str | None:
        """The fingerprint of the loaded model (None until one is loaded)."""
        return None if self.loaded is None else self.loaded.fingerprint

    def loaded_model(self) -> Any:
        """The loaded model when it is the one ``model_spec`` names (a run would use it), else None."""
        loaded = self.loaded
        if loaded is None or str(getattr(loaded.spec, "source", "")) != self.model_spec.strip():
            return None
        return loaded

    def on_model_loaded(self, listener: Callable[[Any], None]) -> None:
        """Call ``listener(loaded)`` (on the loading thread) whenever a different model is loaded."""
        self._listeners.append(listener)

    def load(self, progress: Any = None) -> Any:
        """The LoadedModel for ``model_spec``: the one already loaded, or loaded now (``load_model`` caches)."""
        current = self.loaded_model()
        if current is not None:
            return current
        loaded = self.loader(self.model_spec.strip(), progress=progress)
        self._set_loaded(loaded)
        return loaded

    def _set_loaded(self, loaded: Any) -> None:
        previous, self.loaded = self.loaded, loaded
        if previous is loaded:
            return
        for listener in list(self._listeners):
            try:
                listener(loaded)
            except Exception as err:  # noqa: BLE001 - a listener's extra (a grid check) must not fail the load
                if self.on_listener_error is not None:
                    self.on_listener_error(err)
                else:
                    traceback.print_exc()

    def grid(self) -> Any:
        """The low-bit grid the loaded model's weights sit on (a GridReport), or None; detected once per model."""
        loaded = self.loaded_model()
        if loaded is None:
            return None
        if loaded.fingerprint not in self._grids:
            from workbench.quant_analysis import detect_grid

            self._grids[loaded.fingerprint] = detect_grid(loaded.model)
        return self._grids[loaded.fingerprint]

    # ---- parameter spaces and decisions --------------------------------------------------------------

    def space(self, technique: str) -> Any:
        """The :class:`~workbench.techniques.space.ParameterSpace` of ``technique`` for the loaded model (the
        generic one before a model is loaded); cached per technique and model."""
        from workbench.techniques.space import parameter_space

        loaded = self.loaded_model()
        key = (technique, None if loaded is None else loaded.fingerprint)
        if key not in self._spaces:
            if loaded is None:
                self._spaces[key] = parameter_space(technique)
            else:
                self._spaces[key] = parameter_space(technique, loaded.model, grid=self.grid())
        return self._spaces[key]

    def check(self, pipeline: Sequence[Any]) -> None:
        """Refuse (ConfigError) what the loaded model cannot take: every step checked on the shapes the earlier
        steps will produce, as ``run_experiment`` checks them; nothing to check before a model is loaded."""
        from workbench.techniques.base import check_pipeline

        loaded = self.loaded_model()
        steps = list(pipeline)
        if loaded is not None and steps:
            check_pipeline(loaded.model, steps)

    def find_recorded(self, pipeline: Sequence[Any]) -> Any:
        """The done run of the loaded model, ``pipeline`` and the suite in the registry, or None (also None
        before a model is loaded: its fingerprint is not known)."""
        from workbench.experiment import find_recorded

        loaded = self.loaded_model()
        if loaded is None:
            return None
        return find_recorded(loaded, list(pipeline), self.suite, self.registry)

    def answer_now(self, pipeline: Sequence[Any]) -> Any:
        """On the calling thread, without the queue: the recorded run of ``pipeline`` (a reused RunResult), or
        None when it must be run; ConfigError for settings the loaded model cannot take, or no registry.

        The same lookup and check, in the same order, as ``run_experiment`` makes before any heavy work, so a
        slider moved back answers at once even while the queue is busy. Before the model is loaded there is
        nothing to look up and the queued run does both.
        """
        _ = self.registry  # ConfigError when none is open
        try:
            result = self.find_recorded(pipeline)
        except RegistryError:
            result = None  # the queued run looks again and reports what is wrong with the registry
        if result is None:
            self.check(pipeline)
            return None
        self.last_result = result
        return result

    # ---- runs -----------------------------------------------------------------------------------------

    def run_key(self, pipeline: Sequence[Any]) -> tuple[str, ...]:
        """What makes two run requests the same work: model spec, suite and canonical pipeline."""
        from workbench.techniques import pipeline_to_json

        return ("run", self.model_spec.strip(), self.suite_filter, pipeline_to_json(list(pipeline)))

    def submit_run(
        self,
        pipeline: Sequence[Any],
        *,
        label: str = "",
        tags: Sequence[str] = (),
        on_done: Callable[[Job], None] | None = None,
        on_start: Callable[[Job], None] | None = None,
        on_progress: Callable[[float, str], None] | None = None,
        on_partial: Callable[[dict[str, Any]], None] | None = None,
    ) -> Job:
        """Queue one run of ``pipeline`` on ``model_spec`` with the suite; the same request already queued or
        running returns that job. The registry and suite are taken now (ConfigError when no registry is open).
        ``on_partial(metrics)`` hears provisional metrics while the run evaluates (a first estimate for a plot).
        """
        steps, suite, registry = list(pipeline), self.suite, self.registry

        def work(progress: Any) -> Any:
            loaded = self.load(progress.span(0.0, 0.05))
            result = self.runner(
                loaded, steps, suite, registry=registry, progress=progress.span(0.05, 1.0), tags=tuple(tags)
            )
            self.last_result = result
            return result

        return self.queue.submit(
            work,
            label=label or _label(steps),
            key=self.run_key(steps),
            on_done=on_done,
            on_start=on_start,
            on_progress=on_progress,
            on_partial=on_partial,
        )

    def submit_load(
        self,
        *,
        on_done: Callable[[Job], None] | None = None,
        on_start: Callable[[Job], None] | None = None,
        on_progress: Callable[[float, str], None] | None = None,
    ) -> Job:
        """Queue loading ``model_spec`` (a load already queued for it returns that job)."""
        spec = self.model_spec.strip()
        return self.queue.submit(
            self.load,
            label=f"load {spec}",
            key=("load", spec),
            on_done=on_done,
            on_start=on_start,
            on_progress=on_progress,
        )

    def run_now(
        self,
        pipeline: Sequence[Any],
        *,
        progress: Any = None,
        tags: Sequence[str] = (),
        notes: str = "",
        reuse: bool = True,
    ) -> Any:
        """Run ``pipeline`` on the calling thread (the command line) and return its RunResult.

        The model goes to the runner as the loaded model when it is loaded, else as its spec, so the runner
        checks the suite's text before loading anything.
        """
        model = self.loaded_model() or self.model_spec.strip()
        result = self.runner(
            model,
            list(pipeline),
            self.suite,
            registry=self.registry,
            progress=progress,
            tags=tuple(tags),
            notes=notes,
            reuse=reuse,
        )
        self.last_result = result
        return result

    def sweep_configs(self, technique: str, bits: Sequence[int] | None = None, **params: Any) -> list[Any]:
        """The configs a sweep over ``bits`` runs (all the space's widths when None), for the loaded model, each
        built and checked against it before any is returned."""
        configs = self.space(technique).sweep(bits, **params)
        for config in configs:
            self.check([config])
        return configs

    # ---- a sweep over one slider ----------------------------------------------------------------------

    def slider_values(self, technique: str, field: str) -> tuple[Any, ...]:
        """The whole range of the slider over ``field`` of ``technique`` for the loaded model, in sweep order:
        a parameter space's ``bits`` (widest first), ``group_size`` or ``symmetric``; route's ``k`` (E down to
        1); prune's ``drop`` (0 to L-1). See :func:`workbench.sweep.axis_values`."""
        from workbench.sweep import axis_values

        space = None
        if field in ("bits", "group_size", "symmetric"):
            try:
                space = self.space(technique)
            except ConfigError:
                space = None  # no parameter space: axis_values says which fields have a range
        loaded = self.loaded_model()
        return axis_values(technique, field, None if loaded is None else loaded.model, space=space)

    def slider_sweep(
        self, pipeline: Sequence[Any], technique: str, field: str, values: Sequence[Any] | None = None
    ) -> list[list[Any]]:
        """``pipeline`` at every value of one slider (``values``, else its whole range for the loaded model):
        the pipelines a panel's "Run as sweep" runs, each built (:func:`workbench.sweep.vary`: at route's k the
        dynamic settings are cleared; at ``drop`` 0 the prune step is left out, or added for other depths)."""
        from workbench.sweep import vary

        chosen = self.slider_values(technique, field) if values is None else tuple(values)
        return vary(pipeline, technique, field, chosen)

    def plan_sweep(self, pipelines: Sequence[Sequence[Any]]) -> SweepPlan:
        """Split ``pipelines`` into those the registry answers now, those to queue, and those the loaded model
        refuses (each with its ConfigError), by :meth:`answer_now`; the same pipeline twice counts once.

        Raises:
            ConfigError: no registry is open (nothing can be answered or recorded).
        """
        _ = self.registry
        plan = SweepPlan()
        seen: set[tuple[str, ...]] = set()
        for pipeline in pipelines:
            steps = list(pipeline)
            key = self.run_key(steps)
            if key in seen:
                continue
            seen.add(key)
            try:
                found = self.answer_now(steps)
            except ConfigError as err:
                plan.refused.append((steps, err))
                continue
            if found is not None:
                plan.found.append((steps, found))
            else:
                plan.to_run.append(steps)
        return plan

    def cancel_queue(self) -> list[Job]:
        """Stop the running job and drop every queued one (a sweep given up on); returns the jobs cancelled."""
        return self.queue.cancel_all()

    def close(self) -> None:
        """Stop the queue and close the registry if this workspace opened it."""
        self.queue.close()
        if self._owns_registry and self._registry is not None:
            self._registry.close()
        self._registry = None


@dataclass
class SweepPlan:
    """What :meth:`Workspace.plan_sweep` found: ``found`` (pipeline, reused RunResult) pairs the registry
    answers now, ``to_run`` pipelines to queue, ``refused`` (pipeline, ConfigError) pairs."""

    found: list[tuple[list[Any], Any]] = dataclass_field(default_factory=list)
    to_run: list[list[Any]] = dataclass_field(default_factory=list)
    refused: list[tuple[list[Any], ConfigError]] = dataclass_field(default_factory=list)

    @property
    def first_refusal(self) -> ConfigError | None:
        return self.refused[0][1] if self.refused else None


def _label(pipeline: Sequence[Any]) -> str:
    try:
        from workbench.techniques import describe_pipeline

        return describe_pipeline(list(pipeline))
    except Exception:  # noqa: BLE001 - a label is cosmetic
        return "run"


__all__ = ["NO_REGISTRY", "SweepPlan", "Workspace"]
