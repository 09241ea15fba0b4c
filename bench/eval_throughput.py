"""Evaluation throughput and fidelity on the demo model: the workbench's evaluation path against a plain loop.

Run: ``.venv/bin/python bench/eval_throughput.py [--chunks 20] [--threads 2] [--batch 2] [--no-bf16]``;
the knob study: ``.venv/bin/python bench/eval_throughput.py --study --chunks 8 --rounds 3``

On the same 512-token chunks, in one process, interleaved chunk group by chunk group (so load from other
processes hits both sides alike):

(a) the plain fp32 transformers loop: ``model(ids).logits``, log-softmax, NLL of every position after the first,
    one chunk at a time;
(b) the workbench's path (:func:`workbench.evaluate.score_tokens`): batched chunks, the output head only on
    scored positions, fused NLL per block of rows; and (b+KL) the same with KL against cached base outputs.

(c) llama.cpp (through llama-cpp-python, the same threads) on an F32 GGUF export of the same model: logits of
    every position, NLL of every position after the first, one chunk at a time, as ``llama-perplexity`` does.

It prints tokens/s of each and the ratios measured in this run: the workbench's against the plain loop and
against llama.cpp F32 (the target is >= 1.0). An earlier figure (llama.cpp 1.58x the plain loop) is printed
only as a reference. Fidelity: the perplexities of all three, and
the KL divergence between the two paths' distributions (must be < 1e-5 at fp32). Base-output storage: KL from
the stored base (hidden states, and the uint16 fallback) against the exact full-vocabulary KL on a few chunks of
a 3-bit round-to-nearest copy. Optionally the bf16 fast path: its speed and its KL to fp32.

``--study [--rounds 3] [--chunks 8]`` measures instead what each knob of the evaluation gives, on the same chunks,
every side once per round, the order rotated round by round, medians over rounds (so load from other processes
hits every side alike): torch threads, chunks per forward pass, output-head rows per block, attention
implementation (sdpa / eager), ``torch.compile`` of the decoder body (its compile time apart), bf16 autocast, and
llama.cpp on the same chunks through the workbench's runtime step at F32 and at Q8_0 and Q4_0 (llama.cpp's own
quantizer). Each side's tokens/s, its per-round ratio to the workbench's default, and its fidelity to the fp32
default (KL against the default's stored outputs, largest per-token NLL difference).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import os
import statistics
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

KNOBS = ("threads", "batch", "head", "attention", "bf16", "compile", "llama")  # what --study can measure
REFERENCE_RATIO = 918 / 581  # llama.cpp F32 / plain loop measured once earlier (2 threads): a reference only


def bench_suite(name: str, args):
    """``--chunks`` chunks of 512 tokens, every position after the first scored, ``--batch`` chunks per pass."""
    from workbench import evaluate as ev

    return ev.Suite(
        name,
        n_tokens=512 * args.chunks,
        context_length=512,
        scoring="full",
        batch_size=args.batch,
        speed=False,
        n_generations=0,
    )


def plain_nll(model: torch.nn.Module, chunk: torch.Tensor) -> torch.Tensor:
    """The plain loop's NLL for one chunk: full logits, log-softmax, every position after the first."""
    logits = model(chunk[None]).logits[0]
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -logp[:-1].gather(-1, chunk[1:, None])[:, 0]


def _llama_cpp_f32(loaded, threads: int):
    """The demo model as an F32 GGUF running in llama.cpp (None without llama-cpp-python)."""
    from workbench.runtimes.llamacpp import LlamaCppConfig, llama_cpp_available
    from workbench.techniques.base import ApplyContext, apply_

    if not llama_cpp_available():
        return None
    ctx = ApplyContext(tokenizer=loaded.tokenizer, model_spec=loaded.spec)
    return apply_(loaded.model, LlamaCppConfig(quant="F32", threads=threads), ctx)


def llama_nll(module, chunk: torch.Tensor) -> torch.Tensor:
    """llama.cpp's NLL for one chunk: logits of every position, log-softmax, every position after the first."""
    logits = torch.from_numpy(np.array(module._row_logits(chunk.tolist())))
    logp = torch.log_softmax(logits, dim=-1)
    return -logp[:-1].gather(-1, chunk[1:, None])[:, 0]


