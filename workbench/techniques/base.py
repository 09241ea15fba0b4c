"""The technique name table: a frozen config dataclass plus one apply function, registered by name.

Pattern from torchao's ``quantize_(model, config)``: users build a config and call one verb, :func:`apply_`,
which finds the technique from ``type(config)``, runs its cheap ``check`` first and then its ``apply`` in place.
A *pipeline* is a list of configs applied in order (stacking). Pipelines are stored as JSON
``[{"technique", "version", "params"}, ...]`` and loaded back only through this table, never by importing an
arbitrary path. (In this project "registry" means the run store, so this table lives here.)

Adding a technique is one new file in ``workbench/techniques/``::

    @dataclass(frozen=True)
    class RTNConfig:
        bits: int = 4
        ...

    @register("rtn", RTNConfig, kind="quantize", check=check_rtn)
    def _apply_rtn(model, config, ctx): ...
        return model
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import inspect
import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from workbench.errors import ConfigError
from workbench.progress import Progress

# "deploy": the step runs the variant in a real runtime (llama.cpp, torch packed kernels) after exporting it; its
# apply returns a module that executes there (see workbench.runtimes). It must be the pipeline's last step.
KINDS = ("quantize", "route", "distill", "prune", "deploy", "other")


@dataclass
class StageRecord:
    """What one pipeline step reported: its own metrics and extras, and how long it took.

    ``index`` is the step's 0-based position in the pipeline; ``reused`` marks a step whose result came from
    the prefix cache (its numbers are those of the run that computed it).
    """

    index: int
    technique: str
    metrics: dict[str, float] = field(default_factory=dict)
    extras: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    reused: bool = False

    def summary(self) -> dict[str, Any]:
        """The JSON kept in a run's ``extras["stages"]`` (extras themselves are merged at the top level)."""
        return {
            "stage": self.index + 1,
            "technique": self.technique,
            "metrics": dict(self.metrics),
            "seconds": self.seconds,
            "reused": self.reused,
        }


@dataclass
class ApplyContext:
    """What an apply function may need besides the model and its config.

    ``tokenizer`` and ``corpus`` serve calibrated methods (GPTQ, AWQ, distillation), which take their text from
    ``corpus.text("calibration")`` or ``corpus.text("training")`` (disjoint from the evaluation part).
    ``base`` is the unmodified model (a teacher for distillation); it must not be modified. ``extras`` collects
    what a technique wants recorded with the run (e.g. a loss curve, expert loads) under its name; ``metrics``
    the numbers it reports about its own work. Inside :func:`apply_pipeline_` each step sees empty ``extras``
    and ``metrics`` of its own, merged afterwards (see :func:`merge_stages`), so two steps never overwrite
    each other's values.
    """

    tokenizer: Any = None
    corpus: Any = None
    base: Any = None
    # The base model's ModelSpec: a runtime step exporting to GGUF keeps the metadata of a source GGUF file.
    model_spec: Any = None
    device: str = "cpu"
    seed: int = 0
    progress: Progress = field(default_factory=Progress.null)
    extras: dict[str, Any] = field(default_factory=dict)
    # Numbers a technique reports about its own work (experts kept, active parameters, training tokens,
    # calibration seconds); run_experiment adds them to the run's metrics (metric_* columns).
    metrics: dict[str, float] = field(default_factory=dict)
    # One record per pipeline step applied so far, filled by apply_pipeline_ (earlier steps may come from a
    # cached prefix, marked reused).
    stages: list[StageRecord] = field(default_factory=list)


ApplyFn = Callable[[Any, Any, ApplyContext], Any]
CheckFn = Callable[[Any, Any], None]


@dataclass(frozen=True)
class Technique:
    name: str
    config_cls: type
    apply: ApplyFn
    check: CheckFn | None
    kind: str
    version: int
    summary: str


_TECHNIQUES: dict[str, Technique] = {}
_BY_CONFIG: dict[type, Technique] = {}


