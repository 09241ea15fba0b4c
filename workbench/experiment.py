"""One run: load (cached) -> check -> apply the pipeline to a copy -> evaluate -> record.

``run_experiment`` is the single entry point the CLI, the panels and sweeps use. A run with the same model
fingerprint, pipeline and suite that is already ``done`` in the registry is returned at once instead of being
recomputed, so a slider moved back answers immediately. Bad input raises :class:`ConfigError` before any heavy
work and before anything is recorded; a run that then fails is recorded ``failed`` with its error, one that is
cancelled ``interrupted``; no earlier run is touched.
"""

from __future__ import annotations

import copy
import os
import platform
import socket
import threading
import time
import traceback
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from workbench.errors import ConfigError, RunInterrupted, WorkbenchError
from workbench.prefix_cache import PrefixCache, PrefixKey, default_prefix_cache
from workbench.progress import Progress, ProgressCallback, as_progress
from workbench.techniques.base import (
    ApplyContext,
    StageRecord,
    apply_pipeline_,
    check_pipeline,
    config_from_dict,
    describe_pipeline,
    merge_stages,
    pipeline_to_json,
    technique_for,
)

if TYPE_CHECKING:
    from typing_extensions import Self

# How often a running run tells the registry it is alive; a run whose heartbeat is older than a few periods
# (on another host, where its pid cannot be checked) is considered dead and marked interrupted.
HEARTBEAT_S = 10.0


@dataclass
class RunResult:
    """What one call of :func:`run_experiment` produced (or found again in the registry)."""

    run_id: int | None
    status: str  # done | failed | interrupted
    metrics: dict[str, float] = field(default_factory=dict)
    error: str | None = None
    reused: bool = False
    generations: list[dict[str, str]] = field(default_factory=list)
    label: str = "baseline"
    model_fingerprint: str = ""
    extras: dict[str, Any] = field(default_factory=dict)
    parent_id: int | None = None

    @property
    def ok(self) -> bool:
        return self.status == "done"


def find_recorded(loaded: Any, pipeline: Any, suite: Any, registry: Any) -> RunResult | None:
    """The done run of this loaded model, pipeline and suite in ``registry`` (a :class:`Registry`), as a reused
    :class:`RunResult`, or None.

    The lookup :func:`run_experiment` makes before any work; a UI can make it on its own thread to answer a
    setting measured before at once, without waiting for a queue.
    """
    from workbench.evaluate import get_suite

    steps = _as_pipeline(pipeline)
    hit = registry.find_done(loaded.fingerprint, pipeline_to_json(steps), get_suite(suite).key)
    if hit is None:
        return None
    extras = dict(hit.extras or {})
    return RunResult(
        run_id=hit.id,
        status="done",
        metrics=dict(hit.metrics),
        reused=True,
        generations=list(extras.get("generations", [])),
        label=describe_pipeline(steps),
        model_fingerprint=loaded.fingerprint,
        extras=extras,
        parent_id=hit.parent_id,
    )


def _recorded_prefix(loaded: Any, steps: Sequence[Any], suite: Any, registry: Any) -> int | None:
    """The done run of the longest proper prefix of ``steps`` (same model and suite): a stacked run's parent."""
    for k in range(len(steps) - 1, 0, -1):
        hit = registry.find_done(loaded.fingerprint, pipeline_to_json(steps[:k]), suite.key)
        if hit is not None:
            return hit.id
    return None


def _as_pipeline(pipeline: Any) -> list[Any]:
    if pipeline is None:
        return []
    if not isinstance(pipeline, (list, tuple)):
        pipeline = [pipeline]
    out = []
    for step in pipeline:
        out.append(config_from_dict(step) if isinstance(step, Mapping) else step)
    for step in out:
        technique_for(step)  # unknown config types fail here, before anything loads
    return out


