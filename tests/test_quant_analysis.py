"""Grid detection, per-layer sensitivity and mixed precision built from it."""

from __future__ import annotations

import copy
import time

import pandas as pd
import pytest
import torch

from workbench.errors import ConfigError
from workbench.models import load_model
from workbench.quant_analysis import detect_grid, layer_sensitivity
from workbench.techniques import apply_, config_from_dict, config_to_dict, make_config
from workbench.techniques._quant import packed_bytes
from workbench.techniques.mixed import mixed_bits_per_weight, mixed_from_sensitivity
from workbench.techniques.rtn import RTNConfig


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models gain nothing from threads; on a busy machine two threads make small ops much slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ---- grid detection -----------------------------------------------------------------------------------------


def test_random_weights_are_not_on_a_grid(tiny_llama):
    assert detect_grid(tiny_llama) is None


@pytest.mark.parametrize(("bits", "group", "symmetric"), [(4, 32, False), (3, 64, True), (2, 32, False)])
def test_a_model_pushed_onto_a_grid_is_detected(tiny_llama, bits, group, symmetric):
    gridded = apply_(
        copy.deepcopy(tiny_llama), make_config("rtn", bits=bits, group_size=group, symmetric=symmetric)
    )
    report = detect_grid(gridded)
    assert report is not None
    assert (report.bits, report.group_size) == (bits, group)
    assert report.form == ("symmetric" if symmetric else "asymmetric")
    assert f"{bits}-bit grid (groups of {group}" in report.message
    assert "reproduces it exactly, which says nothing about the method" in report.message
    assert report.finer_bits() == (
        [] if symmetric else [b for b in range(bits + 1, 9) if (2**b - 1) % (2**bits - 1) == 0]
    )


def test_a_q4_1_grid_gets_the_warning_that_names_what_to_compare_instead(tiny_llama):
    report = detect_grid(apply_(copy.deepcopy(tiny_llama), make_config("rtn", bits=4, group_size=32)))
    assert report.message == (
        "This model's weights already sit on a 4-bit grid (groups of 32, Q4_1-style). 4-bit group-32 asymmetric "
        "RTN reproduces it exactly, which says nothing about the method; 8-bit group-32 asymmetric RTN nearly "
        "does too (every 4-bit level is one of its levels, up to the rounding of its fp16 scale). Compare methods "
        "at 3 or 2 bits, 4-bit symmetric, or group 64 / per-channel."
    )


def test_an_integer_zero_point_grid_is_not_mistaken_for_float_weights(tiny_llama):
    # 3-bit with an integer zero point: still at most 8 evenly spaced values per group, so found at 3 bits.
    gridded = apply_(copy.deepcopy(tiny_llama), make_config("rtn", bits=3, group_size=32, zero_point="int"))
    report = detect_grid(gridded)
    assert report is not None and report.bits <= 4 and report.group_size == 32


@pytest.mark.slow
def test_the_demo_model_sits_on_its_q4_1_grid_and_rtn_reproduces_it_fast():
    from workbench.models import load_model

    model = load_model("demo").model
    start = time.perf_counter()
    report = detect_grid(model)
    assert time.perf_counter() - start < 5
    assert (report.bits, report.group_size, report.form) == (4, 32, "asymmetric")
    assert "Q4_1-style" in report.message

    q = copy.deepcopy(model)
    cpu = time.process_time()
    apply_(q, make_config("rtn", bits=4, group_size=32))
    assert time.process_time() - cpu < 3, "RTN of the demo model should take well under a second of CPU"
    same = all(torch.equal(a, b) for a, b in zip(model.parameters(), q.parameters(), strict=True))
    assert same, "4-bit group-32 asymmetric RTN must reproduce the demo model's Q4_1 weights exactly"
    apply_(q, make_config("rtn", bits=4, group_size=32, zero_point="int"))
    assert not torch.equal(
        q.model.layers[0].self_attn.q_proj.weight, model.model.layers[0].self_attn.q_proj.weight
    )


# ---- sensitivity --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ids():
    torch.manual_seed(1)
    return torch.randint(0, 256, (2, 96))


