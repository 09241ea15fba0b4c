"""Copy runs between registries (a laptop's SQLite file into the team's PostgreSQL), never twice.

    report = copy_runs("sqlite:///workbench-runs.db", "postgresql+psycopg://me@team/runs", technique="rtn")
    print(report)        # copied 12 runs (3 already there, 1 parent added) from ... to ...

A run is the same run in both registries when its ``uuid`` is (schema 0.3 gives every run one and a copy keeps
it), so copying again adds nothing and copies made in both directions never duplicate a run. Everything a run
holds travels with it: model, pipeline, suite, status, error, metrics, extras, environment, tags, notes, the
timings (created, updated, finished, last heartbeat), the recording process and host, and its lineage: the
parent of a copied run is copied too (when it is not in the destination already) and ``parent_id`` points at
the parent's id in the destination. Runs still ``running`` are left out (their process keeps writing to the
source; copy them once they have finished), and a run already in the destination is never overwritten.

A damaged SQLite source is read as far as it can be: when the bulk read fails, the runs are read again in id
ranges, narrowing down to single runs, and those that cannot be read are counted in ``unreadable``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from workbench.errors import ConfigError, RegistryError
from workbench.registry.models import RUN_STATUSES, RunRow
from workbench.registry.queries import where_runs
from workbench.registry.store import Registry, _safe

log = logging.getLogger(__name__)

# Every stored column but the id (the destination gives its own) and parent_id (remapped).
_COLUMNS = tuple(c.name for c in RunRow.__table__.columns if c.name not in ("id", "parent_id"))
_FINISHED = tuple(s for s in RUN_STATUSES if s != "running")
_CHUNK = 500  # runs per write transaction: short transactions, so other writers are not held up for long
_IN_CHUNK = 500  # values per IN (...) list: well under SQLite's and PostgreSQL's parameter limits


@dataclass
class CopyReport:
    """What :func:`copy_runs` did: counts, and the id of every source run in the destination."""

    source: str
    destination: str
    copied: int = 0
    already_there: int = 0
    parents_added: int = 0
    running_left_out: int = 0
    unreadable: int = 0
    id_map: dict[int, int] = field(default_factory=dict)

    def __str__(self) -> str:
        extra = [f"{self.already_there} already there"]
        if self.parents_added:
            extra.append(f"{self.parents_added} parent{'s' if self.parents_added != 1 else ''} added")
        if self.running_left_out:
            extra.append(f"{self.running_left_out} still running left out")
        if self.unreadable:
            extra.append(f"{self.unreadable} unreadable in the damaged source")
        noun = "run" if self.copied == 1 else "runs"
        return f"copied {self.copied} {noun} ({', '.join(extra)}) from {self.source} to {self.destination}"


def copy_runs(
    source: Registry | str,
    destination: Registry | str,
    *,
    model: str | None = None,
    technique: str | Sequence[str] | None = None,
    tag: str | None = None,
    status: str | Sequence[str] | None = None,
    since: datetime | timedelta | str | None = None,
    suite: str | None = None,
) -> CopyReport:
    """Copy the runs of ``source`` that match the filters into ``destination``; see the module docstring.

    Args:
        source, destination: open registries or URLs (a URL is opened and closed here; the destination is
            created when new).
        model, technique, tag, since, suite: as :meth:`Registry.runs_frame` filters.
        status: one status, several, or None for every finished run (done, failed, interrupted); ``running``
            runs are never copied (asking for them is a ConfigError).

    Raises:
        ConfigError: a bad filter, or source and destination are the same registry.
        RegistryError: either registry cannot be opened or written.
    """
    statuses = (
        [status] if isinstance(status, str) else list(status) if status is not None else list(_FINISHED)
    )
    if "running" in statuses:
        raise ConfigError(
            "Runs still running are not copied (their process keeps writing to the source registry); "
            "copy them once they have finished."
        )
    unknown = [s for s in statuses if s not in RUN_STATUSES]
    if unknown:
        raise ConfigError(
            f"Unknown status {', '.join(map(repr, unknown))}; use one of {', '.join(RUN_STATUSES)}, or all."
        )
    count_running = status is None  # say how many were left out only when every finished run was asked for
    src, own_src = _open(source, mark_stale=False)
    try:
        dst, own_dst = _open(destination, mark_stale=False)
        try:
            if src._shared is not None and src._shared is dst._shared:
                raise ConfigError(
                    f"--from and --to are the same registry ({_safe(src.url)}); copy into another one."
                )
            return _copy(src, dst, statuses, count_running, model, technique, tag, since, suite)
        finally:
            if own_dst:
                dst.close()
    finally:
        if own_src:
            src.close()


def _open(registry: Registry | str, *, mark_stale: bool) -> tuple[Registry, bool]:
    if isinstance(registry, Registry):
        return registry, False
    return Registry.open(registry, mark_stale=mark_stale), True


def _copy(
    src: Registry,
    dst: Registry,
    statuses: list[str],
    count_running: bool,
    model: str | None,
    technique: str | Sequence[str] | None,
    tag: str | None,
    since: datetime | timedelta | str | None,
    suite: str | None,
) -> CopyReport:
    report = CopyReport(_safe(src.url), _safe(dst.url))
    base = select(RunRow.id, RunRow.parent_id, *(getattr(RunRow, c) for c in _COLUMNS))
    filters = {"model": model, "technique": technique, "tag": tag, "since": since, "suite": suite}
    rows = _read(src, where_runs(base, status=statuses, **filters), report)
    if tag is not None:  # LIKE narrowed it; the parsed tags settle it
        import json

        rows = [r for r in rows if str(tag) in json.loads(r["tags_json"] or "[]")]
    if count_running:
        running = where_runs(select(func.count(RunRow.id)), status="running", **filters)
        report.running_left_out = int(src._transact(lambda s: s.execute(running).scalar() or 0, write=False))
    selected = {r["id"] for r in rows}
    by_id = {r["id"]: r for r in rows}

    # Lineage: parents not selected by the filters come along (and their parents), unless still running.
    wanted = {r["parent_id"] for r in rows if r["parent_id"] is not None} - selected
    while wanted:
        found = _read(src, base.where(RunRow.id.in_(sorted(wanted)), RunRow.status != "running"), report)
        for r in found:
            by_id[r["id"]] = r
        wanted = {r["parent_id"] for r in found if r["parent_id"] is not None} - set(by_id)
    ordered = [by_id[i] for i in sorted(by_id)]  # a parent always has a smaller id than its children

    existing = _existing(dst, [r["uuid"] for r in ordered])
    for start in range(0, len(ordered), _CHUNK):
        chunk = ordered[start : start + _CHUNK]
        written = dst._transact(lambda s, chunk=chunk: _write_chunk(s, chunk, report.id_map, existing))
        for src_id, (dst_id, new) in written.items():
            report.id_map[src_id] = dst_id
            if not new:
                report.already_there += 1
            elif src_id in selected:
                report.copied += 1
            else:
                report.parents_added += 1
    log.info("%s", report)
    return report


def _read(src: Registry, stmt: Any, report: CopyReport) -> list[dict[str, Any]]:
    """The rows of ``stmt`` as dicts; from a damaged SQLite file, as many as can be read (see module docstring)."""
    try:
        return [dict(r._mapping) for r in src._read_rows(stmt.order_by(RunRow.id))]
    except RegistryError as err:
        if not _damaged(err):
            raise
        log.warning("Reading %s failed (%s); reading it run by run.", _safe(src.url), err)
    top = _top_id(src)
    rows: list[dict[str, Any]] = []
    pending = [(1, top)]
    while pending:
        low, high = pending.pop()
        try:
            part = src._read_rows(stmt.where(RunRow.id.between(low, high)).order_by(RunRow.id))
        except RegistryError as err:
            if not _damaged(err):
                raise
            if low == high:
                report.unreadable += 1
                continue
            middle = (low + high) // 2
            pending += [(middle + 1, high), (low, middle)]
            continue
        rows.extend(dict(r._mapping) for r in part)
    rows.sort(key=lambda r: r["id"])
    return rows


def _damaged(err: BaseException) -> bool:
    text = str(err).lower()
    return "malformed" in text or "not a database" in text or "damaged" in text


def _top_id(src: Registry) -> int:
    """The highest id ever given out: sqlite_sequence (AUTOINCREMENT) first, max(id) when that fails."""
    from sqlalchemy import text

    for query in ("SELECT seq FROM sqlite_sequence WHERE name = 'runs'", "SELECT max(id) FROM runs"):
        try:
            value = src._transact(lambda s, q=query: s.execute(text(q)).scalar(), write=False)
        except RegistryError:
            continue
        if value:
            return int(value)
    return 0


def _existing(dst: Registry, uuids: Iterable[str]) -> dict[str, int]:
    """uuid -> id of the runs among ``uuids`` that ``dst`` holds already."""
    uuids = list(uuids)
    found: dict[str, int] = {}
    for start in range(0, len(uuids), _IN_CHUNK):
        part = uuids[start : start + _IN_CHUNK]

        def read(session: Session, part: list[str] = part) -> list[Any]:
            return list(session.execute(select(RunRow.uuid, RunRow.id).where(RunRow.uuid.in_(part))).all())

        found.update({u: int(i) for u, i in dst._transact(read, write=False)})
    return found


def _write_chunk(
    session: Session, chunk: list[dict[str, Any]], id_map: dict[int, int], existing: dict[str, int]
) -> dict[int, tuple[int, bool]]:
    """Insert the runs of ``chunk`` not in the destination; src id -> (destination id, newly inserted).

    Looks again inside the write transaction: another copy may have added some since ``existing`` was read.
    """
    uuids = [r["uuid"] for r in chunk]
    there = dict(existing)
    there.update(
        {u: int(i) for u, i in session.execute(select(RunRow.uuid, RunRow.id).where(RunRow.uuid.in_(uuids)))}
    )
    out: dict[int, tuple[int, bool]] = {}
    links: list[tuple[int, int]] = []  # (destination id, source parent id)
    for r in chunk:
        if r["uuid"] in there:
            out[r["id"]] = (there[r["uuid"]], False)
            continue
        row = RunRow(**{c: r[c] for c in _COLUMNS})
        session.add(row)
        session.flush()
        out[r["id"]] = (int(row.id), True)
        if r["parent_id"] is not None:
            links.append((int(row.id), r["parent_id"]))
    # Parents first in the ordering, so every parent that was copied or found has its id by now.
    known = {**id_map, **{src_id: dst_id for src_id, (dst_id, _new) in out.items()}}
    for dst_id, parent in links:
        if parent in known:
            session.execute(update(RunRow).where(RunRow.id == dst_id).values(parent_id=known[parent]))
    return out


__all__ = ["CopyReport", "copy_runs"]