def environment(device: Any = None) -> dict[str, Any]:
    """Library versions and the machine a run ran on (and the device it ran on), stored with every run."""
    import torch
    import transformers

    import workbench

    env: dict[str, Any] = {
        "workbench": workbench.__version__,
        "device": str(device) if device is not None else "cpu",
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "threads": torch.get_num_threads(),
        "cuda": torch.cuda.is_available(),
        "host": socket.gethostname(),
        "pid": os.getpid(),
    }
    import sys

    for name in ("bitsandbytes", "optimum.quanto", "gguf"):
        module = sys.modules.get(name)
        if module is not None:
            env[name] = getattr(module, "__version__", "?")
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(0)
    return env


class _Heartbeat:
    """Touches the run's heartbeat from a daemon thread while the run works."""

    def __init__(self, registry: Any, run_id: int, period: float = HEARTBEAT_S) -> None:
        self._registry, self._run_id, self._period = registry, run_id, period
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"heartbeat-{run_id}", daemon=True)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=2)

    def _loop(self) -> None:
        while not self._stop.wait(self._period):
            try:
                self._registry.heartbeat(self._run_id)
            except WorkbenchError:
                pass  # a missed heartbeat only delays stale detection; the run itself goes on


def _open_registry(registry: Any) -> Any:
    from workbench.registry import Registry

    if registry is None or isinstance(registry, str):
        return Registry.open(registry)
    return registry


def run_experiment(
    model: Any,
    pipeline: Any = (),
    suite: Any = "quick",
    *,
    registry: Any = None,
    progress: Progress | ProgressCallback | None = None,
    tags: Sequence[str] = (),
    notes: str = "",
    parent_id: int | None = None,
    reuse: bool = True,
    seed: int = 0,
    prefix_cache: PrefixCache | bool | None = None,
) -> RunResult:
    """Run one experiment and record it.

    Args:
        model: a model spec (``"demo"``, a Hugging Face id, a folder, a ``.gguf`` file, a
            :class:`~workbench.models.ModelSpec`) or an already loaded :class:`~workbench.models.LoadedModel`.
        pipeline: technique configs applied in order (a single config is a one-step pipeline); the empty
            pipeline is the baseline. Stored dicts (``{"technique", "version", "params"}``) are accepted.
        suite: ``"quick"``, ``"standard"`` or a :class:`~workbench.evaluate.Suite`.
        registry: a :class:`~workbench.registry.Registry`, a SQLAlchemy URL, or None for the default.
        progress: a :class:`Progress` (cancel it to stop the run) or a ``callback(fraction, message)``.
        parent_id: the run this one builds on; None: for a stacked pipeline, the done run of its longest
            prefix (same model and suite) when there is one.
        reuse: return a matching ``done`` run from the registry instead of recomputing.
        prefix_cache: where the model after ``pipeline[:-1]`` is kept, so that a run differing only in its last
            step starts from it (a :class:`~workbench.prefix_cache.PrefixCache`); None: the process's cache;
            False: none.

    Every step is checked before anything is recorded, on the shapes the earlier steps will produce; a step
    whose check needs an earlier step's real output is checked just before it runs (the run is then
    recorded ``failed``, never ``done``). Numbers a technique reports in ``ctx.metrics`` join the run's
    metrics, its ``ctx.extras`` the run's extras (a name several steps report gets a ``stage<i>_`` prefix),
    and ``extras["stages"]`` lists each step's technique, metrics, seconds and whether it was reused.

    Raises:
        ConfigError: bad input (unknown model or technique, parameters the model cannot take), before any
            heavy work and before anything is recorded.
    """
    from workbench.evaluate import get_suite
    from workbench.registry import Registry

    progress = as_progress(progress)
    steps = _as_pipeline(pipeline)
    suite = get_suite(suite)
    _ = suite.key  # reads the suite's text: a missing or non-UTF-8 file fails here, before the model loads
    if prefix_cache is None or prefix_cache is True:
        cache: PrefixCache | None = default_prefix_cache()
    elif prefix_cache is False:
        cache = None
    elif isinstance(prefix_cache, PrefixCache):
        cache = prefix_cache
    else:
        raise ConfigError(f"prefix_cache={prefix_cache!r}; pass a PrefixCache, None (the default) or False.")
    owned = not isinstance(registry, Registry)
    reg = _open_registry(registry)
    try:
        return _run(model, steps, suite, reg, progress, tags, notes, parent_id, reuse, seed, cache)
    finally:
        if owned:
            reg.close()


