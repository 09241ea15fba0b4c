"""Weight quantizers on tiny models: quality ordering, calibrated methods beating RTN, exact size accounting,
faithfulness of the GPTQ/AWQ building blocks, bad inputs, configs as data, progress and cancellation."""

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

# One row per technique, as in PEFT's TEST_CASES: (name, extra parameters).
TEST_CASES = [
    ("rtn", {}),
    ("rtn", {"symmetric": True}),
    ("rtn", {"zero_point": "int"}),
    ("gptq", {"n_samples": 8, "seq_len": 128}),
    ("gptq", {"n_samples": 8, "seq_len": 128, "act_order": True}),
    ("gptq", {"n_samples": 8, "seq_len": 128, "symmetric": True, "group_size": -1}),
    ("awq", {"n_samples": 8, "seq_len": 128}),
    ("awq", {"n_samples": 8, "seq_len": 128, "zero_point": "int"}),
    ("mixed", {"high_precision": ("*.self_attn.*",)}),
]
CALIBRATED = ("gptq", "awq")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models gain nothing from threads, and on a busy machine two threads waiting on each other make each
    small op many times slower; the previous setting is restored after the module."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _kl(base_logits: torch.Tensor, logits: torch.Tensor) -> float:
    p = torch.log_softmax(base_logits.float(), -1)
    q = torch.log_softmax(logits.float(), -1)
    return float((p.exp() * (p - q)).sum(-1).mean())


@pytest.fixture(scope="module")
def outlier_llama():
    """tiny_llama with a few salient input channels (large activations, small weights), as trained LLMs have:
    the same float function, but harder for round-to-nearest, which gives those weights the same step as the rest."""
    from workbench.tiny import tiny_llama

    model = tiny_llama(seed=3)
    with torch.no_grad():
        for layer in model.model.layers:
            attn, mlp = layer.self_attn, layer.mlp
            for c in (3, 17, 40):
                for norm, consumers in (
                    (layer.input_layernorm, (attn.q_proj, attn.k_proj, attn.v_proj)),
                    (layer.post_attention_layernorm, (mlp.gate_proj, mlp.up_proj)),
                ):
                    norm.weight[c] *= 20
                    for lin in consumers:
                        lin.weight[:, c] /= 20
    return model


@pytest.fixture(scope="module")
def ctx_factory():
    from workbench.tiny import byte_tokenizer

    tok, corpus = byte_tokenizer(), get_corpus("python-docs")
    return lambda progress=None: ApplyContext(
        tokenizer=tok, corpus=corpus, progress=progress or Progress.null()
    )


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


# ---- the matrix ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "extra"), TEST_CASES)
def test_quality_improves_with_bits_and_sizes_are_counted(name, extra, outlier_llama, ctx_factory, eval_ids):
    kls = {}
    params = {"group_size": 32, **extra}
    for bits in (8, 4, 2):
        kls[bits], q = _quantized_kl(outlier_llama, name, {"bits": bits, **params}, ctx_factory(), eval_ids)
        lin = q.model.layers[0].mlp.down_proj
        expected = packed_bytes(
            tuple(lin.weight.shape),
            bits,
            params["group_size"],
            extra.get("symmetric", False),
            extra.get("zero_point", "float"),
        )
        assert lin.wb_storage_bytes == expected
        assert lin.wb_quant["bits"] == bits and lin.wb_quant["method"] == name
    assert kls[8] < kls[4] < kls[2], kls
    assert kls[8] < 1e-3, f"8-bit {name} KL {kls[8]:.2e} should be close to 0"


@pytest.mark.parametrize(("name", "extra"), TEST_CASES)
def test_apply_works_in_place_and_returns_the_same_model(name, extra, tiny_llama, ctx_factory):
    model = copy.deepcopy(tiny_llama)
    before = model.model.layers[1].self_attn.v_proj.weight.detach().clone()
    out = apply_(model, make_config(name, bits=3, **extra), ctx_factory())
    assert out is model
    assert not torch.equal(model.model.layers[1].self_attn.v_proj.weight, before)


