"""Distillation losses over next-token distributions, per token, averaged.

With ``p`` the teacher's and ``q`` the student's distribution, both softened by temperature ``T``:

- ``forward_kl``: KL(p ‖ q), mass-covering (Hinton et al.; torchtune's default).
- ``reverse_kl``: KL(q ‖ p), mode-seeking (MiniLLM).
- ``skew_kl``: KL(p ‖ λp + (1-λ)q), DistiLLM's skew KL; λ = ``skew`` (0.1 in the paper) keeps the target's
  support inside the mixture, so the loss stays finite and its gradient stable where q is tiny.
- ``jsd``: generalised Jensen-Shannon, β·KL(p ‖ m) + (1-β)·KL(q ‖ m) with m = βp + (1-β)q, β = ``skew``
  (as TRL's GKD defines it; β = 0.5 is the symmetric JSD).

:func:`distill_loss` scales the soft term by T² (Hinton: soft-target gradients shrink as 1/T², so the scaling
keeps their weight against the hard labels as T changes) and mixes it with the hard-label cross-entropy:
``alpha · T² · soft + (1 - alpha) · CE``. ``loss="hard"`` is the cross-entropy alone (the baseline).

Sparse teachers (a top-k or a sampled store) give ``p`` only on a few ids per token; :func:`sparse_forward_kl`
is forward KL against that sparse target (the student's full distribution on the other side).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

LOSSES = ("forward_kl", "reverse_kl", "skew_kl", "jsd", "hard")
# Losses that need only p on the stored ids: the ones a top-k or sampled store can serve.
SPARSE_LOSSES = ("forward_kl", "hard")


def _kl(log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """KL(a ‖ b) per row from log-probabilities; 0·log 0 terms are 0."""
    a = log_a.exp()
    return torch.where(a > 0, a * (log_a - log_b), torch.zeros_like(a)).sum(-1)


def _mix(log_a: torch.Tensor, log_b: torch.Tensor, weight_a: float) -> torch.Tensor:
    """log(w·a + (1-w)·b), computed in log space."""
    return torch.logsumexp(torch.stack([log_a + math.log(weight_a), log_b + math.log1p(-weight_a)]), dim=0)


def soft_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    loss: str,
    *,
    temperature: float = 1.0,
    skew: float = 0.1,
) -> torch.Tensor:
    """Mean per-token divergence of ``loss`` between ``(..., V)`` logits at ``temperature`` (no T² scaling)."""
    log_q = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_p = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    if loss == "forward_kl":
        per_token = _kl(log_p, log_q)
    elif loss == "reverse_kl":
        per_token = _kl(log_q, log_p)
    elif loss == "skew_kl":
        per_token = _kl(log_p, _mix(log_p, log_q, skew))
    elif loss == "jsd":
        log_m = _mix(log_p, log_q, skew)
        per_token = skew * _kl(log_p, log_m) + (1 - skew) * _kl(log_q, log_m)
    else:
        raise ValueError(f"Unknown soft loss {loss!r}; choose one of {', '.join(LOSSES[:-1])}.")
    return per_token.mean()


def sparse_forward_kl(
    student_logits: torch.Tensor, ids: torch.Tensor, probs: torch.Tensor, *, temperature: float = 1.0
) -> torch.Tensor:
    """Mean KL(p ‖ q) where p is given on ``ids`` ``(..., k)`` with ``probs`` ``(..., k)`` summing to 1.

    A top-k store passes the teacher's top-k probabilities renormalised (biased: the tail is dropped); a sampled
    store the empirical frequencies of ids drawn from p (unbiased: its expectation is p). Repeated ids may
    appear; their terms add up as they should.
    """
    log_q = F.log_softmax(student_logits.float() / temperature, dim=-1).gather(-1, ids.long())
    probs = probs.float()
    entropy_term = torch.where(probs > 0, probs * probs.clamp_min(1e-30).log(), torch.zeros_like(probs))
    return (entropy_term - probs * log_q).sum(-1).mean()


def hard_loss(student_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of ``(..., V)`` logits against ``(...)`` next-token labels."""
    return F.cross_entropy(student_logits.float().reshape(-1, student_logits.shape[-1]), labels.reshape(-1))


def distill_loss(
    student_logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    loss: str = "forward_kl",
    teacher_logits: torch.Tensor | None = None,
    sparse: tuple[torch.Tensor, torch.Tensor] | None = None,
    temperature: float = 1.0,
    alpha: float = 0.5,
    skew: float = 0.1,
) -> torch.Tensor:
    """``alpha · T² · soft + (1 - alpha) · CE(labels)``; the teacher as full ``teacher_logits`` or ``sparse``
    ``(ids, probs)``. ``loss="hard"`` (or ``alpha=0``) is the cross-entropy alone."""
    if loss == "hard" or alpha == 0:
        return hard_loss(student_logits, labels)
    if sparse is not None:
        if loss != "forward_kl":
            raise ValueError(
                f"{loss} needs the full teacher distribution; a sparse store serves forward_kl only."
            )
        soft = sparse_forward_kl(student_logits, *sparse, temperature=temperature)
    elif teacher_logits is not None:
        soft = soft_loss(student_logits, teacher_logits, loss, temperature=temperature, skew=skew)
    else:
        raise ValueError("distill_loss needs teacher_logits or a sparse (ids, probs) target.")
    out = alpha * temperature**2 * soft
    if alpha < 1:
        out = out + (1 - alpha) * hard_loss(student_logits, labels)
    return out


__all__ = ["LOSSES", "SPARSE_LOSSES", "distill_loss", "hard_loss", "soft_loss", "sparse_forward_kl"]
