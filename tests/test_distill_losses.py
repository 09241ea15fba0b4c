"""Distillation losses against hand computations on small distributions."""

from __future__ import annotations

import math

import pytest
import torch

from workbench.distill.losses import distill_loss, hard_loss, soft_loss, sparse_forward_kl

P = [0.7, 0.2, 0.1]
Q = [0.5, 0.25, 0.25]


def _logits(probs: list[float]) -> torch.Tensor:
    return torch.tensor([probs]).log()  # softmax(log p) = p


def _kl(a: list[float], b: list[float]) -> float:
    return sum(x * math.log(x / y) for x, y in zip(a, b) if x > 0)


def test_forward_and_reverse_kl_match_the_hand_values():
    t, s = _logits(P), _logits(Q)
    assert float(soft_loss(s, t, "forward_kl")) == pytest.approx(_kl(P, Q), rel=1e-5)
    assert float(soft_loss(s, t, "reverse_kl")) == pytest.approx(_kl(Q, P), rel=1e-5)


def test_skew_kl_and_jsd_match_the_hand_values():
    t, s = _logits(P), _logits(Q)
    lam = 0.1
    mix = [lam * p + (1 - lam) * q for p, q in zip(P, Q)]
    assert float(soft_loss(s, t, "skew_kl", skew=lam)) == pytest.approx(_kl(P, mix), rel=1e-5)
    m = [0.5 * p + 0.5 * q for p, q in zip(P, Q)]
    jsd = 0.5 * _kl(P, m) + 0.5 * _kl(Q, m)
    assert float(soft_loss(s, t, "jsd", skew=0.5)) == pytest.approx(jsd, rel=1e-5)
    beta = 0.3
    m = [beta * p + (1 - beta) * q for p, q in zip(P, Q)]
    assert float(soft_loss(s, t, "jsd", skew=beta)) == pytest.approx(
        beta * _kl(P, m) + (1 - beta) * _kl(Q, m), rel=1e-5
    )


@pytest.mark.parametrize("loss", ["forward_kl", "reverse_kl", "skew_kl", "jsd"])
def test_identical_distributions_have_zero_divergence(loss):
    logits = torch.randn(2, 5, 11)
    assert float(soft_loss(logits, logits.clone(), loss, temperature=2.0)) == pytest.approx(0.0, abs=1e-6)


def test_temperature_softens_both_sides_and_the_soft_term_is_scaled_by_t_squared():
    t, s = torch.tensor([[2.0, 0.0, -1.0]]), torch.tensor([[0.5, 0.3, 0.0]])
    T = 2.0
    p = torch.softmax(t / T, -1)[0].tolist()
    q = torch.softmax(s / T, -1)[0].tolist()
    labels = torch.tensor([1])
    ce = -math.log(torch.softmax(s, -1)[0, 1].item())
    got = distill_loss(s, labels, loss="forward_kl", teacher_logits=t, temperature=T, alpha=0.25)
    assert float(got) == pytest.approx(0.25 * T**2 * _kl(p, q) + 0.75 * ce, rel=1e-5)
    assert float(distill_loss(s, labels, loss="hard", teacher_logits=t)) == pytest.approx(ce, rel=1e-5)
    assert float(hard_loss(s, labels)) == pytest.approx(ce, rel=1e-5)


def test_sparse_forward_kl_on_the_full_support_equals_the_dense_one():
    t, s = torch.randn(3, 7), torch.randn(3, 7)
    ids = torch.arange(7).expand(3, 7)
    dense = soft_loss(s, t, "forward_kl", temperature=1.5)
    sparse = sparse_forward_kl(s, ids, torch.softmax(t / 1.5, -1), temperature=1.5)
    assert float(sparse) == pytest.approx(float(dense), rel=1e-5)


def test_sparse_forward_kl_on_a_top_k_matches_the_hand_value():
    s = _logits(Q)
    ids = torch.tensor([[0, 1]])
    probs = torch.tensor([[0.7 / 0.9, 0.2 / 0.9]])  # the top-2 of P, renormalised
    expected = sum(p * math.log(p / q) for p, q in zip(probs[0].tolist(), Q[:2]))
    assert float(sparse_forward_kl(s, ids, probs)) == pytest.approx(expected, rel=1e-5)


def test_sparse_targets_serve_forward_kl_only():
    s = torch.randn(1, 4)
    with pytest.raises(ValueError, match="reverse_kl needs the full teacher"):
        distill_loss(
            s, torch.tensor([0]), loss="reverse_kl", sparse=(torch.tensor([[0]]), torch.tensor([[1.0]]))
        )
