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
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from workbench.errors import ConfigError
from workbench.progress import Progress

KINDS = ("quantize", "route", "distill", "prune", "other")


@dataclass
class ApplyContext:
    """What an apply function may need besides the model and its config.

    ``tokenizer`` and ``corpus`` serve calibrated methods (GPTQ, AWQ, distillation), which take their text from
    ``corpus.text("calibration")`` or ``corpus.text("training")`` (disjoint from the evaluation part).
    ``base`` is the unmodified model (a teacher for distillation); it must not be modified. ``extras`` collects
    what a technique wants recorded with the run (e.g. a loss curve, expert loads) under its name.
    """

    tokenizer: Any = None
    corpus: Any = None
    base: Any = None
    device: str = "cpu"
    seed: int = 0
    progress: Progress = field(default_factory=Progress.null)
    extras: dict[str, Any] = field(default_factory=dict)


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
    """Decorator: register ``apply(model, config, ctx) -> model`` under ``name`` for ``config_cls``."""
    if not name or name != name.lower() or not name.replace("_", "").replace("-", "").isalnum():
        raise ValueError(f"Technique name {name!r} must be lower case letters, digits, '_' or '-'.")
    if kind not in KINDS:
        raise ValueError(f"Technique {name!r}: kind {kind!r} is not one of {', '.join(KINDS)}.")
    if not (dataclasses.is_dataclass(config_cls) and config_cls.__dataclass_params__.frozen):  # type: ignore[attr-defined]
        raise ValueError(f"Technique {name!r}: {config_cls.__name__} must be a frozen dataclass.")

    def decorator(fn: ApplyFn) -> ApplyFn:
        if name in _TECHNIQUES and _TECHNIQUES[name].apply is not fn:
            raise ValueError(f"A technique named {name!r} is already registered; please choose a unique name.")
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


def apply_pipeline_(model: Any, pipeline: Sequence[Any], ctx: ApplyContext | None = None) -> Any:
    """Check every step up front, then apply them in order; progress is split evenly between steps."""
    ctx = ctx if ctx is not None else ApplyContext()
    for config in pipeline:
        technique_for(config)
    if pipeline:
        check(model, pipeline[0])  # later steps are checked on the model the earlier ones produce
    outer = ctx.progress
    n = len(pipeline)
    for i, config in enumerate(pipeline):
        ctx.progress = outer.span(i / n, (i + 1) / n)
        model = apply_(model, config, ctx)
    ctx.progress = outer
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
    params = {f.name: _jsonable(getattr(config, f.name)) for f in dataclasses.fields(config)}
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


_DEFINING = ("bits", "mode", "weights", "group_size")


def describe_pipeline(pipeline: Sequence[Any]) -> str:
    """Short human label, e.g. ``rtn(bits=3, group_size=64)``; the empty pipeline is ``baseline``."""
    if not pipeline:
        return "baseline"
    parts = []
    for config in pipeline:
        d = config_to_dict(config)
        defaults = {f.name: f.default for f in dataclasses.fields(config) if f.default is not dataclasses.MISSING}
        # The defining parameters always show (a label "quanto()" says nothing); the rest only when changed.
        shown = {k: v for k, v in d["params"].items() if defaults.get(k, object()) != v or (k in _DEFINING and v is not None)}
        parts.append(f"{d['technique']}(" + ", ".join(f"{k}={v}" for k, v in shown.items()) + ")")
    return " → ".join(parts)


__all__ = [
    "ApplyContext",
    "Technique",
    "apply_",
    "apply_pipeline_",
    "check",
    "config_from_dict",
    "config_to_dict",
    "describe_pipeline",
    "get_technique",
    "make_config",
    "pipeline_from_json",
    "pipeline_key",
    "pipeline_to_json",
    "register",
    "technique_for",
    "technique_names",
]
