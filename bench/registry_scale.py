"""Registry at scale: 10,000 runs queried into a DataFrame and plotted, against the 1 s target.

    .venv/bin/python bench/registry_scale.py [--runs 10000] [--url sqlite:///path.db]

Fills a fresh registry (a temporary SQLite file unless --url names an empty database) with synthetic runs
through the same table the workbench writes, then times ``runs_frame()`` and a plotly scatter of its rows.
A plain ``pd.read_sql`` of the same rows (raw columns, no JSON parsing) is timed in the same run as the
reference: ``query_vs_read_sql`` says what the flattening costs on top of just reading. A few real
``start_run``/``finish_run`` pairs give the cost of recording one run.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pandas as pd
import plotly.graph_objects as go
from sqlalchemy import insert, select

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from workbench.registry import Registry
from workbench.registry.models import RunRow
from workbench.registry.store import canonical_pipeline

TARGET_S = 1.0  # DESIGN.md: 10,000 runs queried and plotted in under 1 s
METHODS = ("rtn", "gptq", "awq", "hqq", "bnb", "quanto")


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10_000)
    parser.add_argument("--url", default=None, help="an empty database (default: a temporary SQLite file)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        url = args.url or f"sqlite:///{Path(tmp) / 'bench-runs.db'}"
        reg = Registry.open(url)
        t0 = time.perf_counter()
        rows = _rows(args.runs)
        with reg.session_scope() as session:
            session.execute(insert(RunRow), rows)
        print(f"inserted {args.runs} runs in {time.perf_counter() - t0:.2f} s (bulk, synthetic)")

        t0 = time.perf_counter()
        for i in range(50):
            run_id = reg.start_run("fp-x", "m", "[]", "baseline", "quick:abc", "quick", {"i": i})
            reg.finish_run(run_id, {"ppl": 12.0 + i})
        record_ms = (time.perf_counter() - t0) / 50 * 1000
        print(f"record_one_run = {record_ms:.1f} ms (start_run + finish_run, two transactions)")

        t_first = time.perf_counter()
        reg.runs_frame()
        t_first = time.perf_counter() - t_first
        t_query, frame = _best(lambda: reg.runs_frame())
        assert isinstance(frame, pd.DataFrame)
        t_token, token = _best(reg.change_token, repeat=20)

        stmt = select(RunRow.__table__).where(RunRow.status == "done").order_by(RunRow.id)
        with reg.connect() as conn:
            t_raw, _raw = _best(lambda: pd.read_sql(stmt, conn))

        def plot() -> go.Figure:
            return go.Figure(
                go.Scatter(
                    x=frame["metric_bits_per_weight"],
                    y=frame["metric_kl_mean"],
                    mode="markers",
                    marker={"color": frame["metric_decode_tok_s"], "colorbar": {"title": "decode tok/s"}},
                    hovertext=frame["pipeline"],
                    customdata=frame["run_id"],
                )
            ).to_plotly_json()

        t_plot, _ = _best(plot)
        try:  # the workbench's own trade-off view, when present, is what a panel really draws
            from workbench.views import tradeoff_figure

            t_view, _ = _best(lambda: tradeoff_figure(frame), repeat=3)
        except Exception as err:  # noqa: BLE001 - the view is optional here; say why it was skipped
            t_view = None
            print(f"tradeoff_figure skipped: {type(err).__name__}: {err}")
        reg.close()

    n = len(frame)
    total = t_query + t_plot
    print(f"rows = {n} done runs, {frame.shape[1]} columns")
    print(
        f"query_{args.runs // 1000}k_runs = {t_query:.3f} s (target < {TARGET_S:g} s; ratio {t_query / TARGET_S:.2f})"
    )
    print(f"query_first_call = {t_first:.3f} s")
    print(f"read_sql_reference = {t_raw:.3f} s (query_vs_read_sql = {t_query / t_raw:.2f}x)")
    print(f"scatter_figure = {t_plot:.3f} s")
    print(f"query_plus_plot = {total:.3f} s (target < {TARGET_S:g} s; ratio {total / TARGET_S:.2f})")
    if t_view is not None:
        print(
            f"tradeoff_figure = {t_view:.3f} s; query_plus_tradeoff = {t_query + t_view:.3f} s "
            f"(ratio to target {(t_query + t_view) / TARGET_S:.2f})"
        )
    print(f"change_token = {t_token * 1000:.1f} ms ({token})")


if __name__ == "__main__":
    main()
