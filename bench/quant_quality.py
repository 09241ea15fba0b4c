"""Quantization quality on the demo model: every method at comparable settings, on the `standard` suite.

    python bench/quant_quality.py [--suite standard] [--methods rtn gptq awq bnb quanto] [--only LABEL ...]
                                  [--registry URL]

Prints one table row per method and setting: bits per weight (all weights, and decoder linears only), size,
perplexity, mean / p99 KL divergence and same-top-token rate against the unmodified model, quantization time.
Then the slider's latency on the `quick` suite: a new RTN point (target < 10 s) and a revisited point
(target < 0.2 s). The llama.cpp reference rows (same model, same kind of text, 512-token chunks, second half
scored; bits per weight over all weights with the tied embedding at 8 bits) are printed beside ours.

The demo model's weights sit on a Q4_1 grid (groups of 32, float scale and minimum): 4-bit group-32 asymmetric
RTN reproduces them exactly, so method comparisons here use 3 and 2 bits, 4-bit symmetric, group 64 and
per-channel settings.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pandas as pd

from workbench.errors import WorkbenchError
from workbench.experiment import run_experiment
from workbench.models import load_model
from workbench.techniques import make_config, technique_names

# llama.cpp on this model (mean KLD vs its F16, 20k tokens of the same kind of text, 512-token chunks).
LLAMA_CPP = [
    ("Q8_0", 8.5, 0.0041),
    ("Q4_K_M", 6.2, 0.0570),
    ("Q4_0", 5.4, 0.2548),
    ("Q3_K_M", 5.5, 0.1235),
    ("Q2_K", 5.1, 0.4178),
]

# (label, technique, params). Embeddings (tied with the output head) at 8 bits with the same group size and
# form, as llama.cpp keeps them at Q8_0, so bits per weight over all weights compares like for like. None of these
# settings is the demo model's own grid (4- or 8-bit, group 32, asymmetric with a float minimum).
SETTINGS: list[tuple[str, str, dict]] = [
    ("rtn 8b g64 sym", "rtn", {"bits": 8, "group_size": 64, "symmetric": True}),
    ("rtn 5b g64 sym", "rtn", {"bits": 5, "group_size": 64, "symmetric": True}),
    ("rtn 4b g32 sym", "rtn", {"bits": 4, "group_size": 32, "symmetric": True}),
    ("rtn 4b g64 sym", "rtn", {"bits": 4, "group_size": 64, "symmetric": True}),
    ("rtn 3b g32", "rtn", {"bits": 3, "group_size": 32}),
    ("rtn 3b g64", "rtn", {"bits": 3, "group_size": 64}),
    ("rtn 2b g32", "rtn", {"bits": 2, "group_size": 32}),
    ("gptq 5b g64 sym", "gptq", {"bits": 5, "group_size": 64, "symmetric": True}),
    ("gptq 4b g32 sym", "gptq", {"bits": 4, "group_size": 32, "symmetric": True}),
    ("gptq 4b g64 sym", "gptq", {"bits": 4, "group_size": 64, "symmetric": True}),
    ("gptq 3b g32", "gptq", {"bits": 3, "group_size": 32}),
    ("gptq 3b g64", "gptq", {"bits": 3, "group_size": 64}),
    ("gptq 2b g32", "gptq", {"bits": 2, "group_size": 32}),
    ("awq 4b g32 sym", "awq", {"bits": 4, "group_size": 32, "symmetric": True}),
    ("awq 4b g64 sym", "awq", {"bits": 4, "group_size": 64, "symmetric": True}),
    ("awq 3b g32", "awq", {"bits": 3, "group_size": 32}),
    ("awq 3b g64", "awq", {"bits": 3, "group_size": 64}),
    ("bnb int8", "bnb", {"mode": "int8"}),
    ("bnb nf4", "bnb", {"mode": "nf4"}),
    ("bnb fp4", "bnb", {"mode": "fp4"}),
    ("bnb nf4 dq", "bnb", {"mode": "nf4", "double_quant": True}),
    ("quanto int8", "quanto", {"weights": "int8"}),
    ("quanto int4", "quanto", {"weights": "int4"}),
    ("quanto int2", "quanto", {"weights": "int2"}),
]


def _config(technique: str, params: dict):
    """Build the config, adding the 8-bit embedding option where the technique has one."""
    import dataclasses

    from workbench.techniques.base import get_technique

    fields = {f.name for f in dataclasses.fields(get_technique(technique).config_cls)}
    extra = {k: v for k, v in {"include_embeddings": True, "embedding_bits": 8}.items() if k in fields}
    return make_config(technique, **{**extra, **params})


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--suite", default="standard")
    parser.add_argument("--methods", nargs="+", default=["rtn", "gptq", "awq", "bnb", "quanto"])
    parser.add_argument(
        "--only", nargs="+", metavar="LABEL", help="run only these settings, e.g. 'gptq 3b g64'"
    )
    parser.add_argument(
        "--registry",
        default=None,
        help="default: a temporary SQLite file; give one to keep results and rerun only what is new",
    )
    args = parser.parse_args()
    registry = args.registry or f"sqlite:///{tempfile.mkdtemp()}/bench.db"
    known = set(technique_names())

    loaded = load_model("demo")
    base = run_experiment(loaded, [], args.suite, registry=registry)
    rows = [{"setting": "fp32 (base)", **_row(base)}]
    for label, technique, params in SETTINGS:
        if technique not in args.methods or (args.only and label not in args.only):
            continue
        if technique not in known:
            print(f"skip {label}: technique {technique!r} is not available", file=sys.stderr)
            continue
        try:
            res = run_experiment(loaded, [_config(technique, params)], args.suite, registry=registry)
        except WorkbenchError as err:
            print(f"{label}: {err}", file=sys.stderr)
            continue
        if res.status != "done":
            print(f"{label}: {res.status}: {res.error}", file=sys.stderr)
            continue
        rows.append({"setting": label, **_row(res)})
        print(
            f"  {label}: kl_mean={res.metrics.get('kl_mean'):.4f} bpw={res.metrics.get('bits_per_weight'):.2f}",
            file=sys.stderr,
            flush=True,
        )

    table = pd.DataFrame(rows)
    pd.set_option("display.width", 200)
    print(f"\nsuite = {args.suite}, tokens scored = {base.metrics.get('tokens')}")
    print(table.to_string(index=False, float_format=lambda v: f"{v:.4g}"))

    print("\ncalibrated methods against RTN at the same bits, group size and form (mean KLD):")
    by_label = {r["setting"]: r for r in rows}
    for label, technique, _params in SETTINGS:
        if technique not in ("gptq", "awq") or label not in by_label:
            continue
        rtn = by_label.get("rtn" + label[len(technique) :])
        if rtn is None:
            continue
        ours, ref = by_label[label]["kl_mean"], rtn["kl_mean"]
        verdict = "beats RTN" if ours < ref else "does NOT beat RTN"
        print(f"  {label:18s} {ours:.4f} vs {ref:.4f}  ({ref / max(ours, 1e-12):.2f}x lower)  {verdict}")

    print("\nllama.cpp reference (mean KLD vs F16):")
    for name, bpw, kld in LLAMA_CPP:
        ours = table[(table["bpw_all"] <= bpw) & (table["kl_mean"] < kld)]
        best = ours.sort_values("kl_mean").head(1)
        verdict = (
            f"beaten by {best['setting'].iloc[0]} (KLD {best['kl_mean'].iloc[0]:.4f} at {best['bpw_all'].iloc[0]:.2f} bpw)"
            if len(best)
            else "not beaten"
        )
        print(f"  {name:7s} {bpw:4.1f} bpw  KLD {kld:.4f}  -> {verdict}")

    # Slider latency on the quick suite: a point never measured, then the same point again.
    if "rtn" in known:
        run_experiment(loaded, [], "quick", registry=registry)  # base outputs for the quick suite, once
        t0 = time.perf_counter()
        # reuse=False: a point never measured, even when a kept registry already has this one.
        new = run_experiment(
            loaded, [_config("rtn", {"bits": 5, "group_size": 64})], "quick", registry=registry, reuse=False
        )
        t_new = time.perf_counter() - t0
        t0 = time.perf_counter()
        again = run_experiment(
            loaded, [_config("rtn", {"bits": 5, "group_size": 64})], "quick", registry=registry
        )
        t_again = time.perf_counter() - t0
        assert new.status == "done" and again.reused
        print(f"\nslider_new_point_s = {t_new:.2f} (target < 10 s; ratio {t_new / 10:.2f})")
        print(f"slider_revisit_s = {t_again:.3f} (target < 0.2 s; ratio {t_again / 0.2:.2f})")
    print(f"threads = {os.environ.get('OMP_NUM_THREADS', 'default')}")
    return 0


def _row(res) -> dict:
    m = res.metrics
    return {
        "bpw_all": m.get("bits_per_weight"),
        "bpw_linear": m.get("bits_per_weight_linear"),
        "size_mb": m.get("size_mb"),
        "ppl": m.get("ppl"),
        "kl_mean": m.get("kl_mean"),
        "kl_p99": m.get("kl_p99"),
        "top1_%": 100 * m.get("top1_agree", float("nan")),
        "quant_s": m.get("apply_seconds"),
    }


if __name__ == "__main__":
    raise SystemExit(main())
