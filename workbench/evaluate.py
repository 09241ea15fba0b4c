"""Evaluate a model on a suite: perplexity, KL divergence to the base model, size, speed, memory, generations.

``evaluate(model, tokenizer, "quick", base_model=base, base_fingerprint=fp)`` is the one call. Quality follows
llama.cpp's ``llama-perplexity`` so numbers compare: perplexity = exp(mean NLL over the scored positions of
every chunk); with a base, KL(base || model) per scored token summarised as mean, median, 99th percentile and
max, and the same-top-token rate (``top1_agree``, a fraction), as ``--kl-divergence`` reports them.

The pieces live in :mod:`workbench.evaluation`: ``suites`` (Suite, named suites, text -> chunks), ``scoring``
(forward passes that only put scored positions through the output head; fused NLL/KL per block of rows),
``base_cache`` (the base model's outputs computed once per suite, on disk, memory-mapped), ``runtime`` (speed,
peak memory, generations). This module is the public surface and re-exports what callers need.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from workbench.evaluation.base_cache import (
    BaseOutputs,
    base_outputs,
    cache_root,
    clear_memory_cache,
    decode_log_probs,
    encode_log_probs,
)
from workbench.evaluation.runtime import (
    GENERATION_PROMPTS,
    PeakMemory,
    configure_threads,
    generate,
    measure_speed,
)
from workbench.evaluation.scoring import (
    autocast,
    kl_divergence,
    model_device,
    no_grad_for,
    row_blocks,
    score_block,
    scored_hidden,
    scored_log_probs,
    scored_logits,
    split_head,
)
from workbench.evaluation.suites import SUITES, Suite, get_suite, suite_chunks, tokenizer_id
from workbench.progress import Progress, ProgressCallback, as_progress

# The metric names views and the registry rely on (docs/architecture.md); KL ones only with a base.
QUALITY_METRICS = ("ppl", "nll", "tokens")
KL_METRICS = ("kl_mean", "kl_median", "kl_p99", "kl_max", "top1_agree")
SIZE_METRICS = ("size_bytes", "size_mb", "bits_per_weight", "bits_per_weight_linear", "n_params")
RUN_METRICS = ("prefill_tok_s", "decode_tok_s", "peak_mem_mb", "work_mem_mb", "eval_seconds", "eval_tok_s")


@dataclass
class EvalResult:
    """Flat metrics (names above) and side-by-side generations ``{"prompt", "base", "model"}``."""

    metrics: dict[str, float]
    generations: list[dict[str, str]] = field(default_factory=list)


@dataclass
class TokenScores:
    """Per scored token, in suite order: the model's NLL and, against a base, KL and top-1 agreement."""

    nll: torch.Tensor  # (N,) float32
    kl: torch.Tensor | None = None  # (N,) float32
    agree: torch.Tensor | None = None  # (N,) bool


