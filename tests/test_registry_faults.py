"""The registry under faults: many writers, a writer killed, a server restarted, old and new schemas, foreign,
locked, read-only and damaged files, identical runs started at once, and runs copied between registries.

Tests that take ``url`` run on SQLite and on PostgreSQL (the ``postgres_url`` server of conftest.py, each test in a
schema of its own); the restart test starts a PostgreSQL server of its own so the shared one is never disturbed.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import random
import shutil
import signal
import socket
import sqlite3
import stat
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, text, update

from workbench.errors import RegistryError
from workbench.registry import SCHEMA_VERSION, Registry, copy_runs
from workbench.registry.models import INFO_TABLE, VERSION_TABLE, RunRow

ROOT = Path(__file__).resolve().parents[1]
RTN4 = json.dumps([{"technique": "rtn", "version": 1, "params": {"bits": 4, "group_size": 32}}])


@pytest.fixture(params=["sqlite", "postgres"])
def url(request: pytest.FixtureRequest, tmp_path: Path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'runs.db'}"
    return request.getfixturevalue("postgres_schema_url")


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _cli(*args: str, timeout: float = 120, prefix: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*prefix, sys.executable, "-m", "workbench.cli", *args],
        check=False,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=_env(),
        cwd=ROOT,
    )


def _child(code: str) -> subprocess.Popen[str]:
    """A Python child running ``code``; it prints READY (and maybe values) once it holds what the test needs."""
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(),
        cwd=ROOT,
    )


def _wait_ready(proc: subprocess.Popen[str], timeout: float = 120) -> list[str]:
    """The words the child printed on its READY line (raises if the child ended first)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if line.startswith("READY"):
            return line.split()[1:]
        if not line and proc.poll() is not None:
            raise AssertionError(
                f"child ended ({proc.returncode}) before READY: {proc.stderr.read()[-2000:]}"
            )
    raise AssertionError("child never said READY")


def _kill(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)


def _done(reg: Registry, label: str = "baseline", pipeline: str = "[]", **kw) -> int:
    run_id = reg.start_run("fp", "tiny", pipeline, label, "quick:k", "quick", {"torch": "2"}, **kw)
    reg.finish_run(run_id, {"ppl": 10.0 + len(label)}, extras={"label": label})
    return run_id


# --------------------------------------------------------------------------- many writers at once
def _write_many(url: str, worker: int, n: int, pause_s: float = 0.0) -> None:
    reg = Registry.open(url)
    rng = random.Random(worker)
    for i in range(n):
        run_id = reg.start_run("fp", "m", "[]", f"w{worker}-{i}", "quick:k", "quick", {"worker": worker})
        reg.finish_run(run_id, {"worker": worker, "index": i})
        if pause_s:
            time.sleep(rng.uniform(0, pause_s))
    reg.close()


def _assert_complete(url: str, workers: int, n: int) -> None:
    with Registry.open(url) as reg:
        frame = reg.runs_frame(status=None)
    assert len(frame) == workers * n
    assert set(frame["status"]) == {"done"}
    assert frame["run_id"].is_unique
    got = sorted(zip(frame["metric_worker"].astype(int), frame["metric_index"].astype(int)))
    assert got == [(w, i) for w in range(workers) for i in range(n)]  # none lost, none twice
    assert sorted(frame["pipeline"]) == sorted(f"w{w}-{i}" for w in range(workers) for i in range(n))


def test_eight_processes_writing_200_runs_each_lose_nothing(url):
    Registry.open(url).close()
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_write_many, args=(url, w, 200)) for w in range(8)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=600)
    assert [p.exitcode for p in procs] == [0] * 8
    _assert_complete(url, 8, 200)


