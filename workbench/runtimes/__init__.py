"""Take a variant out: export it (GGUF, compressed-tensors, a plain safetensors folder) and run it for real.

A *runtime* runs a variant where it would be deployed. It is the last step of a pipeline, a technique of kind
``"deploy"``: its apply exports the model the earlier steps produced and returns a module that executes in the
runtime (a :class:`torch.nn.Module` whose ``forward(input_ids)`` gives that runtime's logits), so the ordinary
evaluation measures quality, speed and memory there, and the run is recorded like any other. Its pipeline
ends in the deploy step, so it is its own run, and its parent is the simulated run of the steps before it
(``run_experiment`` finds that prefix run). A deploy step's config names the runtime in ``RUNTIME``.

- ``gguf.py``: GGUF export, bit-exact where a GGUF type fits the variant's weights.
- ``llamacpp.py``: the llama.cpp runtime (through llama-cpp-python) and llama.cpp's own quantizer.
- ``torch_packed.py``: torch with packed low-bit kernels (torchao int4/int8), in process.
- ``hf_export.py``: compressed-tensors (what vLLM serves) and plain safetensors folders; ``card.py``: the model
  card written beside every export.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

SIMULATED = "simulated (torch float)"


# The built-in runtime steps by technique name, so that reading runs (the runs frame's ``runtime`` column) needs
# no import of the techniques (torch). ``tests/test_gguf_export.py`` checks it against the registered ones.
BUILTIN_RUNTIMES = {"llama_cpp": "llama.cpp", "torch_packed": "torch packed"}


def runtime_of_names(techniques: Sequence[str]) -> str:
    """:func:`runtime_of` from a stored pipeline's technique names (what the registry keeps)."""
    import sys

    if not techniques:
        return SIMULATED
    last = str(techniques[-1])
    if last in BUILTIN_RUNTIMES:
        return BUILTIN_RUNTIMES[last]
    base = sys.modules.get(
        "workbench.techniques.base"
    )  # a runtime registered by a plug-in is imported already
    tech = getattr(base, "_TECHNIQUES", {}).get(last) if base is not None else None
    if tech is not None and tech.kind == "deploy":
        return str(getattr(tech.config_cls, "RUNTIME", tech.name))
    return SIMULATED


def runtime_choices() -> dict[str, Any]:
    """What a front end offers as "runtime": label -> the deploy step to append (None: simulated).

    Each registered deploy technique contributes its config class's ``PRESETS`` (label -> parameters), or one
    choice with its defaults, labelled by its ``RUNTIME``.
    """
    from workbench.techniques.base import get_technique, technique_names

    choices: dict[str, Any] = {SIMULATED: None}
    for name in technique_names(kind="deploy"):
        cls = get_technique(name).config_cls
        presets = getattr(cls, "PRESETS", None) or {str(getattr(cls, "RUNTIME", name)): {}}
        for label, params in presets.items():
            choices[label] = cls(**params)
    return choices


def with_runtime(pipeline: Sequence[Any], runtime: str | None) -> list[Any]:
    """``pipeline`` measured in ``runtime`` (a label of :func:`runtime_choices`): the deploy step appended.

    A llama.cpp runtime on a pipeline whose last quantizer writes no exact GGUF type is refused here, before
    anything is queued, with the closest type named (the exporter would refuse it after quantizing).

    Raises:
        ConfigError: an unknown runtime, or a variant llama.cpp cannot hold exactly.
    """
    from workbench.errors import ConfigError

    steps = list(pipeline)
    if runtime in (None, "", SIMULATED):
        return steps
    choices = runtime_choices()
    if runtime not in choices:
        raise ConfigError(f"Unknown runtime {runtime!r}. Choose one of: {', '.join(choices)}.")
    step = choices[runtime]
    if getattr(step, "RUNTIME", "") == "llama.cpp" and getattr(step, "quant", "exact") == "exact":
        from workbench.runtimes.gguf import static_gguf_check

        for config in steps:
            static_gguf_check(config)
    return [*steps, step]


def runtime_of(pipeline: Sequence[Any]) -> str:
    """The runtime a pipeline's variant is measured in: its deploy step's ``RUNTIME``, else :data:`SIMULATED`."""
    from workbench.techniques.base import technique_for

    if pipeline:
        last = pipeline[-1]
        if technique_for(last).kind == "deploy":
            return str(getattr(last, "RUNTIME", technique_for(last).name))
    return SIMULATED


__all__ = [
    "BUILTIN_RUNTIMES",
    "SIMULATED",
    "runtime_choices",
    "runtime_of",
    "runtime_of_names",
    "with_runtime",
]