def score_tokens(
    model: nn.Module,
    chunks: torch.Tensor,
    suite: Suite,
    *,
    base: BaseOutputs | None = None,
    base_model: nn.Module | None = None,
    progress: Progress | None = None,
) -> TokenScores:
    """Run ``model`` over ``chunks`` (``batch_size`` at a time) and score every scored position.

    The body runs on whole chunks, the head only on scored positions, a block of rows at a time; with
    ``base``, the base's logits for the same rows are rebuilt from its stored outputs and compared at once,
    so nothing vocabulary-sized ever exists for more than one block. Cancellation is checked between batches.
    """
    progress = progress or Progress.null()
    device = model_device(model)
    parts = split_head(model)
    start, per_chunk = suite.score_start, suite.scored_per_chunk
    n_chunks = chunks.shape[0]
    total = n_chunks * per_chunk
    vocab = int(getattr(getattr(model, "config", None), "vocab_size", 0) or 32768)
    nll = torch.empty(total, dtype=torch.float32)
    kl = torch.empty(total, dtype=torch.float32) if base is not None else None
    agree = torch.empty(total, dtype=torch.bool) if base is not None else None
    offset = 0
    with no_grad_for(model):
        for b in range(0, n_chunks, suite.batch_size):
            progress.update(b / n_chunks, f"evaluating: chunk {b + 1}/{n_chunks}")
            batch = chunks[b : b + suite.batch_size]
            targets = batch[:, start + 1 :].reshape(-1)
            with autocast(device, suite.compute_dtype):
                hidden = scored_hidden(model, batch, start) if parts is not None else None
                full = scored_logits(model, batch, start) if hidden is None else None
            for r in row_blocks(targets.shape[0], vocab):
                if hidden is not None:
                    with autocast(device, suite.compute_dtype):
                        logits = parts[1](hidden[r])  # type: ignore[index]  # (R, V)
                else:
                    logits = full[r]  # type: ignore[index]
                rows = slice(offset + r.start, offset + r.stop)
                base_logits = base.logits(rows, base_model, logits.device) if base is not None else None
                res = score_block(logits, targets[r], base_logits)
                nll[rows] = res.nll
                if kl is not None and agree is not None:
                    kl[rows], agree[rows] = res.kl, res.agree
                del logits, base_logits
            offset += targets.shape[0]
            del hidden, full
            if progress.wants_partial and b + suite.batch_size < n_chunks:
                # A first estimate from the chunks scored so far (cheap: sums over at most `total` floats).
                done = slice(0, offset)
                partial = summarize(
                    TokenScores(
                        nll[done], None if kl is None else kl[done], None if agree is None else agree[done]
                    )
                )
                progress.partial({**partial, "provisional": offset / total})
    progress.update(1.0, "evaluated")
    return TokenScores(nll=nll, kl=kl, agree=agree)


def summarize(scores: TokenScores) -> dict[str, float]:
    """Perplexity and KL statistics from per-token scores (double precision for the sums)."""
    nll = scores.nll.double().numpy()
    out = {"nll": float(nll.mean()), "tokens": float(nll.size)}
    out["ppl"] = float(np.exp(out["nll"]))
    if scores.kl is not None and scores.agree is not None:
        kl = scores.kl.double().numpy()
        out.update(
            kl_mean=float(kl.mean()),
            kl_median=float(np.median(kl)),
            kl_p99=float(np.percentile(kl, 99)),
            kl_max=float(kl.max()),
            top1_agree=float(scores.agree.double().mean()),
        )
    return out