# --------------------------------------------------------------------------- a writer killed with SIGKILL
def test_writer_killed_with_sigkill_mid_run_is_marked_interrupted_and_nothing_else_changes(url):
    with Registry.open(url) as reg:
        before = [_done(reg, f"before-{i}") for i in range(3)]
    child = _child(
        f"""
        from workbench.registry import Registry
        from workbench.registry.models import RunRow
        reg = Registry.open({url!r})
        done = reg.start_run("fp", "m", "[]", "child-done", "quick:k", "quick")
        reg.finish_run(done, {{"ppl": 1.0}})
        running = reg.start_run("fp", "m", "[]", "child-running", "quick:k", "quick")
        reg.heartbeat(running)
        # A write in flight when the kill comes: its transaction must vanish with the process.
        with reg.session_scope() as s:
            s.add(RunRow(created_at=reg.get_run(done).created_at, updated_at=reg.get_run(done).created_at,
                         status="running", model_fingerprint="fp", model_description="m", pipeline_json="[]",
                         pipeline_hash="h", pipeline_label="uncommitted", technique="baseline",
                         suite_key="quick:k", suite_name="quick"))
            s.flush()
            print("READY", done, running, flush=True)
            import time; time.sleep(600)
        """
    )
    try:
        done, running = map(int, _wait_ready(child))
    finally:
        _kill(child)
    with Registry.open(url) as reg:  # the next reader notices the dead pid
        run = reg.get_run(running)
        assert run.status == "interrupted" and "process" in run.error
        assert reg.get_run(done).status == "done" and reg.get_run(done).metrics == {"ppl": 1.0}
        for run_id in before:
            assert reg.get_run(run_id).status == "done"
        frame = reg.runs_frame(status=None)
        assert "uncommitted" not in set(frame["pipeline"])
        assert sorted(frame["run_id"]) == sorted([*before, done, running])
        after = _done(reg, "after")  # the killed writer's lock is gone: writing goes on at once
        assert reg.get_run(after).status == "done"


# --------------------------------------------------------------------------- PostgreSQL restarted
@pytest.fixture(scope="module")
def own_postgres():
    from workbench.registry.localpg import LocalPostgres, unavailable_reason

    reason = unavailable_reason()
    if reason:
        pytest.skip(f"cannot start a private PostgreSQL server: {reason}")
    server = LocalPostgres(port=0, fsync=False).start()
    try:
        yield server
    finally:
        server.close()


def _count(url: str) -> int:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            return int(conn.execute(text("SELECT count(*) FROM runs")).scalar() or 0)
    except Exception:  # noqa: BLE001 - the server is restarting: not counted this time
        return -1
    finally:
        engine.dispose()


def test_postgres_restarted_while_writing_loses_nothing(own_postgres):
    url = own_postgres.url
    Registry.open(url).close()
    ctx = multiprocessing.get_context("spawn")
    workers, n = 4, 60
    procs = [ctx.Process(target=_write_many, args=(url, w, n, 0.03)) for w in range(workers)]
    for p in procs:
        p.start()
    for threshold, mode in ((40, "fast"), (120, "immediate")):  # a clean restart, then a crash and recovery
        deadline = time.monotonic() + 300
        while _count(url) < threshold and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _count(url) < workers * n, "the writers finished before the restart; nothing was tested"
        own_postgres.restart(mode=mode)
    for p in procs:
        p.join(timeout=300)
    assert [p.exitcode for p in procs] == [0] * workers
    _assert_complete(url, workers, n)