def test_sensitivity_scans_each_part_and_restores_the_weights(tiny_llama, ids):
    before = {k: v.clone() for k, v in tiny_llama.state_dict().items()}
    by_type = layer_sensitivity(tiny_llama, ids, by="type")
    by_layer = layer_sensitivity(tiny_llama, ids, by="layer")
    assert list(by_type["name"]) == [
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    ]
    assert list(by_layer["name"]) == ["layer 0", "layer 1"]
    assert list(by_layer["pattern"]) == ["model.layers.0.*", "model.layers.1.*"]
    assert by_type["pattern"].iloc[-1] == "*.down_proj"
    assert (by_type["kl_mean"] > 0).all() and (by_layer["kl_mean"] > 0).all()
    assert by_layer["n_params"].sum() == by_type["n_params"].sum()
    assert all(torch.equal(before[k], v) for k, v in tiny_llama.state_dict().items())


def test_sensitivity_reads_calibration_text_through_a_tokenizer_and_reports_progress(
    tiny_llama, byte_tokenizer
):
    seen: list[float] = []
    frame = layer_sensitivity(
        tiny_llama,
        byte_tokenizer,
        by="layer",
        n_chunks=2,
        chunk_len=64,
        config=make_config("rtn", bits=2),
        progress=lambda f, _m: seen.append(f),
    )
    assert len(frame) == 2 and (frame["kl_mean"] > 0).all()
    assert seen[-1] == 1.0


def test_fewer_bits_make_every_part_more_sensitive(tiny_llama, ids):
    low = layer_sensitivity(tiny_llama, ids, by="layer", config=make_config("rtn", bits=2))
    high = layer_sensitivity(tiny_llama, ids, by="layer", config=make_config("rtn", bits=6))
    assert (low["kl_mean"] > high["kl_mean"]).all()


def test_sensitivity_refuses_an_unknown_grouping(tiny_llama, ids):
    with pytest.raises(ConfigError, match="by='block' must be 'layer'"):
        layer_sensitivity(tiny_llama, ids, by="block")


# ---- mixed precision ----------------------------------------------------------------------------------------


def test_mixed_precision_keeps_the_most_sensitive_parts_at_high_bits(tiny_llama, ids):
    frame = layer_sensitivity(tiny_llama, ids, by="type")
    config = mixed_from_sensitivity(frame, 3, 8, top_n=1)
    worst = frame.sort_values("kl_mean").iloc[-1]["name"]
    assert config.high_precision == (f"*.{worst}",)
    q = apply_(copy.deepcopy(tiny_llama), config)
    for name, module in q.named_modules():
        if hasattr(module, "wb_quant") and ".layers." in name:
            expected = 8 if name.endswith(worst) else 3
            assert module.wb_quant["bits"] == expected, name
            assert module.wb_storage_bytes == packed_bytes(tuple(module.weight.shape), expected, 32, False)
    assert config_from_dict(config_to_dict(config)) == config


@pytest.mark.parametrize("budget", [4.2, 5.0, 7.0])
def test_mixed_precision_within_a_bits_budget_spends_it_without_going_over(tiny_llama, ids, budget):
    from workbench.models import size_report

    frame = layer_sensitivity(tiny_llama, ids, by="layer")
    config = mixed_from_sensitivity(frame, 3, 8, budget_bpw=budget)
    predicted = mixed_bits_per_weight(tiny_llama, config)
    actual = size_report(apply_(copy.deepcopy(tiny_llama), config)).bits_per_weight_linear
    assert actual == pytest.approx(predicted)
    assert 4.0 <= actual <= budget  # 3 bits + 1 bit of fp16 scale and minimum per 32 weights, at least
    if budget >= 7.0:  # room for one of the two blocks (8 bits: 9 bpw), the more sensitive one
        worst = frame.sort_values("kl_mean").iloc[-1]["pattern"]
        assert config.high_precision == (worst,)


def test_mixed_from_sensitivity_needs_exactly_one_rule_and_an_affordable_budget(tiny_llama, ids):
    frame = layer_sensitivity(tiny_llama, ids, by="layer")
    with pytest.raises(ConfigError, match="exactly one of top_n"):
        mixed_from_sensitivity(frame, 3, 8)
    with pytest.raises(ConfigError, match="exactly one of top_n"):
        mixed_from_sensitivity(frame, 3, 8, top_n=1, budget_bpw=5.0)
    with pytest.raises(ConfigError, match="below what 3-bit alone costs"):
        mixed_from_sensitivity(frame, 3, 8, budget_bpw=3.5)


def test_mixed_pattern_that_matches_nothing_is_refused(tiny_llama):
    with pytest.raises(ConfigError, match="matches no decoder linear"):
        apply_(copy.deepcopy(tiny_llama), make_config("mixed", high_precision=("*.nope",)))


