"""Grid detection, per-layer sensitivity and mixed precision built from it."""

from __future__ import annotations

import copy

import pytest
import torch

from workbench.errors import ConfigError
from workbench.quant_analysis import detect_grid, layer_sensitivity
from workbench.techniques import apply_, config_from_dict, config_to_dict, make_config
from workbench.techniques._quant import packed_bytes
from workbench.techniques.mixed import mixed_from_sensitivity


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models gain nothing from threads, and on a busy machine two threads waiting on each other make
    each small op many times slower; the previous setting is restored after the module."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_random_weights_are_not_on_a_grid(tiny_llama):
    assert detect_grid(tiny_llama) is None


@pytest.mark.parametrize(("bits", "group", "symmetric"), [(4, 32, False), (3, 64, True), (8, 32, False)])
def test_a_model_pushed_onto_a_grid_is_detected(tiny_llama, bits, group, symmetric):
    gridded = apply_(copy.deepcopy(tiny_llama), make_config("rtn", bits=bits, group_size=group, symmetric=symmetric))
    report = detect_grid(gridded)
    assert report is not None and report.bits <= bits
    assert report.bits == bits and report.group_size >= group
    assert f"{bits}-bit grid" in report.message and "says nothing about the method" in report.message


@pytest.fixture(scope="module")
def ids():
    torch.manual_seed(1)
    return torch.randint(0, 256, (2, 96))


def test_sensitivity_scans_each_part_and_restores_the_weights(tiny_llama, ids):
    before = {k: v.clone() for k, v in tiny_llama.state_dict().items()}
    by_type = layer_sensitivity(tiny_llama, ids, by="type")
    by_layer = layer_sensitivity(tiny_llama, ids, by="layer")
    assert list(by_type["name"]) == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    assert list(by_layer["name"]) == ["layer 0", "layer 1"]
    assert (by_type["kl_mean"] > 0).all() and (by_layer["kl_mean"] > 0).all()
    assert by_layer["n_params"].sum() == by_type["n_params"].sum()
    assert all(torch.equal(before[k], v) for k, v in tiny_llama.state_dict().items())


def test_mixed_precision_keeps_the_most_sensitive_parts_at_high_bits(tiny_llama, ids):
    frame = layer_sensitivity(tiny_llama, ids, by="type")
    config = mixed_from_sensitivity(frame, 3, high_bits=8, top_n=1)
    worst = frame.sort_values("kl_mean").iloc[-1]["name"]
    assert all(p.endswith(worst) for p in config.high_precision)
    q = apply_(copy.deepcopy(tiny_llama), config)
    for name, module in q.named_modules():
        if hasattr(module, "wb_quant") and ".layers." in name:
            expected = 8 if name.endswith(worst) else 3
            assert module.wb_quant["bits"] == expected, name
            assert module.wb_storage_bytes == packed_bytes(tuple(module.weight.shape), expected, 32, False)
    assert config_from_dict(config_to_dict(config)) == config


def test_mixed_pattern_that_matches_nothing_is_refused(tiny_llama):
    with pytest.raises(ConfigError, match="matches no decoder linear"):
        apply_(copy.deepcopy(tiny_llama), make_config("mixed", high_precision=("*.nope",)))