@pytest.mark.parametrize(("name", "extra"), TEST_CASES)
def test_configs_round_trip_as_data(name, extra):
    config = make_config(name, bits=3, **extra)
    assert config_from_dict(config_to_dict(config)) == config


@pytest.mark.parametrize("name", CALIBRATED)
def test_calibrated_methods_beat_rtn_at_3_bits(name, outlier_llama, ctx_factory, eval_ids):
    # GPTQ's act_order (on by default) ranks columns by the Hessian diagonal: with 16 windows of the tiny byte-level
    # model that ranking is noise and KL ends level with RTN; 64 windows estimate it well enough.
    params = {"bits": 3, "group_size": 32, "n_samples": 64 if name == "gptq" else 16, "seq_len": 128}
    rtn, _ = _quantized_kl(outlier_llama, "rtn", {"bits": 3, "group_size": 32}, ctx_factory(), eval_ids)
    ours, _ = _quantized_kl(outlier_llama, name, params, ctx_factory(), eval_ids)
    assert ours < 0.9 * rtn, f"{name} KL {ours:.5f} is not clearly below RTN's {rtn:.5f}"


# ---- size accounting ----------------------------------------------------------------------------------------


def test_packed_size_is_codes_plus_scales_plus_zero_points():
    # 64 x 128 weight, 4 bits, groups of 32: 4096 bytes of codes, 256 groups.
    assert packed_bytes((64, 128), 4, 32, symmetric=True) == 4096 + 256 * 2
    assert packed_bytes((64, 128), 4, 32, symmetric=False, zero_point="float") == 4096 + 256 * 2 + 256 * 2
    assert packed_bytes((64, 128), 4, 32, symmetric=False, zero_point="int") == 4096 + 512 + 128
    assert (
        packed_bytes((64, 128), 3, -1, symmetric=False, zero_point="int")
        == math.ceil(64 * 128 * 3 / 8) + 128 + 24
    )
    # The demo model's q_proj at Q4_1's settings: 5.0 bits per weight, as llama.cpp's Q4_1.
    assert packed_bytes((576, 576), 4, 32, symmetric=False) == 207_360
    assert 8 * packed_bytes((576, 576), 4, 32, symmetric=False) / (576 * 576) == 5.0


def test_size_report_uses_the_packed_size(tiny_llama):
    from workbench.models import size_report

    q = apply_(copy.deepcopy(tiny_llama), make_config("rtn", bits=3, group_size=32, zero_point="int"))
    linears = [m for n, m in q.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n]
    expected = sum(packed_bytes(tuple(m.weight.shape), 3, 32, False, "int") for m in linears)
    report = size_report(q)
    assert report.linear_bytes == expected
    assert report.bits_per_weight_linear == pytest.approx(
        8 * expected / sum(m.weight.numel() for m in linears)
    )


def test_tied_embedding_and_head_are_one_tensor_quantized_once(tiny_llama):
    from workbench.models import size_report

    assert tiny_llama.lm_head.weight is tiny_llama.model.embed_tokens.weight  # tied in tiny_llama
    q = apply_(copy.deepcopy(tiny_llama), make_config("rtn", bits=4, include_head=True, embedding_bits=8))
    emb, head = q.get_input_embeddings(), q.get_output_embeddings()
    assert head.weight is emb.weight
    assert not torch.equal(emb.weight, tiny_llama.get_input_embeddings().weight)
    stored = packed_bytes(tuple(emb.weight.shape), 8, 32, False, "float")
    assert emb.wb_storage_bytes == head.wb_storage_bytes == stored
    dense = size_report(apply_(copy.deepcopy(tiny_llama), make_config("rtn", bits=4)))
    assert size_report(q).n_bytes == dense.n_bytes - 4 * emb.weight.numel() + stored  # counted once