def register(
    name: str, config_cls: type, *, kind: str = "other", check: CheckFn | None = None, version: int = 1
) -> Callable[[ApplyFn], ApplyFn]:
    """Decorator: register ``apply(model, config, ctx) -> model`` under ``name`` for ``config_cls``.

    ``config_cls`` is a frozen dataclass; each field should carry ``metadata={"help": ...}`` (shown by panels and
    the CLI through :func:`describe_fields`), and a ``label()`` method gives its short name in tables and plots
    (:func:`config_label`).
    """
    if not name or name != name.lower() or not name.replace("_", "").replace("-", "").isalnum():
        raise ValueError(f"Technique name {name!r} must be lower case letters, digits, '_' or '-'.")
    if kind not in KINDS:
        raise ValueError(f"Technique {name!r}: kind {kind!r} is not one of {', '.join(KINDS)}.")
    if not (dataclasses.is_dataclass(config_cls) and config_cls.__dataclass_params__.frozen):  # type: ignore[attr-defined]
        raise ValueError(f"Technique {name!r}: {config_cls.__name__} must be a frozen dataclass.")
    # A config that names itself (the weight-grid configs do, for their messages) must use the registered name.
    own = getattr(config_cls, "technique", name)
    if own != name:
        raise ValueError(
            f"Technique {name!r}: {config_cls.__name__}.technique is {own!r}; set it to {name!r}."
        )

    def decorator(fn: ApplyFn) -> ApplyFn:
        if name in _TECHNIQUES and _TECHNIQUES[name].apply is not fn:
            raise ValueError(
                f"A technique named {name!r} is already registered; please choose a unique name."
            )
        doc = (config_cls.__doc__ or fn.__doc__ or "").strip().splitlines()
        tech = Technique(name, config_cls, fn, check, kind, version, doc[0] if doc else "")
        _TECHNIQUES[name] = tech
        _BY_CONFIG[config_cls] = tech
        return fn

    return decorator


def _load_builtin() -> None:
    # Importing the package registers every built-in technique (each file calls @register at import).
    import workbench.techniques  # noqa: F401


def get_technique(name: str) -> Technique:
    """The technique registered as ``name``; an unknown name lists the known ones and the closest match."""
    _load_builtin()
    try:
        return _TECHNIQUES[name]
    except KeyError:
        known = sorted(_TECHNIQUES)
        close = difflib.get_close_matches(name, known, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"Unknown technique {name!r}. Known: {', '.join(known) or 'none'}.{hint}") from None


def technique_for(config: Any) -> Technique:
    _load_builtin()
    try:
        return _BY_CONFIG[type(config)]
    except KeyError:
        raise ConfigError(
            f"{type(config).__name__} is not a registered technique config. Known techniques: "
            f"{', '.join(sorted(_TECHNIQUES))}."
        ) from None


def technique_names(kind: str | None = None) -> list[str]:
    _load_builtin()
    return sorted(n for n, t in _TECHNIQUES.items() if kind is None or t.kind == kind)


def make_config(name: str, **params: Any) -> Any:
    """Build the config of technique ``name``; bad or unknown parameters raise :class:`ConfigError`."""
    tech = get_technique(name)
    fields = {f.name for f in dataclasses.fields(tech.config_cls)}
    unknown = sorted(set(params) - fields)
    if unknown:
        raise ConfigError(
            f"{name}: unknown parameter(s) {', '.join(unknown)}. Parameters: {', '.join(sorted(fields))}."
        )
    try:
        return tech.config_cls(**params)
    except TypeError as err:
        raise ConfigError(f"{name}: {err}") from None


def check(model: Any, config: Any) -> None:
    """Run the technique's cheap model-dependent checks (raises :class:`ConfigError`)."""
    tech = technique_for(config)
    if tech.check is not None:
        tech.check(model, config)


