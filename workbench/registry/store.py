"""The run registry: every run, stored in any SQLAlchemy database (SQLite by default, PostgreSQL for teams).

Modelled on Optuna's RDB storage. ``Registry.open(url)`` checks the database before anything is written: a
new database is created and stamped with the alembic head, an older schema is refused with the command that
upgrades it, and a file or database that is not a workbench registry is refused without being touched.

Concurrency promise (as Optuna's ``BaseStorage`` states its own):

* A ``Registry`` is safe to share between threads (each call takes its own connection from the pool) and can be
  opened by any number of processes and machines at once; every write is one short transaction, so concurrent
  writers lose nothing. On SQLite, writers take the write lock at the start of their transaction
  (``BEGIN IMMEDIATE``) and wait up to ``BUSY_TIMEOUT_S`` for it; WAL mode lets readers go on meanwhile.
  Opening and reading never take the write lock (only creating or upgrading the schema does), so listing runs
  answers at once while another process writes, and a registry in a read-only folder can still be listed.
* A lost connection (a PostgreSQL server restarted, a network blip) is retried with a fresh connection for up
  to ``RECONNECT_S``; each connection attempt gives up after ``CONNECT_TIMEOUT_S``. ``start_run`` stays
  exactly-once across such retries (the run's uuid is written in the same transaction and looked up first), and
  finishing a run twice with the same result is harmless. A registry that cannot be reached raises one
  :class:`RegistryError` line (the URL without its password, what failed, what to check), never a hang.
* Before the first write of an open registry, SQLite files pass ``PRAGMA quick_check``: a damaged file is
  refused for writing (with how to recover) instead of being written further.
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
import urllib.parse
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

from workbench import __version__
from workbench.errors import ConfigError, RegistryError
from workbench.registry.models import (
    INFO_TABLE,
    SCHEMA_VERSION,
    VERSION_TABLE,
    Base,
    InfoRow,
    Run,
    RunRow,
    new_run_uuid,
)

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
# A server database: how long one connection attempt may take, and for how long a lost connection is retried
# (a PostgreSQL restart takes a few seconds). Opening retries for a shorter time: a server that is not there
# when a command starts is more likely a wrong URL or a stopped server than a restart, and the user waits.
CONNECT_TIMEOUT_S = 5.0
RECONNECT_S = 30.0
OPEN_RECONNECT_S = 5.0
# How long marking stale runs on open / list waits for SQLite's write lock before leaving it to a later reader.
_STALE_BUSY_MS = 200
_MIGRATIONS = Path(__file__).resolve().parent / "migrations"

T = TypeVar("T")


class _TransientError(RegistryError):
    """A lock timeout, deadlock or serialization failure: the same transaction may well succeed if retried."""


class _Disconnected(RegistryError):
    """The database could not be reached or the connection was lost: retried with a new connection for a while."""

    def __init__(self, message: str, detail: str) -> None:
        super().__init__(message)
        self.detail = detail


def resolve_url(url: str | os.PathLike[str] | None = None) -> str:
    """``url``, else ``$WORKBENCH_REGISTRY``, else ``sqlite:///workbench-runs.db``; a plain path means SQLite."""
    if url is None:
        url = os.environ.get(ENV_VAR) or DEFAULT_URL
    url = os.fspath(url)
    if "://" not in url:
        url = f"sqlite:///{Path(url).expanduser().resolve()}"
    return url


def safe_url(url: str | os.PathLike[str] | None) -> str:
    """The registry URL ``url`` resolves to (see resolve_url), with its password hidden: for messages."""
    return _safe(resolve_url(url))


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
    if "uuid" in message and ("unique" in message or "duplicate key" in message):
        # Two copies of the same run raced (copy_runs on PostgreSQL); the retry sees the winner and skips it.
        return True
    return any(
        needle in message
        for needle in ("database is locked", "database table is locked", "deadlock", "could not serialize")
    )


# PostgreSQL error classes that mean "this connection is gone or the server is not ready": connection
# exceptions (08xxx), admin/crash shutdown and "the database system is starting up" (57P01-57P03).
_DISCONNECT_STATES = ("08", "57P01", "57P02", "57P03")


def _is_disconnect(err: BaseException, dialect: str) -> bool:
    if dialect == "sqlite":
        return False  # a file: nothing to reconnect to ("unable to open" will not fix itself)
    if isinstance(err, DBAPIError) and err.connection_invalidated:
        return True
    orig = getattr(err, "orig", None)
    state = getattr(orig, "sqlstate", None)
    if state:
        return state.startswith(_DISCONNECT_STATES)
    # psycopg reports a refused or timed-out connection and a connection dropped mid-query as an
    # OperationalError without SQLSTATE (the server never answered).
    return type(orig).__name__ == "OperationalError"