def test_untied_head_alone_leaves_the_embedding_in_float(tiny_llama):
    model = copy.deepcopy(tiny_llama)
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())  # untie
    emb_before = model.model.embed_tokens.weight.detach().clone()
    apply_(model, make_config("rtn", bits=4, include_head=True))
    assert torch.equal(model.model.embed_tokens.weight, emb_before)
    assert not hasattr(model.model.embed_tokens, "wb_storage_bytes")
    assert model.lm_head.wb_quant["bits"] == 8


# ---- the grid -----------------------------------------------------------------------------------------------


def test_rtn_reproduces_weights_already_on_a_q4_1_grid():
    torch.manual_seed(0)
    codes = torch.randint(0, 16, (8, 64)).float()
    codes[:, 0::32], codes[:, 1::32] = 0, 15  # Q4_1 sets its scale from each group's min and max
    scale = (torch.rand(8, 2, 1) * 0.1 + 0.01).half().float()  # Q4_1 stores both in fp16
    minimum = (-torch.rand(8, 2, 1)).half().float()
    w = (codes.view(8, 2, 32) * scale + minimum).view(8, 64)
    assert torch.allclose(fake_quantize(w, 4, 32, symmetric=False, zero_point="float"), w, atol=1e-6)
    # Every 4-bit level is an 8-bit level (255 = 15 x 17): 8-bit group 32 misses only by its fp16 scale's rounding.
    step = scale.expand(8, 2, 32).reshape(8, 64)
    assert ((fake_quantize(w, 8, 32) - w).abs() / step).max() < 0.1
    assert (
        (fake_quantize(w, 8, 64) - w).abs() / step
    ).max() > 0.05  # one scale across two Q4_1 groups: off the grid
    assert not torch.allclose(fake_quantize(w, 4, 32, symmetric=False, zero_point="int"), w, atol=1e-6)


@pytest.mark.parametrize(("symmetric", "zero_point"), [(True, "float"), (False, "float"), (False, "int")])
def test_each_group_holds_at_most_2_to_the_bits_levels(symmetric, zero_point):
    torch.manual_seed(1)
    w = torch.randn(16, 96) * torch.rand(16, 1)
    q = fake_quantize(w, 3, 32, symmetric, zero_point)
    for group in q.view(16, 3, 32).reshape(-1, 32):
        assert group.unique().numel() <= 8
    if zero_point == "int":  # the integer zero point keeps 0.0 exactly representable
        q0 = fake_quantize(torch.cat([w, torch.zeros(16, 32)], 1), 3, 32, symmetric, zero_point)
        assert (q0[:, 96:] == 0).all()


def test_in_place_and_out_of_place_fake_quantize_agree_for_half_precision():
    from workbench.techniques._quant import fake_quantize_

    w = torch.randn(300, 64).to(torch.bfloat16)  # more rows than one cache-sized step
    out = fake_quantize(w, 4, 32)
    assert out.dtype == torch.bfloat16 and not torch.equal(out, w)
    w2 = w.clone()
    fake_quantize_(w2, 4, 32)
    assert torch.equal(w2, out)


# ---- GPTQ and AWQ building blocks ---------------------------------------------------------------------------


def test_gptq_with_uncorrelated_inputs_is_round_to_nearest():
    """With a diagonal Hessian there is no error to compensate: GPTQ must give exactly RTN's weights."""
    from workbench.techniques.gptq import GPTQConfig, gptq_quantize

    torch.manual_seed(2)
    w = torch.randn(24, 128)
    H = torch.diag(torch.rand(128) + 0.5)
    q = gptq_quantize(w, H, GPTQConfig(bits=3, group_size=32))
    assert torch.allclose(q, fake_quantize(w, 3, 32), atol=1e-6)


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_lowers_the_layer_output_error_it_minimises(act_order):
    from workbench.techniques.gptq import GPTQConfig, gptq_quantize

    torch.manual_seed(3)
    x = torch.randn(2048, 96) @ (torch.randn(96, 96) * 0.3 + torch.eye(96))  # correlated inputs
    x[:, 5] *= 8  # one loud channel
    w = torch.randn(32, 96)
    H = 2 * x.T @ x / x.shape[0]
    rtn = fake_quantize(w, 3, 32)
    gptq = gptq_quantize(w, H, GPTQConfig(bits=3, group_size=32, act_order=act_order))

    def err(q: torch.Tensor) -> float:
        return float(((x @ (q - w).T) ** 2).mean())

    assert err(gptq) < 0.7 * err(rtn), (err(gptq), err(rtn))
    # Static groups: every contiguous group of 32 columns still holds at most 2^3 levels per row.
    for group in gptq.view(32, 3, 32).reshape(-1, 32):
        assert group.unique().numel() <= 8


