"""The run registry: every run, stored in any SQLAlchemy database (SQLite by default, PostgreSQL for teams).

Modelled on Optuna's RDB storage. ``Registry.open(url)`` checks the database before anything is written: a
new database is created and stamped with the alembic head, an older schema is refused with the command that
upgrades it, and a file or database that is not a workbench registry is refused without being touched.

Concurrency promise (as Optuna's ``BaseStorage`` states its own):

* A ``Registry`` is safe to share between threads (each call takes its own connection from the pool) and can be
  opened by any number of processes and machines at once; every write is one short transaction, so concurrent
  writers lose nothing. On SQLite, writers take the write lock at the start of their transaction
  (``BEGIN IMMEDIATE``) and wait up to ``BUSY_TIMEOUT_S`` for it; WAL mode lets readers go on meanwhile.
* Reads see every write committed before they start (read-your-writes within a process and across processes).
* Only the process that started a run updates it (heartbeat, finish, fail); ``mark_stale_runs`` is the one
  exception and only touches runs whose process is gone.
* A committed write survives a crash of the writing process. On SQLite, WAL with ``synchronous=NORMAL`` may
  lose the last transactions on power loss, never corrupt the file.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import random
import socket
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

from sqlalchemy import Engine, create_engine, event, func, inspect, select, text, update
from sqlalchemy.engine import URL, Connection, make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, NoSuchModuleError, SQLAlchemyError
from sqlalchemy.orm import Session
from sqlalchemy.pool import StaticPool

from workbench.errors import ConfigError, RegistryError
from workbench.registry.models import SCHEMA_VERSION, VERSION_TABLE, Base, Run, RunRow

if TYPE_CHECKING:
    import pandas as pd
    from typing_extensions import Self

log = logging.getLogger(__name__)

DEFAULT_URL = "sqlite:///workbench-runs.db"
ENV_VAR = "WORKBENCH_REGISTRY"
# SQLite: how long a writer waits for another process's write lock before "database is locked".
BUSY_TIMEOUT_S = 30.0
# A running run on another host whose heartbeat is older than this is taken for dead. The experiment beats
# every 10 s; two minutes leaves room for a stalled beat and some clock skew between machines.
STALE_AFTER_S = 120.0
# Transient conflicts (see session_scope) are retried this many times in total.
_ATTEMPTS = 6
_MIGRATIONS = Path(__file__).resolve().parent / "migrations"

T = TypeVar("T")


class _TransientError(RegistryError):
    """A lock timeout, deadlock or serialization failure: the same transaction may well succeed if retried."""


def resolve_url(url: str | os.PathLike[str] | None = None) -> str:
    """``url``, else ``$WORKBENCH_REGISTRY``, else ``sqlite:///workbench-runs.db``; a plain path means SQLite."""
    if url is None:
        url = os.environ.get(ENV_VAR) or DEFAULT_URL
    url = os.fspath(url)
    if "://" not in url:
        url = f"sqlite:///{Path(url).expanduser().resolve()}"
    return url