def test_writes_retried_after_a_lost_commit_acknowledgement_happen_exactly_once(
    postgres_schema_url, monkeypatch
):
    # The worst moment for a connection to drop: the server committed, the client never heard. The retry must
    # find the first attempt's work instead of doing it again.
    from sqlalchemy.exc import OperationalError
    from sqlalchemy.orm import Session

    real_commit = Session.commit
    lost: list[int] = []

    def commit_then_lose_the_answer(self: Session) -> None:
        real_commit(self)
        if not lost:
            lost.append(1)
            raise OperationalError(
                "COMMIT",
                {},
                Exception("server closed the connection unexpectedly"),
                connection_invalidated=True,
            )

    with Registry.open(postgres_schema_url) as reg:
        keep = _done(reg, "kept")
        for write in ("start", "finish", "delete"):
            lost.clear()
            if write == "start":
                monkeypatch.setattr(Session, "commit", commit_then_lose_the_answer)
                run_id = reg.start_run("fp", "m", "[]", "once", "quick:k", "quick")
            elif write == "finish":
                monkeypatch.setattr(Session, "commit", commit_then_lose_the_answer)
                reg.finish_run(run_id, {"ppl": 3.0})
            else:
                monkeypatch.setattr(Session, "commit", commit_then_lose_the_answer)
                reg.delete_run(run_id)
            monkeypatch.setattr(Session, "commit", real_commit)
            assert lost == [1]  # the answer was lost once, and the call still succeeded
            frame = reg.runs_frame(status=None)
            if write == "start":
                assert list(frame["pipeline"]).count("once") == 1
            elif write == "finish":
                assert reg.get_run(run_id).status == "done" and reg.get_run(run_id).metrics == {"ppl": 3.0}
            else:
                assert list(frame["run_id"]) == [keep]


def test_registry_that_cannot_be_reached_is_one_clear_line_with_the_password_hidden(monkeypatch):
    from workbench.registry import store

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # nothing listens here once the socket is closed
    url = f"postgresql+psycopg://alice:s3cret@127.0.0.1:{port}/runs"
    monkeypatch.setattr(store, "OPEN_RECONNECT_S", 1.0)
    with pytest.raises(RegistryError) as info:
        Registry.open(url)
    message = str(info.value)
    assert "s3cret" not in message and f"alice:***@127.0.0.1:{port}/runs" in message
    assert "refused" in message.lower() and "Check that the database server is running" in message
    assert "\n" not in message

    out = _cli("runs", "--registry", url, timeout=120)
    assert out.returncode == 2 and out.stdout == ""
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "s3cret" not in lines[0] and "Could not reach the registry" in lines[0]


def test_a_server_that_accepts_but_never_answers_times_out_instead_of_hanging(monkeypatch):
    from workbench.registry import store

    monkeypatch.setattr(store, "CONNECT_TIMEOUT_S", 1.0)
    monkeypatch.setattr(store, "OPEN_RECONNECT_S", 1.0)
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)  # the kernel completes the handshake; nobody ever speaks PostgreSQL
    port = silent.getsockname()[1]
    result: list[BaseException | None] = []

    def attempt() -> None:
        try:
            Registry.open(f"postgresql+psycopg://bob@127.0.0.1:{port}/runs").close()
            result.append(None)
        except BaseException as err:  # noqa: BLE001 - checked below
            result.append(err)

    worker = threading.Thread(target=attempt, daemon=True)
    worker.start()
    worker.join(timeout=60)
    silent.close()
    assert not worker.is_alive(), "Registry.open hung on a server that never answers"
    assert isinstance(result[0], RegistryError) and "timeout" in str(result[0]).lower()


# --------------------------------------------------------------------------- schema versions
def _build_at(url: str, revision: str) -> None:
    """A registry built by the migrations up to ``revision``, as an older workbench left it."""
    from alembic import command

    from workbench.registry.store import _alembic_config

    engine = create_engine(url)
    with engine.begin() as conn:
        command.upgrade(_alembic_config(conn), revision)
        columns = "created_at, updated_at, finished_at, status, model_fingerprint, model_description, "
        columns += (
            "pipeline_json, pipeline_hash, pipeline_label, technique, suite_key, suite_name, metrics_json, "
        )
        columns += "extras_json, environment_json, tags_json, notes, parent_id"
        for i, parent in ((1, None), (2, 1)):
            conn.execute(
                text(
                    f"INSERT INTO runs (id, {columns}) VALUES (:id, '2026-11-01 10:00:0{i}', '2026-11-01 10:00:0{i}', "
                    f"'2026-11-01 10:01:0{i}', 'done', 'fp-old', 'old model', '[]', 'h{i}', 'run {i}', 'baseline', "
                    f"'quick:k', 'quick', :metrics, '{{}}', '{{}}', '[\"old\"]', 'from {revision}', :parent)"
                ),
                {"id": i, "metrics": json.dumps({"ppl": 10.0 + i}), "parent": parent},
            )
        if conn.dialect.name == "postgresql":  # explicit ids leave the id sequence behind
            conn.execute(text("SELECT setval(pg_get_serial_sequence('runs', 'id'), 2)"))
    engine.dispose()