def rtn_copy(model: torch.nn.Module, bits: int = 3, group: int = 64) -> torch.nn.Module:
    """A quick round-to-nearest copy (min-max per group), only to get a realistically perturbed model."""
    out = copy.deepcopy(model)
    with torch.no_grad():
        for name, mod in out.named_modules():
            if isinstance(mod, torch.nn.Linear) and ".layers." in f".{name}.":
                w = mod.weight.view(-1, group)
                lo, hi = w.amin(-1, keepdim=True), w.amax(-1, keepdim=True)
                scale = (hi - lo).clamp_min(1e-8) / (2**bits - 1)
                w.copy_(torch.round((w - lo) / scale) * scale + lo)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--chunks", type=int, default=20, help="512-token chunks timed on each side")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=2, help="chunks per forward pass on the workbench side")
    parser.add_argument("--no-bf16", action="store_true", help="skip the bf16 fast-path measurement")
    parser.add_argument("--study", action="store_true", help="measure each knob's effect instead (see above)")
    parser.add_argument("--rounds", type=int, default=3, help="--study: timed rounds (medians are reported)")
    parser.add_argument(
        "--minutes", type=float, default=10.0, help="--study: fewer rounds (at least one) past this wall time"
    )
    parser.add_argument("--knobs", default=",".join(KNOBS), help="--study: which knobs to measure")
    parser.add_argument("--batches", default="1,2,4,8", help="--study: chunks per forward pass to compare")
    parser.add_argument(
        "--head-rows",
        default="",
        help="--study: head block rows to compare (default: 64, twice the default, a batch)",
    )
    parser.add_argument("--model", default="demo", help="model spec (e.g. tiny-llama for a quick check)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.study:
        study(args)
        return

    from workbench import evaluate as ev
    from workbench.models import load_model

    t0 = time.perf_counter()
    loaded = load_model(args.model)
    model, tok = loaded.model, loaded.tokenizer
    print(
        f"{args.model} model loaded in {time.perf_counter() - t0:.1f} s; threads = {torch.get_num_threads()}; "
        f"attention = {model.config._attn_implementation}"
    )
    suite = bench_suite("bench-eval", args)
    chunks = ev.suite_chunks(tok, suite)
    n = chunks.shape[0]
    llama = _llama_cpp_f32(loaded, args.threads)

    with torch.inference_mode():  # warm-up both paths (allocator, kernel selection)
        plain_nll(model, chunks[0])
        ev.score_tokens(model, chunks[: args.batch], suite)

    # ---- throughput, interleaved per group of `batch` chunks --------------------------------------------------
    t_plain = t_wb = t_llama = 0.0
    nll_plain, nll_wb, nll_llama = [], [], []
    if llama is not None:
        llama_nll(llama, chunks[0])  # warm-up: context creation, first-call allocation
    with torch.inference_mode():
        for b in range(0, n, args.batch):
            group = chunks[b : b + args.batch]
            t = time.perf_counter()
            nll_plain += [plain_nll(model, c) for c in group]
            t_plain += time.perf_counter() - t
            t = time.perf_counter()
            nll_wb.append(ev.score_tokens(model, group, suite).nll)
            t_wb += time.perf_counter() - t
            if llama is not None:
                t = time.perf_counter()
                nll_llama += [llama_nll(llama, c) for c in group]
                t_llama += time.perf_counter() - t
    tokens = chunks.numel()
    plain_tok_s, wb_tok_s = tokens / t_plain, tokens / t_wb
    ppl_plain = float(np.exp(float(torch.cat(nll_plain).double().mean())))
    ppl_wb = float(np.exp(float(torch.cat(nll_wb).double().mean())))
    ratio = wb_tok_s / plain_tok_s
    print(f"chunks = {n} x 512 tokens, scoring full (511 scored per chunk)")
    print(f"plain_loop_tok_s = {plain_tok_s:.1f}")
    print(f"workbench_tok_s = {wb_tok_s:.1f}")
    print(f"eval_tok_s_ratio (workbench / plain loop) = {ratio:.2f}")
    if llama is not None:
        llama_tok_s = tokens / t_llama
        ppl_llama = float(np.exp(float(torch.cat(nll_llama).double().mean())))
        print(f"llama_cpp_f32_tok_s = {llama_tok_s:.1f} (measured in this run, {args.threads} threads)")
        print(f"ratio_to_llama_cpp_f32 = {wb_tok_s / llama_tok_s:.2f} (target >= 1.00, measured)")
        print(
            f"llama.cpp / plain loop = {llama_tok_s / plain_tok_s:.2f} (reference, earlier: {REFERENCE_RATIO:.2f})"
        )
        print(
            f"ppl_llama_cpp_f32 = {ppl_llama:.4f}   rel diff to the workbench = {abs(ppl_llama / ppl_wb - 1):.2e}"
        )
    else:
        print("llama.cpp not measured (llama-cpp-python missing: make setup installs it)")
    print(
        f"ppl_plain = {ppl_plain:.4f}   ppl_workbench = {ppl_wb:.4f}   rel diff = {abs(ppl_wb / ppl_plain - 1):.2e}"
    )

    # ---- the two paths' distributions -------------------------------------------------------------------------
    with torch.inference_mode():
        few = chunks[:2]
        lp_plain = torch.log_softmax(torch.cat([model(c[None]).logits[0, :-1] for c in few]).float(), -1)
        lp_wb = ev.scored_log_probs(model, few, 0).flatten(0, 1)
        kl_paths = float(ev.kl_divergence(lp_plain, lp_wb).double().mean())
        max_diff = float((lp_plain - lp_wb).abs().max())
    # 0 when both paths produce bit-identical logits (same kernels on the same rows).
    print(f"kl_plain_vs_workbench = {kl_paths:.2e} (target < 1e-05); max |log-prob diff| = {max_diff:.1e}")
    del lp_plain, lp_wb

    # ---- KL path: against cached base outputs, and stored-vs-exact agreement on a perturbed copy --------------
    small = dataclasses.replace(suite, name="bench-eval-kl", n_tokens=512 * min(4, n))
    few = ev.suite_chunks(tok, small)
    quant = rtn_copy(model)
    t = time.perf_counter()
    base = ev.base_outputs(model, tok, small)
    t_base = time.perf_counter() - t
    t = time.perf_counter()
    scores = ev.score_tokens(quant, few, small, base=base, base_model=model)
    t_kl = time.perf_counter() - t
    t = time.perf_counter()
    ev.score_tokens(quant, few, small)
    t_nokl = time.perf_counter() - t
    print(f"base_pass_tok_s = {few.numel() / t_base:.1f} (computes and stores the base outputs once)")
    print(
        f"workbench_with_kl_tok_s = {few.numel() / t_kl:.1f}   without kl = {few.numel() / t_nokl:.1f}   "
        f"(kl overhead {t_kl / t_nokl - 1:+.0%})"
    )
    stored = ev.summarize(scores)
    exact, codes_kl, topk_kl = [], [], []
    with torch.inference_mode():
        for c in few:
            lp = ev.scored_log_probs(model, c[None], 0)[0]
            lq = ev.scored_log_probs(quant, c[None], 0)[0]
            exact.append(ev.kl_divergence(lp, lq))
            codes, low, step = ev.encode_log_probs(lp)
            codes_kl.append(
                ev.kl_divergence(ev.decode_log_probs(codes.numpy(), low.numpy(), step.numpy()), lq)
            )
            # For reference: a top-256 summary with the tail lumped into one bucket (not used: it is biased).
            top, idx = lp.topk(256, dim=-1)
            tail_p = (1 - top.exp().sum(-1)).clamp_min(1e-30)
            tail_q = (1 - lq.gather(-1, idx).exp().sum(-1)).clamp_min(1e-30)
            topk_kl.append(
                (top.exp() * (top - lq.gather(-1, idx))).sum(-1) + tail_p * (tail_p.log() - tail_q.log())
            )
    exact_mean = float(torch.cat(exact).double().mean())
    for label, value in (
        ("stored_hidden", stored["kl_mean"]),
        ("uint16_codes", float(torch.cat(codes_kl).double().mean())),
        ("top256_plus_tail", float(torch.cat(topk_kl).double().mean())),
    ):
        print(
            f"kl_{label}_vs_exact = {value:.5f} vs {exact_mean:.5f}: rel err {abs(value / exact_mean - 1):.2e}"
            f"{' (target < 1e-02)' if label == 'stored_hidden' else ''}"
        )
    rows = base.n_tokens
    print(
        f"base_cache_bytes_per_token = {base.hidden.shape[1] * 4 + 8 if base.hidden is not None else 0} "
        f"(full-vocabulary uint16: {model.config.vocab_size * 2 + 8}); {rows} rows"
    )

    # ---- the optional bf16 fast path --------------------------------------------------------------------------
    if not args.no_bf16:
        bf16 = dataclasses.replace(small, compute_dtype="bfloat16")
        with torch.inference_mode():
            ev.score_tokens(model, few[:1], bf16)  # warm-up: bf16 kernels are chosen on first use
        t = time.perf_counter()
        bscores = ev.score_tokens(model, few, bf16, base=base, base_model=model)
        t_bf16 = time.perf_counter() - t
        t = time.perf_counter()
        ev.score_tokens(model, few, small)
        t_fp32 = time.perf_counter() - t
        b = ev.summarize(bscores)
        print(
            f"bf16_tok_s = {few.numel() / t_bf16:.1f} vs fp32 {few.numel() / t_fp32:.1f}: ratio "
            f"{t_fp32 / t_bf16:.2f}; kl_bf16_vs_fp32 mean = {b['kl_mean']:.2e}, p99 = {b['kl_p99']:.2e}, "
            f"top1_agree = {b['top1_agree']:.4f}"
        )
    print(f"load average during the run: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")


# ---- --study: what each knob gives ---------------------------------------------------------------------------


@contextlib.contextmanager
def setting(
    model: torch.nn.Module, *, threads: int = 0, attn: str = "", head_rows: int = 0
) -> Iterator[None]:
    """One side's knobs for the duration of a call, restored afterwards (the sides share one model object)."""
    from workbench.evaluation import scoring

    old = torch.get_num_threads(), model.config._attn_implementation, scoring._BLOCK_BYTES
    try:
        if threads:
            torch.set_num_threads(threads)
        if attn:
            model.set_attn_implementation(attn)
        if head_rows:
            # block_rows() = _BLOCK_BYTES // (4 * vocab): the bytes that give exactly `head_rows` rows per block.
            scoring._BLOCK_BYTES = head_rows * 4 * int(model.config.vocab_size)
        yield
    finally:
        torch.set_num_threads(old[0])
        if attn:
            model.set_attn_implementation(old[1])
        scoring._BLOCK_BYTES = old[2]


@dataclasses.dataclass
class Side:
    """One way of evaluating the same chunks: a module scored by ``score_tokens`` under a suite and knobs."""

    knob: str
    value: str
    model: Any
    suite: Any
    knobs: dict[str, Any] = dataclasses.field(default_factory=dict)
    engine: str = "workbench"
    note: str = ""
    seconds: list[float] = dataclasses.field(default_factory=list)
    nll: torch.Tensor | None = None
    fidelity: dict[str, float] = dataclasses.field(default_factory=dict)

    def score(self, chunks: torch.Tensor, base: Any = None, base_model: Any = None) -> Any:
        from workbench import evaluate as ev

        knobs = self.knobs if self.engine == "workbench" else {}
        with setting(self.model, **knobs) if knobs else contextlib.nullcontext():
            return ev.score_tokens(self.model, chunks, self.suite, base=base, base_model=base_model)

    def timed(self, chunks: torch.Tensor) -> None:
        t = time.perf_counter()
        self.nll = self.score(chunks).nll
        self.seconds.append(time.perf_counter() - t)


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"[:200]


def _llama_sides(loaded: Any, suite: Any, threads: int) -> tuple[list[Side], list[Any]]:
    """llama.cpp at F32 (the runtime step's export) and at Q8_0 / Q4_0 (its quantizer on that F32 file)."""
    from workbench.runtimes.llamacpp import LlamaCppModule, quantize_file

    t = time.perf_counter()
    f32 = _llama_cpp_f32(loaded, threads)
    if f32 is None:
        print("llama.cpp not measured (llama-cpp-python missing: make setup installs it)")
        return [], []
    sides = [
        Side(
            "llama.cpp", "F32", f32, suite, engine="llama.cpp", note=f"{f32.path.stat().st_size / 1e6:.0f} MB"
        )
    ]
    keep = [f32]  # the F32 module owns the folder the quantized files are written to
    for quant in ("Q8_0", "Q4_0"):
        path = f32.path.parent / f"model-{quant}.gguf"
        quantize_file(f32.path, path, quant, threads)
        module = LlamaCppModule(path, vocab_size=int(loaded.model.config.vocab_size), threads=threads)
        sides.append(
            Side(
                "llama.cpp",
                quant,
                module,
                suite,
                engine="llama.cpp",
                note=f"{path.stat().st_size / 1e6:.0f} MB",
            )
        )
    print(f"llama.cpp files written in {time.perf_counter() - t:.1f} s (F32 export, then Q8_0 and Q4_0)")
    return sides, keep


def _compiled_side(model: Any, ref: Side, chunks: torch.Tensor, suite: Any, batch: int) -> list[Side]:
    """``torch.compile`` of the decoder body (score_tokens runs the body and the head apart), on its own copy."""
    with torch.inference_mode():
        t = time.perf_counter()
        ref.score(chunks[:batch])
        t_eager_first = time.perf_counter() - t
    compiled = copy.deepcopy(model)
    compiled.model.compile()
    t = time.perf_counter()
    try:
        with torch.inference_mode():
            Side("compile", "", compiled, suite).score(chunks[:batch])
    except Exception as err:  # noqa: BLE001 (reported as one line: what this torch/transformers says)
        print(f"torch.compile failed: {_first_line(err)}")
        return []
    t_compile = time.perf_counter() - t
    print(
        f"torch.compile: first call {t_compile:.1f} s (an uncompiled call on the same chunks: {t_eager_first:.1f} s)"
    )
    return [Side("torch.compile", "mode default", compiled, suite, note=f"compile {t_compile:.0f} s")]


def study(args: argparse.Namespace) -> None:
    """Every knob's effect on the workbench's evaluation speed, interleaved round by round; see the docstring."""
    from workbench import evaluate as ev
    from workbench.evaluation.scoring import block_rows
    from workbench.models import load_model

    t_study = time.perf_counter()
    loaded = load_model(args.model)
    model, tok = loaded.model, loaded.tokenizer
    threads = args.threads
    suite = bench_suite("bench-eval-study", args)
    chunks = ev.suite_chunks(tok, suite)
    vocab = int(model.config.vocab_size)
    rows_per_batch = args.batch * suite.scored_per_chunk
    default_rows = block_rows(vocab)
    print(
        f"study: {args.model}, {chunks.shape[0]} chunks x 512 tokens, {args.rounds} rounds, threads = {threads}, "
        f"default: batch {args.batch}, head block {default_rows} rows, attention "
        f"{model.config._attn_implementation}, fp32"
    )

    knobs = set(args.knobs.split(","))
    unknown = knobs - set(KNOBS)
    if unknown:
        raise SystemExit(f"--knobs: unknown {', '.join(sorted(unknown))}; choose from {','.join(KNOBS)}")
    ref = Side("default", f"threads {threads}, batch {args.batch}", model, suite)
    sides = [ref]
    if "threads" in knobs and threads != 1:
        sides.append(Side("threads", "1", model, suite, {"threads": 1}))
    for b in [int(x) for x in args.batches.split(",")] if "batch" in knobs else []:
        if b != args.batch:
            sides.append(Side("batch (chunks)", str(b), model, dataclasses.replace(suite, batch_size=b)))
    head_rows = [int(x) for x in args.head_rows.split(",")] if args.head_rows else [64, 2 * default_rows]
    for rows in sorted(set(head_rows + [rows_per_batch]) - {default_rows}) if "head" in knobs else []:
        sides.append(Side("head block (rows)", str(rows), model, suite, {"head_rows": rows}))
    if "attention" in knobs and model.config._attn_implementation != "eager":
        sides.append(Side("attention", "eager", model, suite, {"attn": "eager"}))
    # The default again, half a round later: its ratio to the default is the noise of this run (an A/A test).
    sides.insert(max(1, len(sides) // 2), Side("default, again", "(noise: A/A)", model, suite))
    if "bf16" in knobs:
        sides.append(
            Side("dtype", "bf16 autocast", model, dataclasses.replace(suite, compute_dtype="bfloat16"))
        )
    if "compile" in knobs:
        sides += _compiled_side(model, ref, chunks, suite, args.batch)
    llama, keep = _llama_sides(loaded, suite, threads) if "llama" in knobs else ([], [])
    sides += llama

    for side in sides:  # warm-up: allocator, kernel selection, llama.cpp context creation
        side.score(chunks[: side.suite.batch_size])
    loads = []
    for r in range(args.rounds):
        t_round = time.perf_counter()
        order = sides[r % len(sides) :] + sides[: r % len(sides)]  # rotated, so no side always runs first
        for side in order:
            side.timed(chunks)
        loads.append(os.getloadavg()[0])
        t_round = time.perf_counter() - t_round
        print(
            f"round {r + 1}: {t_round:.0f} s, default {chunks.numel() / ref.seconds[-1]:.1f} tok/s, "
            f"load {loads[-1]:.1f}",
            flush=True,
        )
        # Another round and the fidelity passes (about a third of a round) must fit in the wall-time limit.
        if r + 1 < args.rounds and time.perf_counter() - t_study + 1.4 * t_round > 60 * args.minutes:
            print(
                f"stopping after {r + 1} of {args.rounds} rounds: the next would pass --minutes {args.minutes:g}"
            )
            break

    # Fidelity: KL against the fp32 default's stored outputs (one untimed pass per side, on the first chunks:
    # at least one whole batch of the side, so its batch shape is what is compared), and the largest per-token
    # NLL difference over all chunks (from the timed passes).
    base = ev.base_outputs(model, tok, suite)
    for side in sides:
        few = chunks[: max(2, side.suite.batch_size)]
        kl = ev.summarize(side.score(few, base=base, base_model=model)) if side is not ref else {}
        side.fidelity = {
            "ppl": ev.summarize(ev.TokenScores(side.nll))["ppl"],  # over all chunks, from the timed passes
            "kl_mean": kl.get("kl_mean", 0.0),
            "kl_max": kl.get("kl_max", 0.0),
            "nll_diff": float((side.nll - ref.nll).abs().max()),
        }

    tokens = chunks.numel()
    print()
    print(
        f"| knob | value | tok/s (median of {len(ref.seconds)}) | min–max | x default (median per round) | faster in "
        f"| ppl | KL to fp32 default (mean / max) | max abs NLL diff | note |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for side in sides:
        tok_s = [tokens / s for s in side.seconds]
        ratio = [rs / ss for rs, ss in zip(ref.seconds, side.seconds, strict=True)]
        wins = "—" if side is ref else f"{sum(x > 1 for x in ratio)}/{len(ratio)}"
        f = side.fidelity
        print(
            f"| {side.knob} | {side.value} | {statistics.median(tok_s):.1f} | {min(tok_s):.0f}–{max(tok_s):.0f} "
            f"| {statistics.median(ratio):.2f} | {wins} | {f['ppl']:.4f} "
            f"| {f['kl_mean']:.1e} / {f['kl_max']:.1e} | {f['nll_diff']:.1e} | {side.note} |"
        )
    print()
    for side in llama:
        ratio = statistics.median(ss / rs for rs, ss in zip(ref.seconds, side.seconds, strict=True))
        print(
            f"workbench default / llama.cpp {side.value} = {ratio:.2f} (median per round; >= 1.00: the workbench is "
            f"faster; a simulated {side.value} variant runs the default's fp32 kernels)"
        )
    print(
        f"load average (1 min) at the end of each round: {', '.join(f'{x:.1f}' for x in loads)} "
        f"on {os.cpu_count()} cores; wall time {(time.perf_counter() - t_study) / 60:.1f} min"
    )
    for module in keep:
        module.close()


if __name__ == "__main__":
    main()
