"""Schema 0.2: a per-run revision counter for change detection.

``Registry.change_token()`` sums it (with the row count and the highest id), so a panel in one process notices
an edit made by another without reading every row; heartbeats do not bump it, so a running job does not make
every open panel redraw. Existing runs start at revision 1.

Revision ID: 0.2
Revises: 0.1
Create Date: 2026-11-23
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0.2"
down_revision = "0.1"
branch_labels = None
depends_on = None


# SQLite's batch mode rebuilds the table from its reflection, which forgets AUTOINCREMENT; without it ids of
# deleted runs could be handed out again (lineage and change_token rely on ids never coming back).
TABLE_KWARGS = {"sqlite_autoincrement": True}


def upgrade() -> None:
    with op.batch_alter_table("runs", table_kwargs=TABLE_KWARGS) as batch:
        batch.add_column(sa.Column("revision", sa.Integer(), nullable=False, server_default="1"))


def downgrade() -> None:
    with op.batch_alter_table("runs", table_kwargs=TABLE_KWARGS) as batch:
        batch.drop_column("revision")