@pytest.mark.parametrize("revision", ["0.1", "0.2"])
def test_registry_upgrade_command_migrates_an_older_registry_in_place(url, revision):
    _build_at(url, revision)
    with pytest.raises(RegistryError, match=rf"schema {revision}.*workbench registry upgrade --url"):
        Registry.open(url)

    out = _cli("registry", "upgrade", "--url", url)
    assert out.returncode == 0, out.stderr
    assert f"is up to date (schema {SCHEMA_VERSION}; runs kept)" in out.stdout
    with Registry.open(url) as reg:
        old = [reg.get_run(1), reg.get_run(2)]
        assert [r.metrics for r in old] == [{"ppl": 11.0}, {"ppl": 12.0}]
        assert old[1].parent_id == 1 and old[0].tags == ("old",) and old[0].notes == f"from {revision}"
        assert len({r.uuid for r in old}) == 2 and all(len(r.uuid) == 36 for r in old)
        new = _done(reg, "after upgrade")
        assert new > 2 and reg.get_run(new).uuid not in {r.uuid for r in old}
        reg.delete_run(new)
        assert _done(reg, "again") > new  # ids are never handed out again (AUTOINCREMENT kept on SQLite)
    engine = create_engine(url)
    with engine.connect() as conn:
        assert conn.execute(text(f"SELECT version_num FROM {VERSION_TABLE}")).scalar() == SCHEMA_VERSION
        info = dict(conn.execute(text(f"SELECT key, value FROM {INFO_TABLE}")).all())
    engine.dispose()
    assert info["schema_version"] == SCHEMA_VERSION and info["workbench_version"]
    assert _cli("registry", "upgrade", "--url", url).returncode == 0  # at head: nothing to do, no error


def test_newer_schema_is_refused_naming_the_release_to_install(tmp_path):
    path = tmp_path / "runs.db"
    with Registry.open(path) as reg:
        _done(reg)
    conn = sqlite3.connect(path)
    conn.execute(f"UPDATE {VERSION_TABLE} SET version_num = '9.9'")
    conn.execute(f"UPDATE {INFO_TABLE} SET value = '7.1.0' WHERE key = 'workbench_version'")
    conn.commit()
    conn.close()
    before = path.read_bytes()
    for attempt in (Registry.open, Registry.upgrade):
        with pytest.raises(RegistryError) as info:
            attempt(path)
        message = str(info.value)
        assert "schema 9.9" in message and "efficiency-workbench>=7.1.0" in message
        assert "Nothing was changed" in message
    out = _cli("registry", "upgrade", "--url", f"sqlite:///{path}")
    assert out.returncode == 2 and "efficiency-workbench>=7.1.0" in out.stderr
    assert path.read_bytes() == before

    conn = sqlite3.connect(path)
    conn.execute(f"DELETE FROM {INFO_TABLE}")  # a registry that does not say who wrote it
    conn.commit()
    conn.close()
    with pytest.raises(RegistryError, match=r"schema 9\.9.*newer workbench.*schema is 9\.9 or later"):
        Registry.open(path)


