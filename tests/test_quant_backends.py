"""Back ends with real packed storage (bitsandbytes, optimum-quanto) on the CPU, on tiny models."""

from __future__ import annotations

import copy

import pytest
import torch

from workbench.errors import ConfigError
from workbench.techniques import apply_, config_from_dict, config_to_dict, make_config


def _kl(model, base, ids) -> float:
    with torch.no_grad():
        p = torch.log_softmax(base(ids).logits.float(), -1)
        q = torch.log_softmax(model(ids).logits.float(), -1)
    return float((p.exp() * (p - q)).sum(-1).mean())


@pytest.fixture(scope="module")
def ids():
    torch.manual_seed(0)
    return torch.randint(0, 256, (1, 96))


@pytest.mark.parametrize(
    ("params", "module_type", "bytes_per_weight"),
    [
        ({"mode": "int8"}, "Linear8bitLt", 1.0),
        ({"mode": "nf4"}, "Linear4bit", 0.5),
        ({"mode": "fp4"}, "Linear4bit", 0.5),
        ({"mode": "nf4", "double_quant": True}, "Linear4bit", 0.5),
    ],
)
def test_bnb_modes_store_packed_weights(tiny_llama, ids, params, module_type, bytes_per_weight):
    q = apply_(copy.deepcopy(tiny_llama), make_config("bnb", **params))
    lin = q.model.layers[0].mlp.down_proj
    assert type(lin).__name__ == module_type
    n = lin.in_features * lin.out_features
    stored = lin.weight.data
    assert stored.numel() * stored.element_size() == int(n * bytes_per_weight)
    assert n * bytes_per_weight < lin.wb_storage_bytes < n * bytes_per_weight * 1.2
    assert _kl(q, tiny_llama, ids) < 5e-3


def test_bnb_quality_orders_int8_before_4_bit(tiny_llama, ids):
    kl = {m: _kl(apply_(copy.deepcopy(tiny_llama), make_config("bnb", mode=m)), tiny_llama, ids)
          for m in ("int8", "nf4", "fp4")}
    assert kl["int8"] < kl["nf4"] and kl["int8"] < kl["fp4"], kl


def test_bnb_storage_counts_the_real_tensors(tiny_llama):
    q = apply_(copy.deepcopy(tiny_llama), make_config("bnb", mode="nf4"))
    lin = q.model.layers[1].self_attn.q_proj
    state = lin.weight.quant_state
    assert lin.wb_storage_bytes == lin.weight.data.numel() + state.absmax.numel() * state.absmax.element_size()


@pytest.mark.parametrize("weights", ["int8", "int4", "int2"])
def test_quanto_stores_packed_weights(tiny_llama, ids, weights):
    from workbench.techniques.quanto import tensor_bytes

    q = apply_(copy.deepcopy(tiny_llama), make_config("quanto", weights=weights))
    lin = q.model.layers[0].mlp.down_proj
    assert type(lin).__name__ == "QLinear"
    bits = {"int8": 8, "int4": 4, "int2": 2}[weights]
    n = lin.in_features * lin.out_features
    assert lin.wb_storage_bytes == tensor_bytes(lin.weight)
    assert n * bits / 8 <= lin.wb_storage_bytes < n * bits / 8 + 16 * lin.out_features
    assert _kl(q, tiny_llama, ids) < 0.05


def test_quanto_quality_orders_with_bits(tiny_llama, ids):
    kl = [_kl(apply_(copy.deepcopy(tiny_llama), make_config("quanto", weights=w)), tiny_llama, ids)
          for w in ("int8", "int4", "int2")]
    assert kl[0] < kl[1] < kl[2], kl


@pytest.mark.parametrize(
    ("name", "params", "needle"),
    [
        ("bnb", {"mode": "int3"}, "mode"),
        ("bnb", {"mode": "int8", "double_quant": True}, "double_quant"),
        ("bnb", {"compute_dtype": "float64"}, "compute_dtype"),
        ("quanto", {"weights": "int3"}, "int8, int4 or int2"),
    ],
)
def test_bad_backend_parameters_are_refused(name, params, needle):
    with pytest.raises(ConfigError, match=needle):
        make_config(name, **params)


def test_missing_backend_gives_an_install_hint(monkeypatch, tiny_llama):
    import builtins

    real_import = builtins.__import__

    def no_bnb(name, *args, **kwargs):
        if name == "bitsandbytes":
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_bnb)
    with pytest.raises(ConfigError, match=r"pip install 'efficiency-workbench\[quant\]'"):
        apply_(copy.deepcopy(tiny_llama), make_config("bnb"))


@pytest.mark.parametrize(("name", "params"), [("bnb", {"mode": "fp4", "double_quant": True}), ("quanto", {"weights": "int2"})])
def test_backend_configs_round_trip(name, params):
    config = make_config(name, **params)
    assert config_from_dict(config_to_dict(config)) == config


def test_quantized_model_goes_where_the_model_lives(tiny_llama):
    from workbench.techniques.bnb import _device_map

    assert _device_map(tiny_llama) == "cpu"
