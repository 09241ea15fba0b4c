"""Evaluation throughput and fidelity on the demo model: the workbench's evaluation path against a plain loop.

Run: ``.venv/bin/python bench/eval_throughput.py [--chunks 20] [--threads 2] [--batch 2] [--no-bf16]``

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
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import os
import time

import numpy as np
import torch

REFERENCE_RATIO = 918 / 581  # llama.cpp F32 / plain loop measured once earlier (2 threads): a reference only


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
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from workbench import evaluate as ev
    from workbench.models import load_model

    t0 = time.perf_counter()
    loaded = load_model("demo")
    model, tok = loaded.model, loaded.tokenizer
    print(
        f"demo model loaded in {time.perf_counter() - t0:.1f} s; threads = {torch.get_num_threads()}; "
        f"attention = {model.config._attn_implementation}"
    )
    suite = ev.Suite(
        "bench-eval",
        n_tokens=512 * args.chunks,
        context_length=512,
        scoring="full",
        batch_size=args.batch,
        speed=False,
        n_generations=0,
    )
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


if __name__ == "__main__":
    main()