# --------------------------------------------------------------------------- foreign, locked, read-only files
def test_another_applications_sqlite_file_is_refused_with_its_bytes_unchanged(tmp_path):
    path = tmp_path / "app.db"
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE users (id INTEGER PRIMARY KEY, name TEXT)")
    conn.execute("INSERT INTO users (name) VALUES ('ada')")
    conn.commit()
    conn.close()
    before = path.read_bytes()
    assert before[18:20] == b"\x01\x01"  # a rollback-journal database (WAL would be 2, 2)
    for attempt in (Registry.open, Registry.upgrade):
        with pytest.raises(RegistryError, match=r"not a workbench registry.*\(users\).*Nothing was changed"):
            attempt(f"sqlite:///{path}")
        assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["app.db"]  # no -wal / -shm left beside it


_HOLD_WRITE_LOCK = """
import sqlite3, time
conn = sqlite3.connect({path!r}, isolation_level=None)
conn.execute("BEGIN IMMEDIATE")
conn.execute("UPDATE runs SET notes = 'being edited' WHERE id = 1")
print("READY", flush=True)
time.sleep(600)
"""


def test_listing_runs_needs_no_write_lock_while_another_process_holds_it(tmp_path):
    path = tmp_path / "runs.db"
    with Registry.open(path) as reg:
        ids = [_done(reg, f"r{i}") for i in range(3)]
        stale = reg.start_run("fp", "m", "[]", "stale", "quick:k", "quick")
        dead = subprocess.Popen([sys.executable, "-c", "pass"])
        dead.wait()
        with reg.session_scope() as s:
            s.execute(update(RunRow).where(RunRow.id == stale).values(pid=dead.pid))
    holder = _child(_HOLD_WRITE_LOCK.format(path=str(path)))
    try:
        _wait_ready(holder)
        answers: list[object] = []

        def listing() -> None:
            try:
                with Registry.open(path) as reg:
                    answers.append(reg.runs_frame(status=None))
            except BaseException as err:  # noqa: BLE001 - checked below
                answers.append(err)

        reader = threading.Thread(target=listing, daemon=True)
        reader.start()
        reader.join(timeout=20)  # the write lock is held for minutes; before the fix this waited 6 x 30 s
        assert not reader.is_alive(), "listing waited for another process's write lock"
        frame = answers[0]
        assert not isinstance(frame, BaseException), frame
        assert sorted(frame["run_id"]) == sorted([*ids, stale])
        assert set(frame.loc[frame["run_id"] == stale, "status"]) == {"running"}  # marking waits its turn

        out = _cli(
            "runs", "--registry", f"sqlite:///{path}", "--status", "all", "--format", "csv", timeout=90
        )
        assert out.returncode == 0, out.stderr
        assert len(out.stdout.strip().splitlines()) == 1 + 4
    finally:
        _kill(holder)
    with Registry.open(path) as reg:  # once the lock is free, the next reader marks the stale run
        assert reg.get_run(stale).status == "interrupted"


def _without_root_powers() -> tuple[str, ...]:
    """A command prefix under which file permissions apply: none needed for a normal user; as root, setpriv
    drops the capabilities that let root write anywhere (DAC override), so a read-only folder really is one."""
    if os.geteuid() != 0:
        return ()
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("running as root without setpriv: a read-only folder cannot be made read-only for root")
    return (setpriv, "--bounding-set=-dac_override,-dac_read_search,-fowner,-linux_immutable", "--")


def test_registry_in_a_read_only_folder_can_be_listed_and_is_never_written(tmp_path):
    folder = tmp_path / "shared"
    folder.mkdir()
    path = folder / "runs.db"
    with Registry.open(path) as reg:
        ids = [_done(reg, f"r{i}") for i in range(3)]
    prefix = _without_root_powers()
    before = path.read_bytes()
    path.chmod(0o444)
    folder.chmod(0o555)
    try:
        out = _cli(
            "runs", "--registry", f"sqlite:///{path}", "--status", "all", "--format", "csv", prefix=prefix
        )
        assert out.returncode == 0, out.stderr
        assert len(out.stdout.strip().splitlines()) == 1 + len(ids)
        write = subprocess.run(
            [
                *prefix,
                sys.executable,
                "-c",
                (
                    f"from workbench.registry import Registry\n"
                    f"Registry.open({str(path)!r}).start_run('fp', 'm', '[]', 'x', 'q', 'q')"
                ),
            ],
            check=False,
            capture_output=True,
            text=True,
            timeout=120,
            env=_env(),
        )
        assert write.returncode != 0
        assert "is read-only here" in write.stderr and "workbench runs copy" in write.stderr
    finally:
        folder.chmod(stat.S_IRWXU)
        path.chmod(0o644)
    assert path.read_bytes() == before
    assert sorted(p.name for p in folder.iterdir()) == ["runs.db"]


