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


@pytest.fixture(scope="session")
def postgres_url():
    """A PostgreSQL server for the registry tests: ``$WORKBENCH_TEST_POSTGRES_URL``, else a private one started
    with initdb and pg_ctl on 127.0.0.1 (port 55432 when free; see ``workbench.registry.localpg``), stopped and
    deleted at the end of the session. Skips when neither is available."""
    url = os.environ.get("WORKBENCH_TEST_POSTGRES_URL")
    if url:
        yield url
        return
    from workbench.registry.localpg import LocalPostgres, unavailable_reason

    reason = unavailable_reason()
    if reason:
        pytest.skip(
            f"no PostgreSQL server for the registry tests: {reason}; or set WORKBENCH_TEST_POSTGRES_URL"
        )
    server = LocalPostgres(fsync=False).start()
    try:
        yield server.url
    finally:
        server.close()


@pytest.fixture()
def postgres_schema_url(postgres_url: str):
    """A URL on the test PostgreSQL server whose tables live in a fresh schema of their own (dropped after)."""
    import uuid

    from sqlalchemy import create_engine, text

    schema = f"wb_test_{uuid.uuid4().hex[:12]}"
    admin = create_engine(postgres_url)
    with admin.begin() as conn:
        conn.execute(text(f"CREATE SCHEMA {schema}"))
    sep = "&" if "?" in postgres_url else "?"
    yield f"{postgres_url}{sep}options=-csearch_path%3D{schema}"
    with admin.begin() as conn:
        conn.execute(text(f"DROP SCHEMA {schema} CASCADE"))
    admin.dispose()
