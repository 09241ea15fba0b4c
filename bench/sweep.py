"""Sweep executors: the overhead per configuration of the Ray executor against the local one, on a tiny model.

    .venv/bin/python bench/sweep.py [--configs 4] [--model tiny-llama]

Both executors run the same grid (round-to-nearest at ``--configs`` bit widths on a tiny random model, a small
suite) into fresh SQLite registries in the same run. Each run's own time (``duration_s``: from recording its
start to recording its metrics) is subtracted from the wall time of its executor, so what is left per
configuration is the executor's overhead: for local, building the configurations and the registry lookups; for
Ray, also dispatching a task, a worker opening the registry and loading the model in its process (once per
worker) and returning the result. Ray's one-off costs are reported apart: starting the local instance, and the
first sweep (the baseline on the driver and the first workers' start, importing torch and the workbench).
The timed Ray sweep declares 2 CPUs per task on a 2-CPU instance, so its runs go one at a time as the local
ones do and their own times compare.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from workbench.registry import Registry
from workbench.sweep import Sweep, run_sweep, start_local_ray

SUITE = {
    "name": "bench-sweep",
    "n_tokens": 256,
    "context_length": 64,
    "n_generations": 0,
    "speed_prompt": 16,
    "speed_tokens": 2,
    "speed_repeats": 1,
}


def _sweep(model: str, bits: list[int]) -> Sweep:
    step = {"rtn": {"bits": bits, "group_size": 32, "symmetric": False}}
    return Sweep.from_dict({"models": [model], "suites": [SUITE], "pipelines": [step]}, source="bench")


def _own_seconds(url: str, run_ids: list[int]) -> float:
    with Registry.open(url) as reg:
        frame = reg.runs_frame(status=None)
    return float(frame[frame["run_id"].isin(run_ids)]["duration_s"].sum())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", type=int, default=4, help="configurations timed per executor (2-7)")
    parser.add_argument("--model", default="tiny-llama")
    args = parser.parse_args(argv)
    n = max(2, min(7, args.configs))
    warm, timed = [2], list(range(8, 8 - n, -1))  # a warm-up width, then the timed ones (widest first)
    tmp = Path(tempfile.mkdtemp(prefix="bench-sweep-"))
    os.environ.setdefault("WORKBENCH_HOME", str(tmp / "home"))
    local_url, ray_url = f"sqlite:///{tmp / 'local.db'}", f"sqlite:///{tmp / 'ray.db'}"

    # Local: the model loaded and the base outputs computed by a warm-up sweep, then the timed one.
    run_sweep(_sweep(args.model, warm), registry=local_url)
    t0 = time.perf_counter()
    local = run_sweep(_sweep(args.model, timed), registry=local_url)
    local_wall = time.perf_counter() - t0
    assert local.ok and not any(i.reused for i in local.items), local.summary()
    local_own = _own_seconds(local_url, local.run_ids)

    import ray

    t0 = time.perf_counter()
    start_local_ray(2)
    ray_start = time.perf_counter() - t0
    try:
        t0 = time.perf_counter()
        run_sweep(_sweep(args.model, warm), registry=ray_url, executor="ray", cpus_per_task=2)
        ray_first = time.perf_counter() - t0
        t0 = time.perf_counter()
        remote = run_sweep(_sweep(args.model, timed), registry=ray_url, executor="ray", cpus_per_task=2)
        ray_wall = time.perf_counter() - t0
        assert remote.ok and not any(i.reused for i in remote.items), remote.summary()
        ray_own = _own_seconds(ray_url, remote.run_ids)
        # The same grid again with 1 CPU per task: two runs at once (their timings then share the cores).
        t0 = time.perf_counter()
        parallel = run_sweep(
            _sweep(args.model, timed), registry=f"sqlite:///{tmp / 'par.db'}", executor="ray"
        )
        parallel_wall = time.perf_counter() - t0
        assert parallel.ok, parallel.summary()
    finally:
        ray.shutdown()

    local_over = (local_wall - local_own) / n
    ray_over = (ray_wall - ray_own) / n
    print(f"model {args.model}, {n} configurations per executor (rtn {timed[0]}..{timed[-1]} bits)")
    print(f"local: wall {local_wall:.2f} s, runs' own time {local_own:.2f} s")
    print(
        f"  overhead per configuration {local_over * 1000:.0f} ms ({local_wall / n:.2f} s per configuration)"
    )
    print(f"ray:   wall {ray_wall:.2f} s, runs' own time {ray_own:.2f} s (one task at a time)")
    print(f"  overhead per configuration {ray_over * 1000:.0f} ms ({ray_wall / n:.2f} s per configuration)")
    print(
        f"  one-off: starting the local instance {ray_start:.1f} s, first sweep (driver baseline, workers) {ray_first:.1f} s"
    )
    print(
        f"  1 CPU per task (2 at once): wall {parallel_wall:.2f} s (first sweep into its registry, baseline included)"
    )
    print(
        f"ratio ray/local: overhead per configuration {ray_over / max(local_over, 1e-9):.1f}x, "
        f"wall per configuration {ray_wall / local_wall:.2f}x"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