def _first_line(err: BaseException) -> str:
    orig = getattr(err, "orig", None)
    text_ = str(orig if orig is not None else err).strip()
    return text_.splitlines()[0].strip() if text_ else type(orig or err).__name__


def _recovery_hint(safe_url: str) -> str:
    return (
        f"Copy the runs that can still be read into a fresh file with `workbench runs copy --from {safe_url} "
        f"--to sqlite:///recovered-runs.db --status all` and use that one, or restore a backup."
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

    Writes: :meth:`start_run`, :meth:`claim_run`, :meth:`heartbeat`, :meth:`finish_run`, :meth:`fail_run`,
    :meth:`set_tags`, :meth:`set_notes`, :meth:`delete_run`. Reads: :meth:`find_done`, :meth:`get_run`,
    :meth:`wait_for_run`, :meth:`runs_frame`, :meth:`change_token`. Every method raises :class:`RegistryError`
    when the database cannot be reached, with the driver's message in plain words.
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
        self._sqlite_file = _sqlite_file(url)
        self._intact = False  # set once PRAGMA quick_check passed (SQLite files), before the first write
        # run id -> (revision, metrics, first-step params, stage columns, techniques): parsed JSON reused by
        # runs_frame (see queries._parsed)
        self._frame_cache: dict[
            int, tuple[int, dict[str, Any], dict[str, Any], dict[str, Any], tuple[str, ...]]
        ] = {}

    @property
    def read_only(self) -> bool:
        """True for a SQLite file this process cannot write (file or folder read-only): listed, never written."""
        return self._shared is not None and self._shared.read_only

    # ------------------------------------------------------------------ opening
    @classmethod
    def open(cls, url: str | os.PathLike[str] | None = None, *, mark_stale: bool = True) -> Registry:
        """Open (and on first use create) the registry at ``url``.

        Args:
            url: any SQLAlchemy URL (``sqlite:///runs.db``, ``postgresql+psycopg://user@host/db``) or a plain
                file path (SQLite). None: ``$WORKBENCH_REGISTRY``, else ``workbench-runs.db`` in the working folder.
            mark_stale: mark runs left ``running`` by a dead process as ``interrupted`` (see mark_stale_runs;
                skipped when the registry is read-only or another process holds the write lock).

        Raises:
            RegistryError: the database cannot be reached, is not a workbench registry (another application's
                database, a text file), or has another schema version (the message says how to upgrade).
        """
        url = resolve_url(url)
        registry = cls._acquire(url)
        try:
            registry._prepare(upgrade=False)
            if mark_stale:
                registry._mark_stale_quietly()
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
        """Check the schema; create (new database) or migrate (``upgrade``) it. Never touches foreign data.

        The check is a plain read (no write lock, so it answers while another process writes, and works on a
        read-only file); only creating or migrating the schema opens a write transaction, which checks again
        inside it because another process may have done the same meanwhile.
        """
        if self._sqlite_file is not None:
            _check_sqlite_path(self._sqlite_file, _safe(self.url))
        safe = _safe(self.url)

        def look() -> str:
            with self._engine.connect() as conn, conn.begin():
                return self._schema_action(conn, upgrade=upgrade)

        action = self._retrying(lambda: self._on_connection(look, "open"), reconnect_s=OPEN_RECONNECT_S)
        if action == "ok":
            return
        if self.read_only:
            what = "create a registry" if action == "create" else "upgrade the registry"
            raise RegistryError(
                f"Cannot {what} at {safe}: the file or its folder is read-only here. Make it writable or "
                f"choose another file."
            )

        def change() -> None:
            with self._write_engine.connect() as conn:
                sqlite_dbapi = conn.connection.dbapi_connection if conn.dialect.name == "sqlite" else None
                if sqlite_dbapi is not None:
                    # SQLite migrations rebuild the runs table (batch mode: copy, DROP the old one, rename).
                    # With foreign keys on, that DROP runs ON DELETE SET NULL over the copy and every parent_id
                    # is lost. The pragma only works outside a transaction, hence on the raw connection first.
                    sqlite_dbapi.execute("PRAGMA foreign_keys=OFF")
                try:
                    with conn.begin():
                        if conn.dialect.name == "postgresql":
                            # Two processes creating the same new registry would both run CREATE TABLE; the
                            # transaction-scoped advisory lock makes the second wait and then see the tables.
                            conn.execute(text("SELECT pg_advisory_xact_lock(7220342613)"))
                        again = self._schema_action(conn, upgrade=upgrade)
                        if again == "create":
                            self._create_in(conn)
                        elif again == "upgrade":
                            self._check_integrity(
                                conn
                            )  # a damaged file is not migrated (that would write to it)
                            self._upgrade_in(conn)
                            if sqlite_dbapi is not None:
                                broken = conn.exec_driver_sql("PRAGMA foreign_key_check").all()
                                if broken:
                                    raise RegistryError(
                                        f"Upgrading {_safe(self.url)} would leave {len(broken)} runs with a "
                                        f"parent that does not exist; nothing was changed."
                                    )
                finally:
                    if sqlite_dbapi is not None:
                        sqlite_dbapi.execute("PRAGMA foreign_keys=ON")

        self._retrying(lambda: self._on_connection(change, "open"), reconnect_s=OPEN_RECONNECT_S)

    def _on_connection(self, fn: Callable[[], T], action: str) -> T:
        """``fn()`` with driver errors turned into RegistryError (transient and disconnect kinds kept apart)."""
        try:
            return fn()
        except RegistryError:
            raise
        except SQLAlchemyError as err:
            raise self._classify(err, action) from err

    def _schema_action(self, conn: Connection, *, upgrade: bool) -> str:
        """ "ok" (at head), "create" (empty database) or "upgrade"; raises for anything that must not be touched."""
        tables = set(inspect(conn).get_table_names())
        safe = _safe(self.url)
        # SCHEMA_VERSION is the head of the shipped migrations (a test checks it); reading the version table
        # with plain SQL keeps alembic out of every open that finds the registry up to date.
        head = SCHEMA_VERSION
        if VERSION_TABLE not in tables:
            if tables - {"sqlite_sequence"}:
                shown = ", ".join(sorted(tables)[:6]) + (", ..." if len(tables) > 6 else "")
                raise RegistryError(
                    f"{safe} is not a workbench registry: it holds other tables ({shown}) and no "
                    f"{VERSION_TABLE}. Nothing was changed. Point the registry at a new file or an empty database."
                )
            return "create"
        versions = list(conn.execute(text(f"SELECT version_num FROM {VERSION_TABLE}")).scalars())
        current = str(versions[0]) if versions else None
        if current == head:
            return "ok"
        if current is not None and not _known_revision(current):
            writer = _stored_info(conn, tables, "workbench_version")
            if writer:
                need = (
                    f"it was written by a newer workbench (efficiency-workbench {writer}). Install that release "
                    f"or a later one: pip install -U 'efficiency-workbench>={writer}'"
                )
            else:
                need = (
                    "it was written by a newer workbench. Upgrade the package to a release whose registry "
                    f"schema is {current} or later: pip install -U efficiency-workbench"
                )
            raise RegistryError(
                f"Registry at {safe} has schema {current}, which this workbench (efficiency-workbench "
                f"{__version__}, schema {head}) does not know: {need}. Nothing was changed."
            )
        if not upgrade:
            raise RegistryError(
                f"Registry at {safe} has schema {current or 'none'}; this workbench needs {head}. "
                f"Run `workbench registry upgrade --url {safe}` (runs are kept)."
            )
        return "upgrade"

    def _create_in(self, conn: Connection) -> None:
        from alembic import command

        # A new database: create the tables as the models describe them, then stamp them with the head
        # revision (Optuna does the same); tests check that the migrations build the identical schema.
        Base.metadata.create_all(conn)
        command.stamp(_alembic_config(conn), "head")
        _write_info(conn)
        log.info("Created a new run registry at %s (schema %s).", _safe(self.url), SCHEMA_VERSION)

    def _upgrade_in(self, conn: Connection) -> None:
        from alembic import command
        from alembic.runtime.migration import MigrationContext

        before = MigrationContext.configure(
            conn, opts={"version_table": VERSION_TABLE}
        ).get_current_revision()
        command.upgrade(_alembic_config(conn), "head")
        _write_info(conn)
        log.info(
            "Upgraded the run registry at %s from schema %s to %s.", _safe(self.url), before, SCHEMA_VERSION
        )

    def _check_integrity(self, conn: Connection | None = None) -> None:
        """Refuse to write to a SQLite file that fails ``PRAGMA quick_check`` (once per open Registry).

        A damaged file still answers some reads; writing to it (a new run, a migration) spreads the damage and
        hides it. quick_check reads every page but skips the index cross-checks of integrity_check: tens of ms
        for thousands of runs.
        """
        if self._intact or self._sqlite_file is None:
            return
        try:
            if conn is not None:
                rows = [r[0] for r in conn.exec_driver_sql("PRAGMA quick_check(5)").all()]
            else:
                with self._engine.connect() as own:
                    rows = [r[0] for r in own.exec_driver_sql("PRAGMA quick_check(5)").all()]
        except SQLAlchemyError as err:
            rows = [_first_line(err)]
        if rows != ["ok"]:
            safe = _safe(self.url)
            raise RegistryError(
                f"The registry at {safe} is damaged (PRAGMA quick_check: {'; '.join(map(str, rows))[:200]}); "
                f"nothing was written to it. {_recovery_hint(safe)}"
            )
        self._intact = True

    # ------------------------------------------------------------------ sessions
    @contextmanager
    def session_scope(self, *, write: bool = True) -> Iterator[Session]:
        """One transaction: commit on success, roll back on error, always close.

        Driver errors become :class:`RegistryError` with a readable message; lock timeouts, deadlocks and
        serialization failures become its subclass ``_TransientError``, a lost connection ``_Disconnected``;
        :meth:`_transact` retries both. A write to a read-only or damaged SQLite file is refused first.
        """
        if os.getpid() != self._pid:
            # A forked child must not use the parent's pooled connections (both would talk over one socket or
            # SQLite handle); drop them without closing what the parent still uses, once per engine.
            if self._shared is not None:
                self._shared.after_fork()
            else:
                self._engine.dispose(close=False)
            self._pid = os.getpid()
        if write:
            self._check_writable()
        yield from self._session(
            self._write_engine if write else self._engine, "write to" if write else "read"
        )

    def _session(self, bind: Engine, action: str) -> Iterator[Session]:
        session = Session(bind=bind, expire_on_commit=False)
        try:
            yield session
            session.commit()
        except SQLAlchemyError as err:
            _rollback(session)
            raise self._classify(err, action) from err
        except BaseException:
            _rollback(session)
            raise
        finally:
            try:
                session.close()
            except SQLAlchemyError as err:  # closing over a connection that is gone
                log.debug("Closing a session on %s: %s", _safe(self.url), err)

    def _check_writable(self) -> None:
        if self.read_only:
            safe = _safe(self.url)
            raise RegistryError(
                f"The registry at {safe} is read-only here (no write permission on {self._sqlite_file} or its "
                f"folder): its runs can be listed, not written. Copy them somewhere writable with "
                f"`workbench runs copy --from {safe} --to sqlite:///runs.db`, or make the file writable."
            )
        self._check_integrity()

    def _transact(
        self, fn: Callable[[Session], T], *, write: bool = True, reconnect_s: float = RECONNECT_S
    ) -> T:
        """Run ``fn`` in :meth:`session_scope`, retrying transient conflicts and lost connections.

        Why retry at all: SQLite's busy timeout covers most waits, but a reader that becomes a writer in WAL
        mode, or two PostgreSQL transactions that deadlock, fail at once and would succeed a moment later.
        Why a random, not exponential, pause (as Optuna's ``_create_new_trial``): the conflicting writers are
        a handful of processes that collided at the same instant; spreading their retries apart is what
        helps, and the wait must stay short because a panel is waiting for the answer. A lost connection is
        different: the server is away for a while (a restart), so those retries back off up to 2 s apart.
        ``fn`` must be safe to run again (every write here is: see start_run and finish_run).
        """

        def once() -> T:
            with self.session_scope(write=write) as session:
                return fn(session)

        return self._retrying(once, reconnect_s=reconnect_s)

    def _retrying(self, fn: Callable[[], T], *, reconnect_s: float) -> T:
        conflicts, tries, delay = 0, 0, 0.1
        started: float | None = None
        while True:
            try:
                return fn()
            except _TransientError:
                conflicts += 1
                if conflicts >= _ATTEMPTS:
                    raise
                time.sleep(random.uniform(0.05, 0.3))
            except _Disconnected as err:
                tries += 1
                now = time.monotonic()
                started = now if started is None else started
                left = started + reconnect_s - now
                if left <= 0:
                    raise RegistryError(
                        f"Could not reach the registry at {_safe(self.url)}: {err.detail} (tried {tries} times "
                        f"over {now - started:.0f} s). Check that the database server is running and reachable "
                        f"and that the URL is right (--registry or ${ENV_VAR})."
                    ) from err
                log.info("Registry %s unreachable (%s); retrying.", _safe(self.url), err.detail)
                time.sleep(min(delay * random.uniform(0.5, 1.0), left))
                delay = min(delay * 2, 2.0)

    def _classify(self, err: SQLAlchemyError, action: str) -> RegistryError:
        """The RegistryError a driver error becomes: transient conflicts and lost connections get their own kind."""
        if _is_disconnect(err, self._engine.dialect.name):
            detail = _first_line(err)
            return _Disconnected(f"Could not {action} the registry at {_safe(self.url)}: {detail}.", detail)
        kind = _TransientError if _is_transient(err) else RegistryError
        return kind(self._explain(err, action))

    def _explain(self, err: SQLAlchemyError, action: str) -> str:
        orig = getattr(err, "orig", None)
        detail = _first_line(err)
        name = type(orig).__name__ if orig is not None else type(err).__name__
        lowered = detail.lower()
        hint = ""
        if _is_transient(err):
            hint = (
                " Another process held the database too long; try again, or use PostgreSQL for many writers."
            )
        elif "malformed" in lowered or "not a database" in lowered:
            hint = f" The file is damaged. {_recovery_hint(_safe(self.url))}"
        elif "readonly" in lowered or "read-only" in lowered:
            hint = " The file or its folder is read-only; make it writable or copy the runs elsewhere."
        elif isinstance(err, DBAPIError) and err.connection_invalidated or "connect" in lowered:
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
        run_id, _ = self._start(
            model_fingerprint,
            model_description,
            pipeline_json,
            pipeline_label,
            suite_key,
            suite_name,
            environment,
            parent_id,
            tags,
            notes,
            claim=False,
        )
        return run_id

    def claim_run(
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
    ) -> tuple[int, bool]:
        """Start a run unless the same one (model fingerprint, pipeline, suite) is running live elsewhere.

        Returns ``(run_id, True)`` for a new ``running`` run owned by this process (as :meth:`start_run`), or
        ``(run_id, False)`` for the live run of another process, thread or machine, which the caller waits for
        (:meth:`wait_for_run`) and reuses instead of computing the same thing twice. A ``running`` twin counts
        as live while its heartbeat is younger than ``STALE_AFTER_S`` and, on this host, its process exists; a
        dead twin is marked ``interrupted`` here and never blocks. Checking and inserting happen in one write
        transaction (the SQLite write lock, a PostgreSQL advisory lock on the key), so of several processes
        claiming at once exactly one gets ``True``.
        """
        return self._start(
            model_fingerprint,
            model_description,
            pipeline_json,
            pipeline_label,
            suite_key,
            suite_name,
            environment,
            parent_id,
            tags,
            notes,
            claim=True,
        )

    def _start(
        self,
        model_fingerprint: str,
        model_description: str,
        pipeline_json: str,
        pipeline_label: str,
        suite_key: str,
        suite_name: str,
        environment: Mapping[str, Any] | None,
        parent_id: int | None,
        tags: Iterable[str],
        notes: str,
        *,
        claim: bool,
    ) -> tuple[int, bool]:
        canonical, digest, technique = canonical_pipeline(pipeline_json)
        clean_tags = _clean_tags(tags)
        env_json = _dumps(dict(environment or {}))
        # Chosen once, outside the retried transaction: a retry after a lost connection finds the run that the
        # first attempt may have committed instead of adding it twice.
        run_uuid = new_run_uuid()

        def write(session: Session) -> tuple[int, bool]:
            existing = session.scalar(select(RunRow.id).where(RunRow.uuid == run_uuid))
            if existing is not None:
                return int(existing), True
            if claim:
                twin = self._live_twin(session, model_fingerprint, digest, suite_key)
                if twin is not None:
                    return twin, False
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
                uuid=run_uuid,
            )
            session.add(row)
            session.flush()
            return int(row.id), True

        return self._transact(write)

    def _live_twin(self, session: Session, fingerprint: str, digest: str, suite_key: str) -> int | None:
        """The oldest live ``running`` run with this key, or None; dead ones are marked ``interrupted``."""
        if session.get_bind().dialect.name == "postgresql":
            key = int.from_bytes(
                hashlib.sha256(f"{fingerprint}\0{digest}\0{suite_key}".encode()).digest()[:8],
                "big",
                signed=True,
            )
            session.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": key})
        rows = session.execute(
            select(RunRow.id, RunRow.pid, RunRow.hostname, RunRow.heartbeat_at, RunRow.created_at)
            .where(
                RunRow.model_fingerprint == fingerprint,
                RunRow.pipeline_hash == digest,
                RunRow.suite_key == suite_key,
                RunRow.status == "running",
            )
            .order_by(RunRow.id)
        ).all()
        now, dead = _now(), []
        for run_id, pid, host, beat, created in rows:
            if self._is_live(pid, host, beat, created, now):
                return int(run_id)
            dead.append(int(run_id))
        if dead:
            session.execute(_interrupt(dead, now))
        return None

    def _is_live(
        self,
        pid: int | None,
        host: str | None,
        beat: datetime | None,
        created: datetime,
        now: datetime,
        max_age_s: float = STALE_AFTER_S,
    ) -> bool:
        """Whether a ``running`` run is still being worked on: a recent heartbeat, and on this host its process."""
        if (beat or created) < now - timedelta(seconds=max_age_s):
            return False
        if host == self._host and pid is not None and pid != os.getpid():
            return _pid_alive(pid, created)
        return True

    def wait_for_run(
        self,
        run_id: int,
        *,
        poll_s: float = 0.5,
        check: Callable[[], None] | None = None,
        timeout_s: float | None = None,
    ) -> Run:
        """Wait until ``run_id`` is no longer ``running`` and return it (done, failed or interrupted).

        A run whose process died meanwhile (no heartbeat for ``STALE_AFTER_S``, or on this host its pid gone)
        is marked ``interrupted`` and returned, so a claim held by a dead run never blocks for ever. ``check`` is
        called between polls (``Progress.check`` raises :class:`RunInterrupted` to stop waiting).

        Raises:
            RegistryError: ``timeout_s`` passed with the run still running.
        """
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            run = self.get_run(run_id)
            if run.status != "running":
                return run
            beat = run.heartbeat_at.replace(tzinfo=None) if run.heartbeat_at else None
            created = run.created_at.replace(tzinfo=None)
            if not self._is_live(run.pid, run.hostname, beat, created, _now()):
                self._transact(lambda s: s.execute(_interrupt([run_id], _now())))
                return self.get_run(run_id)
            if check is not None:
                check()
            if deadline is not None and time.monotonic() > deadline:
                raise RegistryError(f"Run {run_id} is still running after {timeout_s:g} s.")
            time.sleep(poll_s)

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
        """Mark ``run_id`` done with its ``metrics`` (flat name -> number) and ``extras`` (any JSON).

        Finishing a done run again with the very same metrics and extras is a no-op (a retry after a lost
        connection may find its first attempt committed); with anything else it is refused.
        """
        metrics_json = _dumps(_flat_metrics(metrics))
        extras_json = _dumps(dict(extras or {}))

        def write(session: Session) -> None:
            row = self._row(session, run_id)
            if row.status == "done":
                if row.metrics_json == metrics_json and row.extras_json == extras_json:
                    return
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
        tries: list[int] = []

        def write(session: Session) -> None:
            tries.append(1)
            if len(tries) > 1 and session.get(RunRow, int(run_id)) is None:
                return  # an earlier attempt deleted it before its connection was lost
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
            self._mark_stale_quietly()
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

    def _mark_stale_quietly(self) -> None:
        """Mark stale runs on open and list, without ever making a reader wait or fail for it."""
        if self.read_only:
            return
        try:
            self.mark_stale_runs(wait=False)
        except RegistryError as err:  # a damaged or unwritable database can still be listed
            log.warning("Could not mark stale runs: %s", err)

    def mark_stale_runs(self, max_age_s: float = STALE_AFTER_S, *, wait: bool = True) -> list[int]:
        """Mark runs left ``running`` by a dead process as ``interrupted``; returns their ids.

        On this host a run is dead when its pid no longer exists (or now belongs to a process started after
        the run); a run from another host is dead when its last heartbeat is older than ``max_age_s``.
        Finding them is a plain read; only when there are some is the write lock taken. ``wait=False`` (what
        open and list use): if another process holds the write lock, leave them for a later reader.
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
            result = session.execute(_interrupt(stale, _now()).returning(RunRow.id))
            return sorted(int(r) for r in result.scalars())

        if wait:
            marked = self._transact(write)
        else:
            try:
                self._check_writable()
                bind = self._write_engine.execution_options(workbench_busy_ms=_STALE_BUSY_MS)
                with contextmanager(self._session)(bind, "write to") as session:
                    marked = write(session)
            except _TransientError as err:
                log.info("Left stale runs %s for later: %s", stale, err)
                return []
        if marked:
            log.info("Marked stale runs %s interrupted in %s.", marked, _safe(self.url))
        return marked


def _interrupt(run_ids: Sequence[int], now: datetime) -> Any:
    """The UPDATE that marks ``running`` runs among ``run_ids`` interrupted (unless they finished meanwhile)."""
    return (
        update(RunRow)
        .where(RunRow.id.in_(list(run_ids)), RunRow.status == "running")
        .values(
            status="interrupted",
            finished_at=now,
            updated_at=now,
            revision=RunRow.revision + 1,
            error="Interrupted: the process running it ended without recording a result "
            "(kernel restart, crash or kill).",
        )
    )


def _rollback(session: Session) -> None:
    try:
        session.rollback()
    except SQLAlchemyError as err:  # the connection is gone: nothing to roll back on our side
        log.debug("Rollback failed: %s", err)


def _stored_info(conn: Connection, tables: set[str], key: str) -> str | None:
    if INFO_TABLE not in tables:
        return None
    try:
        value = conn.execute(select(InfoRow.value).where(InfoRow.key == key)).scalar()
    except SQLAlchemyError:
        return None
    return None if value is None else str(value)


def _write_info(conn: Connection) -> None:
    """Record which schema and which workbench release wrote it (read by older releases to say what to install)."""
    facts = {"schema_version": SCHEMA_VERSION, "workbench_version": __version__}
    conn.execute(InfoRow.__table__.delete().where(InfoRow.key.in_(list(facts))))
    conn.execute(InfoRow.__table__.insert(), [{"key": k, "value": v} for k, v in facts.items()])


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


def _create_engine(url: str, *, read_only: bool = False) -> Engine:
    try:
        parsed = make_url(url)
    except ArgumentError:
        raise RegistryError(
            f"{url!r} is not a database URL. Use e.g. sqlite:///runs.db, a file path, or "
            f"postgresql+psycopg://user@host/dbname."
        ) from None
    kwargs: dict[str, Any] = {}
    backend = parsed.get_backend_name()
    if backend == "sqlite":
        # The engine is shared by worker threads (a run records from its own thread); each thread still gets
        # its own pooled connection, so lifting the same-thread check is safe.
        kwargs["connect_args"] = {"check_same_thread": False, "timeout": BUSY_TIMEOUT_S}
        if parsed.database in (None, "", ":memory:"):
            kwargs["poolclass"] = StaticPool  # one in-memory database shared by all threads
        elif read_only and parsed.database:
            parsed = _read_only_url(parsed)
    else:
        kwargs["pool_pre_ping"] = True  # a server may drop idle connections between two runs
        if backend == "postgresql" and "connect_timeout" not in parsed.query:
            # Without it an unreachable host (packets dropped, not refused) blocks for the OS's TCP timeout,
            # minutes; with it every attempt fails in seconds and _retrying decides whether to try again.
            kwargs["connect_args"] = {"connect_timeout": max(1, round(CONNECT_TIMEOUT_S))}
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
            if backend == "postgresql"
            else f"install the Python driver for {parsed.drivername}"
        )
        raise RegistryError(f"No database driver for {_safe(parsed)} ({err}). Install it: {hint}.") from None
    if backend == "sqlite":
        _install_sqlite_events(engine, read_only=read_only)
    return engine


def _read_only_url(parsed: URL) -> URL:
    """A SQLite URL that opens the file read-only, for a file or folder this process cannot write.

    ``mode=ro`` alone still needs the ``-shm`` file of a WAL database, which a read-only folder cannot hold;
    when neither ``-wal`` nor ``-shm`` exists nobody has the file open (the last connection checkpointed and
    removed them), so ``immutable=1`` reads it exactly as it is without any side file.
    """
    path = os.path.realpath(str(parsed.database))
    query = {"mode": "ro", "uri": "true"}
    if not os.path.exists(path + "-wal") and not os.path.exists(path + "-shm"):
        query["immutable"] = "1"
    return parsed.set(database="file:" + urllib.parse.quote(path), query=query)


def _install_sqlite_events(engine: Engine, *, read_only: bool = False) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Let SQLAlchemy, not the sqlite3 module, decide when transactions begin (see _on_begin).
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        if not read_only:
            # WAL: readers never block the writer and the writer never blocks readers, so a panel can refresh
            # while a run records. synchronous=NORMAL is safe with WAL (no corruption, at worst the last commits
            # are lost on power failure) and makes each commit far cheaper. Only set when not WAL already:
            # switching rewrites the file header, and _check_sqlite_path has made sure the file is ours.
            mode = cursor.execute("PRAGMA journal_mode").fetchone()
            if not mode or str(mode[0]).lower() != "wal":
                cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute(f"PRAGMA busy_timeout={int(BUSY_TIMEOUT_S * 1000)}")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        # Writers take the write lock up front. A deferred transaction that reads first and writes later can
        # fail with "database is locked" at once (no busy wait) when another process wrote in between;
        # IMMEDIATE waits its turn under busy_timeout instead. Readers use a plain (deferred) BEGIN and never
        # wait for a writer (WAL). A transaction may ask for a shorter wait (marking stale runs on open).
        options = conn.get_execution_options()
        busy_ms = int(options.get("workbench_busy_ms", BUSY_TIMEOUT_S * 1000))
        conn.exec_driver_sql(f"PRAGMA busy_timeout={busy_ms}")
        conn.exec_driver_sql("BEGIN IMMEDIATE" if options.get("workbench_write") else "BEGIN")


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

    def __init__(self, key: str | None, engine: Engine, read_only: bool = False) -> None:
        self.key, self.engine, self.users, self.pid = key, engine, 0, os.getpid()
        self.read_only = read_only

    @classmethod
    def acquire(cls, url: str) -> _SharedEngine:
        key = _engine_key(url)
        with cls._lock:
            shared = cls._by_key.get(key) if key is not None else None
            if shared is None:
                read_only = _sqlite_read_only(url)
                shared = cls(key, _create_engine(url, read_only=read_only), read_only)
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


def _sqlite_file(url: str) -> Path | None:
    """The file of a plain SQLite file URL (None: a server database, in-memory, or a ``file:`` URI)."""
    try:
        parsed = make_url(url)
    except ArgumentError:
        return None
    database = parsed.database
    if parsed.get_backend_name() != "sqlite" or not database or database == ":memory:":
        return None
    if database.startswith("file:") or parsed.query.get("uri"):
        return None
    return Path(database)


def _sqlite_read_only(url: str) -> bool:
    """Whether the SQLite file exists and this process may not write it or create files beside it."""
    path = _sqlite_file(url)
    if path is None or not path.is_file() or path.stat().st_size == 0:
        return False
    return not (os.access(path, os.W_OK) and os.access(path.parent, os.W_OK))


def _check_sqlite_path(path: Path, safe_url: str) -> None:
    """Refuse a folder, a missing folder, a file that is not an SQLite database, or another application's
    database, reading the file only through SQLite and only read-only.

    The file is never opened with plain Python: closing that descriptor would drop every lock this process's
    SQLite connections hold on it (see :class:`_SharedEngine`). SQLite itself reads the header and answers
    ``file is not a database``. The look at ``sqlite_master`` happens on a read-only connection, before the
    registry's own connections (which switch the file to WAL, rewriting its header) ever touch the file, so
    another application's database is refused exactly as it was.
    """
    if path.is_dir():
        raise RegistryError(f"Registry path {path} is a folder; give a file name such as {path / 'runs.db'}.")
    if not path.exists() or path.stat().st_size == 0:
        if not path.parent.exists():
            raise RegistryError(
                f"Folder {path.parent} for the registry {path.name} does not exist; create it "
                f"or choose another path."
            )
        return
    real = os.path.realpath(path)
    # No -wal/-shm: nobody has the file open, and immutable=1 reads it as it is without creating either
    # (mode=ro alone would leave both behind for a WAL file). Otherwise mode=ro uses the ones there.
    idle = not os.path.exists(real + "-wal") and not os.path.exists(real + "-shm")
    uri = f"file:{urllib.parse.quote(real)}?mode=ro" + ("&immutable=1" if idle else "")
    try:
        conn = sqlite3.connect(uri, uri=True, timeout=BUSY_TIMEOUT_S)
        try:
            tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        finally:
            conn.close()
    except sqlite3.DatabaseError as err:
        message = str(err)
        if "not a database" in message:
            raise RegistryError(
                f"{path} is not a workbench registry: it is not an SQLite database (a text file, another "
                f"format, or a damaged file). Nothing was changed. Choose another file, e.g. "
                f"--registry sqlite:///runs.db; if it was a registry, restore it from a backup."
            ) from None
        if "malformed" in message:
            raise RegistryError(
                f"The registry at {safe_url} is damaged ({message}). Nothing was changed. "
                f"{_recovery_hint(safe_url)}"
            ) from None
        # Anything else (no permission, a lock) is reported by the open that follows, with the URL.
        log.debug("SQLite check of %s: %s", path, err)
        return
    foreign = tables - {"sqlite_sequence"}
    if foreign and VERSION_TABLE not in tables:
        shown = ", ".join(sorted(foreign)[:6]) + (", ..." if len(foreign) > 6 else "")
        raise RegistryError(
            f"{safe_url} is not a workbench registry: it holds other tables ({shown}) and no "
            f"{VERSION_TABLE}. Nothing was changed. Point the registry at a new file or an empty database."
        )


__all__ = [
    "CONNECT_TIMEOUT_S",
    "DEFAULT_URL",
    "ENV_VAR",
    "RECONNECT_S",
    "STALE_AFTER_S",
    "Registry",
    "canonical_pipeline",
    "resolve_url",
    "safe_url",
]