def apply_(model: Any, config: Any, ctx: ApplyContext | None = None) -> Any:
    """Apply one technique in place (check first) and return the model (which may be a new object)."""
    tech = technique_for(config)
    ctx = ctx if ctx is not None else ApplyContext()
    if tech.check is not None:
        tech.check(model, config)
    out = tech.apply(model, config, ctx)
    return model if out is None else out


# ---- stacking: how a step behaves inside a pipeline ------------------------------------------------------

PreviewFn = Callable[[Any, Any], Any]


@dataclass(frozen=True)
class Stacking:
    """How a technique behaves as one step of a pipeline (declared with :func:`register_stacking`).

    preview: ``preview(model, config) -> model`` returns a stand-in with the shapes the step will produce
        (e.g. built on the meta device with :func:`meta_model`), so the checks of later steps run before any
        work. It must be cheap and must not modify ``model``.
    same_shapes: the step leaves every shape a later check reads as it was (weight-only quantizers). None:
        True for techniques of kind ``quantize``, False otherwise; a step that neither keeps shapes nor has a
        preview defers the checks of every later step to the moment just before each runs.
    cacheable: the model after this step may be kept and reused by a later run (see
        :mod:`workbench.prefix_cache`). Opt out when the result is not deterministic for a given seed.
    """

    preview: PreviewFn | None = None
    same_shapes: bool | None = None
    cacheable: bool = True


_STACKING: dict[type, Stacking] = {}


def register_stacking(
    config_cls: type,
    *,
    preview: PreviewFn | None = None,
    same_shapes: bool | None = None,
    cacheable: bool = True,
) -> None:
    """Declare how the technique of ``config_cls`` stacks (see :class:`Stacking`); the defaults need no call."""
    if not isinstance(config_cls, type):
        raise TypeError(f"register_stacking takes a config class, not {config_cls!r}.")
    _STACKING[config_cls] = Stacking(preview, same_shapes, cacheable)


def stacking_for(config: Any) -> Stacking:
    """What :func:`register_stacking` declared for ``config``'s technique, else the defaults."""
    return _STACKING.get(type(config), Stacking())


def is_cacheable(pipeline: Sequence[Any]) -> bool:
    """Whether the model after every step of ``pipeline`` may be kept for reuse."""
    return all(stacking_for(c).cacheable for c in pipeline)


def meta_model(model: Any, **config_changes: Any) -> Any:
    """A Hugging Face model of ``model``'s class on the meta device, its config changed by ``config_changes``.

    Costs no memory (meta tensors have shapes, no data): what a preview returns for a step that changes
    widths, e.g. ``meta_model(model, intermediate_size=96)`` for a pruning step.
    """
    import copy

    import torch

    config = copy.deepcopy(model.config)
    for key, value in config_changes.items():
        if not hasattr(config, key):
            raise ValueError(f"{type(config).__name__} has no attribute {key!r}.")
        setattr(config, key, value)
    with torch.device("meta"):
        return type(model)(config)


def _in_step(err: ConfigError, index: int, n: int, config: Any) -> ConfigError:
    """The same message, saying which step it concerns (one-step pipelines keep the message as it was)."""
    if n <= 1:
        return err
    return ConfigError(f"Step {index + 1} of {n} ({technique_for(config).name}): {err}")


def _next_view(model: Any, config: Any) -> Any | None:
    """What the next step's check should see after ``config`` is applied to ``model``; None: not known."""
    stacking = stacking_for(config)
    if stacking.preview is not None:
        return stacking.preview(model, config)
    same = stacking.same_shapes
    if same is None:
        same = technique_for(config).kind == "quantize"
    return model if same else None


