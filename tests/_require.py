"""Optional packages that `make test` installs: a test needing one fails when it is missing, never skips
silently. ``WORKBENCH_SKIP_OPTIONAL=1`` skips such tests on purpose (e.g. a machine that cannot build llama.cpp).
"""

from __future__ import annotations

import importlib
import os
from typing import Any

import pytest

HOW = {
    "llama_cpp": "llama-cpp-python (make setup builds it)",
    "torchao": "torchao (the deploy extra)",
    "compressed_tensors": "compressed-tensors (the deploy extra)",
}


def require(module: str) -> Any:
    """The imported module; a missing one fails the test (or skips it with WORKBENCH_SKIP_OPTIONAL=1)."""
    try:
        return importlib.import_module(module)
    except ImportError:
        what = HOW.get(module, module)
        if os.environ.get("WORKBENCH_SKIP_OPTIONAL") == "1":
            pytest.skip(f"{what} is not installed; skipped on request (WORKBENCH_SKIP_OPTIONAL=1)")
        pytest.fail(f"{what} is not installed; `make test` installs it (WORKBENCH_SKIP_OPTIONAL=1 skips)")
