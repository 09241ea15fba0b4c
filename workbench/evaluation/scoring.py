"""Forward passes that only pay for what is scored, and the per-token quantities computed from them.

The output head of a small model is a large share of its work (SmolLM2-135M: a 576 x 49152 matrix, about a
fifth of the model's FLOPs per token), and the full-vocabulary log-softmax is the largest tensor of an
evaluation. So the decoder body runs on whole chunks, the head only on the scored positions, and everything
vocabulary-sized is done a block of rows at a time in float32 (~32 MB per tensor), never for a whole chunk.

KL(base || model) per token is computed as llama.cpp's ``--kl-divergence`` does: sum over the vocabulary of
p_base * (log p_base - log p_model), in float32 here (llama.cpp accumulates in double; the difference is far
below the metric's precision).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

# Config attributes that put an extra operation between the head and the logits; such models use full logits.
_HEAD_EXTRAS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")
_BLOCK_BYTES = 32 * 2**20  # per (rows, vocab) float32 tensor: fits caches well enough, bounds memory


def model_device(model: nn.Module) -> torch.device:
    try:
        return next(p.device for p in model.parameters() if p.device.type != "meta")
    except StopIteration:
        return torch.device("cpu")


def no_grad_for(model: nn.Module) -> Any:
    """``torch.inference_mode()`` (the fastest way to run without autograd), or ``torch.no_grad()`` for a model
    whose weights are tensor subclasses (optimum-quanto's packed 4- and 2-bit weights): their ops make views
    and set version counters, which inference mode forbids ("Cannot set version_counter for inference tensor").
    """
    subclassed = any(type(p.data) is not torch.Tensor for p in model.parameters())
    return torch.no_grad() if subclassed else torch.inference_mode()


def split_head(model: nn.Module) -> tuple[nn.Module, nn.Module] | None:
    """(decoder body returning ``last_hidden_state``, output head), or None when logits need the whole model."""
    config = getattr(model, "config", None)
    if any(getattr(config, name, None) not in (None, 1, 1.0) for name in _HEAD_EXTRAS):
        return None
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    body = getattr(model, "model", None)
    if body is None:
        base = getattr(model, "base_model", None)  # e.g. GPT-2's `transformer`
        body = base if base is not model else None
    if head is None or not isinstance(body, nn.Module):
        return None
    return body, head


def autocast(device: torch.device, dtype: str) -> contextlib.AbstractContextManager[None]:
    """Reduced-precision compute for the model under test; float32 means no autocast at all."""
    if dtype == "float32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=getattr(torch, dtype))


def scored_hidden(model: nn.Module, ids: torch.Tensor, start: int) -> torch.Tensor | None:
    """Final hidden states at logit positions ``start .. T-2`` as ``(B * T', H)``; None without a split head."""
    parts = split_head(model)
    if parts is None:
        return None
    body, _ = parts
    out = body(input_ids=ids.to(model_device(model)), use_cache=False)
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    return hidden[:, start:-1].flatten(0, 1)  # (B*T', H)


def scored_logits(model: nn.Module, ids: torch.Tensor, start: int) -> torch.Tensor:
    """Logits at positions ``start .. T-2`` as ``(B * T', V)`` in the model's dtype (the fallback path).

    A model running in another runtime (``workbench.runtimes``) may answer this itself (``wb_scored_logits``),
    so that only the scored rows ever become torch tensors.
    """
    own = getattr(model, "wb_scored_logits", None)
    if callable(own):
        return own(ids, start)
    out = model(input_ids=ids.to(model_device(model)), use_cache=False)
    return out.logits[:, start:-1].flatten(0, 1)


def scored_log_probs(model: nn.Module, ids: torch.Tensor, start: int) -> torch.Tensor:
    """float32 log-probabilities at positions ``start .. T-2`` as ``(B, T', V)``: for tests and benchmarks.

    Evaluation never materialises this for a whole batch; it goes through :func:`row_blocks` instead.
    """
    b = ids.shape[0]
    hidden = scored_hidden(model, ids, start)
    if hidden is None:
        logits = scored_logits(model, ids, start)
    else:
        logits = split_head(model)[1](hidden)  # type: ignore[index]
    return torch.log_softmax(logits.float(), dim=-1).view(b, -1, logits.shape[-1])


def block_rows(vocab: int) -> int:
    return max(16, _BLOCK_BYTES // (4 * max(vocab, 1)))


@dataclass
class Rows:
    """Per-token results for one block of scored rows (all float32 / int64 on the CPU)."""

    nll: torch.Tensor  # (R,)
    top1: torch.Tensor  # (R,)
    kl: torch.Tensor | None = None  # (R,), when a base distribution was given
    agree: torch.Tensor | None = None  # (R,) bool, model top-1 == base top-1


def score_block(logits: torch.Tensor, targets: torch.Tensor, base_logits: torch.Tensor | None = None) -> Rows:
    """NLL and top-1 of ``logits`` (R, V); with ``base_logits``, KL(base || model) per row too.

    Works in float32 without building log-softmax tensors it does not need: NLL = logsumexp - target logit.
    """
    lq = logits.float()
    lse_q = torch.logsumexp(lq, dim=-1, keepdim=True)  # (R, 1)
    nll = (lse_q[:, 0] - lq.gather(-1, targets[:, None].to(lq.device))[:, 0]).cpu()
    top1 = lq.argmax(-1)
    if base_logits is None:
        return Rows(nll=nll, top1=top1.cpu())
    lp = base_logits.float()
    lp = lp - torch.logsumexp(lp, dim=-1, keepdim=True)  # log p_base
    p = lp.exp()
    lq.sub_(lse_q)  # log p_model, in place: the raw logits are not needed any more
    # nansum: a token the base gives probability 0 (log -inf) contributes 0 * -inf = nan, which is 0 in the limit.
    kl = (p * (lp - lq)).nansum(-1).clamp_min(0.0)
    agree = top1 == lp.argmax(-1)
    return Rows(nll=nll, top1=top1.cpu(), kl=kl.cpu(), agree=agree.cpu())


def row_blocks(n: int, vocab: int) -> Iterator[slice]:
    step = block_rows(vocab)
    for i in range(0, n, step):
        yield slice(i, min(n, i + step))


def kl_divergence(base_logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """Per-token KL(base || model) from full log-probabilities ``(N, V)``, in float32 (reference form)."""
    base_logp, logq = base_logp.float(), logq.float()
    return (base_logp.exp() * (base_logp - logq)).nansum(-1).clamp_min(0.0)


__all__ = [
    "Rows",
    "autocast",
    "block_rows",
    "kl_divergence",
    "model_device",
    "row_blocks",
    "score_block",
    "scored_hidden",
    "scored_log_probs",
    "scored_logits",
    "split_head",
]