def check_pipeline(model: Any, pipeline: Sequence[Any], *, start: int = 0) -> list[int]:
    """Check every step before any work, each on the shapes the earlier steps will produce.

    ``model`` is the model step ``start`` will be applied to (the steps before it already are). Each check
    sees ``model`` as the earlier steps' previews transform it (see :class:`Stacking`). Returns the indices of
    the steps whose check could not run yet because an earlier step changes shapes in a way it does not
    declare; :func:`apply_pipeline_` checks those just before they run.

    Raises:
        ConfigError: a step's parameters do not fit (``Step 3 of 3 (rtn): ...`` in a stacked pipeline).
    """
    n = len(pipeline)
    for i, config in enumerate(pipeline):
        tech = technique_for(config)  # an unknown config type fails before any check runs
        if tech.kind == "deploy" and i != n - 1:
            later = ", ".join(technique_for(c).name for c in pipeline[i + 1 :])
            raise ConfigError(
                f"Step {i + 1} of {n} ({tech.name}) runs the variant in a runtime, so it must be the last "
                f"step; move {later} before it."
            )
    view: Any | None = model
    deferred = []
    for i in range(start, n):
        config = pipeline[i]
        if view is None:
            deferred.append(i)
            continue
        try:
            check(view, config)
        except ConfigError as err:
            raise _in_step(err, i, n, config) from None
        if i < n - 1:
            view = _next_view(view, config)
    return deferred


def _numbers(config: Any, metrics: dict[str, Any]) -> dict[str, float]:
    """A step's metrics as plain numbers; anything else is the technique's bug, named as such."""
    out: dict[str, float] = {}
    for key, value in metrics.items():
        if hasattr(value, "item") and not isinstance(value, (int, float)):
            value = value.item()  # a 0-d tensor or numpy scalar
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(
                f"{technique_for(config).name}: metric {key!r} is {value!r}; metrics are numbers. Put "
                f"structured results in ctx.extras."
            )
        out[str(key)] = value
    return out


def merge_stages(stages: Sequence[StageRecord], what: str, reserved: Sequence[str] = ()) -> dict[str, Any]:
    """The stages' ``metrics`` or ``extras`` (``what``) in one flat dict.

    A name only one stage reports keeps its name; a name several stages report, or one in ``reserved``
    (what the evaluation itself measures), becomes ``stage<i>_<name>`` (1-based) for each, so nothing is
    overwritten: two calibrated steps give ``stage1_calibration_seconds`` and ``stage3_calibration_seconds``.
    """
    if what not in ("metrics", "extras"):
        raise ValueError(f"merge_stages: what={what!r}; use 'metrics' or 'extras'.")
    taken = set(reserved)
    counts: dict[str, int] = {}
    for stage in stages:
        for key in getattr(stage, what):
            counts[key] = counts.get(key, 0) + 1
    out: dict[str, Any] = {}
    for stage in stages:
        for key, value in getattr(stage, what).items():
            name = key if counts[key] == 1 and key not in taken else f"stage{stage.index + 1}_{key}"
            out[name] = value
    return out


