"""The registry's tables (SQLAlchemy 2 declarative) and the frozen :class:`Run` that reads return.

Alembic owns the schema: a change here needs a new file under ``migrations/versions/`` and ``SCHEMA_VERSION``
moves to its revision id. ``tests/test_registry.py`` checks that the migrations and these models agree.

JSON values (metrics, extras, environment, tags) are stored as text, not as a ``JSON`` column type: the
registry only ever reads them back in Python (in bulk for DataFrames), text behaves the same on SQLite and
PostgreSQL, and Python's ``json`` keeps NaN and infinity, which PostgreSQL's JSON types refuse.
"""

from __future__ import annotations

import json
import uuid as uuid_module
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import DateTime, ForeignKey, Index, Integer, String, Text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

# The alembic revision this code reads and writes; a database at another revision is refused on open.
SCHEMA_VERSION = "0.3"

# Our own version table name, so a database that another alembic-managed application also uses keeps both.
VERSION_TABLE = "workbench_alembic_version"

# Key/value facts about the registry itself (schema 0.3): which workbench wrote its schema, so that an older
# workbench that meets a newer schema can name the release to install.
INFO_TABLE = "workbench_registry_info"

RUN_STATUSES = ("running", "done", "failed", "interrupted")


def new_run_uuid() -> str:
    return str(uuid_module.uuid4())


class Base(DeclarativeBase):
    pass


class RunRow(Base):
    """One run: what was applied to which model, evaluated on which suite, and what came out."""

    __tablename__ = "runs"
    # AUTOINCREMENT on SQLite: ids of deleted runs are never handed out again, so lineage (parent_id) and
    # change_token() (which watches max(id)) cannot be fooled by a reused id.
    __table_args__ = (
        Index("ix_runs_lookup", "model_fingerprint", "pipeline_hash", "suite_key", "status"),
        Index("ix_runs_status", "status"),
        Index("ix_runs_created_at", "created_at"),
        Index("ix_runs_uuid", "uuid", unique=True),
        {"sqlite_autoincrement": True},
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    # Timestamps are naive UTC in the database (SQLite has no time zones); reads hand back aware UTC values.
    created_at: Mapped[datetime] = mapped_column(DateTime, nullable=False)
    updated_at: Mapped[datetime] = mapped_column(DateTime, nullable=False)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime)
    heartbeat_at: Mapped[datetime | None] = mapped_column(DateTime)
    status: Mapped[str] = mapped_column(String(16), nullable=False)
    model_fingerprint: Mapped[str] = mapped_column(String(128), nullable=False)
    model_description: Mapped[str] = mapped_column(Text, nullable=False, default="")
    pipeline_json: Mapped[str] = mapped_column(Text, nullable=False)  # canonical: sorted keys, no spaces
    pipeline_hash: Mapped[str] = mapped_column(String(64), nullable=False)  # sha256 of pipeline_json, indexed
    pipeline_label: Mapped[str] = mapped_column(Text, nullable=False, default="")
    technique: Mapped[str] = mapped_column(String(64), nullable=False)  # first step's name, or "baseline"
    suite_key: Mapped[str] = mapped_column(String(256), nullable=False)
    suite_name: Mapped[str] = mapped_column(String(128), nullable=False, default="")
    metrics_json: Mapped[str] = mapped_column(Text, nullable=False, default="{}")
    extras_json: Mapped[str] = mapped_column(Text, nullable=False, default="{}")
    environment_json: Mapped[str] = mapped_column(Text, nullable=False, default="{}")
    tags_json: Mapped[str] = mapped_column(Text, nullable=False, default="[]")
    notes: Mapped[str] = mapped_column(Text, nullable=False, default="")
    error: Mapped[str | None] = mapped_column(Text)
    parent_id: Mapped[int | None] = mapped_column(Integer, ForeignKey("runs.id", ondelete="SET NULL"))
    pid: Mapped[int | None] = mapped_column(Integer)
    hostname: Mapped[str | None] = mapped_column(String(255))
    # Bumped by every change a reader could see (not by heartbeats); change_token() sums it. Schema 0.2.
    revision: Mapped[int] = mapped_column(Integer, nullable=False, default=1, server_default="1")
    # Who the run is across registries (schema 0.3): set once when the run starts, kept when it is copied to
    # another registry (copy_runs never adds a run whose uuid is there already) and used to make a retried
    # start_run exactly-once when a lost connection hid whether the first attempt committed.
    uuid: Mapped[str] = mapped_column(String(36), nullable=False, default=new_run_uuid)

    def to_run(self) -> Run:
        return Run(
            id=self.id,
            created_at=_aware(self.created_at),
            updated_at=_aware(self.updated_at),
            finished_at=_aware(self.finished_at),
            heartbeat_at=_aware(self.heartbeat_at),
            status=self.status,
            model_fingerprint=self.model_fingerprint,
            model_description=self.model_description,
            pipeline_json=self.pipeline_json,
            pipeline_hash=self.pipeline_hash,
            pipeline_label=self.pipeline_label,
            technique=self.technique,
            suite_key=self.suite_key,
            suite_name=self.suite_name,
            metrics=json.loads(self.metrics_json or "{}"),
            extras=json.loads(self.extras_json or "{}"),
            environment=json.loads(self.environment_json or "{}"),
            tags=tuple(json.loads(self.tags_json or "[]")),
            notes=self.notes or "",
            error=self.error,
            parent_id=self.parent_id,
            pid=self.pid,
            hostname=self.hostname,
            uuid=self.uuid,
        )


class InfoRow(Base):
    """One fact about the registry: ``schema_version`` and ``workbench_version`` (the release that wrote it)."""

    __tablename__ = INFO_TABLE

    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(Text, nullable=False)


@dataclass(frozen=True)
class Run:
    """A run as stored: a snapshot, detached from the database (changing it changes nothing there)."""

    id: int
    created_at: datetime
    updated_at: datetime
    finished_at: datetime | None
    heartbeat_at: datetime | None
    status: str
    model_fingerprint: str
    model_description: str
    pipeline_json: str
    pipeline_hash: str
    pipeline_label: str
    technique: str
    suite_key: str
    suite_name: str
    metrics: dict[str, Any] = field(default_factory=dict)
    extras: dict[str, Any] = field(default_factory=dict)
    environment: dict[str, Any] = field(default_factory=dict)
    tags: tuple[str, ...] = ()
    notes: str = ""
    error: str | None = None
    parent_id: int | None = None
    pid: int | None = None
    hostname: str | None = None
    uuid: str = ""

    @property
    def pipeline(self) -> list[dict[str, Any]]:
        """The pipeline as stored: ``[{"technique", "version", "params"}, ...]`` (empty for the baseline)."""
        return json.loads(self.pipeline_json or "[]")

    @property
    def duration_s(self) -> float | None:
        if self.finished_at is None:
            return None
        return (self.finished_at - self.created_at).total_seconds()


def _aware(value: datetime | None) -> datetime | None:
    if value is None or value.tzinfo is not None:
        return value
    return value.replace(tzinfo=timezone.utc)


__all__ = [
    "INFO_TABLE",
    "RUN_STATUSES",
    "SCHEMA_VERSION",
    "VERSION_TABLE",
    "Base",
    "InfoRow",
    "Run",
    "RunRow",
    "new_run_uuid",
]
