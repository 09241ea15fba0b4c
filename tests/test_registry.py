"""The run registry: opening and schema checks, the run life cycle, DataFrames, stale runs, many writers.

Every test that takes ``url`` runs on SQLite and on PostgreSQL (``WORKBENCH_TEST_POSTGRES_URL``, else the private
server of the ``postgres_url`` fixture in conftest.py), each test in a schema of its own.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import sqlite3
import subprocess
import sys
import threading
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pandas as pd
import pytest
from sqlalchemy import create_engine, text, update

from workbench.errors import ConfigError, RegistryError
from workbench.registry import BASE_COLUMNS, SCHEMA_VERSION, Registry
from workbench.registry.models import VERSION_TABLE, Base, RunRow

RTN4 = json.dumps([{"technique": "rtn", "version": 1, "params": {"bits": 4, "group_size": 32}}])
RTN3 = json.dumps([{"technique": "rtn", "version": 1, "params": {"bits": 3, "group_size": 64}}])
GPTQ = json.dumps(
    [
        {"technique": "gptq", "version": 1, "params": {"bits": 4, "damp": 0.01, "layers": [0, 1]}},
        {"technique": "rtn", "version": 1, "params": {"bits": 8, "group_size": 32}},
    ]
)


@pytest.fixture(params=["sqlite", "postgres"])
def url(request: pytest.FixtureRequest, tmp_path: Path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'runs.db'}"
    return request.getfixturevalue("postgres_schema_url")


@pytest.fixture()
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'runs.db'}"


def _start(reg: Registry, pipeline: str = RTN4, *, model: str = "fp-a", suite: str = "quick:k1", **kw) -> int:
    label = "baseline" if pipeline == "[]" else json.loads(pipeline)[0]["technique"]
    return reg.start_run(
        model, f"tiny {model}", pipeline, label, suite, suite.split(":")[0], {"torch": "2"}, **kw
    )


def _version(url: str) -> str | None:
    engine = create_engine(url)
    with engine.connect() as conn:
        version = conn.execute(text(f"SELECT version_num FROM {VERSION_TABLE}")).scalar()
    engine.dispose()
    return version


# --------------------------------------------------------------------------- opening and schema
def test_new_registry_is_created_and_stamped_at_head(url):
    with Registry.open(url) as reg:
        assert reg.runs_frame(status=None).empty
    assert _version(url) == SCHEMA_VERSION
    with Registry.open(url) as again:  # opening an existing registry changes nothing
        assert again.change_token() == "0:0:0"
    assert _version(url) == SCHEMA_VERSION


def test_migrations_build_exactly_the_schema_of_the_models(url):
    from alembic import command
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    from workbench.registry.store import _alembic_config, _create_engine

    engine = _create_engine(url)
    with engine.begin() as conn:
        command.upgrade(_alembic_config(conn), "head")
    with engine.connect() as conn:
        ctx = MigrationContext.configure(conn, opts={"version_table": VERSION_TABLE})
        assert ctx.get_current_revision() == SCHEMA_VERSION
        diff = compare_metadata(ctx, Base.metadata)
    engine.dispose()
    assert diff == [], f"models and migrations disagree: {diff}"
    with Registry.open(url) as reg:  # a migrated database is a normal registry
        assert reg.get_run(_start(reg)).status == "running"


def test_old_schema_is_refused_with_the_upgrade_command_and_upgrade_keeps_runs(url):
    from alembic import command

    from workbench.registry.store import _alembic_config, _create_engine

    with Registry.open(url) as reg:
        run_id = _start(reg, tags=("keep",))
        reg.finish_run(run_id, {"ppl": 12.5})
    engine = _create_engine(url)
    with engine.begin() as conn:
        command.downgrade(_alembic_config(conn), "0.1")
    engine.dispose()

    with pytest.raises(RegistryError) as info:
        Registry.open(url)
    message = str(info.value)
    assert "schema 0.1" in message and f"needs {SCHEMA_VERSION}" in message
    assert "workbench registry upgrade --url" in message

    assert Registry.upgrade(url) == SCHEMA_VERSION
    with Registry.open(url) as reg:
        run = reg.get_run(run_id)
        assert run.status == "done" and run.metrics == {"ppl": 12.5} and run.tags == ("keep",)
        before = reg.change_token()
        reg.set_notes(run_id, "after upgrade")
        assert reg.change_token() != before


def test_newer_schema_is_refused_with_a_package_upgrade_hint(sqlite_url):
    Registry.open(sqlite_url).close()
    engine = create_engine(sqlite_url)
    with engine.begin() as conn:
        conn.execute(text(f"UPDATE {VERSION_TABLE} SET version_num = '9.9'"))
    engine.dispose()
    with pytest.raises(RegistryError, match=r"schema 9\.9.*newer workbench.*pip install -U"):
        Registry.open(sqlite_url)
    with pytest.raises(RegistryError, match="newer workbench"):
        Registry.upgrade(sqlite_url)  # never "upgrades" down to an older schema


def test_text_file_is_refused_and_left_untouched(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("my thesis notes\n" * 50)
    before = path.read_bytes()
    with pytest.raises(RegistryError, match="not an SQLite database.*Nothing was changed"):
        Registry.open(path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]  # no -wal / -shm files either


def test_another_applications_sqlite_database_is_refused_and_left_untouched(tmp_path):
    path = tmp_path / "app.db"
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE users (id INTEGER PRIMARY KEY, name TEXT)")
        conn.execute("INSERT INTO users (name) VALUES ('ada')")
    conn.close()
    with pytest.raises(RegistryError, match=r"not a workbench registry: it holds other tables \(users\)"):
        Registry.open(f"sqlite:///{path}")
    with pytest.raises(RegistryError, match="not a workbench registry"):
        Registry.upgrade(f"sqlite:///{path}")
    with sqlite3.connect(path) as conn:
        tables = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        assert tables == ["users"]
        assert conn.execute("SELECT name FROM users").fetchall() == [("ada",)]
    conn.close()


def test_truncated_database_file_gives_a_registry_error(tmp_path):
    path = tmp_path / "runs.db"
    Registry.open(path).close()
    data = path.read_bytes()
    path.write_bytes(data[:100] + b"\x00garbage" * 64)  # valid header, broken pages
    with pytest.raises(RegistryError, match="registry at sqlite:///"):
        Registry.open(path)


def test_url_can_be_a_path_the_environment_or_the_working_folder_default(tmp_path, monkeypatch):
    with Registry.open(tmp_path / "by-path.db") as reg:
        assert reg.url == f"sqlite:///{tmp_path / 'by-path.db'}"
    monkeypatch.setenv("WORKBENCH_REGISTRY", f"sqlite:///{tmp_path / 'from-env.db'}")
    Registry.open().close()
    assert (tmp_path / "from-env.db").exists()
    monkeypatch.delenv("WORKBENCH_REGISTRY")
    monkeypatch.chdir(tmp_path)
    Registry.open().close()
    assert (tmp_path / "workbench-runs.db").exists()


def test_unusable_urls_say_what_to_do(tmp_path):
    with pytest.raises(RegistryError, match="not a database URL SQLAlchemy knows"):
        Registry.open("nosuchdialect+x://")
    with pytest.raises(RegistryError, match="does not exist"):
        Registry.open(tmp_path / "missing-folder" / "runs.db")
    with pytest.raises(RegistryError, match="is a folder"):
        Registry.open(tmp_path)


# --------------------------------------------------------------------------- life cycle
def test_finished_run_is_found_again_and_failed_runs_never_count(url):
    with Registry.open(url) as reg:
        failed = _start(reg)
        reg.fail_run(failed, "RuntimeError: boom")
        assert reg.find_done("fp-a", RTN4, "quick:k1") is None

        first = _start(reg)
        assert reg.get_run(first).status == "running"
        assert reg.find_done("fp-a", RTN4, "quick:k1") is None  # running is not done either
        reg.finish_run(first, {"ppl": 12.25, "kl_mean": 0.01}, extras={"generations": [{"prompt": "p"}]})
        second = _start(reg)
        reg.finish_run(second, {"ppl": 12.5})

        hit = reg.find_done("fp-a", RTN4, "quick:k1")
        assert hit is not None and hit.id == second and hit.metrics == {"ppl": 12.5}  # the latest done run
        # Key order and spacing do not matter: pipelines are compared in canonical form.
        respaced = json.dumps(json.loads(RTN4), indent=2, sort_keys=False)
        assert reg.find_done("fp-a", respaced, "quick:k1").id == second
        assert reg.find_done("fp-a", RTN3, "quick:k1") is None
        assert reg.find_done("fp-b", RTN4, "quick:k1") is None
        assert reg.find_done("fp-a", RTN4, "standard:k2") is None

        run = reg.get_run(first)
        assert run.status == "done" and run.technique == "rtn" and run.suite_name == "quick"
        assert run.extras == {"generations": [{"prompt": "p"}]} and run.environment == {"torch": "2"}
        assert run.pid == os.getpid() and run.hostname
        assert run.finished_at >= run.created_at and run.created_at.tzinfo is not None
        assert run.pipeline[0]["params"]["bits"] == 4 and run.duration_s >= 0
        failed_run = reg.get_run(failed)
        assert failed_run.status == "failed" and failed_run.error == "RuntimeError: boom"


def test_done_runs_are_never_overwritten_and_bad_calls_are_refused(url):
    with Registry.open(url) as reg:
        run_id = _start(reg)
        reg.finish_run(run_id, {"ppl": 10.0})
        with pytest.raises(RegistryError, match="already done"):
            reg.finish_run(run_id, {"ppl": 99.0})
        with pytest.raises(RegistryError, match="never marked failed"):
            reg.fail_run(run_id, "late error")
        assert reg.get_run(run_id).metrics == {"ppl": 10.0}
        with pytest.raises(ConfigError, match="'failed' or 'interrupted'"):
            reg.fail_run(run_id, "x", status="done")
        with pytest.raises(RegistryError, match="No run 987654"):
            reg.get_run(987654)
        with pytest.raises(RegistryError, match="No run 987654"):
            reg.finish_run(987654, {})
        with pytest.raises(RegistryError, match="parent_id must name a recorded run"):
            _start(reg, parent_id=987654)
        with pytest.raises(ConfigError, match="not valid JSON"):
            reg.start_run("fp-a", "m", "[{", "broken", "quick:k1", "quick", {})
        with pytest.raises(ConfigError, match="flat numbers"):
            reg.finish_run(_start(reg), {"per_layer": [1.0, 2.0]})


def test_interrupted_run_keeps_its_reason(url):
    with Registry.open(url) as reg:
        run_id = _start(reg)
        reg.fail_run(run_id, "Cancelled by the user.", status="interrupted")
        run = reg.get_run(run_id)
        assert run.status == "interrupted" and run.error == "Cancelled by the user." and run.finished_at


def test_tags_notes_lineage_and_change_token(url):
    with Registry.open(url) as reg:
        token0 = reg.change_token()
        parent = _start(reg, pipeline="[]", tags=("team-a",), notes="base")
        token1 = reg.change_token()
        assert token1 != token0
        child = _start(reg, parent_id=parent, tags=["sweep", "sweep", " ", "team-a"])
        assert reg.get_run(child).tags == ("sweep", "team-a") and reg.get_run(child).parent_id == parent

        token2 = reg.change_token()
        reg.heartbeat(child)  # a heartbeat is not a change a reader can see
        assert reg.change_token() == token2
        reg.set_tags(child, ["final"])
        token3 = reg.change_token()
        assert token3 != token2 and reg.get_run(child).tags == ("final",)
        reg.set_notes(child, "looks good")
        assert reg.change_token() != token3 and reg.get_run(child).notes == "looks good"
        with pytest.raises(ConfigError, match="comma"):
            reg.set_tags(child, ["a,b"])

        # Another process's registry object sees the same token.
        with Registry.open(url) as other:
            assert other.change_token() == reg.change_token()
            other.finish_run(child, {"ppl": 1.0})
        assert reg.change_token() != token3

        token4 = reg.change_token()
        reg.delete_run(parent)  # the child stays, without a parent
        assert reg.change_token() != token4
        assert reg.get_run(child).parent_id is None
        with pytest.raises(RegistryError, match="No run"):
            reg.get_run(parent)
        assert _start(reg) > child  # ids are never reused


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_runs_left_running_by_a_dead_process_are_marked_interrupted(url):
    with Registry.open(url) as reg:
        mine = _start(reg)
        dead = _start(reg)
        far_alive = _start(reg)
        far_dead = _start(reg)
        long_ago = datetime.now(timezone.utc).replace(tzinfo=None) - timedelta(hours=1)
        with reg.session_scope() as s:
            s.execute(update(RunRow).where(RunRow.id == dead).values(pid=_dead_pid()))
            s.execute(update(RunRow).where(RunRow.id == far_alive).values(hostname="other-host", pid=1))
            s.execute(
                update(RunRow)
                .where(RunRow.id == far_dead)
                .values(hostname="other-host", pid=1, heartbeat_at=long_ago)
            )
        assert reg.mark_stale_runs(max_age_s=60) == [dead, far_dead]
        assert reg.get_run(dead).status == "interrupted" and "process" in reg.get_run(dead).error
        assert reg.get_run(far_dead).status == "interrupted"
        assert reg.get_run(mine).status == "running" and reg.get_run(far_alive).status == "running"
        assert reg.mark_stale_runs(max_age_s=60) == []

        # Opening the registry (as a restarted kernel does) and listing runs mark them too.
        redead = _start(reg)
        with reg.session_scope() as s:
            s.execute(update(RunRow).where(RunRow.id == redead).values(pid=_dead_pid()))
        frame = reg.runs_frame(status=None)
        assert frame.set_index("run_id").loc[redead, "status"] == "interrupted"


# --------------------------------------------------------------------------- DataFrames
def test_runs_frame_has_flat_metric_and_param_columns_and_filters(url):
    with Registry.open(url) as reg:
        base = _start(reg, pipeline="[]", tags=("a",))
        reg.finish_run(base, {"ppl": 10.0, "size_mb": 100.0})
        rtn = _start(reg, pipeline=RTN4, tags=("ab", "x"), notes="4 bits", parent_id=base)
        reg.finish_run(rtn, {"ppl": 11.0, "kl_mean": 0.02, "size_mb": 30.0})
        gptq = _start(reg, pipeline=GPTQ, model="fp-b", suite="standard:k2")
        reg.finish_run(gptq, {"ppl": 10.5, "kl_mean": 0.01})
        failed = _start(reg, pipeline=RTN3)
        reg.fail_run(failed, "boom")

        frame = reg.runs_frame()
        assert list(frame.columns[: len(BASE_COLUMNS)]) == list(BASE_COLUMNS)
        assert list(frame["run_id"]) == [base, rtn, gptq]
        assert {"metric_ppl", "metric_kl_mean", "metric_size_mb"} <= set(frame.columns)
        assert {"param_bits", "param_group_size", "param_damp", "param_layers"} <= set(frame.columns)
        row = frame.set_index("run_id")
        assert row.loc[rtn, "metric_kl_mean"] == 0.02 and pd.isna(row.loc[base, "metric_kl_mean"])
        assert (
            row.loc[rtn, "param_bits"] == 4 and row.loc[gptq, "param_bits"] == 4
        )  # first technique's params
        assert row.loc[gptq, "param_layers"] == "[0,1]"
        assert row.loc[rtn, "technique"] == "rtn" and row.loc[gptq, "technique"] == "gptq"
        assert row.loc[base, "technique"] == "baseline" and row.loc[base, "pipeline"] == "baseline"
        assert row.loc[rtn, "tags"] == "ab,x" and row.loc[rtn, "notes"] == "4 bits"
        assert row.loc[rtn, "parent_id"] == base and pd.isna(row.loc[base, "parent_id"])
        assert row.loc[rtn, "model"] == "tiny fp-a" and row.loc[gptq, "suite"] == "standard"
        assert (frame["duration_s"] >= 0).all()
        assert str(frame["created_at"].dt.tz) == "UTC"

        assert list(reg.runs_frame(status=None)["run_id"]) == [base, rtn, gptq, failed]
        assert list(reg.runs_frame(status="failed")["run_id"]) == [failed]
        assert list(reg.runs_frame(status=["failed", "done"], technique="rtn")["run_id"]) == [rtn, failed]
        assert list(reg.runs_frame(technique="baseline")["run_id"]) == [base]
        assert list(reg.runs_frame(tag="a")["run_id"]) == [base]  # "ab" is another tag
        assert list(reg.runs_frame(tag="x")["run_id"]) == [rtn]
        assert list(reg.runs_frame(model="fp-b")["run_id"]) == [gptq]
        assert list(reg.runs_frame(model="tiny fp-b")["run_id"]) == [gptq]
        assert list(reg.runs_frame(suite="standard")["run_id"]) == [gptq]
        assert list(reg.runs_frame(suite="quick:k1")["run_id"]) == [base, rtn]
        assert len(reg.runs_frame(since=timedelta(hours=1))) == 3
        assert reg.runs_frame(since="2100-01-01").empty
        assert len(reg.runs_frame(since=datetime.now(timezone.utc) - timedelta(minutes=5))) == 3
        with pytest.raises(ConfigError, match="Unknown status 'finished'"):
            reg.runs_frame(status="finished")
        with pytest.raises(ConfigError, match="not a date"):
            reg.runs_frame(since="yesterday-ish")


def test_empty_registry_and_empty_filters_give_frames_with_the_base_columns(url):
    with Registry.open(url) as reg:
        empty = reg.runs_frame(status=None)
        assert empty.empty and list(empty.columns) == list(BASE_COLUMNS)
        reg.finish_run(_start(reg), {"ppl": 1.0})
        none_match = reg.runs_frame(tag="nobody")
        assert none_match.empty and list(none_match.columns) == list(BASE_COLUMNS)


def test_runs_frame_of_a_thousand_runs_is_fast(sqlite_url):
    import time

    with Registry.open(sqlite_url) as reg, reg.session_scope() as s:
        now = datetime.now(timezone.utc).replace(tzinfo=None)
        for i in range(1000):
            s.add(
                RunRow(
                    created_at=now,
                    updated_at=now,
                    finished_at=now,
                    status="done",
                    model_fingerprint="fp",
                    model_description="m",
                    pipeline_json=RTN4,
                    pipeline_hash=f"h{i}",
                    pipeline_label="rtn",
                    technique="rtn",
                    suite_key="q",
                    suite_name="quick",
                    metrics_json=json.dumps({"ppl": i}),
                    extras_json="{}",
                    environment_json="{}",
                    tags_json="[]",
                    notes="",
                )
            )
    with Registry.open(sqlite_url) as reg:
        t0 = time.perf_counter()
        frame = reg.runs_frame()
        took = time.perf_counter() - t0
    assert len(frame) == 1000 and frame["metric_ppl"].sum() == sum(range(1000))
    assert took < 1.0, f"runs_frame took {took:.2f} s for 1,000 runs"


# --------------------------------------------------------------------------- concurrency
def _write_runs(url: str, worker: int, n: int) -> None:
    reg = Registry.open(url)  # every worker opens (and maybe creates) the registry at the same moment
    for i in range(n):
        pipeline = json.dumps(
            [{"technique": "rtn", "version": 1, "params": {"bits": 4, "seed": worker * 1000 + i}}]
        )
        run_id = reg.start_run(
            "fp", "m", pipeline, "rtn", "quick:k", "quick", {"worker": worker}, tags=[f"w{worker}"]
        )
        reg.heartbeat(run_id)
        reg.finish_run(run_id, {"worker": worker, "index": i, "value": worker * 1000 + i + 0.5})
    reg.close()


def test_several_processes_writing_at_once_lose_nothing(url):
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_write_runs, args=(url, w, 25)) for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert [p.exitcode for p in procs] == [0, 0, 0, 0]
    with Registry.open(url) as reg:
        frame = reg.runs_frame(status=None)
        assert len(frame) == 100 and set(frame["status"]) == {"done"}
        assert frame["run_id"].is_unique
        got = sorted(zip(frame["metric_worker"], frame["metric_index"], frame["metric_value"]))
        assert got == [(w, i, w * 1000 + i + 0.5) for w in range(4) for i in range(25)]
        assert (frame["tags"] == "w" + frame["metric_worker"].astype(int).astype(str)).all()
        assert reg.change_token().startswith("100:")


def test_one_registry_shared_by_threads(url):
    errors: list[BaseException] = []
    with Registry.open(url) as reg:

        def work(worker: int) -> None:
            try:
                for i in range(10):
                    run_id = _start(reg, model=f"fp-{worker}")
                    reg.finish_run(run_id, {"i": i})
                    reg.runs_frame()
            except BaseException as err:  # noqa: BLE001 - reported by the assertion below
                errors.append(err)

        threads = [threading.Thread(target=work, args=(w,)) for w in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == []
        assert len(reg.runs_frame()) == 40


# --------------------------------------------------------------------------- opening twice in one process
def _count_from_another_process(url: str) -> int:
    """How many runs ``workbench runs`` sees from a fresh process (which opens and closes the registry)."""
    out = subprocess.run(
        [sys.executable, "-m", "workbench.cli", "runs", "--registry", url, "--format", "csv"],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return len(out.stdout.strip().splitlines()) - 1


def _add(reg: Registry, label: str) -> int:
    run_id = reg.start_run("fp", "m", "[]", label, "quick", "quick")
    reg.finish_run(run_id, {"ppl": 1.0})
    return run_id


def test_opening_the_registry_twice_in_one_process_loses_no_run(tmp_path, monkeypatch):
    # The sequence a notebook makes: the registry opened in a cell, again by the app, and `workbench runs` in a
    # terminal beside it. A second open must not drop the first one's SQLite locks (a plain-Python read of the
    # file did: the other process then deleted the -wal file and later writes went nowhere).
    monkeypatch.chdir(tmp_path)
    url = "sqlite:///r.db"
    r1 = Registry.open(url)
    _add(r1, "a")
    r2 = Registry.open(url)
    assert _count_from_another_process(url) == 1
    _add(r1, "b")
    assert _count_from_another_process(url) == 2
    _add(r2, "c")
    r2.close()
    r2.close()  # closing twice is harmless, and r1 keeps working
    _add(r1, "d")
    assert _count_from_another_process(url) == 4
    assert sorted(r1.runs_frame()["pipeline"]) == ["a", "b", "c", "d"]
    r1.close()
    assert (tmp_path / "r.db").exists()


def test_a_text_file_check_never_reads_the_file_outside_sqlite(tmp_path, monkeypatch):
    # Opening a registry must not open its file with Python's own open(): closing that descriptor would drop the
    # process's SQLite locks on it.
    import builtins
    import io

    path = tmp_path / "runs.db"
    Registry.open(path).close()
    opened: list[str] = []
    real_open, real_io_open = builtins.open, io.open

    def spy(file, *args, **kwargs):
        opened.append(str(file))
        return real_open(file, *args, **kwargs)

    def spy_io(file, *args, **kwargs):
        opened.append(str(file))
        return real_io_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", spy)
    monkeypatch.setattr(io, "open", spy_io)
    monkeypatch.setattr(Path, "open", lambda self, *a, **k: spy(self, *a, **k))
    with Registry.open(path) as reg, Registry.open(path) as again:
        _add(reg, "x")
        assert len(again.runs_frame()) == 1
    assert not [name for name in opened if name.startswith(str(path))]


def _random_session(url: str, worker: int, seed: int, n_steps: int, queue: multiprocessing.Queue) -> None:
    """Open the registry several times, list, write and close in random order; report what was written."""
    import random

    rng = random.Random(seed)
    handles: list[Registry] = []
    written: list[str] = []
    try:
        for step in range(n_steps):
            action = rng.choice(["open", "open", "write", "write", "write", "list", "close"])
            if action == "open" or not handles:
                handles.append(Registry.open(url))
            elif action == "write":
                label = f"w{worker}-{step}"
                _add(rng.choice(handles), label)
                written.append(label)
            elif action == "list":
                rng.choice(handles).runs_frame(status=None)
                _count_from_another_process(url) if rng.random() < 0.05 else None
            else:
                handles.pop(rng.randrange(len(handles))).close()
        for handle in handles:
            handle.close()
        queue.put((worker, written, None))
    except BaseException as err:  # noqa: BLE001 - reported to the parent
        queue.put((worker, written, f"{type(err).__name__}: {err}"))


def test_processes_opening_the_registry_many_times_in_random_order_lose_nothing(tmp_path):
    url = f"sqlite:///{tmp_path / 'runs.db'}"
    Registry.open(url).close()
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_random_session, args=(url, w, 1000 + w, 60, queue)) for w in range(4)]
    for p in procs:
        p.start()
    reports = [queue.get(timeout=300) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    assert [p.exitcode for p in procs] == [0, 0, 0, 0]
    assert [error for _w, _written, error in reports if error] == []
    written = sorted(label for _w, labels, _e in reports for label in labels)
    assert len(written) > 40
    # A fresh process sees every run that was written, and so does this one.
    assert _count_from_another_process(url) == len(written)
    with Registry.open(url) as reg:
        assert sorted(reg.runs_frame(status=None)["pipeline"]) == written