# --------------------------------------------------------------------------- damaged files
def _damaged_registry(tmp_path: Path, runs: int = 300) -> tuple[Path, dict[int, float]]:
    path = tmp_path / "runs.db"
    metrics = {}
    with Registry.open(path) as reg:
        for i in range(runs):
            run_id = reg.start_run("fp", "m", "[]", f"r{i}", "quick:k", "quick", {"pad": "x" * 300})
            reg.finish_run(run_id, {"ppl": float(i)}, extras={"text": "y" * 400})
            metrics[run_id] = float(i)
    size = path.stat().st_size
    assert size > 64 * 1024
    data = bytearray(path.read_bytes())
    start = size // 2 - 4096
    data[start : start + 8192] = random.Random(1).randbytes(8192)  # 8 KB overwritten inside the file
    path.write_bytes(bytes(data))
    return path, metrics


def test_damaged_registry_is_never_written_and_the_message_says_how_to_recover(tmp_path):
    path, metrics = _damaged_registry(tmp_path)
    before = path.read_bytes()
    with pytest.raises(RegistryError) as info, Registry.open(path) as reg:
        reg.start_run("fp", "m", "[]", "new", "quick:k", "quick")
    message = str(info.value)
    assert "damaged" in message and "workbench runs copy --from" in message and "backup" in message
    assert path.read_bytes() == before

    # What can still be read is copied into a fresh file, which is a healthy registry.
    fresh = tmp_path / "recovered.db"
    report = copy_runs(f"sqlite:///{path}", f"sqlite:///{fresh}")
    assert report.copied > 0 and report.copied + report.unreadable <= len(metrics) + report.unreadable
    with Registry.open(fresh) as reg:
        frame = reg.runs_frame(status=None)
        _done(reg, "written after recovery")
    assert len(frame) == report.copied
    originals = sorted(metrics.values())
    assert set(frame["metric_ppl"]) <= set(originals)
    conn = sqlite3.connect(fresh)
    assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    conn.close()


def test_truncated_registry_says_what_to_do(tmp_path):
    path = tmp_path / "runs.db"
    with Registry.open(path) as reg:
        for i in range(200):
            _done(reg, f"r{i}")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(RegistryError) as info, Registry.open(path) as reg:
        reg.runs_frame(status=None)
        reg.start_run("fp", "m", "[]", "new", "quick:k", "quick")
    message = str(info.value)
    assert "workbench runs copy" in message and "backup" in message


# --------------------------------------------------------------------------- identical runs at once
def _claim(url: str, barrier: Any, done: Any, queue: multiprocessing.Queue) -> None:
    reg = Registry.open(url)
    barrier.wait(timeout=300)  # every process opened: claim at the same moment
    queue.put(reg.claim_run("fp", "m", RTN4, "rtn", "quick:k", "quick"))
    done.wait(timeout=300)  # stay alive (a live owner) until every claim is in
    reg.close()


def test_identical_runs_claimed_at_once_by_eight_processes_have_one_owner(url):
    Registry.open(url).close()
    ctx = multiprocessing.get_context("spawn")
    queue, barrier, done = ctx.Queue(), ctx.Barrier(8), ctx.Event()
    procs = [ctx.Process(target=_claim, args=(url, barrier, done, queue)) for _ in range(8)]
    for p in procs:
        p.start()
    try:
        claims = [queue.get(timeout=300) for _ in procs]
    finally:
        done.set()
    for p in procs:
        p.join(timeout=60)
    assert sorted(owned for _id, owned in claims) == [False] * 7 + [True]
    assert len({run_id for run_id, _owned in claims}) == 1
    with Registry.open(url) as reg:
        assert len(reg.runs_frame(status=None)) == 1