def _run(
    model: Any,
    steps: list[Any],
    suite: Any,
    reg: Any,
    progress: Progress,
    tags: Sequence[str],
    notes: str,
    parent_id: int | None,
    reuse: bool,
    seed: int,
    cache: PrefixCache | None,
) -> RunResult:
    from workbench.corpus import get_corpus
    from workbench.evaluate import evaluate
    from workbench.evaluation.suites import check_suite_text
    from workbench.models import LoadedModel, load_model
    from workbench.techniques._calibration import check_text_needs

    label = describe_pipeline(steps)
    pipeline_json = pipeline_to_json(steps)
    n = len(steps)

    loaded = model if isinstance(model, LoadedModel) else load_model(model, progress=progress.span(0.0, 0.1))
    if reuse:
        found = find_recorded(loaded, steps, suite, reg)
        if found is not None:
            progress.update(1.0, "found in the registry")
            return found
    corpus = get_corpus(suite.corpus) if steps else None
    device = str(loaded.spec.device)

    def key(prefix: Sequence[Any]) -> PrefixKey:
        # Everything a prefix's result depends on: calibrated steps read the suite's corpus, seeded ones the seed.
        corpus_key = corpus.key if corpus is not None else ""
        return PrefixCache.key(loaded, prefix, device=device, corpus_key=corpus_key, seed=seed)

    start = cache.longest(steps, key) if cache is not None and n > 1 else 0
    check_model = cache.peek(key(steps[:start])) if cache is not None and start else None
    if check_model is None:
        start, check_model = 0, loaded.model
    # ConfigError here: nothing is recorded, nothing heavy has run. Every step is checked, each on the shapes
    # the steps before it will produce (a cached prefix is its real output).
    check_pipeline(check_model, steps, start=start)
    del check_model
    # The text is input too: a suite's evaluation part shorter than one chunk, or calibration / training text
    # shorter than a step's windows, is refused here, before a run is recorded.
    check_suite_text(loaded.tokenizer, suite)
    if corpus is not None:
        check_text_needs(steps, loaded.tokenizer, corpus)
    if parent_id is None and n > 1:
        parent_id = _recorded_prefix(loaded, steps, suite, reg)

    record: dict[str, Any] = {
        "model_fingerprint": loaded.fingerprint,
        "model_description": loaded.description,
        "pipeline_json": pipeline_json,
        "pipeline_label": label,
        "suite_key": suite.key,
        "suite_name": suite.name,
        "environment": environment(_model_device(loaded.model)),
        "parent_id": parent_id,
        "tags": tuple(tags),
        "notes": notes,
    }
    # A claim on (model, pipeline, suite): when the same run is being computed right now (by another process,
    # thread or machine), wait for it and reuse its result instead of computing it twice. A claim whose run
    # fails or whose process dies is claimed again (wait_for_run notices a dead one).
    run_id, owned = reg.claim_run(**record) if reuse else (reg.start_run(**record), True)
    while not owned:
        try:
            progress.update(0.1, f"waiting for run {run_id}: the same run is being computed elsewhere")
            other = reg.wait_for_run(run_id, check=progress.check)
        except RunInterrupted as err:
            return RunResult(
                None, "interrupted", error=str(err), label=label, model_fingerprint=loaded.fingerprint
            )
        found = find_recorded(loaded, steps, suite, reg) if other.status == "done" else None
        if found is not None:
            progress.update(1.0, "found in the registry")
            return found
        run_id, owned = reg.claim_run(**record)
    extras: dict[str, Any] = {}
    stages: list[StageRecord] = []
    try:
        with _Heartbeat(reg, run_id):
            t0 = time.perf_counter()
            if steps:
                taken = cache.take(key(steps[:start])) if cache is not None and start else None
                if taken is None:  # no prefix held (or evicted since the lookup): start from the base model
                    start, work = 0, copy.deepcopy(loaded.model)
                else:
                    work, stages = taken
                ctx = ApplyContext(
                    tokenizer=loaded.tokenizer,
                    corpus=corpus,
                    base=loaded.model,
                    model_spec=loaded.spec,
                    device=device,
                    seed=seed,
                    progress=progress.span(0.1, 0.55),
                    stages=stages,
                )

                def keep_prefix(i: int, current: Any) -> None:
                    # The model before the last step is what a run differing only in that step starts from.
                    if cache is not None and i == n - 2:
                        cache.put(key(steps[: i + 1]), current, list(ctx.stages), steps[: i + 1])

                work = apply_pipeline_(work, steps, ctx, start=start, after_step=keep_prefix)
                if cache is not None and technique_for(steps[-1]).kind != "deploy":
                    # The whole pipeline's model too: the same variant measured in a runtime next (the
                    # pipeline plus a deploy step) starts from it instead of quantizing again.
                    cache.put(key(steps), work, list(ctx.stages), steps)
            else:
                work = (
                    loaded.model
                )  # the baseline evaluates the loaded model itself; evaluation does not modify it
            apply_s = time.perf_counter() - t0
            result = evaluate(
                work,
                loaded.tokenizer,
                suite,
                base_model=loaded.model,
                base_fingerprint=loaded.fingerprint,
                progress=progress.span(0.55 if steps else 0.1, 1.0),
            )
            metrics = dict(result.metrics)
            metrics["apply_seconds"] = apply_s
            # What the techniques report about their own work; a name the evaluation measures keeps the
            # evaluation's value and the technique's gets its stage prefix.
            metrics.update(merge_stages(stages, "metrics", reserved=tuple(metrics)))
            extras.update(merge_stages(stages, "extras", reserved=("generations", "stages")))
            if stages:
                extras["stages"] = [stage.summary() for stage in stages]
            extras["generations"] = list(result.generations)
            reg.finish_run(run_id, metrics, extras=extras)
            del work
        return RunResult(
            run_id,
            "done",
            metrics,
            None,
            False,
            list(result.generations),
            label,
            loaded.fingerprint,
            extras,
            parent_id,
        )
    except RunInterrupted as err:
        reg.fail_run(run_id, str(err), status="interrupted")
        return RunResult(
            run_id,
            "interrupted",
            error=str(err),
            label=label,
            model_fingerprint=loaded.fingerprint,
            parent_id=parent_id,
        )
    except KeyboardInterrupt:
        reg.fail_run(run_id, "Interrupted (KeyboardInterrupt).", status="interrupted")
        raise
    except Exception as err:  # noqa: BLE001 (recorded, never lost: the message for the user, the traceback for debugging)
        message = str(err) if isinstance(err, WorkbenchError) else f"{type(err).__name__}: {err}"
        failing = len(stages)  # the step that raised: stages holds one record per step finished
        if n > 1 and failing < n and not message.startswith("Step "):
            message = f"Step {failing + 1} of {n} ({technique_for(steps[failing]).name}): {message}"
        reg.fail_run(run_id, message + "\n\n" + traceback.format_exc(limit=8), status="failed")
        return RunResult(
            run_id,
            "failed",
            error=message,
            label=label,
            model_fingerprint=loaded.fingerprint,
            parent_id=parent_id,
        )


def _model_device(model: Any) -> Any:
    """The device of the model's first parameter (where a run's compute happened)."""
    try:
        return next(model.parameters()).device
    except (StopIteration, AttributeError):
        return None


__all__ = ["RunResult", "environment", "find_recorded", "run_experiment"]