def apply_pipeline_(
    model: Any,
    pipeline: Sequence[Any],
    ctx: ApplyContext | None = None,
    *,
    start: int = 0,
    after_step: Callable[[int, Any], None] | None = None,
) -> Any:
    """Check every step up front, then apply them in order; progress is split evenly between the steps run.

    Args:
        start: the steps before it are already applied to ``model`` (a cached prefix); their records, if
            any, are already in ``ctx.stages``.
        after_step: ``after_step(i, model)`` once step ``i`` is done (e.g. to keep the prefix model); it must
            not modify the model.

    Each step gets empty ``ctx.metrics`` and ``ctx.extras`` of its own and leaves a :class:`StageRecord` in
    ``ctx.stages``; at the end ``ctx.metrics`` and ``ctx.extras`` hold all stages' values merged (see
    :func:`merge_stages`). Every later step is checked again just before it runs, on the model the earlier
    steps really produced: the up-front check saw a preview (or nothing, for a step whose check had to wait,
    see :func:`check_pipeline`), and a preview may miss what only the real result shows (a model already
    packed by a backend); such a :class:`ConfigError` names the step.
    """
    import time

    ctx = ctx if ctx is not None else ApplyContext()
    n = len(pipeline)
    check_pipeline(model, pipeline, start=start)
    outer, outer_extras, outer_metrics = ctx.progress, ctx.extras, ctx.metrics
    todo = n - start
    try:
        for i in range(start, n):
            config = pipeline[i]
            tech = technique_for(config)
            outer.check()  # a cancel between two steps stops before the next one starts
            if i > start:  # step `start` was just checked on this very model
                try:
                    check(model, config)
                except ConfigError as err:
                    raise _in_step(err, i, n, config) from None
            ctx.progress = outer.span((i - start) / todo, (i - start + 1) / todo)
            ctx.extras, ctx.metrics = {}, {}
            t0 = time.perf_counter()
            out = tech.apply(model, config, ctx)  # checked above, in check_pipeline or just now
            model = model if out is None else out
            ctx.stages.append(
                StageRecord(
                    i, tech.name, _numbers(config, ctx.metrics), dict(ctx.extras), time.perf_counter() - t0
                )
            )
            if after_step is not None:
                after_step(i, model)
    finally:
        ctx.progress = outer
        ctx.extras, ctx.metrics = outer_extras, outer_metrics
    ctx.extras.update(merge_stages(ctx.stages, "extras"))
    ctx.metrics.update(merge_stages(ctx.stages, "metrics"))
    return model


# ---- configs as data ---------------------------------------------------------------------------------------


