"""Evaluation on tiny models: perplexity against a hand-written loop, KL, the base-output cache, cancellation.

One slow test checks the same on the demo model (SmolLM2-135M).
"""

from __future__ import annotations

import copy
import dataclasses
import itertools

import numpy as np
import pytest
import torch

from workbench import evaluate as ev
from workbench.errors import ConfigError, RunInterrupted
from workbench.evaluation import base_cache
from workbench.progress import Progress

SMALL = ev.Suite(
    "small",
    n_tokens=1024,
    context_length=128,
    scoring="full",
    batch_size=3,
    n_generations=1,
    speed_prompt=32,
    speed_tokens=4,
    speed_repeats=1,
)
FAST = dataclasses.replace(SMALL, speed=False, n_generations=0)


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


def _plain_kl(base, model, chunks, start):
    with torch.no_grad():
        lp = torch.log_softmax(base(chunks).logits[:, start:-1].float(), -1).flatten(0, 1)
        lq = torch.log_softmax(model(chunks).logits[:, start:-1].float(), -1).flatten(0, 1)
    return ev.kl_divergence(lp, lq), lp.argmax(-1) == lq.argmax(-1)


class _NoSplitHead(torch.nn.Module):
    """A causal LM without ``.model``/``get_output_embeddings``: evaluation must fall back to full logits."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.config = inner.config

    def forward(self, input_ids=None, **kw):
        return self.inner(input_ids=input_ids, **kw)


@pytest.mark.parametrize("scoring", ["full", "second_half"])
def test_perplexity_equals_a_plain_loop_on_the_same_chunks(tiny_llama, byte_tokenizer, scoring):
    suite = dataclasses.replace(FAST, scoring=scoring)
    res = ev.evaluate(tiny_llama, byte_tokenizer, suite)
    chunks = ev.suite_chunks(byte_tokenizer, suite)
    ref = _plain_nll(tiny_llama, chunks, suite.score_start)
    assert res.metrics["nll"] == pytest.approx(ref, rel=1e-5)
    assert res.metrics["ppl"] == pytest.approx(np.exp(ref), rel=1e-5)
    per_chunk = 127 if scoring == "full" else 63
    assert chunks.shape == (8, 128) and res.metrics["tokens"] == 8 * per_chunk
    assert "kl_mean" not in res.metrics  # no base, no KL


def test_models_without_a_split_head_use_full_logits(tiny_llama, byte_tokenizer):
    wrapped = _NoSplitHead(tiny_llama)
    assert ev.split_head(wrapped) is None and ev.split_head(tiny_llama) is not None
    res = ev.evaluate(wrapped, byte_tokenizer, FAST)
    ref = _plain_nll(tiny_llama, ev.suite_chunks(byte_tokenizer, FAST), 0)
    assert res.metrics["nll"] == pytest.approx(ref, rel=1e-5)


def test_kl_is_zero_for_the_base_itself_and_matches_a_plain_computation_for_a_perturbed_copy(
    tiny_llama, byte_tokenizer
):
    same = ev.evaluate(tiny_llama, byte_tokenizer, SMALL, base_model=tiny_llama)
    assert same.metrics["kl_mean"] == 0.0 and same.metrics["top1_agree"] == 1.0
    other_model = _perturbed(tiny_llama)
    other = ev.evaluate(other_model, byte_tokenizer, SMALL, base_model=tiny_llama)
    m = other.metrics
    assert 0 < m["kl_median"] <= m["kl_p99"] <= m["kl_max"] and m["kl_mean"] > 0
    assert 0 < m["top1_agree"] < 1
    kl, agree = _plain_kl(tiny_llama, other_model, ev.suite_chunks(byte_tokenizer, SMALL), 0)
    assert m["kl_mean"] == pytest.approx(float(kl.double().mean()), rel=1e-4)
    assert m["kl_max"] == pytest.approx(float(kl.max()), rel=1e-4)
    assert m["top1_agree"] == pytest.approx(float(agree.double().mean()), abs=2e-3)
    for name in (
        "prefill_tok_s",
        "decode_tok_s",
        "peak_mem_mb",
        "size_mb",
        "bits_per_weight",
        "eval_tok_s",
        "n_params",
        "size_bytes",
        "bits_per_weight_linear",
        "eval_seconds",
    ):
        assert m[name] > 0, name
    assert 0 <= m["work_mem_mb"] <= m["peak_mem_mb"]
    assert other.generations and set(other.generations[0]) == {"prompt", "base", "model"}
    assert other.generations[0]["base"] == same.generations[0]["model"]  # the base's own text, reused


def test_base_outputs_keep_hidden_states_not_vocabulary_sized_logits(tiny_llama, byte_tokenizer):
    out = ev.base_outputs(tiny_llama, byte_tokenizer, FAST)
    assert out.codes is None and out.hidden is not None
    assert out.hidden.shape == (8 * 127, tiny_llama.config.hidden_size)
    # The fallback for models without a split head stores llama.cpp's uint16 full-vocabulary layout.
    fallback = ev.base_outputs(_NoSplitHead(tiny_llama), byte_tokenizer, FAST)
    assert fallback.hidden is None and fallback.codes is not None and fallback.codes.dtype == np.uint16
    np.testing.assert_allclose(np.asarray(fallback.nll), np.asarray(out.nll), rtol=1e-5)


@pytest.mark.parametrize("peaked", [1.0, 12.0])
def test_stored_base_outputs_give_the_exact_kl_within_1_percent(tiny_llama, byte_tokenizer, peaked):
    # peaked=12: a confident model, like a trained one, and a small perturbation: the hard case for compression.
    base = copy.deepcopy(tiny_llama)
    with torch.no_grad():
        base.get_output_embeddings().weight.mul_(peaked)
    model = _perturbed(base, scale=0.01)
    chunks = ev.suite_chunks(byte_tokenizer, FAST)
    exact, _ = _plain_kl(base, model, chunks, 0)
    for stored_base in (base, _NoSplitHead(base)):  # hidden states, then uint16 codes
        res = ev.evaluate(model, byte_tokenizer, FAST, base_model=stored_base)
        assert res.metrics["kl_mean"] == pytest.approx(float(exact.double().mean()), rel=0.01)
        assert res.metrics["kl_max"] == pytest.approx(float(exact.max()), rel=0.01)
    # The codes alone, round-tripped: what the 1% promise rests on.
    with torch.no_grad():
        lp = ev.scored_log_probs(base, chunks, 0).flatten(0, 1)
        lq = ev.scored_log_probs(model, chunks, 0).flatten(0, 1)
    codes, low, step = ev.encode_log_probs(lp)
    approx = ev.kl_divergence(ev.decode_log_probs(codes.numpy(), low.numpy(), step.numpy()), lq)
    assert codes.dtype == torch.uint16
    assert float(approx.mean()) == pytest.approx(float(ev.kl_divergence(lp, lq).mean()), rel=0.01)


def test_base_outputs_are_computed_once_and_reused_from_disk(
    tiny_llama, byte_tokenizer, tmp_path, monkeypatch
):
    monkeypatch.setenv("WORKBENCH_HOME", str(tmp_path))
    calls = []
    model = _perturbed(tiny_llama)  # copied before the hook, so only the base's forward passes are counted
    handle = tiny_llama.model.register_forward_hook(lambda *a: calls.append(1))
    try:
        suite = dataclasses.replace(FAST, name="cache-test")
        first = ev.evaluate(model, byte_tokenizer, suite, base_model=tiny_llama, base_fingerprint="fp-test")
        n_first = len(calls)
        ev.clear_memory_cache()  # force the disk copy to be used, as in a new process
        second = ev.evaluate(model, byte_tokenizer, suite, base_model=tiny_llama, base_fingerprint="fp-test")
        # Speed settings do not change the base outputs: the same entry serves this suite too.
        third = ev.evaluate(
            model,
            byte_tokenizer,
            dataclasses.replace(suite, speed_repeats=3),
            base_model=tiny_llama,
            base_fingerprint="fp-test",
        )
    finally:
        handle.remove()
    assert n_first == 3 and len(calls) == n_first  # 8 chunks in batches of 3, then nothing more
    assert second.metrics["kl_mean"] == pytest.approx(first.metrics["kl_mean"], rel=1e-6)
    assert third.metrics["kl_mean"] == pytest.approx(first.metrics["kl_mean"], rel=1e-6)
    entries = [p for p in (tmp_path / "base_outputs").iterdir()]
    assert len(entries) == 1 and not entries[0].name.startswith(".tmp")
    assert (entries[0] / "hidden.npy").stat().st_size < 8 * 127 * 64 * 4 + 1024


def test_an_entry_published_by_another_process_first_is_kept(
    tiny_llama, byte_tokenizer, tmp_path, monkeypatch
):
    monkeypatch.setenv("WORKBENCH_HOME", str(tmp_path))
    suite = dataclasses.replace(FAST, name="race-test")
    out = ev.base_outputs(tiny_llama, byte_tokenizer, suite, base_fingerprint="fp-race")
    # Another process finished the same entry while this one computed: publishing must not break either copy.
    tmp = tmp_path / "base_outputs" / ".tmp-other"
    tmp.mkdir()
    (tmp / "meta.json").write_text("{}")
    final = base_cache._publish(tmp, out.folder)
    assert final == out.folder and not tmp.exists()
    ev.clear_memory_cache()
    again = ev.base_outputs(tiny_llama, byte_tokenizer, suite, base_fingerprint="fp-race")
    np.testing.assert_array_equal(np.asarray(again.nll), np.asarray(out.nll))


def test_progress_is_reported_per_batch_and_cancel_raises_run_interrupted(tiny_llama, byte_tokenizer):
    seen = []
    ev.evaluate(tiny_llama, byte_tokenizer, FAST, progress=lambda f, m: seen.append((f, m)))
    chunk_msgs = [m for _, m in seen if m.startswith("evaluating: chunk")]
    assert len(chunk_msgs) == 3 and seen[-1][0] == 1.0
    assert all(a <= b for (a, _), (b, _) in itertools.pairwise(seen))
    progress = Progress()
    progress.cancel()
    with pytest.raises(RunInterrupted):
        ev.evaluate(tiny_llama, byte_tokenizer, SMALL, progress=progress)
    # Cancelled mid-way: the second batch never runs.
    stopper = Progress(lambda f, m: progress_mid.cancel() if m == "evaluating: chunk 4/8" else None)
    progress_mid = stopper
    with pytest.raises(RunInterrupted):
        ev.evaluate(tiny_llama, byte_tokenizer, FAST, progress=stopper)


def test_bos_replaces_the_first_token_only_when_asked(byte_tokenizer):
    plain = ev.suite_chunks(byte_tokenizer, SMALL)
    with pytest.raises(ConfigError, match="has none"):
        ev.suite_chunks(byte_tokenizer, dataclasses.replace(SMALL, name="bos", add_bos=True))
    with_bos_tok = copy.deepcopy(byte_tokenizer)
    with_bos_tok.bos_token = "<eos>"
    with_bos = ev.suite_chunks(with_bos_tok, dataclasses.replace(SMALL, name="bos", add_bos=True))
    assert with_bos[:, 0].eq(with_bos_tok.bos_token_id).all()
    assert torch.equal(plain[:, 1:], with_bos[:, 1:])
    # None = as the tokenizer asks: this one asks for no BOS.
    assert torch.equal(ev.suite_chunks(with_bos_tok, dataclasses.replace(SMALL, name="bos")), plain)


def test_chunks_are_consecutive_tokens_of_the_evaluation_text(byte_tokenizer):
    from workbench.corpus import get_corpus

    chunks = ev.suite_chunks(byte_tokenizer, SMALL)
    text = get_corpus("python-docs").text("evaluation")
    whole = byte_tokenizer(text[:5000], add_special_tokens=False)["input_ids"]
    assert chunks.flatten().tolist() == whole[:1024]


def test_suites_have_stable_keys_and_bad_names_are_refused():
    quick = ev.get_suite("quick")
    assert quick.key == dataclasses.replace(quick).key and quick.key.startswith("quick-")
    assert quick.key != ev.get_suite("standard").key
    assert quick.key != dataclasses.replace(quick, n_tokens=4096).key
    assert quick.key != dataclasses.replace(quick, compute_dtype="bfloat16").key
    assert quick.base_key == dataclasses.replace(quick, speed=False, batch_size=4).base_key
    standard = ev.get_suite("standard")
    assert standard.scoring == "second_half" and standard.n_tokens // standard.context_length == 40
    assert ev.get_suite(quick) is quick
    with pytest.raises(ConfigError, match="Known: quick, standard"):
        ev.get_suite("quik")
    with pytest.raises(ConfigError, match="n_tokens"):
        ev.Suite("bad", n_tokens=10, context_length=512)
    with pytest.raises(ConfigError, match="scoring"):
        ev.Suite("bad", scoring="half")
    with pytest.raises(ConfigError, match="compute_dtype"):
        ev.Suite("bad", compute_dtype="int8")


def test_bfloat16_compute_is_close_to_float32_but_not_equal(tiny_llama, byte_tokenizer):
    fp32 = ev.evaluate(tiny_llama, byte_tokenizer, FAST, base_model=tiny_llama)
    bf16 = ev.evaluate(
        tiny_llama, byte_tokenizer, dataclasses.replace(FAST, compute_dtype="bfloat16"), base_model=tiny_llama
    )
    assert fp32.metrics["kl_mean"] == 0.0
    assert 0 < bf16.metrics["kl_mean"] < 1e-2
    assert bf16.metrics["ppl"] == pytest.approx(fp32.metrics["ppl"], rel=0.01)


def test_moe_models_evaluate_too(tiny_moe, byte_tokenizer):
    res = ev.evaluate(tiny_moe, byte_tokenizer, FAST, base_model=tiny_moe)
    assert np.isfinite(res.metrics["ppl"]) and res.metrics["kl_mean"] == 0.0
    ref = _plain_nll(tiny_moe, ev.suite_chunks(byte_tokenizer, FAST), 0)
    assert res.metrics["nll"] == pytest.approx(ref, rel=1e-5)


@pytest.mark.slow
def test_demo_perplexity_equals_a_plain_transformers_loop():
    from workbench.models import load_model

    loaded = load_model("demo")
    for scoring in ("full", "second_half"):
        suite = ev.Suite(
            f"demo-{scoring}",
            n_tokens=1024,
            context_length=512,
            scoring=scoring,
            speed=False,
            n_generations=0,
        )
        res = ev.evaluate(loaded.model, loaded.tokenizer, suite)
        chunks = ev.suite_chunks(loaded.tokenizer, suite)
        ref = _plain_nll(loaded.model, chunks, suite.score_start)
        assert res.metrics["nll"] == pytest.approx(ref, rel=1e-5), scoring
        assert 1.5 < res.metrics["ppl"] < 100, res.metrics["ppl"]


def test_provisional_metrics_arrive_per_batch_and_do_not_change_the_result(tiny_llama, byte_tokenizer):
    # A plot shows a first estimate after the first batch; listening must not move the final numbers.
    other = _perturbed(tiny_llama)
    partials: list[dict] = []
    heard = ev.evaluate(
        other, byte_tokenizer, FAST, base_model=tiny_llama, progress=Progress(on_partial=partials.append)
    )
    quiet = ev.evaluate(other, byte_tokenizer, FAST, base_model=tiny_llama)
    assert (
        heard.metrics["ppl"] == quiet.metrics["ppl"] and heard.metrics["kl_mean"] == quiet.metrics["kl_mean"]
    )
    n_batches = -(-(FAST.n_tokens // FAST.context_length) // FAST.batch_size)
    assert len(partials) == n_batches - 1  # after every batch but the last (the result itself follows)
    fractions = [p["provisional"] for p in partials]
    assert fractions == sorted(fractions) and 0 < fractions[0] < fractions[-1] < 1
    first = partials[0]
    # The variant's size is known at once; quality is the estimate over the chunks scored so far.
    assert first["bits_per_weight"] == quiet.metrics["bits_per_weight"]
    assert first["kl_mean"] > 0 and first["ppl"] > 1 and 0 <= first["top1_agree"] <= 1
    assert abs(partials[-1]["ppl"] - quiet.metrics["ppl"]) / quiet.metrics["ppl"] < 0.5


def test_iterated_steps_report_the_time_left(monkeypatch):
    from workbench import progress as pr

    clock = iter([0.0, 10.0, 20.0, 600.0])
    monkeypatch.setattr(pr.time, "monotonic", lambda: next(clock))
    seen: list[str] = []
    list(Progress(lambda _f, m: seen.append(m)).iter(range(4), desc="gptq layer"))
    assert seen[0] == "gptq layer 1/4"  # no pace yet
    assert seen[1] == "gptq layer 2/4 · about 30 s left"  # 10 s for one layer, three to go
    assert seen[2] == "gptq layer 3/4 · about 20 s left"
    assert (
        seen[3] == "gptq layer 4/4 · about 3 min left"
    )  # a slow third layer: 600 s / 3 per layer, one to go
    assert seen[-1] == "gptq layer"