def test_a_claim_held_by_a_killed_process_never_blocks(url):
    Registry.open(url).close()
    child = _child(
        f"""
        from workbench.registry import Registry
        reg = Registry.open({url!r})
        run_id, owned = reg.claim_run("fp", "m", {RTN4!r}, "rtn", "quick:k", "quick")
        print("READY", run_id, owned, flush=True)
        import time; time.sleep(600)
        """
    )
    try:
        words = _wait_ready(child)
        held = int(words[0])
        assert words[1] == "True"
        with Registry.open(url) as reg:
            assert reg.claim_run("fp", "m", RTN4, "rtn", "quick:k", "quick") == (held, False)  # alive: wait
            waited: list[object] = []
            waiter = threading.Thread(target=lambda: waited.append(reg.wait_for_run(held, poll_s=0.1)))
            waiter.start()
            time.sleep(0.5)
            assert waiter.is_alive()  # still running, so still waiting
            _kill(child)
            waiter.join(timeout=30)
            assert not waiter.is_alive() and waited[0].status == "interrupted"
            run_id, owned = reg.claim_run("fp", "m", RTN4, "rtn", "quick:k", "quick")
            assert owned and run_id != held
    finally:
        _kill(child)


def test_run_experiment_waits_for_an_identical_run_started_elsewhere_and_reuses_it(registry_url):
    from workbench.evaluate import get_suite
    from workbench.experiment import run_experiment
    from workbench.models import load_model

    loaded = load_model("tiny-llama")
    suite = get_suite("quick")
    twin = _child(
        f"""
        import time
        from workbench.registry import Registry
        reg = Registry.open({registry_url!r})
        run_id, owned = reg.claim_run({loaded.fingerprint!r}, "tiny", "[]", "baseline", {suite.key!r}, "quick")
        print("READY", run_id, owned, flush=True)
        time.sleep(3)  # computing, as far as anyone can tell
        reg.finish_run(run_id, {{"ppl": 42.0}}, extras={{"generations": []}})
        """
    )
    try:
        words = _wait_ready(twin)
        assert words[1] == "True"
        result = run_experiment(loaded, [], "quick", registry=registry_url)
        assert twin.wait(timeout=60) == 0
    finally:
        _kill(twin)
    assert result.reused and result.run_id == int(words[0]) and result.metrics == {"ppl": 42.0}
    with Registry.open(registry_url) as reg:
        assert len(reg.runs_frame(status=None)) == 1  # computed once, stored once


# --------------------------------------------------------------------------- copying runs
def _source(url: str) -> dict[str, int]:
    """A registry with lineage, tags, notes, extras and every status."""
    with Registry.open(url) as reg:
        base = reg.start_run("fp-a", "tiny a", "[]", "baseline", "quick:k", "quick", {"torch": "2.13"})
        reg.finish_run(base, {"ppl": 12.0}, extras={"generations": [{"prompt": "p", "model": "m"}]})
        reg.set_tags(base, ["laptop", "base"])
        reg.set_notes(base, "the reference")
        child = reg.start_run("fp-a", "tiny a", RTN4, "rtn 4", "quick:k", "quick", {"torch": "2.13"}, base)
        reg.finish_run(child, {"ppl": 12.5, "bits_per_weight": 4.5})
        reg.set_tags(child, ["laptop"])
        failed = reg.start_run("fp-a", "tiny a", RTN4, "rtn 4", "quick:other", "quick", parent_id=base)
        reg.fail_run(failed, "RuntimeError: out of memory")
        gone = reg.start_run("fp-b", "tiny b", "[]", "baseline", "quick:k", "quick")
        reg.fail_run(gone, "Interrupted (KeyboardInterrupt).", status="interrupted")
        running = reg.start_run("fp-b", "tiny b", RTN4, "rtn 4", "quick:k", "quick")
    return {"base": base, "child": child, "failed": failed, "gone": gone, "running": running}


