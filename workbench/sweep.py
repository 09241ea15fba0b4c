"""Sweeps: a grid of models × pipelines × suites, from a YAML file or code, run locally or on Ray.

A sweep file (examples under ``examples/sweeps/``)::

    name: quant-grid                  # optional; also tags every run "sweep:quant-grid"
    models: [demo]                    # or `model: demo`; an entry may be a mapping of ModelSpec fields
    suites: [quick]                   # or `suite:`; a name, or a mapping of Suite fields (a custom suite)
    tags: [grid]                      # optional, added to every run; `notes:` and `seed:` too
    pipelines:
      - baseline                      # the unmodified model
      - rtn: {bits: 2..8, group_size: [32, 64]}     # one step: 7 × 2 configurations
      - [prune: {drop: 1}, distill: {steps: 20}, rtn: {bits: [4, 3]}]   # stacked steps, in order

A pipeline is ``baseline``, one step, or a list of steps; a step is a technique name or a one-key mapping
``technique: {field: value, ...}``. A field's value is one value, a list of values to try, a range ``A..B``
(whole numbers, both ends included; ``8..2`` counts down), or ``all``: the whole range the technique declares
for the model (a bit-width slider's widths, the group sizes every layer takes, route's ``k`` from E down to
1, prune's ``drop`` from 0 to L-1). Range ends may name the model: ``E`` (experts per MoE layer) and ``L``
(decoder layers), with an offset (``1..E``, ``1..L-1``). The grid is the product of every field's values,
step by step; identical pipelines are run once. A field whose default is a tuple (prune's ``layers``) takes a
list as one value; a list of lists tries each. Steps of a technique with a parameter space
(:mod:`workbench.techniques.space`) are built through it, so ``bnb: {bits: [8, 4]}`` means int8 and nf4 and
settings left out take the point the Quantize panel starts at for the model.

The file is checked before anything runs: an unknown key, technique or field, or a malformed value, raises
:class:`ConfigError` naming the file, line and key and what to write instead; then every configuration is
built and checked against its model (the technique's own ``check``) before the first run.

    sweep = Sweep.from_yaml("examples/sweeps/quant-grid.yaml")
    report = run_sweep(sweep, registry="sqlite:///runs.db")              # local: one run at a time
    report = run_sweep(sweep, registry=url, executor="ray", address="auto")   # a Ray cluster
    report.table()                                                      # the comparison table

Runs the registry already has are found and reused (``run_experiment`` looks first), so a sweep stopped half
way continues where it stopped; ``dry_run=True`` lists what would run and what is known without running.

The Ray executor runs each configuration as one Ray task that declares the CPUs it needs (and a GPU when its
model is placed on CUDA), opens the shared registry itself (its URL travels with the task: a SQLite file for a
local Ray instance, PostgreSQL for a cluster) and records its run there. The driver first evaluates each
model's baseline, so the base-model outputs every run compares with are computed once and cached on disk
(``$WORKBENCH_HOME``, :mod:`workbench.evaluation.base_cache`) before the tasks fan out. A run that fails is
recorded failed by ``run_experiment``; a task whose worker or node was lost is retried (``max_retries``), a
failing configuration is not.

:func:`axis_values` and :func:`vary` are what a panel's "Run as sweep" uses (through
:class:`~workbench.workspace.Workspace`): which values one slider's whole range means for a model, and the
pipelines that result from setting one field of one step to each.
"""

from __future__ import annotations

import dataclasses
import difflib
import itertools
import json
import re
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from workbench.errors import ConfigError

EXECUTORS = ("local", "ray")
TOP_KEYS = ("name", "model", "models", "suite", "suites", "pipelines", "tags", "notes", "seed", "registry")
SYMBOLS = {"E": "experts per MoE layer", "L": "decoder layers"}
ALL = "all"
# Ray errors that mean the worker (or its node) was lost, not that the configuration failed: retried.
WORKER_LOST = (
    "WorkerCrashedError",
    "NodeDiedError",
    "RayActorError",
    "ActorDiedError",
    "LocalRayletDiedError",
)

_END = r"(?:-?\d+|[A-Z]\s*(?:[-+]\s*\d+)?)"
_RANGE = re.compile(rf"^\s*(?P<lo>{_END})\s*\.\.\s*(?P<hi>{_END})\s*$")
_SYMBOL_END = re.compile(r"^(?P<name>[A-Z])\s*(?:(?P<sign>[-+])\s*(?P<offset>\d+))?$")


# ---- where a value came from: file, line and key --------------------------------------------------------


Path_ = tuple[Any, ...]  # a key path: ("pipelines", 1, "rtn", "bits")


def key_text(path: Path_) -> str:
    """``pipelines[1].rtn.bits`` for ``("pipelines", 1, "rtn", "bits")``."""
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


@dataclass(frozen=True)
class Where:
    """Names a place in a sweep's source for messages: ``quant-grid.yaml:7: pipelines[1].rtn.bits``."""

    source: str = ""
    lines: Mapping[Path_, int] = field(default_factory=dict)
    keys: bool = True  # False: messages say what is wrong without a key path (a sweep built from flags)

    def __call__(self, path: Path_, message: str) -> ConfigError:
        line = None
        for n in range(len(path), 0, -1):  # the key itself, else the nearest enclosing one with a line
            line = self.lines.get(tuple(path[:n]))
            if line is not None:
                break
        head = self.source + (f":{line}" if self.source and line is not None else "")
        key = key_text(path) if self.keys else ""
        prefix = ": ".join(p for p in (head, key) if p)
        return ConfigError(f"{prefix}: {message}" if prefix else message)