def _safe(url: str | URL) -> str:
    """The URL without its password, for messages and repr."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return str(url)


@functools.lru_cache(maxsize=1)
def _script() -> Any:
    """The migration scripts shipped in the package (parsed once per process)."""
    from alembic.script import ScriptDirectory

    return ScriptDirectory(str(_MIGRATIONS), version_locations=[str(_MIGRATIONS / "versions")])


def _alembic_config(connection: Connection) -> Any:
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(_MIGRATIONS))
    cfg.set_main_option("version_locations", str(_MIGRATIONS / "versions"))
    cfg.attributes["connection"] = connection
    return cfg


def _now() -> datetime:
    """Naive UTC, as the database stores it."""
    return datetime.now(timezone.utc).replace(tzinfo=None)


def _is_transient(err: BaseException) -> bool:
    orig = getattr(err, "orig", None)
    if getattr(orig, "sqlstate", None) in {
        "40001",
        "40P01",
        "55P03",
    }:  # serialization, deadlock, lock timeout
        return True
    message = str(orig or err).lower()
    return any(
        needle in message
        for needle in ("database is locked", "database table is locked", "deadlock", "could not serialize")
    )


def _dumps(value: Any) -> str:
    return json.dumps(value, default=_json_default, ensure_ascii=False)


def _json_default(value: Any) -> Any:
    """numpy/torch scalars and arrays become plain numbers and lists; anything else its text."""
    if hasattr(value, "tolist"):
        return value.tolist()
    if hasattr(value, "item"):
        return value.item()
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    if isinstance(value, datetime):
        return value.isoformat()
    return str(value)


def canonical_pipeline(pipeline_json: str) -> tuple[str, str, str]:
    """(canonical JSON, its sha256, first technique or "baseline"), so equal pipelines always match."""
    try:
        steps = json.loads(pipeline_json or "[]")
    except json.JSONDecodeError as err:
        raise ConfigError(
            f"pipeline_json is not valid JSON ({err}); pass pipeline_to_json(pipeline)."
        ) from None
    if not isinstance(steps, list):
        raise ConfigError(
            "pipeline_json must be a JSON list of {technique, version, params}; "
            "pass pipeline_to_json(pipeline)."
        )
    canonical = json.dumps(steps, sort_keys=True, separators=(",", ":"))
    technique = "baseline"
    if steps and isinstance(steps[0], dict) and steps[0].get("technique"):
        technique = str(steps[0]["technique"])
    return canonical, hashlib.sha256(canonical.encode()).hexdigest(), technique


def _clean_tags(tags: Iterable[str] | str) -> list[str]:
    if isinstance(tags, str):
        tags = [tags]
    out: list[str] = []
    for tag in tags:
        tag = str(tag).strip()
        if "," in tag:
            raise ConfigError(
                f"Tag {tag!r} contains a comma; tables join tags with commas. Use one tag per item."
            )
        if tag and tag not in out:
            out.append(tag)
    return out


def _pid_alive(pid: int, since: datetime | None) -> bool:
    """Whether ``pid`` runs on this host and was already running at ``since`` (naive UTC), i.e. is not reused."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's process: it exists
    except OSError:
        return False
    if since is None:
        return True
    try:
        import psutil
    except ImportError:
        return True
    try:
        started = datetime.fromtimestamp(psutil.Process(pid).create_time(), timezone.utc).replace(tzinfo=None)
    except (psutil.Error, OSError, ValueError) as err:  # the process ended a moment ago, or is not readable
        log.debug("Cannot read the start time of pid %s (%s); trusting os.kill.", pid, err)
        return True
    # A process that started after the run was created cannot be the one running it: its pid was reused.
    return started <= since + timedelta(seconds=2)


