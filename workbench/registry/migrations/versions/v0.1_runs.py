"""Schema 0.1: the runs table.

One row per run with its model fingerprint, canonical pipeline JSON (and its hash, for lookups), suite,
status, timings, metrics/extras/environment as JSON text, lineage (parent_id), tags and notes.

Revision ID: 0.1
Revises:
Create Date: 2026-11-23
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0.1"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "runs",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("updated_at", sa.DateTime(), nullable=False),
        sa.Column("finished_at", sa.DateTime(), nullable=True),
        sa.Column("heartbeat_at", sa.DateTime(), nullable=True),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("model_fingerprint", sa.String(128), nullable=False),
        sa.Column("model_description", sa.Text(), nullable=False),
        sa.Column("pipeline_json", sa.Text(), nullable=False),
        sa.Column("pipeline_hash", sa.String(64), nullable=False),
        sa.Column("pipeline_label", sa.Text(), nullable=False),
        sa.Column("technique", sa.String(64), nullable=False),
        sa.Column("suite_key", sa.String(256), nullable=False),
        sa.Column("suite_name", sa.String(128), nullable=False),
        sa.Column("metrics_json", sa.Text(), nullable=False),
        sa.Column("extras_json", sa.Text(), nullable=False),
        sa.Column("environment_json", sa.Text(), nullable=False),
        sa.Column("tags_json", sa.Text(), nullable=False),
        sa.Column("notes", sa.Text(), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("parent_id", sa.Integer(), sa.ForeignKey("runs.id", ondelete="SET NULL"), nullable=True),
        sa.Column("pid", sa.Integer(), nullable=True),
        sa.Column("hostname", sa.String(255), nullable=True),
        sqlite_autoincrement=True,
    )
    op.create_index("ix_runs_lookup", "runs", ["model_fingerprint", "pipeline_hash", "suite_key", "status"])
    op.create_index("ix_runs_status", "runs", ["status"])
    op.create_index("ix_runs_created_at", "runs", ["created_at"])


def downgrade() -> None:
    op.drop_table("runs")