def test_module_sensitivity_has_one_part_per_linear_with_its_shape():
    from workbench.quant_analysis import layer_sensitivity
    from workbench.techniques._quant import decoder_linears

    loaded = load_model("tiny-llama")
    ids = torch.randint(
        0, loaded.model.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(0)
    )
    frame = layer_sensitivity(
        loaded.model, ids, config=RTNConfig(bits=4, group_size=32, symmetric=True), by="module"
    )
    linears = dict(decoder_linears(loaded.model))
    assert list(frame["pattern"]) == list(linears)
    for pattern, shapes in zip(frame["pattern"], frame["shapes"], strict=True):
        assert shapes == [tuple(linears[pattern].weight.shape)]
    # Each part alone moves the output (q/k barely, on a random model's near-uniform attention).
    assert (frame[frame["pattern"].str.endswith("down_proj")]["kl_mean"] > 1e-7).all()


def _frame(kls, shape=(64, 64)):
    return pd.DataFrame(
        {
            "pattern": [f"m{i}" for i in range(len(kls))],
            "kl_mean": kls,
            "n_params": [shape[0] * shape[1]] * len(kls),
            "shapes": [[shape]] * len(kls),
        }
    )


def test_plan_module_bits_spends_the_budget_on_the_most_sensitive_parts():
    from workbench.quant_analysis import plan_module_bits
    from workbench.techniques._quant import packed_bytes

    b4, b5, b8 = (packed_bytes((64, 64), b, 32, True) for b in (4, 5, 8))
    frame = _frame([1.0, 0.01, 0.02, 0.5])
    # Room for two 4->5 upgrades: the two most sensitive parts get them.
    plan = plan_module_bits(frame, budget_bytes=4 * b4 + 2 * (b5 - b4))
    assert plan.bits == 4 and dict(plan.module_bits) == {"m0": 5, "m3": 5}
    assert plan.bytes == 4 * b4 + 2 * (b5 - b4) and plan.counts == {4: 2, 5: 2}
    # Everything at 5 and one part at 8: the most sensitive one.
    plan = plan_module_bits(frame, budget_bytes=3 * b5 + b8)
    assert plan.bits == 5 and dict(plan.module_bits) == {"m0": 8}
    # The prediction follows the 4^-bits rule from the measured 4-bit KL.
    assert plan.predicted_kl == pytest.approx(1.0 / 256 + (0.01 + 0.02 + 0.5) / 4)
    # The whole budget at the highest width: nothing listed, everything at 8.
    plan = plan_module_bits(frame, budget_bpw=9.0)
    assert plan.bits == 8 and plan.module_bits == ()
    assert plan.bytes <= 9.0 * frame["n_params"].sum() / 8


def test_plan_module_bits_refuses_budgets_and_frames_it_cannot_use():
    from workbench.quant_analysis import plan_module_bits

    frame = _frame([1.0, 0.5])
    with pytest.raises(ConfigError, match="below what 4 bits alone cost"):
        plan_module_bits(frame, budget_bpw=3.0)
    with pytest.raises(ConfigError, match="exactly one of"):
        plan_module_bits(frame)
    with pytest.raises(ConfigError, match="lacks shapes"):
        plan_module_bits(frame.drop(columns=["shapes"]), budget_bpw=5.0)
    with pytest.raises(ConfigError, match="out of range"):
        plan_module_bits(frame, choices=(4, 9), budget_bpw=5.0)


def test_gptq_module_bits_are_checked_and_labelled():
    from workbench.techniques.gptq import GPTQConfig, check_gptq

    config = GPTQConfig(bits=4, module_bits=[["*.v_proj", 8], ["model.layers.0.*", 5]])  # as stored in JSON
    assert config.module_bits == (("*.v_proj", 8), ("model.layers.0.*", 5))
    assert config.bits_for("model.layers.0.self_attn.v_proj") == 8
    assert config.bits_for("model.layers.0.mlp.up_proj") == 5
    assert config.bits_for("model.layers.1.mlp.up_proj") == 4
    assert "map 5b:1 8b:1 #" in config.label()
    other = GPTQConfig(bits=4, module_bits=[["*.v_proj", 8], ["model.layers.1.*", 5]])
    assert other.label() != config.label()
    with pytest.raises(ConfigError, match="out of range"):
        GPTQConfig(module_bits=(("*.v_proj", 9),))
    with pytest.raises(ConfigError, match="not a .pattern, bits. pair"):
        GPTQConfig(module_bits=("*.v_proj",))
    loaded = load_model("tiny-llama")
    with pytest.raises(ConfigError, match="matches no decoder linear"):
        check_gptq(loaded.model, GPTQConfig(module_bits=(("*.vproj", 8),)))