def _load_yaml(text: str, source: str) -> tuple[Any, dict[Path_, int]]:
    """The YAML document as plain Python data, and the 1-based line of every key and list item."""
    import yaml

    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{source}:{mark.line + 1}" if mark is not None else source
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(
            f"{where}: not valid YAML ({problem}); check the indentation and brackets."
        ) from None
    lines: dict[Path_, int] = {}
    constructor = yaml.constructor.SafeConstructor()

    def build(node: Any, path: Path_) -> Any:
        if isinstance(node, yaml.MappingNode):
            out: dict[Any, Any] = {}
            for key_node, value_node in node.value:
                key = constructor.construct_object(key_node, deep=True)
                if isinstance(key, (list, dict)):
                    raise ConfigError(
                        f"{source}:{key_node.start_mark.line + 1}: a key must be a name, not a list or mapping."
                    )
                lines[(*path, key)] = key_node.start_mark.line + 1
                out[key] = build(value_node, (*path, key))
            return out
        if isinstance(node, yaml.SequenceNode):
            items = []
            for i, item in enumerate(node.value):
                lines[(*path, i)] = item.start_mark.line + 1
                items.append(build(item, (*path, i)))
            return items
        return constructor.construct_object(node, deep=True)

    if node is None:
        return None, lines
    return build(node, ()), lines


# ---- values: one, a list, a range, all -------------------------------------------------------------------


@dataclass(frozen=True)
class Values:
    """What one field of a step takes: ``kind`` is "one" (``value``), "list" (``value`` is the tuple),
    "range" (``value`` is the (low, high) ends as written) or "all"."""

    kind: str
    value: Any
    path: Path_ = ()

    @property
    def needs_model(self) -> bool:
        if self.kind == "all":
            return True
        if self.kind == "range":
            return any(isinstance(end, str) for end in self.value)
        return False


def _range_end(text: str) -> int | str:
    text = text.strip()
    return int(text) if re.fullmatch(r"-?\d+", text) else re.sub(r"\s+", "", text)


def _parse_values(raw: Any, path: Path_, where: Where, tuple_field: bool) -> Values:
    if isinstance(raw, str):
        text = raw.strip()
        if text == ALL:
            return Values("all", None, path)
        if ".." in text:
            match = _RANGE.match(text)
            if match is None:
                raise where(
                    path,
                    f"{raw!r} is not a range; write A..B with whole numbers or E/L (e.g. 2..8, 1..E, "
                    "1..L-1), a list such as [2, 4], or one value.",
                )
            ends = (_range_end(match["lo"]), _range_end(match["hi"]))
            for end in ends:
                if isinstance(end, str):
                    name = _SYMBOL_END.match(end)
                    if name is None or name["name"] not in SYMBOLS:
                        known = ", ".join(f"{k} ({v})" for k, v in SYMBOLS.items())
                        raise where(path, f"range end {end!r} is not a number or one of {known}.")
            return Values("range", ends, path)
        return Values("one", raw, path)
    if isinstance(raw, list):
        if not raw:
            raise where(path, "an empty list tries nothing; give at least one value.")
        if tuple_field and not any(isinstance(v, list) for v in raw):
            return Values("one", tuple(raw), path)  # a tuple-valued field: the list is one value
        items = tuple(tuple(v) if isinstance(v, list) else v for v in raw)
        return Values("list", items, path)
    return Values("one", raw, path)


def model_symbols(model: Any) -> dict[str, Callable[[], int]]:
    """What ``E`` and ``L`` mean for ``model`` (computed when a range names them)."""

    def experts() -> int:
        from workbench.techniques.route import route_space

        return int(route_space(model).n_experts)

    return {"E": experts, "L": lambda: n_layers(model)}


