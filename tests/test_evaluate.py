"""Evaluation on tiny models: perplexity against a hand-written loop, KL, the base-output cache, cancellation."""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest
import torch

from workbench import evaluate as ev
from workbench.errors import ConfigError, RunInterrupted
from workbench.progress import Progress

SMALL = ev.Suite("small", n_tokens=1024, context_length=128, scoring="full", batch_size=3, n_generations=1)


def _perturbed(model, scale=0.02, seed=1):
    torch.manual_seed(seed)
    other = copy.deepcopy(model)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(scale * torch.randn_like(p))
    return other


def _plain_nll(model, chunks, start):
    """The reference: full logits, log-softmax, NLL of each next token, one chunk at a time."""
    total, count = 0.0, 0
    with torch.no_grad():
        for chunk in chunks:
            logits = model(chunk[None]).logits[0].float()
            logp = torch.log_softmax(logits[start:-1], -1)
            nll = -logp.gather(-1, chunk[start + 1 :, None])[:, 0]
            total += float(nll.double().sum())
            count += nll.numel()
    return total / count


@pytest.mark.parametrize("scoring", ["full", "second_half"])
def test_perplexity_equals_a_plain_loop_on_the_same_chunks(tiny_llama, byte_tokenizer, scoring):
    suite = dataclasses.replace(SMALL, scoring=scoring, speed=False, n_generations=0)
    res = ev.evaluate(tiny_llama, byte_tokenizer, suite)
    chunks = ev.suite_chunks(byte_tokenizer, suite)
    ref = _plain_nll(tiny_llama, chunks, suite.score_start)
    assert res.metrics["nll"] == pytest.approx(ref, rel=1e-5)
    assert res.metrics["ppl"] == pytest.approx(np.exp(ref), rel=1e-5)
    per_chunk = suite.context_length - suite.score_start - 1
    assert res.metrics["tokens"] == chunks.shape[0] * per_chunk


def test_kl_is_zero_for_the_base_itself_and_positive_for_a_perturbed_copy(tiny_llama, byte_tokenizer):
    same = ev.evaluate(tiny_llama, byte_tokenizer, SMALL, base_model=tiny_llama)
    assert same.metrics["kl_mean"] == 0.0 and same.metrics["top1_agree"] == 1.0
    other = ev.evaluate(_perturbed(tiny_llama), byte_tokenizer, SMALL, base_model=tiny_llama)
    m = other.metrics
    assert 0 < m["kl_median"] <= m["kl_p99"] <= m["kl_max"] and m["kl_mean"] > 0
    assert 0 < m["top1_agree"] < 1
    for name in ("prefill_tok_s", "decode_tok_s", "peak_mem_mb", "size_mb", "bits_per_weight", "eval_tok_s"):
        assert m[name] > 0, name
    assert other.generations and set(other.generations[0]) == {"prompt", "base", "model"}


def test_stored_base_log_probs_give_the_exact_kl_within_1_percent(tiny_llama, byte_tokenizer):
    # A peaked model, like a trained one, and a small perturbation: the hard case for any compression.
    base = copy.deepcopy(tiny_llama)
    with torch.no_grad():
        base.get_output_embeddings().weight.mul_(12.0)
    model = _perturbed(base, scale=0.01)
    chunks = ev.suite_chunks(byte_tokenizer, SMALL)
    with torch.no_grad():
        lp = ev.scored_log_probs(base, chunks, 0).flatten(0, 1)
        lq = ev.scored_log_probs(model, chunks, 0).flatten(0, 1)
    exact = ev.kl_divergence(lp, lq)
    codes, low, step = ev.encode_log_probs(lp)
    stored = ev.BaseOutputs(codes.numpy(), low.numpy(), step.numpy(), lp.argmax(-1).int().numpy(),
                            np.zeros(len(lp), np.float32), [])
    approx = ev.kl_divergence(stored.log_probs(slice(None)), lq)
    assert codes.dtype == torch.uint16
    assert float(approx.mean()) == pytest.approx(float(exact.mean()), rel=0.01)
    assert float(approx.max()) == pytest.approx(float(exact.max()), rel=0.01)


def test_base_outputs_are_computed_once_and_reused(tiny_llama, byte_tokenizer, tmp_path, monkeypatch):
    monkeypatch.setenv("WORKBENCH_HOME", str(tmp_path))
    calls = []
    model = _perturbed(tiny_llama)  # copied before the hook, so only the base's forward passes are counted
    handle = tiny_llama.model.register_forward_hook(lambda *a: calls.append(1))
    try:
        suite = dataclasses.replace(SMALL, name="cache-test", speed=False, n_generations=0)
        ev.evaluate(model, byte_tokenizer, suite, base_model=tiny_llama, base_fingerprint="fp-test")
        first = len(calls)
        ev._BASE_LRU.clear()  # force the disk copy to be used, as in a new process
        ev.evaluate(model, byte_tokenizer, suite, base_model=tiny_llama, base_fingerprint="fp-test")
    finally:
        handle.remove()
    assert first > 0 and len(calls) == first
    assert any((tmp_path / "base_outputs").iterdir())


def test_cancel_between_chunks_raises_run_interrupted(tiny_llama, byte_tokenizer):
    progress = Progress()
    progress.cancel()
    with pytest.raises(RunInterrupted):
        ev.evaluate(tiny_llama, byte_tokenizer, SMALL, progress=progress)


def test_bos_replaces_the_first_token_only_when_asked(byte_tokenizer):
    plain = ev.suite_chunks(byte_tokenizer, SMALL)
    with pytest.raises(ConfigError, match="has none"):
        ev.suite_chunks(byte_tokenizer, dataclasses.replace(SMALL, name="bos", add_bos=True))
    with_bos_tok = copy.deepcopy(byte_tokenizer)
    with_bos_tok.bos_token = "<eos>"
    with_bos = ev.suite_chunks(with_bos_tok, dataclasses.replace(SMALL, name="bos", add_bos=True))
    assert with_bos[:, 0].eq(with_bos_tok.bos_token_id).all()
    assert torch.equal(plain[:, 1:], with_bos[:, 1:])


def test_suites_have_stable_keys_and_bad_names_are_refused():
    assert ev.get_suite("quick").key == ev.get_suite("quick").key
    assert ev.get_suite("quick").key != ev.get_suite("standard").key
    assert ev.get_suite("standard").scoring == "second_half"
    with pytest.raises(ConfigError, match="Known: quick, standard"):
        ev.get_suite("quik")
    with pytest.raises(ConfigError):
        ev.Suite("bad", n_tokens=10, context_length=512)


def test_moe_models_evaluate_too(tiny_moe, byte_tokenizer):
    res = ev.evaluate(tiny_moe, byte_tokenizer, SMALL, base_model=tiny_moe)
    assert np.isfinite(res.metrics["ppl"]) and res.metrics["kl_mean"] == 0.0
