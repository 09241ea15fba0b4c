"""Registry at scale: insert and query rates for 10,000 runs on SQLite and on PostgreSQL, and the time to build
the comparison table and the trade-off plot from them, against the 1 s target.

    .venv/bin/python bench/registry_scale.py [--runs 10000] [--url sqlite:///path.db] [--pg-url URL]

For each backend a fresh registry is filled with synthetic runs through the same table the workbench writes
(a bulk insert: runs/s), then real ``start_run``/``finish_run`` pairs are recorded one by one (what a sweep pays
per run: runs/s), then ``runs_frame()`` reads every run (runs/s; the first call parses every run's JSON, later
calls reuse it) and the Compare tab's table (``comparison_table``) and the trade-off plot (``tradeoff_figure``)
are built from the frame. A plain ``pd.read_sql`` of the same rows (raw columns, no JSON parsing) is timed in the
same run as the reference.

SQLite: a temporary file unless --url names an empty database. PostgreSQL: --pg-url (the runs go into a schema
of their own, dropped afterwards); without it, a private server is started the way the tests start one
(``workbench.registry.localpg``: initdb and pg_ctl, fsync on) when the PostgreSQL programs are installed;
otherwise the PostgreSQL figures are reported as not measured.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pandas as pd
from sqlalchemy import create_engine, insert, select, text

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from workbench.registry import Registry
from workbench.registry.models import RunRow
from workbench.registry.store import canonical_pipeline

TARGET_S = 1.0  # DESIGN.md: 10,000 runs queried and plotted in under 1 s
METHODS = ("rtn", "gptq", "awq", "hqq", "bnb", "quanto")
RECORDED = 200  # start_run + finish_run pairs timed one by one


def _rows(n: int) -> list[dict]:
    rng = random.Random(0)
    start = datetime.now(timezone.utc).replace(tzinfo=None) - timedelta(days=30)
    rows = []
    for i in range(n):
        method, bits = rng.choice(METHODS), rng.choice((2, 3, 4, 5, 6, 8))
        steps = [{"technique": method, "version": 1, "params": {"bits": bits, "group_size": 32, "seed": i}}]
        canonical, digest, technique = canonical_pipeline(json.dumps(steps))
        created = start + timedelta(seconds=30 * i)
        kl = 2.0 ** (-bits) * rng.uniform(0.5, 1.5)
        metrics = {
            "ppl": 12.0 * (1 + kl),
            "nll": 2.48 + kl,
            "kl_mean": kl,
            "kl_median": kl * 0.8,
            "kl_p99": kl * 6,
            "kl_max": kl * 20,
            "top1_agree": 1 - kl,
            "tokens": 4096,
            "size_bytes": 134_515_008 * bits / 8,
            "size_mb": 134.5 * bits / 8,
            "bits_per_weight": bits + 0.5,
            "bits_per_weight_linear": bits + 0.5,
            "n_params": 134_515_008,
            "prefill_tok_s": rng.uniform(500, 900),
            "decode_tok_s": rng.uniform(20, 60),
            "peak_mem_mb": rng.uniform(300, 700),
            "eval_seconds": rng.uniform(3, 9),
            "eval_tok_s": 700.0,
        }
        rows.append(
            {
                "created_at": created,
                "updated_at": created,
                "finished_at": created + timedelta(seconds=8),
                "heartbeat_at": created,
                "status": "done" if i % 20 else "failed",
                "model_fingerprint": "fp-demo",
                "model_description": "SmolLM2-135M-Instruct",
                "pipeline_json": canonical,
                "pipeline_hash": digest,
                "pipeline_label": f"{method}(bits={bits})",
                "technique": technique,
                "suite_key": "quick:abc",
                "suite_name": "quick",
                "metrics_json": json.dumps(metrics),
                "extras_json": json.dumps(
                    {"generations": [{"prompt": "p", "base": "b" * 200, "model": "m" * 200}]}
                ),
                "environment_json": json.dumps({"torch": "2.13.0", "host": "bench"}),
                "tags_json": json.dumps(["bench"]),
                "notes": "",
                "error": None if i % 20 else "RuntimeError: synthetic",
                "pid": 1,
                "hostname": "bench",
                "revision": 1,
            }
        )
    return rows


def _best(fn, repeat: int = 5) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def measure(name: str, url: str, n: int) -> dict[str, float]:
    """Fill the empty registry at ``url`` and time inserts, queries, the table and the plot; print one block."""
    from workbench.tables import comparison_table
    from workbench.views import tradeoff_figure

    reg = Registry.open(url)
    try:
        rows = _rows(n)
        t0 = time.perf_counter()
        with reg.session_scope() as session:
            session.execute(insert(RunRow), rows)
        t_bulk = time.perf_counter() - t0

        t0 = time.perf_counter()
        for i in range(RECORDED):
            run_id = reg.start_run("fp-x", "m", "[]", "baseline", "quick:abc", "quick", {"i": i})
            reg.finish_run(run_id, {"ppl": 12.0 + i})
        t_record = time.perf_counter() - t0

        t_first = time.perf_counter()
        reg.runs_frame()
        t_first = time.perf_counter() - t_first
        t_query, frame = _best(lambda: reg.runs_frame())
        assert isinstance(frame, pd.DataFrame)
        t_token, token = _best(reg.change_token, repeat=20)
        stmt = select(RunRow.__table__).where(RunRow.status == "done").order_by(RunRow.id)
        with reg.connect() as conn:
            t_raw, _raw = _best(lambda: pd.read_sql(stmt, conn))
        t_table, table = _best(lambda: comparison_table(frame), repeat=3)
        t_plot, _fig = _best(lambda: tradeoff_figure(frame).to_plotly_json(), repeat=3)
    finally:
        reg.close()

    rows_read = len(frame)
    total = t_query + t_table + t_plot
    print(f"[{name}] {url.split('?')[0]}")
    print(f"  insert_bulk = {n / t_bulk:,.0f} runs/s ({n} runs in {t_bulk:.2f} s, one transaction)")
    print(
        f"  insert_recorded = {RECORDED / t_record:,.0f} runs/s ({t_record / RECORDED * 1000:.1f} ms per run: "
        f"start_run + finish_run, two transactions)"
    )
    print(
        f"  query = {rows_read / t_query:,.0f} runs/s (runs_frame of {rows_read} done runs, {frame.shape[1]} "
        f"columns: {t_query:.3f} s; first call {t_first:.3f} s)"
    )
    print(f"  read_sql_reference = {t_raw:.3f} s (query_vs_read_sql = {t_query / t_raw:.2f}x)")
    print(f"  comparison_table = {t_table:.3f} s ({len(table)} rows)")
    print(f"  tradeoff_figure = {t_plot:.3f} s")
    print(
        f"  query_table_plot = {total:.3f} s (target < {TARGET_S:g} s; ratio {total / TARGET_S:.2f}; "
        f"first query instead: {t_first + t_table + t_plot:.3f} s)"
    )
    print(f"  change_token = {t_token * 1000:.1f} ms ({token})")
    return {"query_table_plot": total}


def _postgres(args: argparse.Namespace) -> tuple[str | None, str, object]:
    """(URL to measure, how it was obtained, something to close) — URL None when PostgreSQL is not measured."""
    if args.pg_url:
        schema = f"wb_bench_{uuid.uuid4().hex[:10]}"
        engine = create_engine(args.pg_url)
        with engine.begin() as conn:
            conn.execute(text(f"CREATE SCHEMA {schema}"))
        sep = "&" if "?" in args.pg_url else "?"

        def drop() -> None:
            with engine.begin() as conn:
                conn.execute(text(f"DROP SCHEMA {schema} CASCADE"))
            engine.dispose()

        return f"{args.pg_url}{sep}options=-csearch_path%3D{schema}", "--pg-url", drop
    from workbench.registry.localpg import LocalPostgres, unavailable_reason

    reason = unavailable_reason()
    if reason:
        return None, reason, None
    server = LocalPostgres(port=0, fsync=True).start()
    return server.url, "a private server started with pg_ctl (fsync on)", server.close


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10_000)
    parser.add_argument("--url", default=None, help="an empty SQLite database (default: a temporary file)")
    parser.add_argument(
        "--pg-url", default=None, help="a PostgreSQL database (default: a private server, if pg_ctl is here)"
    )
    args = parser.parse_args()

    # runs_frame's runtime column looks techniques up (workbench.techniques imports torch): a once-per-process
    # cost, timed on its own so that "first call" below measures the registry itself.
    t0 = time.perf_counter()
    import workbench.techniques  # noqa: F401

    print(
        f"import workbench.techniques (first runs_frame of a process pays it) = {time.perf_counter() - t0:.2f} s"
    )
    with tempfile.TemporaryDirectory() as tmp:
        measure("sqlite", args.url or f"sqlite:///{Path(tmp) / 'bench-runs.db'}", args.runs)
    pg_url, how, close = _postgres(args)
    if pg_url is None:
        print(f"[postgresql] not measured: {how}; pass --pg-url to measure a server")
        return
    print(f"(postgresql: {how})")
    try:
        measure("postgresql", pg_url, args.runs)
    finally:
        if callable(close):
            close()


if __name__ == "__main__":
    main()
