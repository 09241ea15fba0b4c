"""Shared fixtures: tiny random models (milliseconds) and a throw-away registry per test.

Tests that need the demo model are marked ``slow``; they reuse one prepared copy under ``$WORKBENCH_HOME``
(the Makefile points it at ``.cache/workbench-home`` in the repository), so it is extracted once per machine.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("WORKBENCH_HOME", str(ROOT / ".cache" / "workbench-home"))
# Notebooks executed by the suite run their smoke settings (one bit width per method, small calibration).
os.environ.setdefault("WORKBENCH_NOTEBOOK_SMOKE", "1")

import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def tiny_llama():
    from workbench.tiny import tiny_llama

    return tiny_llama()


@pytest.fixture(scope="session")
def tiny_moe():
    from workbench.tiny import tiny_moe

    return tiny_moe()


@pytest.fixture(scope="session")
def byte_tokenizer():
    from workbench.tiny import byte_tokenizer

    return byte_tokenizer()


@pytest.fixture()
def registry_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'runs.db'}"
