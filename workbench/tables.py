"""Comparison tables: the runs as a report reads them, one definition for the Compare panel, ``workbench runs``
and every export.

``comparison_table`` turns a runs frame (``Registry.runs_frame``) into a few readable columns: a short model
name, the method and its setting ("4b g64 sym"), quality, size and latency in one unit each (top-token
agreement always in %, sizes in MB, latency in ms/token) and whether that latency was measured or only
simulated. ``COLUMNS`` says, per column, where it comes from, its short heading and how many significant
digits people see (CSV and JSON keep full values). ``DEFAULT_COLUMNS`` is what shows first; the rest are one
choice away (``MORE_COLUMNS``). The suite and filter helpers (``only_suite``, ``filter_mask``,
``no_match_message``) and ``generations_table`` (base-vs-variant continuations) serve the same front ends.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pandas as pd

from workbench.errors import ConfigError
from workbench.export import export_frame
from workbench.views import (
    DERIVED_METRICS,
    LATENCY_METRICS,
    setting_labels,
    short_model_name,
    simulated_latency,
    with_display_metrics,
)


@dataclass(frozen=True)
class TableColumn:
    """One column of the comparison table.

    Attributes:
        key: its name in the table and in every export (``kl_mean``); stable, so scripts can read exports.
        header: the short heading with its unit that the notebook shows (``KL mean``, ``size MB``).
        source: the runs-frame column it is read from (after :func:`workbench.views.with_display_metrics`), or
            "" for a column built here (``setting``, ``latency``).
        digits: significant digits in the formats for people (Markdown, HTML, LaTeX); None for non-numbers.
        help: what the column means, for tooltips and documentation.
    """

    key: str
    header: str
    source: str
    digits: int | None = None
    help: str = ""


COLUMNS: tuple[TableColumn, ...] = (
    TableColumn("run_id", "run", "run_id"),
    TableColumn(
        "model", "model", "model", help="the model's name (last path component), without its size note"
    ),
    TableColumn("technique", "method", "technique", help="first step of the pipeline, or baseline"),
    TableColumn("setting", "setting", "", help="the first step's grid: bits, group size, symmetry or format"),
    TableColumn("ppl", "ppl", "metric_ppl", 4, "perplexity on the suite's evaluation text"),
    TableColumn("kl_mean", "KL mean", "metric_kl_mean", 3, "mean KL divergence from the base model's tokens"),
    TableColumn(
        "top1_agree_pct",
        "top-1 same %",
        "metric_top1_agree_pct",
        3,
        "share of positions whose most likely token is the base model's, in %",
    ),
    TableColumn(
        "bits_per_weight", "bits/weight", "metric_bits_per_weight", 3, "all weights, scales included"
    ),
    TableColumn(
        "bits_per_weight_linear",
        "bits/weight linears",
        "metric_bits_per_weight_linear",
        3,
        "the decoder's linear layers only: what a quantizer's bit width sets",
    ),
    TableColumn("size_mb", "size MB", "metric_size_mb", 3, "the variant's own stored weights"),
    TableColumn(
        "decode_ms_per_tok",
        "decode ms/token",
        "metric_decode_ms_per_tok",
        3,
        "greedy decoding latency per token (see the latency column)",
    ),
    TableColumn(
        "latency",
        "latency",
        "",
        help="measured (runs packed) or simulated (float weights on a low-bit grid: the float model's speed)",
    ),
    TableColumn("tags", "tags", "tags"),
    # One choice away in the panel (MORE_COLUMNS).
    TableColumn("pipeline", "pipeline", "pipeline", help="every step with its parameters"),
    TableColumn("suite", "suite", "suite"),
    TableColumn("status", "status", "status", help="done, failed, interrupted or running"),
    TableColumn("kl_median", "KL median", "metric_kl_median", 3),
    TableColumn("kl_p99", "KL p99", "metric_kl_p99", 3, "99th percentile of the per-token KL divergence"),
    TableColumn("prefill_ms_per_tok", "prefill ms/token", "metric_prefill_ms_per_tok", 3),
    TableColumn("decode_tok_s", "decode tokens/s", "metric_decode_tok_s", 3),
    TableColumn("prefill_tok_s", "prefill tokens/s", "metric_prefill_tok_s", 3),
    TableColumn(
        "peak_mem_mb",
        "process peak MB",
        "metric_peak_mem_mb",
        4,
        "resident peak of the whole process, the base model kept for KL included",
    ),
    TableColumn("work_mem_mb", "eval working MB", "metric_work_mem_mb", 3, "what evaluating added on top"),
    TableColumn("notes", "notes", "notes"),
    TableColumn("created_at", "created", "created_at"),
)
COLUMNS_BY_KEY = {c.key: c for c in COLUMNS}
# Seen first: who, what, how good, how small, how fast. Twelve columns read at a glance on a laptop screen.
DEFAULT_COLUMNS: tuple[str, ...] = (
    "run_id",
    "model",
    "technique",
    "setting",
    "ppl",
    "kl_mean",
    "top1_agree_pct",
    "bits_per_weight",
    "bits_per_weight_linear",
    "size_mb",
    "decode_ms_per_tok",
    "latency",
    "tags",
)
MORE_COLUMNS: tuple[str, ...] = tuple(c.key for c in COLUMNS if c.key not in DEFAULT_COLUMNS)


def _check_columns(columns: Sequence[str]) -> None:
    unknown = [c for c in columns if c not in COLUMNS_BY_KEY]
    if unknown:
        raise ConfigError(
            f"Unknown table column(s) {', '.join(map(repr, unknown))}. Columns: {', '.join(COLUMNS_BY_KEY)}."
        )


def comparison_table(
    frame: pd.DataFrame,
    sort_by: str = "run_id",
    descending: bool = False,
    columns: Sequence[str] | None = None,
) -> pd.DataFrame:
    """The runs as a report table: ``columns`` (keys of ``COLUMNS``; default ``DEFAULT_COLUMNS``) that the frame
    can fill, baseline rows first, then sorted by ``sort_by`` (a column key, or a runs-frame name such as
    ``metric_kl_mean``; an unknown one sorts by run).

    Values stay numbers (exports to CSV and JSON keep them whole); :func:`export_table` formats them for people.

    Raises:
        ConfigError: a column key that ``COLUMNS`` does not define (the message lists them).
    """
    wanted = list(DEFAULT_COLUMNS if columns is None else columns)
    _check_columns(wanted)
    shown = with_display_metrics(frame)
    built: dict[str, Any] = {}
    for key in wanted:
        column = COLUMNS_BY_KEY[key]
        if key == "setting":
            if "technique" in shown.columns:
                built[key] = setting_labels(shown)
        elif key == "latency":
            if any(c in shown.columns for c in LATENCY_METRICS):
                built[key] = ["simulated" if s else "measured" for s in simulated_latency(shown).tolist()]
        elif column.source in shown.columns:
            values = shown[column.source]
            if key == "model":
                values = [short_model_name(v) for v in values.tolist()]
            built[key] = values.tolist() if isinstance(values, pd.Series) else values
    table = pd.DataFrame(built, columns=list(built), index=range(len(shown)))
    if table.empty:
        return table.reset_index(drop=True)
    if "latency" in table.columns and "decode_ms_per_tok" in table.columns:
        table.loc[table["decode_ms_per_tok"].isna(), "latency"] = (
            ""  # no latency measured: nothing to qualify
        )
    technique = shown["technique"].reset_index(drop=True) if "technique" in shown.columns else None
    key = _sort_key(sort_by, table.columns)
    not_baseline = (
        (technique != "baseline").astype(int) if technique is not None else pd.Series(0, table.index)
    )
    table = table.assign(_not_baseline=not_baseline.to_numpy())
    table = table.sort_values(
        ["_not_baseline", key], ascending=[True, not descending], kind="stable", na_position="last"
    )
    table = table.drop(columns="_not_baseline").reset_index(drop=True)
    if "created_at" in table.columns:
        table["created_at"] = pd.to_datetime(table["created_at"], utc=True).dt.strftime("%Y-%m-%d %H:%M")
    return table


def available_columns(frame: pd.DataFrame) -> list[str]:
    """The keys of ``COLUMNS`` that ``frame`` can fill, in table order (what a column chooser offers)."""
    shown = set(frame.columns) | {d for d, (src, _) in DERIVED_METRICS.items() if src in frame.columns}
    keys = []
    for column in COLUMNS:
        if column.key == "setting":
            ok = "technique" in shown
        elif column.key == "latency":
            ok = bool(shown & LATENCY_METRICS)
        else:
            ok = column.source in shown
        if ok:
            keys.append(column.key)
    return keys


def _sort_key(sort_by: str, columns: Sequence[str]) -> str:
    by_source = {c.source: c.key for c in COLUMNS if c.source}
    for candidate in (sort_by, by_source.get(sort_by), f"{sort_by}_pct"):
        if candidate in columns:
            return str(candidate)
    return "run_id" if "run_id" in columns else str(columns[0])


def table_headers(table: pd.DataFrame) -> dict[str, str]:
    """Column key -> short heading with unit, for the columns of ``table``."""
    return {
        c: COLUMNS_BY_KEY[c].header if c in COLUMNS_BY_KEY else str(c).replace("_", " ")
        for c in table.columns
    }


def table_digits(table: pd.DataFrame) -> dict[str, int]:
    """Column key -> significant digits, for the numeric columns of ``table``."""
    return {c: d for c in table.columns if (d := getattr(COLUMNS_BY_KEY.get(c), "digits", None)) is not None}


def export_table(
    table: pd.DataFrame, fmt: str, path: str | Path | None = None, *, headers: bool = False
) -> str:
    """``table`` (from :func:`comparison_table`) in ``fmt``, each metric at its fixed significant digits in the
    formats for people. ``headers`` replaces the column keys with the short headings (for the notebook; exports
    keep the keys, which scripts read)."""
    digits = table_digits(table)
    if headers:
        names = table_headers(table)
        table = table.rename(columns=names)
        digits = {names[k]: d for k, d in digits.items()}
    return export_frame(table, fmt, path, digits=digits)


# ---- filters ---------------------------------------------------------------------------------------------

FILTER_NAMES = {"model": "Model", "technique": "Technique", "suite": "Suite", "tag": "Tag", "since": "Since"}
_LOOSEN = {
    "model": 'pick "All models"',
    "technique": 'pick "All"',
    "suite": 'pick "All suites"',
    "tag": "empty it",
    "since": "clear the date",
}


def only_suite(frame: pd.DataFrame, suite: str) -> pd.DataFrame:
    """The runs of ``suite`` (name or key, as ``runs_frame(suite=...)`` matches), dropping metric and parameter
    columns no remaining run has (as ``runs_frame`` would not have them)."""
    if frame.empty:
        return frame
    keep = (frame["suite"] == suite) | (frame["suite_key"] == suite)
    part = frame[keep].reset_index(drop=True)
    extra = [c for c in part.columns if c.startswith(("metric_", "param_"))]
    empty = [c for c in extra if part[c].isna().all()]
    return part.drop(columns=empty) if empty else part


def filter_mask(frame: pd.DataFrame, filters: Mapping[str, Any]) -> pd.Series:
    """Which runs of ``frame`` pass ``filters`` (``model`` fingerprint, ``technique``, ``suite`` name or key,
    ``tag``, ``since``; None means off), matched as ``Registry.runs_frame`` matches them."""
    mask = pd.Series(True, index=frame.index)
    if frame.empty:
        return mask
    for name, value in filters.items():
        if value is None:
            continue
        if name == "model":
            mask &= frame["model_fingerprint"] == value
        elif name == "technique":
            mask &= frame["technique"].isin([value] if isinstance(value, str) else list(value))
        elif name == "suite":
            mask &= (frame["suite"] == value) | (frame["suite_key"] == value)
        elif name == "tag":
            tags = frame["tags"].fillna("").astype(str).str.split(",")
            mask &= tags.map(lambda t, v=str(value): v in t)
        elif name == "since":
            since = pd.Timestamp(
                datetime.now(timezone.utc) - value if isinstance(value, timedelta) else value
            )
            since = (
                since.tz_localize("UTC") if since.tzinfo is None else since
            )  # naive times are UTC, as stored
            mask &= pd.to_datetime(frame["created_at"], utc=True) >= since
        else:
            raise ConfigError(f"Unknown filter {name!r}. Filters: {', '.join(FILTER_NAMES)}.")
    return mask


def no_match_message(
    full: pd.DataFrame, filters: Mapping[str, Any], labels: Mapping[str, str] | None = None
) -> str:
    """What to say when ``filters`` leave no run of ``full`` (every run in the registry).

    An empty registry asks for a baseline; otherwise the message names the filters and, for each one, how many
    runs clearing it alone would show, so the user knows which filter to loosen. ``labels`` are the filters'
    values as the user sees them (a model's name rather than its fingerprint).
    """
    if full.empty:
        return "No runs yet: record a baseline, then quantize."
    active = {k: v for k, v in filters.items() if v is not None}
    shown = {k: (labels or {}).get(k, str(v)) for k, v in active.items()}
    if not active:
        return "No runs match."
    described = ", ".join(f"{FILTER_NAMES.get(k, k)} = {v}" for k, v in shown.items())
    hints = []
    for name in active:
        n = int(filter_mask(full, {k: v for k, v in active.items() if k != name}).sum())
        if n:
            hints.append(f"{FILTER_NAMES.get(name, name)}: {_LOOSEN.get(name, 'clear it')} to see {n} run(s)")
    text = f"No run matches the filters ({described}); the registry holds {len(full)} run(s)."
    if hints:
        return f"{text} Loosen a filter: {'; '.join(hints)}."
    return f"{text} No single filter is to blame: clear several of them."


# ---- generations -----------------------------------------------------------------------------------------


def generations_table(runs: Sequence[Any]) -> pd.DataFrame:
    """Base-vs-variant continuations of ``runs`` (``Registry.get_run`` results) side by side: one row per
    prompt, columns ``prompt``, ``base`` and ``run <id>: <pipeline>`` per run.

    A run stores its continuations in ``extras["generations"]`` as ``{"prompt", "base", "model"}``; runs of one
    suite share the prompts. A run without any (a suite with ``n_generations=0``) gives an empty cell.
    """
    prompts: dict[str, str] = {}  # prompt -> base continuation, in first-seen order
    columns: dict[str, dict[str, str]] = {}
    for run in runs:
        entries = (getattr(run, "extras", None) or {}).get("generations") or []
        label = f"run {run.id}: {run.pipeline_label or run.technique}"
        columns[label] = {}
        for entry in entries:
            prompt = str(entry.get("prompt", ""))
            prompts.setdefault(prompt, str(entry.get("base", "")))
            columns[label][prompt] = str(entry.get("model", ""))
    data = {"prompt": list(prompts), "base": list(prompts.values())}
    for label, by_prompt in columns.items():
        data[label] = [by_prompt.get(p, "") for p in prompts]
    return pd.DataFrame(data)


__all__ = [
    "COLUMNS",
    "COLUMNS_BY_KEY",
    "DEFAULT_COLUMNS",
    "FILTER_NAMES",
    "MORE_COLUMNS",
    "TableColumn",
    "available_columns",
    "comparison_table",
    "export_table",
    "filter_mask",
    "generations_table",
    "no_match_message",
    "only_suite",
    "table_digits",
    "table_headers",
]
