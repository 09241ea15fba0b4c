"""The model card written beside every export (``README.md``), and the variant rebuilt from a recorded run.

:func:`model_card` describes one recorded run for whoever receives the exported files: the pipeline that made
the variant (each step with its parameters), the run's metrics and where they were measured (a simulated
variant's quality is what a packed kernel computes, its size the packed format's bytes, but its speed is the
float model's), the measurements of the same variant in real runtimes when the registry has them (runs whose
parent is this run and whose last step is a deploy step), the files and how to load them, and the workbench
version. It takes the export's description as an :class:`ExportInfo` (or a plain mapping with the same keys),
so every exporter (compressed-tensors, safetensors, GGUF) writes its card through it.

:func:`rebuild_variant` is what an export of a recorded run starts from: the run's model loaded again (its
fingerprint checked against the run's) and its pipeline applied again, as ``run_experiment`` applied it.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from workbench.errors import ConfigError

CARD_NAME = "README.md"

# How to load each export format; an exporter may give its own text in ExportInfo.how_to_load instead.
# ``{folder}`` is the export's folder name.
HOW_TO_LOAD: dict[str, str] = {
    "compressed-tensors": (
        "transformers (needs `pip install compressed-tensors`; the weights are unpacked on load):\n\n"
        "```python\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n"
        'model = AutoModelForCausalLM.from_pretrained("{folder}")\n'
        'tokenizer = AutoTokenizer.from_pretrained("{folder}")\n```\n\n'
        "vLLM serves this format with its packed int4/int8 kernels (on a GPU):\n\n"
        "```bash\nvllm serve {folder}\n```"
    ),
    "safetensors": (
        "transformers (plain float weights; the quantized values are stored dequantized):\n\n"
        "```python\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n"
        'model = AutoModelForCausalLM.from_pretrained("{folder}")\n'
        'tokenizer = AutoTokenizer.from_pretrained("{folder}")\n```'
    ),
    "gguf": (
        'llama.cpp:\n\n```bash\nllama-cli -m {folder}/<file>.gguf -p "Hello"\n'
        "llama-perplexity -m {folder}/<file>.gguf -f text.txt\n```\n\n"
        'llama-cpp-python: `Llama(model_path="{folder}/<file>.gguf")`.'
    ),
}

# The run metrics a card shows, by group: (metric, heading, unit).
QUALITY = (
    ("ppl", "perplexity", ""),
    ("kl_mean", "KL mean vs base", "nats"),
    ("kl_p99", "KL p99 vs base", "nats"),
    ("top1_agree", "same top token as base", ""),
)
SIZE = (
    ("size_mb", "weights", "MB"),
    ("bits_per_weight", "bits per weight", ""),
    ("bits_per_weight_linear", "bits per weight (decoder linears)", ""),
    ("n_params", "parameters", ""),
)
SPEED = (
    ("prefill_tok_s", "prefill", "tokens/s"),
    ("decode_tok_s", "decode", "tokens/s"),
    ("peak_mem_mb", "peak memory (process)", "MB"),
)


@dataclass
class ExportInfo:
    """What an export wrote, for its card and for whoever called it.

    format: the export format's name (``"compressed-tensors"``, ``"safetensors"``, ``"gguf"``).
    folder: where it was written. files: the file names written there (relative to ``folder``).
    n_bytes: bytes of the weight files. details: format-specific facts (the quantization scheme, modules stored
    packed or dense, the reload check) shown in the card as a list. notes: what a reader must know (a tensor
    stored dense, a conversion made). how_to_load: Markdown; None takes the format's entry of ``HOW_TO_LOAD``.
    """

    format: str
    folder: str
    files: list[str] = field(default_factory=list)
    n_bytes: int = 0
    details: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    how_to_load: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _as_export_info(info: ExportInfo | Mapping[str, Any] | None) -> ExportInfo | None:
    if info is None or isinstance(info, ExportInfo):
        return info
    known = {f.name for f in dataclasses.fields(ExportInfo)}
    unknown = sorted(set(info) - known)
    if unknown or "format" not in info:
        raise ConfigError(
            f"export_info needs 'format' and may have {', '.join(sorted(known))}; got {', '.join(unknown)}."
        )
    values = dict(info)
    values.setdefault("folder", "")
    return ExportInfo(**values)


def _fmt(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if math.isnan(value):
            return "n/a"
        if value == int(value) and abs(value) >= 1000:
            return f"{int(value):,}"
        return f"{value:.4g}"
    return str(value)


def _params_text(params: Mapping[str, Any]) -> str:
    return ", ".join(f"`{k}={json.dumps(v)}`" for k, v in params.items()) or "(defaults)"


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(_fmt(c).replace("|", "\\|") for c in row) + " |" for row in rows]
    return lines


def _get_run(run: Any, registry: Any) -> Any:
    if isinstance(run, int) and not isinstance(run, bool):
        if registry is None:
            raise ConfigError(f"model_card: run {run} is an id; pass registry= to read it.")
        return registry.get_run(run)
    if not hasattr(run, "pipeline_json"):
        raise ConfigError(f"model_card: {run!r} is not a recorded run (a registry Run or its id).")
    return run


def _runtime(pipeline_json: str) -> str:
    from workbench.runtimes import SIMULATED, runtime_of
    from workbench.techniques import pipeline_from_json

    try:
        return runtime_of(pipeline_from_json(pipeline_json))
    except ConfigError:  # a technique this workbench no longer has: say what the record says
        return SIMULATED


def runtime_runs(registry: Any, run: Any) -> list[Any]:
    """Done runs of ``run``'s variant measured in a runtime: its children whose last step is a deploy step."""
    from workbench.runtimes import SIMULATED

    frame = registry.runs_frame(status="done")
    if frame.empty or "parent_id" not in frame.columns:
        return []
    ids = frame.loc[frame["parent_id"] == run.id, "run_id"].tolist()
    children = [registry.get_run(int(i)) for i in ids]
    return [c for c in children if _runtime(c.pipeline_json) != SIMULATED]