def test_copy_runs_keeps_everything_remaps_lineage_and_never_duplicates(tmp_path, url):
    src_url = f"sqlite:///{tmp_path / 'laptop.db'}"
    ids = _source(src_url)
    with Registry.open(url) as dst:
        _done(dst, "a teammate's run")  # the destination's ids differ from the source's
    report = copy_runs(src_url, url)
    assert (report.copied, report.already_there, report.running_left_out) == (4, 0, 1)
    with Registry.open(src_url) as src, Registry.open(url) as dst:
        for name in ("base", "child", "failed", "gone"):
            a, b = src.get_run(ids[name]), dst.get_run(report.id_map[ids[name]])
            for attr in (
                "status",
                "model_fingerprint",
                "model_description",
                "pipeline_json",
                "pipeline_label",
                "technique",
                "suite_key",
                "metrics",
                "extras",
                "environment",
                "tags",
                "notes",
                "error",
                "uuid",
                "created_at",
                "finished_at",
                "hostname",
                "pid",
            ):
                assert getattr(a, attr) == getattr(b, attr), (name, attr)
        assert dst.get_run(report.id_map[ids["child"]]).parent_id == report.id_map[ids["base"]]
        assert dst.get_run(report.id_map[ids["failed"]]).parent_id == report.id_map[ids["base"]]
        assert len(dst.runs_frame(status=None)) == 5

    again = copy_runs(src_url, url)
    assert (again.copied, again.already_there) == (0, 4)
    assert again.id_map == report.id_map
    with Registry.open(url) as dst:
        assert len(dst.runs_frame(status=None)) == 5


def test_copy_runs_filters_bring_their_parents_along(tmp_path):
    src_url = f"sqlite:///{tmp_path / 'laptop.db'}"
    ids = _source(src_url)
    only_rtn = copy_runs(src_url, f"sqlite:///{tmp_path / 'rtn.db'}", technique="rtn", status="done")
    assert (only_rtn.copied, only_rtn.parents_added) == (1, 1)
    with Registry.open(tmp_path / "rtn.db") as dst:
        child = dst.get_run(only_rtn.id_map[ids["child"]])
        assert child.parent_id == only_rtn.id_map[ids["base"]]
        assert dst.get_run(child.parent_id).notes == "the reference"
    tagged = copy_runs(src_url, f"sqlite:///{tmp_path / 'tag.db'}", tag="base")
    assert tagged.copied == 1 and set(tagged.id_map) == {ids["base"]}
    model_b = copy_runs(src_url, f"sqlite:///{tmp_path / 'b.db'}", model="fp-b")
    assert set(model_b.id_map) == {ids["gone"]} and model_b.running_left_out == 1


def test_workbench_runs_copy_from_the_command_line(tmp_path):
    src_url = f"sqlite:///{tmp_path / 'laptop.db'}"
    dst_url = f"sqlite:///{tmp_path / 'team.db'}"
    _source(src_url)
    first = _cli("runs", "copy", "--from", src_url, "--to", dst_url, "--status", "done")
    assert first.returncode == 0, first.stderr
    assert first.stdout.startswith("copied 2 runs (0 already there") and dst_url in first.stdout
    second = _cli("runs", "copy", "--from", src_url, "--to", dst_url)
    assert second.returncode == 0 and second.stdout.startswith("copied 2 runs (2 already there")
    third = _cli("runs", "copy", "--from", src_url, "--to", dst_url)
    assert third.stdout.startswith("copied 0 runs (4 already there")
    missing = _cli("runs", "copy", "--from", src_url)
    assert missing.returncode == 2 and "--to" in missing.stderr
