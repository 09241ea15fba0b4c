"""Variants of the demo model measured where they would be deployed, side by side in one run.

    .venv/bin/python bench/deploy.py [--suite quick|standard] [--only NAME ...]

For each variant: bits per weight of the file (or packed tensors), perplexity and mean KL to the float model
*measured in the runtime* next to the workbench's simulation of the same variant (where one exists), prefill and
decode tokens/s in the runtime, and the process's peak memory. Every row is a run of the workbench (recorded in
a temporary registry), so the numbers are the ones the lab shows. llama.cpp's own quantizer (Q4_K_M, Q3_K_M,
Q8_0, Q4_1) converts the F32 export; the workbench's variants are written bit-exact (GPTQ codes as Q4_0, a
per-tensor map of Q4_0/Q5_0/Q8_0 chosen from measured sensitivity).

The last lines compare the workbench's best exact file against llama.cpp's Q4_K_M on file size and KL, both
measured in llama.cpp in this run. Figures from elsewhere are printed as references, never as ratios.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from workbench.experiment import run_experiment
from workbench.models import load_model
from workbench.registry import Registry
from workbench.runtimes.llamacpp import LlamaCppConfig, llama_cpp_available, quantizer_types
from workbench.techniques.gptq import GPTQConfig
from workbench.techniques.mixed import MixedPrecisionConfig

# Turn-1 figures on this kind of CPU, for orientation only (not measured here).
REFERENCE = (
    "llama.cpp decode F32 78 tok/s, Q4_0 262 tok/s; plain transformers 25 tok/s (earlier measurements)"
)
EMB8 = {
    "include_embeddings": True,
    "embedding_bits": 8,
}  # the tied embedding as Q8_0, as llama.cpp's files keep it


def _sensitive_patterns(loaded, n: int) -> tuple[str, ...]:
    """Globs of the n decoder layers whose 4-bit rounding moves the output most (the workbench's scan)."""
    from workbench.quant_analysis import layer_sensitivity
    from workbench.techniques.rtn import RTNConfig

    scan = layer_sensitivity(
        loaded.model, loaded.tokenizer, config=RTNConfig(bits=4, group_size=32, symmetric=True), by="layer"
    )
    return tuple(scan.sort_values("kl_mean", ascending=False)["pattern"].head(n))


def module_sensitivity(loaded, cache: Path | None):
    """KL of each decoder linear alone at 4-bit symmetric group 32 (the Q4_0 grid), on calibration text.

    One forward pass of the calibration chunks per linear (210 on the demo: minutes); kept in ``cache``.
    """
    import pandas as pd

    from workbench.quant_analysis import layer_sensitivity
    from workbench.techniques.rtn import RTNConfig

    if cache is not None and cache.exists():
        return pd.read_pickle(cache)
    t0 = time.perf_counter()
    frame = layer_sensitivity(
        loaded.model, loaded.tokenizer, config=RTNConfig(bits=4, group_size=32, symmetric=True), by="module"
    )
    print(
        f"per-tensor sensitivity scan: {len(frame)} linears in {time.perf_counter() - t0:.0f} s", flush=True
    )
    if cache is not None:
        frame.to_pickle(cache)
    return frame


def decoder_bytes(loaded, bits: int) -> int:
    """Packed bytes of the decoder linears at ``bits``, symmetric group 32 (Q4_0/Q5_0/Q8_0 blocks exactly)."""
    from workbench.techniques._quant import decoder_linears, packed_bytes

    return sum(packed_bytes(tuple(m.weight.shape), bits, 32, True) for _, m in decoder_linears(loaded.model))


def bytes_outside_decoder(loaded) -> float:
    """Bytes of a GGUF file of the demo outside its decoder linears (the Q8_0 embedding, norms, metadata):
    measured on an exact export of a round-to-nearest Q4_0 copy (seconds), whose decoder bytes are known."""
    import copy

    from workbench.runtimes.gguf import export_gguf
    from workbench.techniques.base import ApplyContext, apply_
    from workbench.techniques.rtn import RTNConfig

    model = apply_(
        copy.deepcopy(loaded.model),
        RTNConfig(bits=4, group_size=32, symmetric=True, **EMB8),
        ApplyContext(tokenizer=loaded.tokenizer, model_spec=loaded.spec),
    )
    with tempfile.TemporaryDirectory() as tmp:
        report = export_gguf(model, Path(tmp) / "q4.gguf", tokenizer=loaded.tokenizer, spec=loaded.spec)
        size = report.path.stat().st_size
    return size - decoder_bytes(loaded, 4)


def mapped_row(loaded, frame, name: str, target_mb: float, outside: float):
    """A GPTQ variant whose per-tensor Q4_0/Q5_0/Q8_0 map is planned to make a file no larger than
    ``target_mb``: the bytes outside the decoder linears are measured (:func:`bytes_outside_decoder`), the
    rest is the planner's budget."""
    from workbench.quant_analysis import plan_module_bits

    plan = plan_module_bits(frame, choices=(4, 5, 8), budget_bytes=int(target_mb * 1e6 - outside))
    print(
        f"{name}: planned for {target_mb:.1f} MB ({outside / 1e6:.2f} MB outside the decoder linears): "
        f"{plan.counts} tensors at 4/5/8 bits, {plan.bits_per_weight:.3f} bpw over the decoder linears, "
        f"predicted KL {plan.predicted_kl:.4f}",
        flush=True,
    )
    config = GPTQConfig(bits=plan.bits, module_bits=plan.module_bits, group_size=32, symmetric=True, **EMB8)
    return [config, LlamaCppConfig()], [config]


CURVE_TYPES = ("Q2_K", "Q3_K_S", "Q3_K_M", "Q3_K_L", "Q4_K_S", "Q4_K_M", "Q5_K_S", "Q5_K_M", "Q6_K")


def variants(loaded, only: set[str] | None, curve: bool) -> list[tuple[str, object, object]]:
    """(name, pipeline measured in the runtime, pipeline of its simulation or None). A pipeline may be a
    function of the results measured so far (a file-size budget taken from another row)."""
    gptq4 = GPTQConfig(bits=4, group_size=32, symmetric=True, **EMB8)
    rows: list[tuple[str, object, object]] = [
        ("F32 (llama.cpp)", [LlamaCppConfig(quant="F32")], []),
        ("Q8_0 (llama.cpp quantizer)", [LlamaCppConfig(quant="Q8_0")], None),
        ("Q4_0 from GPTQ (exact)", [gptq4, LlamaCppConfig()], [gptq4]),
        ("Q4_1 (llama.cpp quantizer)", [LlamaCppConfig(quant="Q4_1")], None),
    ]
    known = set(quantizer_types())
    for k in CURVE_TYPES if curve else ("Q4_K_M", "Q3_K_M"):
        if k in known:
            rows.append((f"{k} (llama.cpp quantizer)", [LlamaCppConfig(quant=k)], None))
    if not curve:
        try:
            from workbench.runtimes.torch_packed import TorchPackedConfig

            rows.append(("torch packed int8", [TorchPackedConfig(kind="int8")], []))
            rows.append(
                (
                    "torch packed int4 (bf16)",
                    [TorchPackedConfig(kind="int4", group_size=32, dtype="bfloat16")],
                    [],
                )
            )
        except ImportError:
            print("torch packed runtime not available: its rows are not measured")
    if not curve and (only is None or any(name.startswith("mixed") for name in only)):
        # About Q4_K_M's size: each layer at Q8_0 instead of Q4_0 adds half a byte per weight (~1.8 MB here).
        patterns = _sensitive_patterns(loaded, 7)
        mixed = MixedPrecisionConfig(
            bits=4, high_bits=8, group_size=32, symmetric=True, high_precision=patterns, **EMB8
        )
        rows.append(
            ("mixed Q4_0/Q8_0 (exact, 7 most sensitive layers Q8_0)", [mixed, LlamaCppConfig()], [mixed])
        )
    gptq5 = GPTQConfig(bits=5, group_size=32, symmetric=True, **EMB8)
    rows.append(("Q5_0 from GPTQ (exact)", [gptq5, LlamaCppConfig()], [gptq5]))
    if curve:
        gptq8 = GPTQConfig(bits=8, group_size=32, symmetric=True, **EMB8)
        rows.append(("Q8_0 from GPTQ (exact)", [gptq8, LlamaCppConfig()], [gptq8]))
    # GPTQ with a per-tensor map sized to each llama.cpp file above Q4_0's size (Q4_K_M always).
    for k in CURVE_TYPES if curve else ("Q4_K_M",):
        if k in known:
            rows.append((f"GPTQ map sized to {k} (exact)", ("map", k), None))
    if only:
        rows = [r for r in rows if any(r[0].startswith(o) for o in only)]
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--suite", default="quick")
    parser.add_argument("--only", nargs="*", help="names (prefixes) of the rows to measure")
    parser.add_argument(
        "--curve",
        action="store_true",
        help="the size-KL curve: every llama.cpp K-quant type, and a GPTQ per-tensor map sized to each",
    )
    parser.add_argument(
        "--sensitivity-cache",
        type=Path,
        default=None,
        help="keep the per-tensor sensitivity scan in this file",
    )
    args = parser.parse_args()
    if not llama_cpp_available():
        print("llama-cpp-python is not installed (make setup installs it): nothing measured.")
        return 1
    loaded = load_model("demo")
    only = set(args.only) if args.only else None
    with tempfile.TemporaryDirectory() as tmp, Registry.open(f"sqlite:///{tmp}/deploy.db") as reg:
        base = run_experiment(loaded, [], args.suite, registry=reg)
        print(f"demo model, suite {args.suite}: float baseline ppl {base.metrics['ppl']:.4f} (workbench)")
        header = (
            f"{'variant':52} {'bpw':>6} {'file MB':>8} {'ppl rt':>9} {'ppl sim':>9} {'KL rt':>8} {'KL sim':>8} "
            f"{'prefill':>8} {'decode':>8} {'peak MB':>8}"
        )
        print(header)
        print("-" * len(header))
        results = {}
        frame = outside = None
        for name, steps, sim_steps in variants(loaded, only, args.curve):
            t0 = time.perf_counter()
            if isinstance(steps, tuple):  # ("map", llama.cpp type): a budget from that row of this run
                anchor_row = results.get(f"{steps[1]} (llama.cpp quantizer)")
                if anchor_row is None:
                    print(
                        f"{name}: needs the '{steps[1]} (llama.cpp quantizer)' row of this run; not measured"
                    )
                    continue
                if frame is None:
                    frame = module_sensitivity(loaded, args.sensitivity_cache)
                    outside = bytes_outside_decoder(loaded)
                steps, sim_steps = mapped_row(loaded, frame, name, anchor_row["gguf_file_mb"], outside)
            sim = (
                run_experiment(loaded, sim_steps, args.suite, registry=reg) if sim_steps is not None else None
            )
            run = run_experiment(loaded, steps, args.suite, registry=reg)
            if not run.ok:
                print(f"{name:52} failed: {run.error}")
                continue
            m = run.metrics
            results[name] = m
            sm = sim.metrics if sim is not None and sim.ok else {}
            file_mb = m.get("gguf_file_mb", m["size_bytes"] / 1e6)
            print(
                f"{name:52} {m['bits_per_weight']:6.2f} {file_mb:8.1f} {m['ppl']:9.4f} "
                f"{sm.get('ppl', float('nan')):9.4f} {m.get('kl_mean', float('nan')):8.4f} "
                f"{sm.get('kl_mean', float('nan')):8.4f} {m['prefill_tok_s']:8.1f} {m['decode_tok_s']:8.1f} "
                f"{m['peak_mem_mb']:8.0f}   ({time.perf_counter() - t0:.0f} s)",
                flush=True,
            )
        f32 = results.get("F32 (llama.cpp)")
        if f32 is not None:
            gap = 100 * (f32["ppl"] / base.metrics["ppl"] - 1)
            print(
                f"\nfidelity: llama.cpp F32 perplexity vs the workbench's: {gap:+.3f}% (target within 0.5%)"
            )
        anchor = results.get("Q4_K_M (llama.cpp quantizer)")
        if anchor is not None:
            print(
                f"anchor Q4_K_M: {anchor['gguf_file_mb']:.1f} MB, KL {anchor['kl_mean']:.4f} (measured in llama.cpp)"
            )
            exact = [
                (n, m)
                for n, m in results.items()
                if "exact" in n and m.get("gguf_file_mb", 1e9) <= anchor["gguf_file_mb"] + 1e-9
            ]
            if exact:
                best_name, best = min(exact, key=lambda nm: nm[1]["kl_mean"])
                verdict = "lower" if best["kl_mean"] < anchor["kl_mean"] else "NOT lower"
                print(
                    f"best workbench file no larger than Q4_K_M: {best_name}: {best['gguf_file_mb']:.3f} MB "
                    f"(Q4_K_M: {anchor['gguf_file_mb']:.3f} MB), "
                    f"KL {best['kl_mean']:.4f}: {verdict} than Q4_K_M's (ratio "
                    f"{best['kl_mean'] / max(anchor['kl_mean'], 1e-12):.2f})"
                )
            else:
                print("no workbench exact file no larger than Q4_K_M was measured")
        print(f"reference (not measured in this run): {REFERENCE}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