def n_layers(model: Any) -> int:
    """Decoder layers of a Hugging Face model (its text config's ``num_hidden_layers``)."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return int(config.num_hidden_layers)


def _resolve_end(end: int | str, model: Any, values: Values, where: Where) -> int:
    if isinstance(end, int):
        return end
    if model is None:
        raise where(values.path, f"{end} names the model; it is known only once the model is loaded.")
    match = _SYMBOL_END.match(end)
    assert match is not None  # checked when parsed
    try:
        base = model_symbols(model)[match["name"]]()
    except ConfigError as err:
        raise where(values.path, f"{end}: {err}") from None
    offset = int(match["offset"] or 0)
    return base - offset if match["sign"] == "-" else base + offset


# ---- axes: what one slider's whole range means for a model ---------------------------------------------


@dataclass(frozen=True)
class Axis:
    """One slider a panel sweeps over, besides the bit widths of a parameter space.

    ``values(model)`` is the whole range in sweep order; ``clears`` are fields set back to their defaults when
    the axis is set (a fixed-k sweep is not a top-p one); at ``identity`` the step changes nothing and is left
    out of the pipeline; a pipeline without the step gets it at ``insert_at`` (None: it must have the step).
    """

    technique: str
    field: str
    values: Callable[[Any], tuple[Any, ...]]
    clears: tuple[str, ...] = ()
    identity: Any = None
    insert_at: int | None = None


def _route_ks(model: Any) -> tuple[int, ...]:
    from workbench.techniques.route import route_space

    return tuple(sorted(route_space(model).ks, reverse=True))  # E first: the model as built, then fewer


AXES: dict[tuple[str, str], Axis] = {
    ("route", "k"): Axis("route", "k", _route_ks, clears=("top_p", "skip_beta", "budget")),
    # Student depths: dropping 0 layers is the teacher's own depth (no prune step), then ever shallower.
    ("prune", "drop"): Axis(
        "prune", "drop", lambda model: tuple(range(n_layers(model))), identity=0, insert_at=0
    ),
}


def _space_or_none(technique: str, model: Any = None) -> Any:
    from workbench.techniques.space import parameter_space

    try:
        return parameter_space(technique, model)
    except ConfigError:
        return None  # the technique declares no parameter space


def axis_values(technique: str, field_name: str, model: Any, *, space: Any = None) -> tuple[Any, ...]:
    """The whole range a slider over ``field_name`` of ``technique`` offers for ``model``, in sweep order.

    ``bits`` (widest first), ``group_size`` and ``symmetric`` of a technique with a parameter space (``space``:
    the one already built for the model, else it is built here); route's ``k`` (E down to 1); prune's ``drop``
    (0 to L-1). Anything else raises :class:`ConfigError` saying which fields have a range.
    """
    axis = AXES.get((technique, field_name))
    if axis is not None:
        if model is None:
            raise ConfigError(f"{technique}.{field_name}: its range depends on the model; load one first.")
        return tuple(axis.values(model))
    if field_name in ("bits", "group_size", "symmetric"):
        space = space if space is not None else _space_or_none(technique, model)
        if space is not None:
            if field_name == "bits":
                return tuple(sorted(space.bits, reverse=True))
            if field_name == "group_size" and space.group_sizes:
                return tuple(space.group_sizes)
            if field_name == "symmetric" and space.symmetric:
                return tuple(space.symmetric)
    ranged = ", ".join(f"{t}.{f}" for t, f in AXES)
    raise ConfigError(
        f"{technique}.{field_name} has no declared range, so `all` means nothing for it; list the values. "
        f"Ranges: bits, group_size and symmetric of the quantizers, {ranged}."
    )


def vary(pipeline: Sequence[Any], technique: str, field_name: str, values: Iterable[Any]) -> list[list[Any]]:
    """``pipeline`` with ``field_name`` of its (last) ``technique`` step set to each of ``values``, in order.

    Fields the axis clears go back to their defaults; at the axis's identity value the step is left out; a
    pipeline without such a step gets one (where the axis says) or is refused. Each config is built here, so a
    bad value raises :class:`ConfigError` before any pipeline is returned.
    """
    from workbench.techniques.base import make_config, technique_for

    steps = list(pipeline)
    names = [technique_for(s).name for s in steps]
    at = max((i for i, n in enumerate(names) if n == technique), default=None)
    axis = AXES.get((technique, field_name))
    out: list[list[Any]] = []
    for value in values:
        if at is None:
            if axis is None or axis.insert_at is None:
                raise ConfigError(
                    f"The pipeline has no {technique} step to vary {field_name} in; add one first."
                )
            if value == axis.identity:
                out.append(list(steps))
                continue
            new = make_config(technique, **{field_name: value})
            out.append([*steps[: axis.insert_at], new, *steps[axis.insert_at :]])
            continue
        current = steps[at]
        params = {f.name: getattr(current, f.name) for f in dataclasses.fields(current)}
        if field_name not in params:
            raise ConfigError(f"{technique} has no field {field_name!r}.")
        defaults = {f.name: f.default for f in dataclasses.fields(current)}
        for name in axis.clears if axis is not None else ():
            params[name] = defaults[name]
        params[field_name] = value
        if axis is not None and axis.identity is not None and value == axis.identity:
            try:
                new = make_config(technique, **params)
            except ConfigError:  # e.g. prune with nothing left to prune: the step does nothing
                out.append(steps[:at] + steps[at + 1 :])
                continue
        else:
            new = make_config(technique, **params)
        out.append([*steps[:at], new, *steps[at + 1 :]])
    return out


# ---- the sweep ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StepSpec:
    """One step of a pipeline in a sweep: a technique and the values of its fields (``fields`` maps a field to
    its :class:`Values`); ``path`` is where it was written."""

    technique: str
    fields: Mapping[str, Values]
    path: Path_ = ()


@dataclass(frozen=True)
class PipelineSpec:
    steps: tuple[StepSpec, ...]
    path: Path_ = ()


@dataclass(frozen=True)
class Configuration:
    """One point of the grid: a model, a suite and a built pipeline (configs), and where it was written."""

    model: Any  # a model spec string or ModelSpec
    suite: Any  # a suite name or Suite
    pipeline: tuple[Any, ...]
    path: Path_ = ()

    @property
    def label(self) -> str:
        from workbench.techniques import describe_pipeline

        return describe_pipeline(list(self.pipeline))

    @property
    def pipeline_json(self) -> str:
        from workbench.techniques import pipeline_to_json

        return pipeline_to_json(list(self.pipeline))

    @property
    def model_name(self) -> str:
        return str(getattr(self.model, "source", self.model))

    @property
    def suite_name(self) -> str:
        return self.suite if isinstance(self.suite, str) else str(self.suite.name)

    def key(self) -> tuple[str, str, str]:
        from workbench.evaluate import get_suite

        model = self.model.key if hasattr(self.model, "key") else str(self.model)
        return (model, get_suite(self.suite).key, self.pipeline_json)

    @property
    def wants_gpu(self) -> bool:
        """Its model is placed on CUDA (every step then computes there), or a step is set to a CUDA device."""
        device = str(getattr(self.model, "device", "cpu"))
        steps = [str(getattr(s, "device", "") or "") for s in self.pipeline]
        return device.startswith("cuda") or any(d.startswith("cuda") for d in steps)


def _suggest(name: str, known: Iterable[str]) -> str:
    close = difflib.get_close_matches(str(name), list(known), n=1)
    return f" Did you mean {close[0]!r}?" if close else ""


@dataclass(frozen=True)
class Sweep:
    """A grid of models × pipelines × suites (see the module docstring for the file format).

    Build one with :meth:`from_yaml` or :meth:`from_dict` (both check everything that does not need a model)
    and enumerate it with :meth:`configurations`.
    """

    models: tuple[Any, ...]
    suites: tuple[Any, ...]
    pipelines: tuple[PipelineSpec, ...]
    name: str = ""
    tags: tuple[str, ...] = ()
    notes: str = ""
    seed: int = 0
    registry: str | None = None
    where: Where = field(default_factory=Where)

    # ---- reading ---------------------------------------------------------------------------------------

    @classmethod
    def from_yaml(cls, path: str | Path) -> Sweep:
        """Read and check a sweep file; a problem raises :class:`ConfigError` naming its line and key."""
        file = Path(path).expanduser()
        try:
            text = file.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ConfigError(f"{file}: no such sweep file; examples are in examples/sweeps/.") from None
        except (OSError, UnicodeDecodeError) as err:
            raise ConfigError(f"{file}: cannot read it ({err}); give a UTF-8 YAML file.") from None
        data, lines = _load_yaml(text, file.name)
        return cls.from_dict(data, source=file.name, lines=lines)

    @classmethod
    def from_dict(
        cls,
        data: Any,
        *,
        source: str = "sweep",
        lines: Mapping[Path_, int] | None = None,
        keys: bool = True,
    ) -> Sweep:
        """Check ``data`` (the parsed file, or the same structure built in code) and return the sweep.

        ``source`` names it in messages (the file name; "" for none); ``lines`` maps key paths to lines;
        ``keys=False`` leaves key paths out of messages (a sweep built from command-line flags).
        """
        where = Where(source, dict(lines or {}), keys)
        if not isinstance(data, Mapping):
            raise where(
                (), "a sweep is a mapping with at least `models:` and `pipelines:`; see examples/sweeps/."
            )
        for key in data:
            if key not in TOP_KEYS:
                raise where(
                    (key,), f"unknown key. Keys: {', '.join(TOP_KEYS)}.{_suggest(str(key), TOP_KEYS)}"
                )
        for one, many in (("model", "models"), ("suite", "suites")):
            if one in data and many in data:
                raise where((one,), f"give `{one}:` or `{many}:`, not both.")
        model_key = "models" if "models" in data else "model"
        if model_key not in data:
            raise where((), "no models: add `models: [demo]` (or `model: tiny-llama`).")
        models = tuple(_models(data[model_key], (model_key,), where))
        suite_key = "suites" if "suites" in data else "suite"
        suites = tuple(_suites(data.get(suite_key, ["quick"]), (suite_key,), where))
        if "pipelines" not in data:
            raise where((), "no pipelines: add e.g. `pipelines: [baseline, {rtn: {bits: 2..8}}]`.")
        raw_pipelines = data["pipelines"]
        if not isinstance(raw_pipelines, list) or not raw_pipelines:
            raise where(("pipelines",), "give a list of pipelines, e.g. `[baseline, {rtn: {bits: [4, 3]}}]`.")
        pipelines = tuple(_pipeline(p, ("pipelines", i), where) for i, p in enumerate(raw_pipelines))
        tags = data.get("tags") or []
        if isinstance(tags, str):
            tags = [tags]
        if not isinstance(tags, list) or not all(isinstance(t, (str, int)) for t in tags):
            raise where(("tags",), "give a list of words, e.g. `tags: [grid, team-a]`.")
        name = str(data.get("name") or "")
        seed = data.get("seed", 0)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise where(("seed",), f"{seed!r} is not a whole number; e.g. `seed: 0`.")
        registry = data.get("registry")
        if registry is not None and not isinstance(registry, str):
            raise where(("registry",), "give a SQLAlchemy URL, e.g. sqlite:///runs.db.")
        all_tags = tuple(dict.fromkeys([*(str(t) for t in tags), *([f"sweep:{name}"] if name else [])]))
        return cls(
            models=models,
            suites=suites,
            pipelines=pipelines,
            name=name,
            tags=all_tags,
            notes=str(data.get("notes") or ""),
            seed=int(seed),
            registry=registry,
            where=where,
        )

    def replace(self, **changes: Any) -> Sweep:
        """A copy with some fields replaced (``models=("tiny-llama",)``: the command line's --model)."""
        if "models" in changes:
            changes["models"] = tuple(_models(list(changes["models"]), ("models",), Where("")))
        if "suites" in changes:
            changes["suites"] = tuple(_suites(list(changes["suites"]), ("suites",), Where("")))
        return dataclasses.replace(self, **changes)

    # ---- enumerating -----------------------------------------------------------------------------------

    def needs_weights(self) -> bool:
        """Whether the configurations depend on the models' weights or structure, not only their names: a
        range naming E or L, ``all``, or a step of a technique with a parameter space that leaves its group
        size or symmetry to the model's default point (which avoids a grid the weights sit on)."""
        for pipeline in self.pipelines:
            for step in pipeline.steps:
                if any(v.needs_model for v in step.fields.values()):
                    return True
                space = _space_or_none(step.technique)
                if space is not None and (
                    (space.group_sizes and "group_size" not in step.fields)
                    or (space.symmetric and "symmetric" not in step.fields)
                ):
                    return True
        return False

    def configurations(
        self,
        model_for: Callable[[Any], Any] | None = None,
        *,
        check: bool = True,
        notes: list[str] | None = None,
    ) -> list[Configuration]:
        """Every configuration of the grid, in order: models, then suites, then pipelines, each step's fields
        in the order written and their values in the order given; identical ones once.

        ``model_for(spec)`` gives the loaded model (an ``nn.Module``) that model-dependent values read (ranges
        naming E or L, ``all``, a parameter space's default point) and that each pipeline is checked against;
        None loads each model (:func:`~workbench.models.load_model`, cached); a ``model_for`` that returns None
        builds without the model (the generic spaces, no check). Every configuration is built and checked
        before this returns. ``notes`` collects what a user should know (a default moved off a grid).
        """
        if model_for is None:
            from workbench.models import load_model

            def model_for(spec: Any) -> Any:
                return load_model(spec).model

        out: list[Configuration] = []
        seen: set[tuple[str, str, str]] = set()
        for spec in self.models:
            model = model_for(spec)
            spaces: dict[str, Any] = {}
            for suite in self.suites:
                for pipeline in self.pipelines:
                    for steps in self._expand(pipeline, model, spaces, notes):
                        config = Configuration(spec, suite, tuple(steps), pipeline.path)
                        key = config.key()
                        if key in seen:
                            continue
                        seen.add(key)
                        if check and model is not None and steps:
                            from workbench.techniques.base import check_pipeline

                            try:
                                check_pipeline(model, list(steps))
                            except ConfigError as err:
                                raise self.where(
                                    pipeline.path, f"{config.label} on {config.model_name}: {err}"
                                ) from None
                        out.append(config)
        return out

    def _expand(
        self, pipeline: PipelineSpec, model: Any, spaces: dict[str, Any], notes: list[str] | None
    ) -> list[list[Any]]:
        per_step: list[list[Any]] = []
        for step in pipeline.steps:
            if step.technique not in spaces:
                spaces[step.technique] = _space_or_none(step.technique, model)
            space = spaces[step.technique]
            if (
                space is not None
                and notes is not None
                and space.reason
                and not ({"group_size", "symmetric"} & set(step.fields))
                and space.reason not in notes
            ):
                notes.append(space.reason)
            names = list(step.fields)
            choices = [self._values(step, n, step.fields[n], model, space) for n in names]
            configs = []
            for combo in itertools.product(*choices):
                configs.append(self._build(step, dict(zip(names, combo)), space))
            per_step.append(configs)
        return [list(steps) for steps in itertools.product(*per_step)]

    def _values(self, step: StepSpec, name: str, values: Values, model: Any, space: Any) -> list[Any]:
        if values.kind == "one":
            return [values.value]
        if values.kind == "list":
            return list(values.value)
        if values.kind == "all":
            if model is None and (step.technique, name) in AXES:
                raise self.where(values.path, "`all` depends on the model; it is known once it is loaded.")
            try:
                return list(axis_values(step.technique, name, model, space=space))
            except ConfigError as err:
                raise self.where(values.path, str(err)) from None
        lo, hi = (_resolve_end(end, model, values, self.where) for end in values.value)
        return list(range(lo, hi + 1)) if lo <= hi else list(range(lo, hi - 1, -1))

    def _build(self, step: StepSpec, params: dict[str, Any], space: Any) -> Any:
        from workbench.techniques.base import make_config

        params = _tuples(step.technique, params)
        try:
            if space is not None and (space.formats is None or "bits" in params):
                axes = {k: params.pop(k) for k in ("bits", "group_size", "symmetric") if k in params}
                return space.config(**axes, **params)
            return make_config(step.technique, **params)
        except ConfigError as err:
            raise self.where(step.path, str(err)) from None


def _tuples(technique: str, params: dict[str, Any]) -> dict[str, Any]:
    """List values of tuple-valued fields as tuples (frozen configs hash), as stored pipelines are read back."""
    from workbench.techniques.base import get_technique

    cls = get_technique(technique).config_cls
    kinds = {f.name: f.default for f in dataclasses.fields(cls)}
    return {
        k: tuple(v) if isinstance(v, list) and isinstance(kinds.get(k), tuple) else v
        for k, v in params.items()
    }


def _models(raw: Any, path: Path_, where: Where) -> Iterable[Any]:
    from workbench.models import ModelSpec

    items = raw if isinstance(raw, list) else [raw]
    if not items:
        raise where(path, "give at least one model, e.g. `models: [demo]`.")
    names = [f.name for f in dataclasses.fields(ModelSpec)]
    for i, item in enumerate(items):
        at = (*path, i) if isinstance(raw, list) else path
        if isinstance(item, ModelSpec):
            yield item
        elif isinstance(item, str) and item.strip():
            yield item.strip()
        elif isinstance(item, Mapping):
            unknown = [k for k in item if k not in names]
            if unknown:
                raise where(
                    (*at, unknown[0]),
                    f"not a model setting. Settings: {', '.join(names)}." + _suggest(str(unknown[0]), names),
                )
            if "source" not in item:
                raise where(
                    at, "a model mapping needs `source:` (demo, a Hugging Face id, a folder, a .gguf)."
                )
            try:
                yield ModelSpec(**item)
            except (ConfigError, TypeError) as err:
                raise where(at, str(err)) from None
        else:
            raise where(at, f"{item!r} is not a model; give a name such as demo or tiny-llama.")


def _suites(raw: Any, path: Path_, where: Where) -> Iterable[Any]:
    from workbench.evaluate import Suite, get_suite

    items = raw if isinstance(raw, list) else [raw]
    if not items:
        raise where(path, "give at least one suite, e.g. `suites: [quick]`.")
    names = [f.name for f in dataclasses.fields(Suite)]
    for i, item in enumerate(items):
        at = (*path, i) if isinstance(raw, list) else path
        if isinstance(item, Suite):
            yield item
        elif isinstance(item, str):
            try:
                get_suite(item)
            except ConfigError as err:
                raise where(
                    at, f"{err} A custom suite is a mapping, e.g. {{name: small, n_tokens: 512}}."
                ) from None
            yield item
        elif isinstance(item, Mapping):
            unknown = [k for k in item if k not in names]
            if unknown:
                raise where(
                    (*at, unknown[0]),
                    f"not a suite setting. Settings: {', '.join(names)}." + _suggest(str(unknown[0]), names),
                )
            if "name" not in item:
                raise where(
                    at, "a custom suite needs `name:` (it is shown in tables and is part of its key)."
                )
            try:
                yield Suite(**item)
            except (ConfigError, TypeError) as err:
                raise where(at, str(err)) from None
        else:
            raise where(at, f"{item!r} is not a suite; give quick, standard or a mapping of suite settings.")


def _pipeline(raw: Any, path: Path_, where: Where) -> PipelineSpec:
    if raw == "baseline" or raw is None:
        return PipelineSpec((), path)
    if isinstance(raw, (str, Mapping)):
        return PipelineSpec((_step(raw, path, where),), path)
    if isinstance(raw, list):
        if not raw:
            raise where(path, "an empty pipeline: write `baseline` for the unmodified model.")
        return PipelineSpec(tuple(_step(s, (*path, i), where) for i, s in enumerate(raw)), path)
    raise where(path, f"{raw!r} is not a pipeline; write baseline, `rtn: {{bits: 4}}` or a list of steps.")


def _step(raw: Any, path: Path_, where: Where) -> StepSpec:
    from workbench.techniques.base import get_technique, technique_names

    if isinstance(raw, str):
        name, params, at = raw.strip(), {}, path
    elif isinstance(raw, Mapping):
        if len(raw) != 1:
            raise where(
                path,
                f"a step names one technique, not {len(raw)} ({', '.join(map(str, raw))}); for a stacked "
                "pipeline write a list: [prune: {drop: 1}, distill: {steps: 20}].",
            )
        name, params = next(iter(raw.items()))
        name, at = str(name), (*path, name)
        params = {} if params is None else params
        if not isinstance(params, Mapping):
            raise where(at, f"give the settings as a mapping, e.g. `{name}: {{bits: 4}}`, not {params!r}.")
    else:
        raise where(path, f"{raw!r} is not a step; write a technique name or `rtn: {{bits: 4}}`.")
    if name == "baseline":
        raise where(at, "baseline is a whole pipeline (the unmodified model), not a step.")
    try:
        tech = get_technique(name)
    except ConfigError:
        known = technique_names()
        raise where(
            at, f"unknown technique {name!r}. Techniques: {', '.join(known)}.{_suggest(name, known)}"
        ) from None
    cls_fields = {f.name: f for f in dataclasses.fields(tech.config_cls)}
    space = _space_or_none(name)
    allowed = set(cls_fields) | ({"bits"} if space is not None else set())
    fields: dict[str, Values] = {}
    for key, value in params.items():
        key_path = (*at, key)
        if key not in allowed:
            known = sorted(allowed)
            raise where(
                key_path,
                f"{name} has no field {key!r}. Fields: {', '.join(known)}.{_suggest(str(key), known)}",
            )
        default = cls_fields[key].default if key in cls_fields else None
        fields[str(key)] = _parse_values(value, key_path, where, isinstance(default, tuple))
    return StepSpec(name, fields, at)


# ---- running -----------------------------------------------------------------------------------------------


@dataclass
class SweepItem:
    """What became of one configuration: ``status`` is ``done``, ``failed``, ``interrupted``, or in a dry run
    ``known`` (the registry has it: ``run_id``) or ``to run``."""

    configuration: Configuration
    status: str
    run_id: int | None = None
    reused: bool = False
    error: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class SweepReport:
    """A sweep's outcome: one :class:`SweepItem` per configuration, in the sweep's order."""

    sweep: Sweep
    items: list[SweepItem]
    executor: str
    registry_url: str
    dry_run: bool = False
    seconds: float = 0.0
    baseline_ids: list[int] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def run_ids(self) -> list[int]:
        return [i.run_id for i in self.items if i.run_id is not None]

    @property
    def failed(self) -> list[SweepItem]:
        return [i for i in self.items if i.status in ("failed", "interrupted")]

    @property
    def ok(self) -> bool:
        return not self.failed

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for item in self.items:
            key = "from registry" if item.reused else item.status
            out[key] = out.get(key, 0) + 1
        return out

    def summary(self) -> str:
        """One line: how many configurations, how many run, found, failed (or known / to run in a dry run)."""
        parts = ", ".join(f"{n} {what}" for what, n in self.counts().items())
        head = f"{len(self.items)} configuration(s)"
        how = "" if self.dry_run else f" in {self.seconds:.1f} s ({self.executor})"
        return f"{head}: {parts}{how}." if parts else f"{head}."

    def plan(self) -> Any:
        """The configurations as a DataFrame: model, suite, pipeline, status and run (for a dry run)."""
        import pandas as pd

        return pd.DataFrame(
            [
                {
                    "model": i.configuration.model_name,
                    "suite": i.configuration.suite_name,
                    "pipeline": i.configuration.label,
                    "status": "from registry" if i.reused else i.status,
                    "run": i.run_id,
                }
                for i in self.items
            ]
        )

    def frame(self, registry: Any = None) -> Any:
        """The registry's rows of this sweep's runs (any status), in the sweep's order."""
        reg, owned = _registry(registry if registry is not None else self.registry_url)
        try:
            frame = reg.runs_frame(status=None, mark_stale=False)
        finally:
            if owned:
                reg.close()
        ids = self.run_ids
        if frame.empty or not ids:
            return frame.iloc[0:0]
        order = {run_id: i for i, run_id in enumerate(ids)}
        part = frame[frame["run_id"].isin(order)]
        return part.iloc[part["run_id"].map(order).argsort()].reset_index(drop=True)

    def table(self, registry: Any = None, columns: Sequence[str] | None = None) -> Any:
        """The comparison table of this sweep's runs (:func:`workbench.tables.comparison_table`)."""
        from workbench.tables import DEFAULT_COLUMNS, comparison_table

        cols = list(columns) if columns is not None else ["run_id", "status", *DEFAULT_COLUMNS[1:], "suite"]
        return comparison_table(self.frame(registry), columns=cols)


def _registry(registry: Any) -> tuple[Any, bool]:
    from workbench.registry import Registry

    if registry is None or isinstance(registry, (str, Path)):
        return Registry.open(None if registry is None else str(registry)), True
    return registry, False


def worker_url(url: str) -> str:
    """The registry URL as a worker on this machine must see it: a relative SQLite path made absolute (a worker
    may start in another folder); an in-memory SQLite database cannot be shared and is refused."""
    from sqlalchemy.engine import make_url

    try:
        parsed = make_url(url)
    except Exception:  # noqa: BLE001 - a plain file path is a SQLite file (as Registry.open takes it)
        return f"sqlite:///{Path(url).expanduser().resolve()}"
    if parsed.get_backend_name() != "sqlite":
        return url
    database = parsed.database or ""
    if database in ("", ":memory:") or database.startswith("file::memory:"):
        raise ConfigError(
            "An in-memory SQLite registry cannot be shared with Ray workers; give a file "
            "(sqlite:///runs.db) or a PostgreSQL URL."
        )
    if not Path(database).is_absolute():
        parsed = parsed.set(database=str(Path(database).resolve()))
    return parsed.render_as_string(hide_password=False)


def known_fingerprint(spec: Any) -> str | None:
    """The fingerprint remembered beside a model's weight files, without loading them (None when none is
    remembered, or for a model whose weights are not files: the tiny models, Hugging Face ids).

    Reads the same records :func:`workbench.models.fingerprints._cached_fingerprint` writes: keyed by the
    folder and the files' names, sizes and modification times, and the dtype.
    """
    from workbench.models import DEMO_FOLDER, ModelSpec, _demo_ready, demo_home

    spec = ModelSpec.parse(spec)
    source = Path(spec.source).expanduser()
    if spec.source == "demo":
        folder = demo_home() / DEMO_FOLDER
        files = [folder / "model.safetensors"] if _demo_ready(folder) else []
    elif spec.source.lower().endswith(".gguf"):
        files = [source]
    elif source.is_dir():
        files = sorted(source.glob("*.safetensors"))
    else:
        return None
    files = [f for f in files if f.is_file()]
    if not files:
        return None
    stats = [f.stat() for f in files]
    key = "|".join(f"{f.name}:{s.st_size}:{s.st_mtime_ns}" for f, s in zip(files, stats)) + f"|{spec.dtype}"
    folder = files[0].parent
    record_key = f"{folder.resolve()}|{key}"
    for record in (folder / "wb-fingerprint.json", demo_home() / "fingerprints.json"):
        try:
            known = json.loads(record.read_text())
        except (OSError, ValueError):
            continue
        if record_key in known:
            return str(known[record_key])
    return None


def _result_item(config: Configuration, result: Any) -> SweepItem:
    return SweepItem(
        config,
        str(result.status),
        result.run_id,
        bool(result.reused),
        result.error,
        dict(result.metrics or {}),
    )


def run_sweep(
    sweep: Sweep,
    *,
    registry: Any = None,
    executor: str = "local",
    address: str | None = None,
    dry_run: bool = False,
    force: bool = False,
    max_retries: int = 2,
    num_cpus: int = 2,
    cpus_per_task: float = 1.0,
    runner: Callable[..., Any] | None = None,
    on_result: Callable[[SweepItem, int, int], None] | None = None,
    on_start: Callable[[int], None] | None = None,
) -> SweepReport:
    """Run every configuration of ``sweep`` (or, with ``dry_run``, say which the registry already has).

    Args:
        registry: a URL, a :class:`~workbench.registry.Registry`, or None (the sweep's own ``registry:``, else
            ``$WORKBENCH_REGISTRY`` or ``./workbench-runs.db``).
        executor: ``"local"`` (one run at a time in this process, so timings are not shared with other runs) or
            ``"ray"`` (one Ray task per configuration).
        address: the Ray cluster to join (``"auto"``, ``ray://host:10001``); None starts a local Ray instance
            with ``num_cpus`` CPUs unless one is already running in this process.
        force: run again even where the registry has the run.
        max_retries: Ray only: how often a task whose worker or node was lost is retried.
        cpus_per_task: Ray only: the CPUs each task declares.
        runner: what runs one configuration (``run_experiment``'s signature; the default is it).
        on_start: ``on_start(n)`` once the configurations are built and checked, before the first run.
        on_result: ``on_result(item, i, n)`` after each configuration (for a progress bar).

    Raises:
        ConfigError: the sweep or a configuration is refused (nothing has run), an unknown executor, or Ray is
            not installed.
    """
    if executor not in EXECUTORS:
        raise ConfigError(f"Unknown executor {executor!r}; use one of {', '.join(EXECUTORS)}.")
    if executor == "ray":
        try:
            import ray  # noqa: F401
        except ImportError:
            raise ConfigError(
                "The ray executor needs Ray: pip install 'efficiency-workbench[ray]' (or 'ray>=2.9')."
            ) from None
    t0 = time.perf_counter()
    reg, owned = _registry(registry if registry is not None else sweep.registry)
    try:
        notes: list[str] = []
        loaded: dict[Any, Any] = {}
        if dry_run:
            configs, fingerprints = _plan(sweep, notes, loaded)
        else:
            from workbench.models import load_model

            def model_for(spec: Any) -> Any:
                key = getattr(spec, "key", spec)
                if key not in loaded:
                    loaded[key] = load_model(spec)
                return loaded[key].model

            configs = sweep.configurations(model_for, notes=notes)  # every one built and checked first
            fingerprints = {k: v.fingerprint for k, v in loaded.items()}
        report = SweepReport(sweep, [], executor, str(getattr(reg, "url", "")), dry_run, notes=notes)
        if on_start is not None:
            on_start(len(configs))
        if dry_run:
            report.items = _lookup(configs, fingerprints, reg)
            for i, item in enumerate(report.items):
                if on_result is not None:
                    on_result(item, i, len(configs))
        elif executor == "local":
            report.items = _run_local(sweep, configs, loaded, reg, force, runner, on_result)
        else:
            report.items, report.baseline_ids = _run_ray(
                sweep,
                configs,
                loaded,
                reg,
                force,
                runner,
                on_result,
                address,
                num_cpus,
                cpus_per_task,
                max_retries,
            )
        report.seconds = time.perf_counter() - t0
        return report
    finally:
        if owned:
            reg.close()


def _plan(
    sweep: Sweep, notes: list[str], loaded: dict[Any, Any]
) -> tuple[list[Configuration], dict[Any, str]]:
    """A dry run's configurations and each model's fingerprint, loading weights only where needed: a tiny
    model, a model whose fingerprint is not remembered, or a sweep whose settings depend on the weights."""
    from workbench.models import TINY, ModelSpec, load_model

    fingerprints: dict[Any, str] = {}
    needs = sweep.needs_weights()

    def model_for(spec: Any) -> Any:
        key = getattr(spec, "key", spec)
        parsed = ModelSpec.parse(spec)
        known = None if parsed.source in TINY else known_fingerprint(parsed)
        if known is not None and not needs:
            fingerprints[key] = known
            return None  # built without the model: the generic spaces, checked when it runs
        if key not in loaded:
            loaded[key] = load_model(spec)
        fingerprints[key] = loaded[key].fingerprint
        return loaded[key].model

    return sweep.configurations(model_for, notes=notes), fingerprints


def _lookup(configs: Sequence[Configuration], fingerprints: Mapping[Any, str], reg: Any) -> list[SweepItem]:
    from workbench.evaluate import get_suite

    items = []
    for config in configs:
        fp = fingerprints[getattr(config.model, "key", config.model)]
        hit = reg.find_done(fp, config.pipeline_json, get_suite(config.suite).key)
        if hit is not None:
            items.append(SweepItem(config, "known", hit.id, True, None, dict(hit.metrics)))
        else:
            items.append(SweepItem(config, "to run"))
    return items


def _runner(runner: Callable[..., Any] | None) -> Callable[..., Any]:
    if runner is not None:
        return runner
    from workbench.experiment import run_experiment  # looked up now: tests and tools may replace it

    return run_experiment


def _run_local(
    sweep: Sweep,
    configs: Sequence[Configuration],
    loaded: Mapping[Any, Any],
    reg: Any,
    force: bool,
    runner: Callable[..., Any] | None,
    on_result: Callable[[SweepItem, int, int], None] | None,
) -> list[SweepItem]:
    run = _runner(runner)
    items = []
    for i, config in enumerate(configs):
        model = loaded.get(getattr(config.model, "key", config.model), config.model)
        result = run(
            model,
            list(config.pipeline),
            config.suite,
            registry=reg,
            tags=sweep.tags,
            notes=sweep.notes,
            reuse=not force,
            seed=sweep.seed,
        )
        item = _result_item(config, result)
        items.append(item)
        if on_result is not None:
            on_result(item, i, len(configs))
    return items


def _ray_task(payload: dict[str, Any]) -> dict[str, Any]:
    """One configuration on a Ray worker: it opens the shared registry itself and records its run there."""
    from workbench.techniques import pipeline_from_json

    run = _runner(payload.get("runner"))
    result = run(
        payload["model"],
        pipeline_from_json(payload["pipeline_json"]),
        payload["suite"],
        registry=payload["registry_url"],
        tags=tuple(payload["tags"]),
        notes=payload["notes"],
        reuse=payload["reuse"],
        seed=payload["seed"],
    )
    return {
        "status": result.status,
        "run_id": result.run_id,
        "reused": bool(result.reused),
        "error": result.error,
        "metrics": dict(result.metrics or {}),
    }


def start_local_ray(num_cpus: int = 2, *, attempts: int = 3) -> None:
    """Start a local Ray instance with ``num_cpus`` CPUs (workers see this process's ``WORKBENCH_HOME``).

    On a machine whose cores are busy, Ray's raylet can give up waiting for its own agents to start (a fixed
    wait inside Ray: ray-project/ray#65983) and the start fails with "The current node timed out during
    startup"; that start is tried again, up to ``attempts`` times.
    """
    import os

    import ray

    env = {k: os.environ[k] for k in ("WORKBENCH_HOME",) if k in os.environ}
    for attempt in range(1, attempts + 1):
        try:
            ray.init(
                num_cpus=num_cpus,
                include_dashboard=False,
                runtime_env={"env_vars": env} if env else None,
                log_to_driver=False,
            )
            return
        except Exception as err:  # Ray raises a bare Exception when its start times out
            ray.shutdown()
            if "timed out during startup" not in str(err) or attempt == attempts:
                raise


def _worker_lost(err: BaseException) -> bool:
    return any(type(e).__name__ in WORKER_LOST for e in (err, getattr(err, "cause", None)) if e is not None)


def _run_ray(
    sweep: Sweep,
    configs: Sequence[Configuration],
    loaded: Mapping[Any, Any],
    reg: Any,
    force: bool,
    runner: Callable[..., Any] | None,
    on_result: Callable[[SweepItem, int, int], None] | None,
    address: str | None,
    num_cpus: int,
    cpus_per_task: float,
    max_retries: int,
) -> tuple[list[SweepItem], list[int]]:

    import ray

    url = worker_url(str(reg.url))
    started = False
    if not ray.is_initialized():
        if address is None:
            start_local_ray(num_cpus)
        else:
            ray.init(address=address, log_to_driver=False)
        started = True
    try:
        if any(c.wants_gpu for c in configs) and ray.cluster_resources().get("GPU", 0) < 1:
            first = next(c for c in configs if c.wants_gpu)
            raise ConfigError(
                f"{first.label} on {first.model_name} runs on CUDA, but the Ray cluster has no GPU; join a "
                "cluster with one (--address) or place the model on the CPU."
            )
        run = _runner(runner)
        items: list[SweepItem | None] = [None] * len(configs)
        n = len(configs)
        done_count = 0

        def finish(i: int, item: SweepItem) -> None:
            nonlocal done_count
            items[i] = item
            if on_result is not None:
                on_result(item, done_count, n)
            done_count += 1

        # Runs the registry has answer here at once; the rest fan out.
        fingerprints = {k: v.fingerprint for k, v in loaded.items()}
        todo: list[int] = []
        for i, item in enumerate(_lookup(configs, fingerprints, reg)):
            if item.status == "known" and not force:
                finish(i, dataclasses.replace(item, status="done"))
            else:
                todo.append(i)
        # The baseline of each model and suite first, here: the base outputs every task compares with are
        # then on disk, computed once, instead of by every task at the same moment.
        baselines: list[int] = []
        if todo:
            for key, lm in loaded.items():
                for suite in dict.fromkeys(configs[i].suite for i in todo if _model_key(configs[i]) == key):
                    result = run(
                        lm, [], suite, registry=reg, tags=sweep.tags, notes=sweep.notes, seed=sweep.seed
                    )
                    if result.run_id is not None:
                        baselines.append(int(result.run_id))
                    for i in list(todo):
                        c = configs[i]
                        if _model_key(c) == key and c.suite == suite and not c.pipeline:
                            finish(i, _result_item(c, result))
                            todo.remove(i)
        task = ray.remote(_ray_task)
        pending: dict[Any, int] = {}
        for i in todo:
            config = configs[i]
            payload = {
                "registry_url": url,
                "model": config.model,
                "pipeline_json": config.pipeline_json,
                "suite": config.suite,
                "tags": list(sweep.tags),
                "notes": sweep.notes,
                "reuse": not force,
                "seed": sweep.seed,
                "runner": runner,
            }
            options = {
                "num_cpus": cpus_per_task,
                "num_gpus": 1 if config.wants_gpu else 0,
                "max_retries": max_retries,  # system failures only: a lost worker or node
                "retry_exceptions": False,  # an error of the configuration itself is not retried
            }
            pending[task.options(**options).remote(payload)] = i
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            ref = ready[0]
            i = pending.pop(ref)
            config = configs[i]
            try:
                out = ray.get(ref)
                finish(
                    i,
                    SweepItem(
                        config, out["status"], out["run_id"], out["reused"], out["error"], out["metrics"]
                    ),
                )
            except Exception as err:  # noqa: BLE001 - recorded in the report, the sweep goes on
                if _worker_lost(err):
                    message = (
                        f"The Ray worker running it was lost {max_retries + 1} time(s) "
                        f"({type(err).__name__}); not retried further."
                    )
                else:
                    cause = getattr(err, "cause", None) or err
                    message = (
                        str(cause) if isinstance(cause, ConfigError) else f"{type(cause).__name__}: {cause}"
                    )
                finish(i, SweepItem(config, "failed", None, False, message))
        if any(item is not None and item.status == "failed" and item.run_id is None for item in items):
            reg.mark_stale_runs()  # a lost worker's run stays "running" until marked
        return [item for item in items if item is not None], baselines
    finally:
        if started:
            ray.shutdown()


def _model_key(config: Configuration) -> Any:
    return getattr(config.model, "key", config.model)


__all__ = [
    "AXES",
    "EXECUTORS",
    "Axis",
    "Configuration",
    "PipelineSpec",
    "StepSpec",
    "Sweep",
    "SweepItem",
    "SweepReport",
    "Values",
    "axis_values",
    "known_fingerprint",
    "n_layers",
    "run_sweep",
    "start_local_ray",
    "vary",
    "worker_url",
]
