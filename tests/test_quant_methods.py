"""Weight quantizers on tiny models: quality ordering, calibrated methods beating RTN, exact size accounting."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from workbench.corpus import get_corpus
from workbench.errors import ConfigError, RunInterrupted
from workbench.progress import Progress
from workbench.techniques import ApplyContext, apply_, config_from_dict, config_to_dict, make_config
from workbench.techniques._quant import fake_quantize, packed_bytes


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models gain nothing from threads, and on a busy machine two threads waiting on each other make
    each small op many times slower; the previous setting is restored after the module."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

# One row per technique, as in PEFT's TEST_CASES: (name, extra parameters).
TEST_CASES = [
    ("rtn", {}),
    ("rtn", {"symmetric": True}),
    ("rtn", {"zero_point": "int"}),
    ("gptq", {"n_samples": 8, "seq_len": 128}),
    ("gptq", {"n_samples": 8, "seq_len": 128, "act_order": True}),
    ("awq", {"n_samples": 8, "seq_len": 128}),
]


def _kl(base_logits: torch.Tensor, logits: torch.Tensor) -> float:
    p = torch.log_softmax(base_logits.float(), -1)
    q = torch.log_softmax(logits.float(), -1)
    return float((p.exp() * (p - q)).sum(-1).mean())


@pytest.fixture(scope="module")
def outlier_llama():
    """tiny_llama with a few salient input channels: the same function, but harder for round-to-nearest."""
    from workbench.tiny import tiny_llama

    model = tiny_llama(seed=3)
    with torch.no_grad():
        for layer in model.model.layers:
            for c in (3, 17, 40):
                for norm, consumers in (
                    (layer.input_layernorm, (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj)),
                    (layer.post_attention_layernorm, (layer.mlp.gate_proj, layer.mlp.up_proj)),
                ):
                    norm.weight[c] *= 20
                    for lin in consumers:
                        lin.weight[:, c] /= 20
    return model


@pytest.fixture(scope="module")
def ctx_factory():
    from workbench.tiny import byte_tokenizer

    tok, corpus = byte_tokenizer(), get_corpus("python-docs")
    return lambda: ApplyContext(tokenizer=tok, corpus=corpus)


@pytest.fixture(scope="module")
def eval_ids():
    from workbench.tiny import byte_tokenizer

    text = get_corpus("python-docs").text("evaluation")[:3000]
    return torch.tensor([byte_tokenizer()(text, add_special_tokens=False)["input_ids"][:384]])


def _quantized_kl(model, name, params, ctx, ids):
    with torch.no_grad():
        base = model(ids).logits
        q = apply_(copy.deepcopy(model), make_config(name, **params), ctx)
        return _kl(base, q(ids).logits), q


@pytest.mark.parametrize(("name", "extra"), TEST_CASES)
def test_quality_improves_with_bits_and_sizes_are_counted(name, extra, outlier_llama, ctx_factory, eval_ids):
    kls = {}
    for bits in (8, 4, 2):
        kls[bits], q = _quantized_kl(outlier_llama, name, {"bits": bits, "group_size": 32, **extra}, ctx_factory(),
                                     eval_ids)
        lin = q.model.layers[0].mlp.down_proj
        assert lin.wb_storage_bytes == packed_bytes(tuple(lin.weight.shape), bits, 32,
                                                    extra.get("symmetric", False), extra.get("zero_point", "float"))
    assert kls[8] < kls[4] < kls[2], kls


@pytest.mark.parametrize("name", ["gptq", "awq"])
def test_calibrated_methods_beat_rtn_at_3_bits(name, outlier_llama, ctx_factory, eval_ids):
    params = {"bits": 3, "group_size": 32, "n_samples": 16, "seq_len": 128}
    rtn, _ = _quantized_kl(outlier_llama, "rtn", {"bits": 3, "group_size": 32}, ctx_factory(), eval_ids)
    ours, _ = _quantized_kl(outlier_llama, name, params, ctx_factory(), eval_ids)
    assert ours < rtn, f"{name} KL {ours:.5f} is not below RTN's {rtn:.5f}"


def test_packed_size_is_codes_plus_scales_plus_zero_points():
    # 64 x 128 weight, 4 bits, groups of 32: 4096 bytes of codes, 256 groups.
    assert packed_bytes((64, 128), 4, 32, symmetric=True) == 4096 + 256 * 2
    assert packed_bytes((64, 128), 4, 32, symmetric=False, zero_point="float") == 4096 + 256 * 2 + 256 * 2
    assert packed_bytes((64, 128), 4, 32, symmetric=False, zero_point="int") == 4096 + 512 + 128
    assert packed_bytes((64, 128), 3, -1, symmetric=False, zero_point="int") == math.ceil(64 * 128 * 3 / 8) + 128 + 24


def test_rtn_reproduces_weights_already_on_a_q4_1_grid():
    torch.manual_seed(0)
    codes = torch.randint(0, 16, (8, 64)).float()
    codes[:, 0::32], codes[:, 1::32] = 0, 15  # Q4_1 sets its scale from each group's min and max
    scale = torch.rand(8, 2, 1) * 0.1 + 0.01
    minimum = -torch.rand(8, 2, 1)
    w = (codes.view(8, 2, 32) * scale + minimum).view(8, 64)
    assert torch.allclose(fake_quantize(w, 4, 32, symmetric=False, zero_point="float"), w, atol=1e-6)
    assert not torch.allclose(fake_quantize(w, 4, 32, symmetric=False, zero_point="int"), w, atol=1e-6)


def test_embeddings_can_be_quantized_too(tiny_llama, ctx_factory):
    q = apply_(copy.deepcopy(tiny_llama), make_config("rtn", bits=4, include_embeddings=True, embedding_bits=8),
               ctx_factory())
    emb = q.get_input_embeddings()
    assert emb.wb_storage_bytes == packed_bytes(tuple(emb.weight.shape), 8, 32, False, "float")
    assert not torch.equal(emb.weight, tiny_llama.get_input_embeddings().weight)


@pytest.mark.parametrize(
    ("name", "params", "needle"),
    [
        ("rtn", {"bits": 1}, "out of range"),
        ("rtn", {"bits": 9}, "out of range"),
        ("gptq", {"zero_point": "half"}, "zero_point"),
        ("awq", {"group_size": 0}, "group_size"),
        ("rtn", {"bitz": 4}, "unknown parameter"),
    ],
)
def test_bad_parameters_are_refused_with_a_message(name, params, needle):
    with pytest.raises(ConfigError, match=needle):
        make_config(name, **params)


@pytest.mark.parametrize("name", ["rtn", "gptq", "awq"])
def test_group_size_that_does_not_divide_names_the_layer(name, tiny_llama, ctx_factory):
    with pytest.raises(ConfigError, match=r"does not divide in_features=64 of 'model\.layers\.0\..*Group sizes"):
        apply_(copy.deepcopy(tiny_llama), make_config(name, group_size=48), ctx_factory())


@pytest.mark.parametrize(("name", "extra"), TEST_CASES)
def test_configs_round_trip_as_data(name, extra):
    config = make_config(name, bits=3, **extra)
    assert config_from_dict(config_to_dict(config)) == config


def test_calibrated_method_without_calibration_text_says_how_to_get_it(tiny_llama):
    with pytest.raises(ConfigError, match="calibration text"):
        apply_(copy.deepcopy(tiny_llama), make_config("gptq"), ApplyContext())


def test_cancel_stops_a_calibrated_run(tiny_llama, ctx_factory):
    ctx = ctx_factory()
    ctx.progress = Progress()
    ctx.progress.cancel()
    with pytest.raises(RunInterrupted):
        apply_(copy.deepcopy(tiny_llama), make_config("gptq", n_samples=4, seq_len=64), ctx)