def model_card(
    run: Any, registry: Any = None, export_info: ExportInfo | Mapping[str, Any] | None = None
) -> str:
    """The Markdown card of a recorded run (a registry ``Run``, or its id with ``registry``).

    With ``registry`` the card also lists the variant's runtime measurements and the base model's numbers on
    the same suite; with ``export_info`` (what an exporter wrote: format, files, details, notes) it says what
    the files are and how to load them.
    """
    import workbench
    from workbench.runtimes import SIMULATED

    run = _get_run(run, registry)
    info = _as_export_info(export_info)
    steps = run.pipeline
    runtime = _runtime(run.pipeline_json)
    label = run.pipeline_label or "baseline"
    lines = [f"# {label}", ""]
    lines.append(
        f"A variant of **{run.model_description}** (weights fingerprint `{run.model_fingerprint}`), made and "
        f"measured with Efficiency Workbench {workbench.__version__} (run {run.id}, suite `{run.suite_name}`)."
    )
    if info is not None:
        lines += ["", f"Exported as **{info.format}**."]
    lines += ["", "## Pipeline", ""]
    if steps:
        rows = [
            (i + 1, f"`{s.get('technique')}`", _params_text(s.get("params", {}))) for i, s in enumerate(steps)
        ]
        lines += _table(["step", "technique", "parameters"], rows)
    else:
        lines.append("None: the unmodified model (baseline).")

    metrics = dict(run.metrics or {})
    env = dict(run.environment or {})
    from workbench.views import SIMULATED_LATENCY

    # A step that only rounds weights in float (rtn, gptq, awq, mixed) leaves the float model's speed.
    simulated = runtime == SIMULATED and any(s.get("technique") in SIMULATED_LATENCY for s in steps)
    if runtime != SIMULATED:
        where = f"measured in the runtime **{runtime}**"
    elif simulated:
        where = "**simulated** (torch float): weights rounded onto the quantized grid and kept in float"
    else:
        where = "measured in torch (the float model, or the packed modules of the technique's own backend)"
    lines += ["", "## Metrics of this run", "", f"Measured on the `{run.suite_name}` suite, {where}."]
    if simulated:
        lines.append(
            "Quality is what a kernel reading the packed weights computes; size is the bytes the packed format "
            "takes (codes, scales, zero points); speed and memory are those of the float model, not of a "
            "packed kernel (see the runtime measurements below when there are any)."
        )
    rows = []
    for group, spec in (("quality", QUALITY), ("size", SIZE), ("speed", SPEED)):
        for key, heading, unit in spec:
            if key in metrics:
                kind = "simulated" if group == "speed" and simulated else "measured"
                if group == "size" and simulated:
                    kind = "counted (packed format)" if key != "n_params" else "counted"
                rows.append((group, heading, metrics[key], unit, kind))
    if rows:
        lines += [""] + _table(["", "metric", "value", "unit", "how"], rows)
    if env:
        machine = ", ".join(
            f"{k} {env[k]}" for k in ("device", "threads", "torch", "transformers", "platform") if k in env
        )
        lines += ["", f"Machine: {machine}."]

    if registry is not None:
        base = registry.find_done(run.model_fingerprint, "[]", run.suite_key) if steps else None
        measured = runtime_runs(registry, run)
        if measured or base is not None:
            lines += ["", "## Runtime measurements", ""]
            if measured:
                lines.append(
                    "The same variant run in a real runtime (each its own run, with this run as parent):"
                )
            rows = []
            for r in ([base] if base is not None else []) + measured:
                m = r.metrics or {}
                name = "base model (float)" if r is base else _runtime(r.pipeline_json)
                rows.append(
                    (
                        r.id,
                        name,
                        r.pipeline_label,
                        m.get("ppl"),
                        m.get("kl_mean"),
                        m.get("size_mb"),
                        m.get("prefill_tok_s"),
                        m.get("decode_tok_s"),
                    )
                )
            lines += [""] + _table(
                ["run", "runtime", "pipeline", "ppl", "KL mean", "MB", "prefill tok/s", "decode tok/s"], rows
            )
            if not measured:
                lines += ["", "No runtime measurement of this variant is recorded yet."]

    if info is not None:
        lines += ["", "## Files", ""]
        folder = Path(info.folder)
        for name in info.files:
            path = folder / name
            size = f" ({path.stat().st_size / 1e6:.2f} MB)" if path.is_file() else ""
            lines.append(f"- `{name}`{size}")
        if info.n_bytes:
            lines.append(f"- weight files in all: {info.n_bytes / 1e6:.2f} MB")
        if info.details:
            lines += ["", "Format details:", ""]
            for key, value in info.details.items():
                shown = json.dumps(value) if isinstance(value, (dict, list, tuple)) else _fmt(value)
                lines.append(f"- {key.replace('_', ' ')}: {shown}")
        if info.notes:
            lines += ["", "Notes:", ""] + [f"- {note}" for note in info.notes]
        how = info.how_to_load or HOW_TO_LOAD.get(info.format)
        if how:
            lines += ["", "## How to load", "", how.replace("{folder}", folder.name or str(folder))]
    lines += ["", "---", f"Written by Efficiency Workbench {workbench.__version__}.", ""]
    return "\n".join(lines)


