"""How long the Compare tab takes to redraw when the registry holds 1,000 runs.

    python bench/ui_refresh.py [--runs 1000] [--repeats 5]

One refresh is what the app does when the registry changes: ``runs_frame`` as the app reads it, without
stale-run marking (marking is a write; the app's registry marks stale runs once, when it is opened, which is
outside the timed loop), the Suite filter (every run here is of the app's suite) and the derived display metrics
(latency, same-top-token %), the trade-off figure with its Pareto front (:func:`workbench.views.tradeoff_figure`),
the FigureWidget update, the filter choices and the HTML table. The reference is a plain ``pd.read_sql`` of the
same rows (no JSON flattening, no figure), so the ratio says what the workbench adds on top of reading the table.
Runs are inserted through the registry API into a temporary SQLite file; no model is loaded and nothing is
evaluated.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pandas as pd

from workbench.registry import Registry

TARGET_S = 0.3
METHODS = ("rtn", "gptq", "awq")


def fill(registry: Registry, n: int, seed: int = 0) -> None:
    """``n`` finished runs: a baseline, then quantized variants with plausible, noisy metrics."""
    rng = random.Random(seed)
    fingerprint, description = "bench0000fingerp", "bench model (135M params)"
    for i in range(n):
        if i == 0:
            technique, params, label = "baseline", None, "baseline"
            bits, kl = 32.0, 0.0
        else:
            technique = METHODS[i % len(METHODS)]
            b = rng.choice((2, 3, 4, 5, 6, 8))
            group = rng.choice((32, 64, -1))
            params = {"bits": b, "group_size": group, "symmetric": bool(i % 2)}
            label = f"{technique}(bits={b}, group_size={group}, n={i})"  # distinct pipelines
            bits = b + 32 / (group if group > 0 else 576) + rng.random() * 0.05
            kl = 2.0 ** (-1.6 * b) * (1 + rng.random()) * (0.7 if technique != "rtn" else 1.0)
        pipeline = (
            [] if params is None else [{"technique": technique, "version": 1, "params": {**params, "i": i}}]
        )
        run_id = registry.start_run(
            model_fingerprint=fingerprint,
            model_description=description,
            pipeline_json=json.dumps(pipeline),
            pipeline_label=label,
            suite_key="quick-bench",
            suite_name="quick",
            environment={"bench": True},
            tags=("bench",) if i % 10 == 0 else (),
        )
        size_mb = 538.0 * bits / 32
        registry.finish_run(
            run_id,
            {
                "ppl": 12.0 * (1 + kl),
                "nll": 2.48 + kl,
                "kl_mean": kl,
                "kl_median": kl * 0.6,
                "kl_p99": kl * 9,
                "kl_max": kl * 30,
                "top1_agree": max(0.0, 1 - 3 * kl),
                "tokens": 2048.0,
                "size_bytes": size_mb * 1e6,
                "size_mb": size_mb,
                "bits_per_weight": bits,
                "bits_per_weight_linear": bits,
                "n_params": 134.5e6,
                "prefill_tok_s": 900 + rng.random() * 300,
                "decode_tok_s": 30 + rng.random() * 20,
                "peak_mem_mb": 700 + size_mb,
                "eval_seconds": 3.0,
                "eval_tok_s": 700.0,
            },
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)

    from widgets import Workbench

    with tempfile.TemporaryDirectory() as tmp:
        url = f"sqlite:///{Path(tmp) / 'runs.db'}"
        t0 = time.perf_counter()
        with Registry.open(url) as registry:
            fill(registry, args.runs)
        print(f"inserted {args.runs} runs through the registry API in {time.perf_counter() - t0:.1f} s")

        app = Workbench(url, model="tiny-llama", poll_interval=0)
        try:
            compare = app.compare
            compare.refresh()  # warm-up: imports, first figure
            assert len(compare.frame) == args.runs, (len(compare.frame), args.runs)
            assert compare.plot.trace_points("runs") == args.runs
            refresh = []
            for _ in range(args.repeats):
                t = time.perf_counter()
                compare.refresh()
                refresh.append(time.perf_counter() - t)
            registry = app.registry
            plain = []
            for _ in range(args.repeats):
                t = time.perf_counter()
                with registry.connect() as conn:
                    raw = pd.read_sql("SELECT * FROM runs", conn)
                plain.append(time.perf_counter() - t)
            assert len(raw) == args.runs
            # Where the time goes, once (same steps as refresh, timed apart).
            steps = {}
            t = time.perf_counter()
            frame = app.runs_frame()
            steps["runs_frame"] = time.perf_counter() - t
            from workbench.views import tradeoff_figure, with_display_metrics

            t = time.perf_counter()
            frame = with_display_metrics(frame[frame["suite"] == app.suite_filter])
            steps["suite_and_display_metrics"] = time.perf_counter() - t

            t = time.perf_counter()
            fig = tradeoff_figure(
                frame, x=compare.x.value, y=compare.y.value, color=compare.color.value or None
            )
            steps["tradeoff_figure"] = time.perf_counter() - t
            from widgets.common import replace_figure

            t = time.perf_counter()
            replace_figure(compare.plot.figure, fig)
            steps["figure_widget_update"] = time.perf_counter() - t
            t = time.perf_counter()
            compare._render_table()
            steps["table"] = time.perf_counter() - t
        finally:
            app.close()

    ui, read = statistics.median(refresh), statistics.median(plain)
    print("  ".join(f"{k} {v * 1000:.0f} ms" for k, v in steps.items()))
    print(
        f"ui_refresh_{args.runs} = {ui:.3f} s (target < {TARGET_S} s; ratio to target {ui / TARGET_S:.2f}); "
        f"plain read = {read:.3f} s (refresh / plain read = {ui / read:.1f}x)"
    )
    return 0 if ui < TARGET_S else 1


if __name__ == "__main__":
    raise SystemExit(main())