class Registry:
    """Where runs are recorded and found again; open one with :meth:`Registry.open`.

    Writes: :meth:`start_run`, :meth:`heartbeat`, :meth:`finish_run`, :meth:`fail_run`, :meth:`set_tags`,
    :meth:`set_notes`, :meth:`delete_run`. Reads: :meth:`find_done`, :meth:`get_run`, :meth:`runs_frame`,
    :meth:`change_token`. Every method raises :class:`RegistryError` when the database cannot be reached,
    with the driver's message in plain words.
    """

    def __init__(self, engine: Engine, url: str, *, shared: _SharedEngine | None = None) -> None:
        """Use :meth:`open`; this constructor does not check the schema."""
        self._engine = engine
        self._shared = shared
        self._closed = False
        # Writers start with BEGIN IMMEDIATE on SQLite (see _install_sqlite_events); readers with plain BEGIN.
        self._write_engine = engine.execution_options(workbench_write=True)
        self.url = url
        self._pid = os.getpid()
        self._host = socket.gethostname()
        # run id -> (revision, metrics, first-step params, stage columns, techniques): parsed JSON reused by
        # runs_frame (see queries._parsed)
        self._frame_cache: dict[
            int, tuple[int, dict[str, Any], dict[str, Any], dict[str, Any], tuple[str, ...]]
        ] = {}

    # ------------------------------------------------------------------ opening
    @classmethod
    def open(cls, url: str | os.PathLike[str] | None = None, *, mark_stale: bool = True) -> Registry:
        """Open (and on first use create) the registry at ``url``.

        Args:
            url: any SQLAlchemy URL (``sqlite:///runs.db``, ``postgresql+psycopg://user@host/db``) or a plain
                file path (SQLite). None: ``$WORKBENCH_REGISTRY``, else ``workbench-runs.db`` in the working folder.
            mark_stale: mark runs left ``running`` by a dead process as ``interrupted`` (see mark_stale_runs).

        Raises:
            RegistryError: the database cannot be reached, is not a workbench registry (another application's
                database, a text file), or has another schema version (the message says how to upgrade).
        """
        url = resolve_url(url)
        registry = cls._acquire(url)
        try:
            registry._prepare(upgrade=False)
            if mark_stale:
                registry.mark_stale_runs()
        except BaseException:
            registry.close()
            raise
        return registry

    @classmethod
    def _acquire(cls, url: str) -> Registry:
        """A Registry over the process's one engine for ``url`` (see :class:`_SharedEngine` for why one)."""
        shared = _SharedEngine.acquire(url)
        return cls(shared.engine, url, shared=shared)

    @classmethod
    def upgrade(cls, url: str | os.PathLike[str] | None = None) -> str:
        """Bring the registry at ``url`` to this workbench's schema (``workbench registry upgrade --url URL``).

        Runs are kept; a new database is created. Returns the schema version now in place.
        """
        url = resolve_url(url)
        registry = cls._acquire(url)
        try:
            registry._prepare(upgrade=True)
        finally:
            registry.close()
        return SCHEMA_VERSION

    def close(self) -> None:
        """Let go of the database; this object must not be used afterwards (closing twice is harmless).

        Other ``Registry`` objects of this process on the same database keep working: the pooled connections
        are closed only when the last of them closes.
        """
        if self._closed:
            return
        self._closed = True
        if self._shared is not None:
            self._shared.release()
        else:
            self._engine.dispose()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Registry({_safe(self.url)!r})"

    def _prepare(self, *, upgrade: bool) -> None:
        """Check the schema; create (new database) or migrate (``upgrade``) it. Never touches foreign data."""
        if self._engine.dialect.name == "sqlite":
            _check_sqlite_path(self._engine.url)
        for attempt in range(_ATTEMPTS):
            try:
                with self._write_engine.begin() as conn:
                    if conn.dialect.name == "postgresql":
                        # Two processes creating the same new registry would both run CREATE TABLE; the
                        # transaction-scoped advisory lock makes the second wait and then see the tables.
                        conn.execute(text("SELECT pg_advisory_xact_lock(7220342613)"))
                    self._prepare_in(conn, upgrade=upgrade)
                return
            except RegistryError:
                raise
            except SQLAlchemyError as err:
                if _is_transient(err) and attempt < _ATTEMPTS - 1:
                    time.sleep(random.uniform(0.05, 0.3))
                    continue
                raise RegistryError(self._explain(err, "open")) from err

    def _prepare_in(self, conn: Connection, *, upgrade: bool) -> None:
        from alembic import command
        from alembic.runtime.migration import MigrationContext

        tables = set(inspect(conn).get_table_names())
        safe = _safe(self.url)
        head = _script().get_current_head()
        if VERSION_TABLE not in tables:
            if tables:
                shown = ", ".join(sorted(tables)[:6]) + (", ..." if len(tables) > 6 else "")
                raise RegistryError(
                    f"{safe} is not a workbench registry: it holds other tables ({shown}) and no "
                    f"{VERSION_TABLE}. Nothing was changed. Point the registry at a new file or an empty database."
                )
            # A new database: create the tables as the models describe them, then stamp them with the head
            # revision (Optuna does the same); tests check that the migrations build the identical schema.
            Base.metadata.create_all(conn)
            command.stamp(_alembic_config(conn), "head")
            log.info("Created a new run registry at %s (schema %s).", safe, head)
            return
        current = MigrationContext.configure(
            conn, opts={"version_table": VERSION_TABLE}
        ).get_current_revision()
        if current == head:
            return
        if current is not None and not _known_revision(current):
            raise RegistryError(
                f"Registry at {safe} has schema {current}, which this workbench (schema {head}) does not know: "
                f"it was written by a newer workbench. Upgrade the package: pip install -U efficiency-workbench."
            )
        if not upgrade:
            raise RegistryError(
                f"Registry at {safe} has schema {current or 'none'}; this workbench needs {head}. "
                f"Run `workbench registry upgrade --url {safe}` (runs are kept)."
            )
        command.upgrade(_alembic_config(conn), "head")
        log.info("Upgraded the run registry at %s from schema %s to %s.", safe, current, head)

    # ------------------------------------------------------------------ sessions
    @contextmanager
    def session_scope(self, *, write: bool = True) -> Iterator[Session]:
        """One transaction: commit on success, roll back on error, always close.

        Driver errors become :class:`RegistryError` with a readable message; lock timeouts, deadlocks and
        serialization failures become its subclass ``_TransientError``, which :meth:`_transact` retries.
        """
        if os.getpid() != self._pid:
            # A forked child must not use the parent's pooled connections (both would talk over one socket or
            # SQLite handle); drop them without closing what the parent still uses, once per engine.
            if self._shared is not None:
                self._shared.after_fork()
            else:
                self._engine.dispose(close=False)
            self._pid = os.getpid()
        session = Session(bind=self._write_engine if write else self._engine, expire_on_commit=False)
        try:
            yield session
            session.commit()
        except SQLAlchemyError as err:
            session.rollback()
            kind = _TransientError if _is_transient(err) else RegistryError
            raise kind(self._explain(err, "write to" if write else "read")) from err
        except BaseException:
            session.rollback()
            raise
        finally:
            session.close()

    def _transact(self, fn: Callable[[Session], T], *, write: bool = True) -> T:
        """Run ``fn`` in :meth:`session_scope`, retrying transient conflicts.

        Why retry at all: SQLite's busy timeout covers most waits, but a reader that becomes a writer in WAL
        mode, or two PostgreSQL transactions that deadlock, fail at once and would succeed a moment later.
        Why a random, not exponential, pause (as Optuna's ``_create_new_trial``): the conflicting writers are
        a handful of processes that collided at the same instant; spreading their retries apart is what
        helps, and the wait must stay short because a panel is waiting for the answer.
        """
        for attempt in range(_ATTEMPTS):
            try:
                with self.session_scope(write=write) as session:
                    return fn(session)
            except _TransientError:
                if attempt == _ATTEMPTS - 1:
                    raise
                time.sleep(random.uniform(0.05, 0.3))
        raise AssertionError("unreachable")

    def _explain(self, err: SQLAlchemyError, action: str) -> str:
        orig = getattr(err, "orig", None)
        detail = (
            str(orig if orig is not None else err).strip().splitlines()[0] if str(orig or err).strip() else ""
        )
        name = type(orig).__name__ if orig is not None else type(err).__name__
        hint = ""
        if _is_transient(err):
            hint = (
                " Another process held the database too long; try again, or use PostgreSQL for many writers."
            )
        elif isinstance(err, DBAPIError) and err.connection_invalidated or "connect" in detail.lower():
            hint = " Check that the database server is running and the URL is right."
        return f"Could not {action} the registry at {_safe(self.url)}: {name}: {detail}.{hint}"

    def _read_rows(self, stmt: Any) -> list[Any]:
        """Rows of a Core ``select`` (no ORM objects: the fast path for DataFrames), with the same errors."""

        def read(session: Session) -> list[Any]:
            return list(session.connection().execute(stmt).all())

        return self._transact(read, write=False)

    def connect(self) -> Any:
        """A read connection for ad-hoc SQL (``with registry.connect() as conn: pd.read_sql(..., conn)``)."""
        return self._engine.connect()

    # ------------------------------------------------------------------ writes
    def start_run(
        self,
        model_fingerprint: str,
        model_description: str,
        pipeline_json: str,
        pipeline_label: str,
        suite_key: str,
        suite_name: str,
        environment: Mapping[str, Any] | None = None,
        parent_id: int | None = None,
        tags: Iterable[str] = (),
        notes: str = "",
    ) -> int:
        """Record a new ``running`` run owned by this process; returns its id.

        Raises:
            ConfigError: ``pipeline_json`` is not a JSON list, or a tag contains a comma.
            RegistryError: ``parent_id`` names no run, or the database fails.
        """
        canonical, digest, technique = canonical_pipeline(pipeline_json)
        clean_tags = _clean_tags(tags)
        env_json = _dumps(dict(environment or {}))

        def write(session: Session) -> int:
            if parent_id is not None and session.get(RunRow, parent_id) is None:
                raise RegistryError(
                    f"No run {parent_id} in the registry at {_safe(self.url)}; "
                    f"parent_id must name a recorded run."
                )
            now = _now()
            row = RunRow(
                created_at=now,
                updated_at=now,
                heartbeat_at=now,
                status="running",
                model_fingerprint=model_fingerprint,
                model_description=model_description or "",
                pipeline_json=canonical,
                pipeline_hash=digest,
                pipeline_label=pipeline_label or "",
                technique=technique,
                suite_key=suite_key,
                suite_name=suite_name or "",
                metrics_json="{}",
                extras_json="{}",
                environment_json=env_json,
                tags_json=_dumps(clean_tags),
                notes=notes or "",
                parent_id=parent_id,
                pid=os.getpid(),
                hostname=self._host,
                revision=1,
            )
            session.add(row)
            session.flush()
            return int(row.id)

        return self._transact(write)

    def heartbeat(self, run_id: int) -> None:
        """Say that the process running ``run_id`` is alive (readers are not told: no change token moves)."""

        def write(session: Session) -> None:
            result = session.execute(
                update(RunRow)
                .where(RunRow.id == run_id, RunRow.status == "running")
                .values(heartbeat_at=_now())
            )
            if result.rowcount == 0:  # type: ignore[attr-defined]
                self._row(session, run_id)  # raises for a missing run; a finished one needs no heartbeat

        self._transact(write)

    def finish_run(
        self, run_id: int, metrics: Mapping[str, Any], extras: Mapping[str, Any] | None = None
    ) -> None:
        """Mark ``run_id`` done with its ``metrics`` (flat name -> number) and ``extras`` (any JSON)."""
        metrics_json = _dumps(_flat_metrics(metrics))
        extras_json = _dumps(dict(extras or {}))

        def write(session: Session) -> None:
            row = self._row(session, run_id)
            if row.status == "done":
                raise RegistryError(f"Run {run_id} is already done; a finished run is never overwritten.")
            now = _now()
            row.status, row.finished_at, row.updated_at, row.heartbeat_at = "done", now, now, now
            row.metrics_json, row.extras_json, row.error = metrics_json, extras_json, None
            row.revision += 1

        self._transact(write)

    def fail_run(self, run_id: int, error: str, status: str = "failed") -> None:
        """Mark ``run_id`` ``failed`` or ``interrupted`` with the error text; a done run is left as it is."""
        if status not in ("failed", "interrupted"):
            raise ConfigError(f"fail_run: status={status!r}; use 'failed' or 'interrupted'.")

        def write(session: Session) -> None:
            row = self._row(session, run_id)
            if row.status == "done":
                raise RegistryError(f"Run {run_id} is done; a finished run is never marked {status}.")
            now = _now()
            row.status, row.error, row.finished_at, row.updated_at = status, str(error), now, now
            row.revision += 1

        self._transact(write)

    def set_tags(self, run_id: int, tags: Iterable[str]) -> None:
        """Replace the tags of ``run_id`` (order kept, duplicates and blanks dropped)."""
        tags_json = _dumps(_clean_tags(tags))
        self._edit(run_id, tags_json=tags_json)

    def set_notes(self, run_id: int, notes: str) -> None:
        """Replace the free-text notes of ``run_id``."""
        self._edit(run_id, notes=str(notes or ""))

    def delete_run(self, run_id: int) -> None:
        """Delete ``run_id``; runs that named it as parent keep existing with no parent."""

        def write(session: Session) -> None:
            row = self._row(session, run_id)
            now = _now()
            session.execute(
                update(RunRow)
                .where(RunRow.parent_id == run_id)
                .values(parent_id=None, updated_at=now, revision=RunRow.revision + 1)
            )
            session.delete(row)

        self._transact(write)

    def _edit(self, run_id: int, **values: Any) -> None:
        def write(session: Session) -> None:
            row = self._row(session, run_id)
            for key, value in values.items():
                setattr(row, key, value)
            row.updated_at = _now()
            row.revision += 1

        self._transact(write)

    def _row(self, session: Session, run_id: int) -> RunRow:
        row = session.get(RunRow, int(run_id))
        if row is None:
            raise RegistryError(f"No run {run_id} in the registry at {_safe(self.url)}.")
        return row

    # ------------------------------------------------------------------ reads
    def get_run(self, run_id: int) -> Run:
        """The run with id ``run_id``. Raises :class:`RegistryError` (no such run) when it does not exist."""
        return self._transact(lambda s: self._row(s, run_id).to_run(), write=False)

    def find_done(self, model_fingerprint: str, pipeline_json: str, suite_key: str) -> Run | None:
        """The latest ``done`` run of this model, pipeline and suite, or None (failed runs never count)."""
        _, digest, _ = canonical_pipeline(pipeline_json)

        def read(session: Session) -> Run | None:
            row = session.scalars(
                select(RunRow)
                .where(
                    RunRow.model_fingerprint == model_fingerprint,
                    RunRow.pipeline_hash == digest,
                    RunRow.suite_key == suite_key,
                    RunRow.status == "done",
                )
                .order_by(RunRow.id.desc())
                .limit(1)
            ).first()
            return None if row is None else row.to_run()

        return self._transact(read, write=False)

    def runs_frame(
        self,
        model: str | None = None,
        status: str | Sequence[str] | None = "done",
        technique: str | Sequence[str] | None = None,
        tag: str | None = None,
        since: datetime | timedelta | str | None = None,
        suite: str | None = None,
        *,
        stage_technique: str | Sequence[str] | None = None,
        mark_stale: bool = True,
    ) -> pd.DataFrame:
        """One row per run with flat columns; see :func:`workbench.registry.queries.runs_frame`."""
        from workbench.registry.queries import runs_frame

        if mark_stale:
            try:
                self.mark_stale_runs()
            except RegistryError as err:  # a read-only database can still be listed
                log.warning("Could not mark stale runs: %s", err)
        return runs_frame(
            self,
            model=model,
            status=status,
            technique=technique,
            tag=tag,
            since=since,
            suite=suite,
            stage_technique=stage_technique,
        )

    def change_token(self) -> str:
        """A short string that changes whenever any process adds, edits or deletes a run (not on heartbeats).

        ``count`` moves on delete, ``max(id)`` on insert (ids are never reused) and ``sum(revision)`` on every
        edit, so any change moves at least one of them; one aggregate query, a few ms for 10,000 runs.
        """

        def read(session: Session) -> str:
            count, top, total = session.execute(
                select(func.count(RunRow.id), func.max(RunRow.id), func.sum(RunRow.revision))
            ).one()
            return f"{count}:{top or 0}:{total or 0}"

        return self._transact(read, write=False)

    def mark_stale_runs(self, max_age_s: float = STALE_AFTER_S) -> list[int]:
        """Mark runs left ``running`` by a dead process as ``interrupted``; returns their ids.

        On this host a run is dead when its pid no longer exists (or now belongs to a process started after
        the run); a run from another host is dead when its last heartbeat is older than ``max_age_s``.
        """
        cutoff = _now() - timedelta(seconds=max_age_s)

        def read(session: Session) -> list[int]:
            rows = session.execute(
                select(RunRow.id, RunRow.pid, RunRow.hostname, RunRow.heartbeat_at, RunRow.created_at).where(
                    RunRow.status == "running"
                )
            ).all()
            stale = []
            for run_id, pid, host, beat, created in rows:
                if host == self._host and pid is not None:
                    if pid != os.getpid() and not _pid_alive(pid, created):
                        stale.append(run_id)
                elif (beat or created) < cutoff:
                    stale.append(run_id)
            return stale

        stale = self._transact(read, write=False)
        if not stale:
            return []

        def write(session: Session) -> list[int]:
            now = _now()
            result = session.execute(
                update(RunRow)
                .where(RunRow.id.in_(stale), RunRow.status == "running")  # unless it finished meanwhile
                .values(
                    status="interrupted",
                    finished_at=now,
                    updated_at=now,
                    revision=RunRow.revision + 1,
                    error="Interrupted: the process running it ended without recording a result "
                    "(kernel restart, crash or kill).",
                )
                .returning(RunRow.id)
            )
            return sorted(int(r) for r in result.scalars())

        marked = self._transact(write)
        if marked:
            log.info("Marked stale runs %s interrupted in %s.", marked, _safe(self.url))
        return marked