def write_card(
    folder: str | Path,
    run: Any,
    registry: Any = None,
    export_info: ExportInfo | Mapping[str, Any] | None = None,
) -> Path:
    """Write :func:`model_card` as ``folder/README.md`` and return its path."""
    path = Path(folder) / CARD_NAME
    path.write_text(model_card(run, registry=registry, export_info=export_info), encoding="utf-8")
    return path


def rebuild_variant(
    run: Any, *, registry: Any, model: Any = "demo", progress: Any = None, suite: Any = None
) -> tuple[Any, Any]:
    """The variant a recorded run measured: ``(loaded base model, variant model)``.

    Loads ``model`` (a spec; the registry keeps the weights' fingerprint, not where they came from) and refuses
    it unless its fingerprint is the run's; then applies the run's pipeline (``pipeline_from_json``) to a copy
    with the run's suite's corpus for calibrated steps and seed 0, as ``run_experiment`` does. A run whose last
    step is a deploy step measured a runtime, not a variant: its parent is named instead.
    ``suite``: the run's suite when it is a custom :class:`~workbench.evaluate.Suite` (the registry keeps only
    its name and key; the key must be the run's); a built-in suite is found by name.

    Raises:
        ConfigError: the run is not done, is a runtime run, or ``model`` is not the model it was recorded on.
    """
    import copy

    from workbench.corpus import get_corpus
    from workbench.evaluate import get_suite
    from workbench.models import load_model
    from workbench.progress import as_progress
    from workbench.runtimes import SIMULATED
    from workbench.techniques import ApplyContext, apply_pipeline_, pipeline_from_json

    progress = as_progress(progress)
    run = _get_run(run, registry)
    if run.status != "done":
        raise ConfigError(f"Run {run.id} is {run.status}, not done; export a run that finished.")
    runtime = _runtime(run.pipeline_json)
    if runtime != SIMULATED:
        parent = f"its parent, run {run.parent_id}" if run.parent_id is not None else "the run it measured"
        raise ConfigError(
            f"Run {run.id} measures a variant in the runtime {runtime!r}; export {parent} (the variant itself)."
        )
    pipeline = pipeline_from_json(run.pipeline_json)
    loaded = load_model(model, progress=progress.span(0.0, 0.4))
    if loaded.fingerprint != run.model_fingerprint:
        raise ConfigError(
            f"Run {run.id} was recorded on {run.model_description} (fingerprint {run.model_fingerprint}); "
            f"the model {loaded.spec.source!r} has fingerprint {loaded.fingerprint}. Pass the run's model "
            "(e.g. --model SOURCE)."
        )
    if not pipeline:
        return loaded, copy.deepcopy(loaded.model)
    if suite is not None and not isinstance(suite, str) and suite.name == run.suite_name:
        if suite.key != run.suite_key:
            raise ConfigError(
                f"Run {run.id} was measured on another suite named {run.suite_name!r} (key {run.suite_key}); "
                "pass the suite it was recorded with."
            )
        corpus = get_corpus(suite.corpus)
    else:
        corpus = get_corpus(get_suite(run.suite_name).corpus)
    ctx = ApplyContext(
        tokenizer=loaded.tokenizer,
        corpus=corpus,
        base=loaded.model,
        device=str(loaded.spec.device),
        seed=0,
        progress=progress.span(0.4, 1.0),
    )
    variant = apply_pipeline_(copy.deepcopy(loaded.model), pipeline, ctx)
    return loaded, variant


__all__ = [
    "CARD_NAME",
    "HOW_TO_LOAD",
    "ExportInfo",
    "model_card",
    "rebuild_variant",
    "runtime_runs",
    "write_card",
]