def test_gptq_ignores_dead_inputs():
    from workbench.techniques.gptq import GPTQConfig, gptq_quantize

    torch.manual_seed(4)
    x = torch.randn(512, 64)
    x[:, 7] = 0  # an input that is always 0
    # Its weights are set to 0 (free to choose); a symmetric grid holds 0 exactly.
    q = gptq_quantize(
        torch.randn(8, 64), 2 * x.T @ x / 512, GPTQConfig(bits=4, group_size=32, symmetric=True)
    )
    assert torch.isfinite(q).all() and (q[:, 7] == 0).all()


def test_awq_scale_folding_keeps_the_float_model_unchanged(tiny_llama, eval_ids):
    from workbench.techniques.awq import _apply_scale

    model = copy.deepcopy(tiny_llama)
    layer = model.model.layers[0]
    with torch.no_grad():
        base = model(eval_ids).logits
        s = torch.rand(64) * 3 + 0.2
        _apply_scale(
            layer.input_layernorm, [layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj], s
        )
        s2 = torch.rand(128) * 3 + 0.2
        _apply_scale(layer.mlp.up_proj, [layer.mlp.down_proj], s2)
        assert torch.allclose(model(eval_ids).logits, base, atol=1e-4)


def test_awq_clip_search_matches_the_reference_loop():
    """Our Gram-matrix error equals llm-awq's direct per-token error, so the same clip is chosen."""
    from workbench.techniques.awq import AWQConfig, _search_clip

    torch.manual_seed(5)
    config = AWQConfig(bits=3, group_size=32)
    lin = torch.nn.Linear(64, 16, bias=False)
    x = torch.randn(700, 64)
    w = lin.weight.data.clone()
    _search_clip(x, lin, config)
    # llm-awq auto_clip_layer, written out: 512 evenly spread tokens, max |w| shrunk by 1 - i/20, i < 10.
    xs = x[0 :: 700 // 512][:512].reshape(1, -1, 2, 32)
    wg = w.reshape(16, 1, 2, 32)
    org_max = wg.abs().amax(-1, keepdim=True)
    org_out = (xs * wg).sum(-1)
    best, min_err = org_max.clone(), torch.full_like(org_max, float("inf"))
    for i in range(10):
        max_val = org_max * (1 - i / 20)
        q = fake_quantize(torch.clamp(wg, -max_val, max_val).reshape(16, 64), 3, 32).reshape(16, 1, 2, 32)
        err = ((xs * q).sum(-1) - org_out).pow(2).mean(1).view(min_err.shape)
        better = err < min_err
        min_err[better], best[better] = err[better], max_val[better]
    expected = torch.clamp(wg, -best, best).reshape(16, 64)
    assert torch.allclose(lin.weight.data, expected, atol=1e-6)


# ---- bad inputs ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "params", "needle"),
    [
        ("rtn", {"bits": 1}, "out of range"),
        ("rtn", {"bits": 9}, "out of range"),
        ("gptq", {"bits": 9}, "out of range"),
        ("awq", {"bits": 1}, "out of range"),
        ("mixed", {"bits": 1}, "out of range"),
        ("gptq", {"zero_point": "half"}, "zero_point"),
        ("awq", {"group_size": 0}, "group_size"),
        ("gptq", {"damp": 0}, "damp"),
        ("mixed", {"bits": 4, "high_bits": 3}, "below bits"),
        ("mixed", {"high_precision": "*.down_proj"}, "list of name patterns"),
        ("rtn", {"bitz": 4}, "unknown parameter"),
    ],
)
def test_bad_parameters_are_refused_with_a_message(name, params, needle):
    with pytest.raises(ConfigError, match=needle):
        make_config(name, **params)