def _known_revision(revision: str) -> bool:
    from alembic.util import CommandError

    try:
        return _script().get_revision(revision) is not None
    except CommandError:
        return False


def _flat_metrics(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """Metrics as JSON numbers (numpy/torch scalars unwrapped); a nested value is refused, not flattened."""
    out: dict[str, Any] = {}
    for key, value in dict(metrics).items():
        if hasattr(value, "item") and not isinstance(value, (int, float, str)):
            value = value.item()
        if isinstance(value, bool):
            value = int(value)
        if isinstance(value, (int, float, str)) or value is None:  # NaN and inf included: json keeps them
            out[str(key)] = value
        else:
            raise ConfigError(
                f"Metric {key!r} is a {type(value).__name__}; metrics are flat numbers. "
                f"Put structured results in extras."
            )
    return out


def _create_engine(url: str) -> Engine:
    try:
        parsed = make_url(url)
    except ArgumentError:
        raise RegistryError(
            f"{url!r} is not a database URL. Use e.g. sqlite:///runs.db, a file path, or "
            f"postgresql+psycopg://user@host/dbname."
        ) from None
    kwargs: dict[str, Any] = {}
    if parsed.get_backend_name() == "sqlite":
        # The engine is shared by worker threads (a run records from its own thread); each thread still gets
        # its own pooled connection, so lifting the same-thread check is safe.
        kwargs["connect_args"] = {"check_same_thread": False, "timeout": BUSY_TIMEOUT_S}
        if parsed.database in (None, "", ":memory:"):
            kwargs["poolclass"] = StaticPool  # one in-memory database shared by all threads
    else:
        kwargs["pool_pre_ping"] = True  # a server may drop idle connections between two runs
    try:
        engine = create_engine(parsed, **kwargs)
    except NoSuchModuleError:
        raise RegistryError(
            f"{_safe(parsed)!r} is not a database URL SQLAlchemy knows (no dialect {parsed.drivername!r}). Use "
            f"e.g. sqlite:///runs.db, a file path, or postgresql+psycopg://user@host/dbname."
        ) from None
    except ImportError as err:
        hint = (
            "pip install 'efficiency-workbench[postgres]'"
            if parsed.get_backend_name() == "postgresql"
            else f"install the Python driver for {parsed.drivername}"
        )
        raise RegistryError(f"No database driver for {_safe(parsed)} ({err}). Install it: {hint}.") from None
    if parsed.get_backend_name() == "sqlite":
        _install_sqlite_events(engine)
    return engine


def _install_sqlite_events(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Let SQLAlchemy, not the sqlite3 module, decide when transactions begin (see _on_begin).
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        # WAL: readers never block the writer and the writer never blocks readers, so a panel can refresh
        # while a run records. synchronous=NORMAL is safe with WAL (no corruption, at worst the last commits
        # are lost on power failure) and makes each commit far cheaper.
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute(f"PRAGMA busy_timeout={int(BUSY_TIMEOUT_S * 1000)}")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        # Writers take the write lock up front. A deferred transaction that reads first and writes later can
        # fail with "database is locked" at once (no busy wait) when another process wrote in between;
        # IMMEDIATE waits its turn under busy_timeout instead.
        mode = "BEGIN IMMEDIATE" if conn.get_execution_options().get("workbench_write") else "BEGIN"
        conn.exec_driver_sql(mode)


class _SharedEngine:
    """The one engine (and connection pool) of this process for one database URL, shared by every ``Registry``.

    Why one per process: SQLite's locks are POSIX advisory locks, which belong to the process, and closing *any*
    descriptor of a file drops *all* of the process's locks on it. SQLite guards against that only among its own
    connections of one process (it defers closing a descriptor while another of its connections holds a lock).
    Two engines in one process are still both SQLite, but every extra pool is another set of connections to keep
    consistent, and an open used to read the file's header with plain Python while the first engine's
    connections held locks: another process then saw no reader and deleted the ``-wal`` file, and later writes
    went to a deleted file. So a file is never opened outside SQLite (see :func:`_check_sqlite_path`), and a
    second ``Registry.open`` of the same database reuses the first engine; the pool is disposed when the last
    ``Registry`` using it closes. In-memory SQLite URLs are not shared: each open is its own database.
    """

    _lock: ClassVar[threading.Lock] = threading.Lock()
    _by_key: ClassVar[dict[str, _SharedEngine]] = {}

    def __init__(self, key: str | None, engine: Engine) -> None:
        self.key, self.engine, self.users, self.pid = key, engine, 0, os.getpid()

    @classmethod
    def acquire(cls, url: str) -> _SharedEngine:
        key = _engine_key(url)
        with cls._lock:
            shared = cls._by_key.get(key) if key is not None else None
            if shared is None:
                shared = cls(key, _create_engine(url))
                if key is not None:
                    cls._by_key[key] = shared
            shared.users += 1
            return shared

    def release(self) -> None:
        with self._lock:
            self.users -= 1
            if self.users > 0:
                return
            if self.key is not None and self._by_key.get(self.key) is self:
                del self._by_key[self.key]
        if self.pid == os.getpid():
            self.engine.dispose()
        else:  # a forked child closing what it inherited: leave the parent's connections alone
            self.engine.dispose(close=False)

    def after_fork(self) -> None:
        with self._lock:
            if self.pid != os.getpid():
                self.engine.dispose(close=False)
                self.pid = os.getpid()


def _engine_key(url: str) -> str | None:
    """What identifies a database within this process: the file's real path for SQLite files, else the URL.

    None for in-memory SQLite (nothing to share).
    """
    try:
        parsed = make_url(url)
    except ArgumentError:
        return url  # _create_engine says what is wrong with it
    if parsed.get_backend_name() != "sqlite":
        return parsed.render_as_string(hide_password=False)
    database = parsed.database
    if not database or database == ":memory:" or "mode=memory" in str(parsed):
        return None
    if database.startswith("file:"):
        return str(parsed)
    return f"sqlite:{os.path.realpath(database)}?{sorted(parsed.query.items())}"


def _check_sqlite_path(url: URL) -> None:
    """Refuse a folder, a missing folder or a file that is not an SQLite database, reading it only through SQLite.

    The file is never opened with plain Python: closing that descriptor would drop every lock this process's
    SQLite connections hold on it (see :class:`_SharedEngine`). SQLite itself reads the header and answers
    ``file is not a database``; a plain read transaction writes nothing, so a text file is left as it was.
    """
    database = url.database
    if not database or database == ":memory:" or database.startswith("file:"):
        return
    path = Path(database)
    if path.is_dir():
        raise RegistryError(f"Registry path {path} is a folder; give a file name such as {path / 'runs.db'}.")
    if not path.exists() or path.stat().st_size == 0:
        if not path.parent.exists():
            raise RegistryError(
                f"Folder {path.parent} for the registry {path.name} does not exist; create it "
                f"or choose another path."
            )
        return
    try:
        conn = sqlite3.connect(path, timeout=BUSY_TIMEOUT_S)
        try:
            conn.execute("PRAGMA schema_version").fetchone()
        finally:
            conn.close()
    except sqlite3.DatabaseError as err:
        if "not a database" in str(err):
            raise RegistryError(
                f"{path} is not a workbench registry: it is not an SQLite database (a text file, another "
                f"format, or a damaged file). Nothing was changed. Choose another file, e.g. "
                f"--registry sqlite:///runs.db."
            ) from None
        # Anything else (a damaged page, no permission) is reported by the open that follows, with the URL.
        log.debug("SQLite check of %s: %s", path, err)


__all__ = ["DEFAULT_URL", "ENV_VAR", "STALE_AFTER_S", "Registry", "canonical_pipeline", "resolve_url"]