def evaluate(
    model: nn.Module,
    tokenizer: Any,
    suite: str | Suite = "quick",
    *,
    base_model: nn.Module | None = None,
    base_fingerprint: str | None = None,
    progress: Progress | ProgressCallback | None = None,
) -> EvalResult:
    """Evaluate ``model`` on ``suite``; with ``base_model``, also its divergence from the base.

    Metric names: ppl, nll, kl_mean, kl_median, kl_p99, kl_max, top1_agree, tokens, size_bytes, size_mb,
    bits_per_weight, bits_per_weight_linear, n_params, prefill_tok_s, decode_tok_s, peak_mem_mb (the process's
    resident peak), work_mem_mb (what evaluating added to the resident memory),
    eval_seconds, eval_tok_s (plus peak_gpu_mem_mb on a GPU). KL metrics are present only with a base.
    ``base_fingerprint`` (from :func:`workbench.models.load_model`) lets the base outputs be kept on disk and
    reused by later runs and other processes; without it they are reused only within this process.

    Raises:
        ConfigError: unknown suite, or a text too short for one chunk.
        RunInterrupted: ``progress`` was cancelled (checked between chunks).
    """
    suite = get_suite(suite)
    progress = as_progress(progress)
    progress.check()
    configure_threads()
    t_start = time.perf_counter()
    device = model_device(model)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    chunks = suite_chunks(tokenizer, suite)
    # Evaluating the base itself (the baseline run): its scores are the cached base outputs, KL is 0 by definition.
    model_is_base = base_model is not None and model is base_model and suite.compute_dtype == "float32"
    generations: list[dict[str, str]] = []
    with PeakMemory() as memory:
        base = None
        t_eval = time.perf_counter()
        if base_model is not None:
            base = base_outputs(
                base_model,
                tokenizer,
                suite,
                base_fingerprint=base_fingerprint,
                progress=progress.span(0.0, 0.8 if model_is_base else 0.45),
            )
        if model_is_base:
            assert base is not None
            nll = torch.from_numpy(np.array(base.nll, dtype=np.float32))
            scores = TokenScores(nll, torch.zeros_like(nll), torch.ones_like(nll, dtype=torch.bool))
        else:
            t_eval = time.perf_counter()
            span = progress.span(0.45 if base is not None else 0.0, 0.8)
            if span.wants_partial:
                # Provisional points carry the variant's size at once (it does not change while scoring).
                span = span.adding(_size_metrics(model))
            scores = score_tokens(model, chunks, suite, base=base, base_model=base_model, progress=span)
        eval_s = time.perf_counter() - t_eval
        metrics = summarize(scores)
        if suite.speed:
            progress.update(0.8, "measuring speed")
            with autocast(device, suite.compute_dtype):
                metrics["prefill_tok_s"], metrics["decode_tok_s"] = measure_speed(
                    model,
                    chunks[0, : suite.speed_prompt],
                    new_tokens=suite.speed_tokens,
                    repeats=suite.speed_repeats,
                    check=progress.check,
                )
        if suite.n_generations:
            progress.update(0.95, "generating samples")
            if model_is_base and base is not None:
                texts = list(base.generations)
            else:
                with autocast(device, suite.compute_dtype):
                    texts = generate(model, tokenizer, suite.n_generations, suite.new_tokens)
            base_texts = list(base.generations) if base is not None else [""] * len(texts)
            generations = [
                {"prompt": p, "base": bt, "model": mt}
                for p, bt, mt in zip(GENERATION_PROMPTS, base_texts, texts, strict=False)
            ]
    metrics.update(_size_metrics(model))
    metrics["peak_mem_mb"] = memory.peak / 2**20  # the whole process
    metrics["work_mem_mb"] = max(0, memory.peak - memory.start) / 2**20  # what evaluating added on top
    if device.type == "cuda":
        metrics["peak_gpu_mem_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    metrics["eval_seconds"] = time.perf_counter() - t_start
    # Scoring throughput; for the baseline, that of the base pass (or of reading its cached outputs).
    metrics["eval_tok_s"] = chunks.numel() / max(eval_s, 1e-9)
    progress.update(1.0, "done")
    return EvalResult(metrics, generations)


def _size_metrics(model: nn.Module) -> dict[str, float]:
    from workbench.models import size_report  # lazily: models imports heavy optional back ends

    rep = size_report(model)
    return {
        "n_params": float(rep.n_params),
        "size_bytes": float(rep.n_bytes),
        "size_mb": float(rep.n_bytes / 1e6),
        "bits_per_weight": float(rep.bits_per_weight),
        "bits_per_weight_linear": float(rep.bits_per_weight_linear),
    }


__all__ = [
    "GENERATION_PROMPTS",
    "KL_METRICS",
    "SUITES",
    "BaseOutputs",
    "EvalResult",
    "Suite",
    "TokenScores",
    "base_outputs",
    "cache_root",
    "clear_memory_cache",
    "decode_log_probs",
    "encode_log_probs",
    "evaluate",
    "generate",
    "get_suite",
    "kl_divergence",
    "measure_speed",
    "model_device",
    "score_block",
    "score_tokens",
    "scored_hidden",
    "scored_log_probs",
    "scored_logits",
    "split_head",
    "suite_chunks",
    "summarize",
    "tokenizer_id",
]
