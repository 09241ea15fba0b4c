"""The run registry: every run stored in an SQL database (SQLite by default, PostgreSQL for teams).

    from workbench.registry import Registry
    reg = Registry.open()                       # $WORKBENCH_REGISTRY or ./workbench-runs.db
    reg.runs_frame(technique="rtn")             # one row per run, flat metric_* / param_* columns
    copy_runs(reg, "postgresql+psycopg://me@team/runs")   # into the team's registry, never twice

In this project "registry" means this run store; the technique name table lives in ``workbench.techniques``.
"""

from workbench.registry.copy import CopyReport, copy_runs
from workbench.registry.models import RUN_STATUSES, SCHEMA_VERSION, Run
from workbench.registry.queries import BASE_COLUMNS
from workbench.registry.store import DEFAULT_URL, ENV_VAR, STALE_AFTER_S, Registry, resolve_url, safe_url

__all__ = [
    "BASE_COLUMNS",
    "DEFAULT_URL",
    "ENV_VAR",
    "RUN_STATUSES",
    "SCHEMA_VERSION",
    "STALE_AFTER_S",
    "CopyReport",
    "Registry",
    "Run",
    "copy_runs",
    "resolve_url",
    "safe_url",
]
