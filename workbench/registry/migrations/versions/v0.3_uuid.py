"""Schema 0.3: a uuid per run, and a table saying which workbench wrote the schema.

``runs.uuid`` names a run across registries: ``copy_runs`` (``workbench runs copy``) keeps it, so copying the
same runs again adds none, and ``start_run`` uses it to stay exactly-once when it retries after a lost
connection. Existing runs get a fresh uuid each (they were never copied anywhere under one).

``workbench_registry_info`` holds ``schema_version`` and ``workbench_version`` (the release that created or
last upgraded the schema), so an older workbench refusing a newer schema can name the release to install.

Revision ID: 0.3
Revises: 0.2
Create Date: 2026-12-01
"""

from __future__ import annotations

import uuid

import sqlalchemy as sa
from alembic import op

revision = "0.3"
down_revision = "0.2"
branch_labels = None
depends_on = None

TABLE_KWARGS = {"sqlite_autoincrement": True}  # see v0.2: batch mode would drop AUTOINCREMENT
_CHUNK = 1000


def upgrade() -> None:
    with op.batch_alter_table("runs", table_kwargs=TABLE_KWARGS) as batch:
        batch.add_column(sa.Column("uuid", sa.String(36), nullable=True))
    conn = op.get_bind()
    ids = list(conn.execute(sa.text("SELECT id FROM runs ORDER BY id")).scalars())
    for start in range(0, len(ids), _CHUNK):
        conn.execute(
            sa.text("UPDATE runs SET uuid = :uuid WHERE id = :id"),
            [{"uuid": str(uuid.uuid4()), "id": run_id} for run_id in ids[start : start + _CHUNK]],
        )
    with op.batch_alter_table("runs", table_kwargs=TABLE_KWARGS) as batch:
        batch.alter_column("uuid", existing_type=sa.String(36), nullable=False)
        batch.create_index("ix_runs_uuid", ["uuid"], unique=True)
    op.create_table(
        "workbench_registry_info",
        sa.Column("key", sa.String(64), primary_key=True),
        sa.Column("value", sa.Text(), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("workbench_registry_info")
    with op.batch_alter_table("runs", table_kwargs=TABLE_KWARGS) as batch:
        batch.drop_index("ix_runs_uuid")
        batch.drop_column("uuid")