@pytest.mark.parametrize("name", ["rtn", "gptq", "awq", "mixed"])
def test_group_size_that_does_not_divide_names_the_layer(name, tiny_llama, ctx_factory):
    model = copy.deepcopy(tiny_llama)
    before = model.model.layers[0].self_attn.q_proj.weight.detach().clone()
    with pytest.raises(
        ConfigError,
        match=r"does not divide in_features=64 of 'model\.layers\.0\..*Group sizes "
        r"that divide every layer: 16, 32, 64, or -1",
    ):
        apply_(model, make_config(name, group_size=48), ctx_factory())
    assert torch.equal(model.model.layers[0].self_attn.q_proj.weight, before)  # refused before any work


def test_awq_refuses_layers_it_cannot_fold_into(tiny_moe, ctx_factory):
    with pytest.raises(
        ConfigError, match="awq: the decoder layers of .* lack mlp.gate_proj.*Use gptq or rtn"
    ):
        apply_(copy.deepcopy(tiny_moe), make_config("awq"), ctx_factory())


def test_calibrated_method_without_calibration_text_says_how_to_get_it(tiny_llama):
    with pytest.raises(ConfigError, match="calibration text"):
        apply_(copy.deepcopy(tiny_llama), make_config("gptq"), ApplyContext())


# ---- progress and cancellation ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["rtn", "gptq", "awq", "mixed"])
def test_progress_is_reported_and_a_cancel_stops_the_run(name, tiny_llama, ctx_factory):
    params = {"n_samples": 4, "seq_len": 64} if name in CALIBRATED else {}
    seen: list[float] = []
    apply_(
        copy.deepcopy(tiny_llama),
        make_config(name, **params),
        ctx_factory(Progress(lambda f, _m: seen.append(f))),
    )
    assert seen[-1] == 1.0 and seen == sorted(seen) and len(seen) > 2

    progress = Progress(lambda f, _m: progress.cancel() if f > 0 else None)
    with pytest.raises(RunInterrupted):
        apply_(copy.deepcopy(tiny_llama), make_config(name, **params), ctx_factory(progress))


# ---- MoE experts kept as 3D tensors -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "params"), [("rtn", {}), ("mixed", {}), ("gptq", {"n_samples": 4, "seq_len": 64})]
)
def test_fused_moe_experts_are_quantized_and_sized(name, params, tiny_moe, ctx_factory):
    model = copy.deepcopy(tiny_moe)
    ctx = ctx_factory()
    apply_(model, make_config(name, bits=3, **params), ctx)
    experts = model.model.layers[0].mlp.experts
    before = tiny_moe.model.layers[0].mlp.experts
    for pname in ("gate_up_proj", "down_proj"):
        param = getattr(experts, pname)
        n_exp, out_f, in_f = param.shape
        assert experts.wb_param_storage_bytes[pname] == packed_bytes(
            (n_exp * out_f, in_f), 3, 32, False, "float"
        )
        assert not torch.equal(param, getattr(before, pname))
        for group in param.detach().reshape(-1, 32):  # every group of every expert on a 3-bit grid
            assert group.unique().numel() <= 8
    router = model.model.layers[0].mlp.gate
    assert torch.equal(router.weight, tiny_moe.model.layers[0].mlp.gate.weight)  # routers stay in float
    if name == "gptq":
        assert ctx.extras["gptq"]["fused_expert_tensors_by_rtn"] == 2 * len(model.model.layers)