def _jsonable(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return value


def config_to_dict(config: Any) -> dict[str, Any]:
    tech = technique_for(config)
    # Fields a config gained after runs were recorded with it are left out while at their default, so the
    # stored pipelines of those runs (matched as JSON text for reuse) stay what they were.
    added = set(getattr(config, "ADDED_FIELDS", ()))
    params = {
        f.name: _jsonable(getattr(config, f.name))
        for f in dataclasses.fields(config)
        if not (f.name in added and getattr(config, f.name) == f.default)
    }
    return {"technique": tech.name, "version": tech.version, "params": params}


def config_from_dict(data: dict[str, Any]) -> Any:
    tech = get_technique(str(data.get("technique")))
    version = int(data.get("version", tech.version))
    if version != tech.version:
        raise ConfigError(
            f"{tech.name}: stored config has version {version}, this workbench has version {tech.version}."
        )
    params = dict(data.get("params", {}))
    for f in dataclasses.fields(tech.config_cls):
        # JSON has no tuples: turn lists back into tuples where the default is a tuple (frozen configs hash).
        if f.name in params and isinstance(params[f.name], list):
            params[f.name] = tuple(params[f.name])
    return make_config(tech.name, **params)


def pipeline_to_json(pipeline: Sequence[Any]) -> str:
    """Canonical JSON (sorted keys, no spaces): equal pipelines give equal strings, so lookups can match."""
    return json.dumps([config_to_dict(c) for c in pipeline], sort_keys=True, separators=(",", ":"))


def pipeline_from_json(text: str) -> list[Any]:
    return [config_from_dict(d) for d in json.loads(text or "[]")]


def pipeline_key(pipeline: Sequence[Any]) -> str:
    return hashlib.sha256(pipeline_to_json(pipeline).encode()).hexdigest()[:16]


def config_label(config: Any) -> str:
    """The short label of one config, as its technique defines it (``config.label()``: "rtn 4b g64 sym",
    "bnb nf4", "gptq 3b g64"). A config without one gets ``name(param=value, ...)`` with the parameters that
    differ from their defaults, so labels of different settings still differ."""
    tech = technique_for(config)
    own = getattr(config, "label", None)
    if callable(own):
        return str(own())
    changed = [
        f"{f.name}={_jsonable(getattr(config, f.name))}"
        for f in dataclasses.fields(config)
        if f.default is dataclasses.MISSING or getattr(config, f.name) != f.default
    ]
    return f"{tech.name}(" + ", ".join(changed) + ")"


def setting_label(config: Any) -> str:
    """The label without the technique's name (``4b g64 sym``, ``nf4``), for a table's setting column or a plot
    legend that shows the technique elsewhere; a label that does not start with the name is returned whole."""
    return config_label(config).removeprefix(technique_for(config).name + " ")


def describe_pipeline(pipeline: Sequence[Any]) -> str:
    """Short human label: the steps' own labels joined by " → " (``rtn 4b g32 → bnb nf4``); the empty
    pipeline is ``baseline``."""
    if not pipeline:
        return "baseline"
    return " → ".join(config_label(config) for config in pipeline)


# ---- field help --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FieldInfo:
    """One parameter of a technique's config, for a panel's control or ``workbench`` help output.

    ``type`` is the annotation as written (``"int"``, ``"int | None"``); ``default`` the default value (None
    when the field has none); ``help`` the field's ``metadata["help"]`` ("" when missing); ``choices`` the
    allowed values when they are a fixed set (``metadata["choices"]``), else None.
    """

    name: str
    type: str
    default: Any
    help: str
    choices: tuple[Any, ...] | None = None


_DOC_LINE = re.compile(r"^(?P<names>[A-Za-z_][\w]*(?:\s*,\s*[A-Za-z_][\w]*)*)\s*:\s*(?P<text>.*)$")


def _docstring_help(doc: str) -> dict[str, str]:
    """``name: text`` entries of a config docstring (continuation lines indented deeper); ``a, b: text`` gives
    both names the text. The first line is the summary ("GPTQ: second-order ...") and is skipped."""
    out: dict[str, str] = {}
    current: list[str] = []
    for raw in inspect.cleandoc(doc).splitlines()[1:]:
        stripped = raw.strip()
        match = _DOC_LINE.match(raw)  # entries start at the margin; cleandoc removed the common indent
        if match:
            current = [n.strip() for n in match.group("names").split(",")]
            for name in current:
                out[name] = match.group("text").strip()
        elif stripped and current and raw[:1].isspace():
            for name in current:
                out[name] = f"{out[name]} {stripped}"
        else:
            current = []
    return out


def describe_fields(name_or_config: str | Any) -> list[FieldInfo]:
    """The parameters of technique ``name`` (or of a config, or a config class), in declaration order.

    Help comes from ``field(metadata={"help": ...})``, else from the config docstring's ``name: text`` lines; a
    field documented in neither gets "" rather than an error.
    """
    if isinstance(name_or_config, str):
        cls = get_technique(name_or_config).config_cls
    else:
        cls = name_or_config if isinstance(name_or_config, type) else type(name_or_config)
        if not dataclasses.is_dataclass(cls):
            raise ConfigError(
                f"{cls.__name__} is not a technique config; pass a technique name such as 'rtn'."
            )
    from_doc = _docstring_help(cls.__doc__ or "")
    out = []
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            default: Any = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = None
        kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
        choices = f.metadata.get("choices")
        out.append(
            FieldInfo(
                f.name,
                str(kind),
                default,
                str(f.metadata.get("help") or from_doc.get(f.name, "")),
                tuple(choices) if choices is not None else None,
            )
        )
    return out


__all__ = [
    "ApplyContext",
    "FieldInfo",
    "Stacking",
    "StageRecord",
    "Technique",
    "apply_",
    "apply_pipeline_",
    "check",
    "check_pipeline",
    "config_from_dict",
    "config_label",
    "config_to_dict",
    "describe_fields",
    "describe_pipeline",
    "get_technique",
    "is_cacheable",
    "make_config",
    "merge_stages",
    "meta_model",
    "pipeline_from_json",
    "pipeline_key",
    "pipeline_to_json",
    "register",
    "register_stacking",
    "setting_label",
    "stacking_for",
    "technique_for",
    "technique_names",
]
