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


def runtime_of(pipeline: Sequence[Any]) -> str:
    """The runtime a pipeline's variant is measured in: its deploy step's ``RUNTIME``, else :data:`SIMULATED`."""
    from workbench.techniques.base import technique_for

    if pipeline:
        last = pipeline[-1]
        if technique_for(last).kind == "deploy":
            return str(getattr(last, "RUNTIME", technique_for(last).name))
    return SIMULATED


__all__ = ["SIMULATED", "runtime_of"]
