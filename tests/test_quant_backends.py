"""Back ends with real packed storage (bitsandbytes, optimum-quanto) on the CPU, on tiny models.

Every case of the matrix checks that the layers really are the back end's own modules holding packed codes, that
``wb_storage_bytes`` is the sum of the real tensors and matches the counting rule the technique documents, and
that the logits stay close to the base model's.
"""

from __future__ import annotations

import builtins
import copy
import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from workbench.errors import ConfigError
from workbench.techniques import apply_, check, config_from_dict, config_to_dict, make_config
from workbench.techniques._quant import decoder_linears

pytest.importorskip("bitsandbytes")
pytest.importorskip("optimum.quanto")


def _kl(model: nn.Module, base: nn.Module, ids: torch.Tensor) -> float:
    """Mean KL(base || model) over positions, as the evaluation reports it."""
    with torch.no_grad():
        p = torch.log_softmax(base(ids).logits.float(), -1)
        q = torch.log_softmax(model(ids).logits.float(), -1)
    return float((p.exp() * (p - q)).sum(-1).mean())


def _real_bytes(module: nn.Module) -> int:
    """Bytes of the tensors that hold a quantized weight, read independently of the technique's own helper."""
    w = module.weight
    state = getattr(w, "quant_state", None)
    if state is not None:  # bitsandbytes Params4bit
        parts = [w.data, state.absmax]
        if state.nested:
            parts += [state.state2.absmax, state.offset]
        return sum(t.numel() * t.element_size() for t in parts)
    if w.dtype == torch.int8 and hasattr(module, "state"):  # bitsandbytes Int8Params + row scales
        scb = w.SCB if w.SCB is not None else module.state.SCB  # moved to the state on the first forward
        return w.numel() + scb.numel() * scb.element_size()
    data = w.data
    parts = [
        getattr(data, n) for n in data.__tensor_flatten__()[0]
    ]  # quanto: _data (maybe packed), _scale, ...
    flat = []
    for t in parts:
        flat += [getattr(t, n) for n in t.__tensor_flatten__()[0]] if type(t) is not torch.Tensor else [t]
    return sum(t.numel() * t.element_size() for t in flat)


def _expected_bytes(out: int, inp: int, backend: str, params: dict) -> int:
    """The documented counting rule for each case (fp32 model: quanto's scales are fp32 too)."""
    n = out * inp
    if backend == "bnb":
        if params["mode"] == "int8":
            return n + 4 * out
        blocks = n // 64
        if params.get("double_quant"):
            return n // 2 + blocks + 4 * math.ceil(blocks / 256) + 4
        return n // 2 + 4 * blocks
    bits = int(params["weights"][3:])
    if bits == 8:
        return n + 4 * out
    group = params.get("group_size") or (min(inp, 128))
    groups = n // group
    return n * bits // 8 + 2 * 4 * groups  # a scale and a shift per group


@pytest.fixture(scope="module")
def ids() -> torch.Tensor:
    torch.manual_seed(0)
    return torch.randint(0, 256, (1, 96))


# (backend, params, module class name, stored code dtype, KL ceiling on the tiny model)
CASES = [
    ("bnb", {"mode": "int8"}, "Linear8bitLt", torch.int8, 1e-4),
    ("bnb", {"mode": "nf4"}, "Linear4bit", torch.uint8, 2e-3),
    ("bnb", {"mode": "fp4"}, "Linear4bit", torch.uint8, 2e-3),
    ("bnb", {"mode": "nf4", "double_quant": True}, "Linear4bit", torch.uint8, 2e-3),
    ("quanto", {"weights": "int8"}, "QLinear", torch.int8, 1e-4),
    ("quanto", {"weights": "int4"}, "QLinear", torch.uint8, 2e-3),
    ("quanto", {"weights": "int4", "group_size": 32}, "QLinear", torch.uint8, 2e-3),
    ("quanto", {"weights": "int2"}, "QLinear", torch.uint8, 3e-2),
]


@pytest.mark.parametrize(
    ("backend", "params", "cls", "code_dtype", "kl_ceiling"),
    CASES,
    ids=[f"{c[0]}-{'-'.join(map(str, c[1].values()))}" for c in CASES],
)
def test_backend_stores_packed_codes_and_stays_close_to_base(
    tiny_llama, ids, backend, params, cls, code_dtype, kl_ceiling
):
    from workbench.models import size_report

    config = make_config(backend, **params)
    q = apply_(copy.deepcopy(tiny_llama), config)
    linears = (
        list(decoder_linears(q))
        if backend == "quanto"
        else [(n, m) for n, m in q.named_modules() if ".layers." in n and type(m).__name__ == cls]
    )
    assert len(linears) == 14, [n for n, _ in linears]  # 2 layers x (q, k, v, o, gate, up, down)
    total = 0
    for name, lin in linears:
        assert type(lin).__name__ == cls, name
        assert type(lin).__module__.split(".")[0] in ("bitsandbytes", "optimum"), type(lin).__module__
        out, inp = lin.out_features, lin.in_features
        codes = lin.weight.data if backend == "bnb" else lin.weight._data
        codes = (
            codes if type(codes) is torch.Tensor else codes._data
        )  # quanto packs int4/int2 in a PackedTensor
        assert codes.dtype == code_dtype, name
        assert codes.numel() * codes.element_size() == out * inp * config.bits // 8, name  # really packed
        assert lin.wb_storage_bytes == _real_bytes(lin), name
        assert lin.wb_storage_bytes == _expected_bytes(out, inp, backend, params), name
        total += lin.wb_storage_bytes
    assert type(q.lm_head) is nn.Linear  # the output head stays in full precision, as transformers keeps it
    rep = size_report(q)
    assert rep.linear_bytes == total
    fp32 = size_report(tiny_llama).linear_bytes
    assert total < fp32 * (config.bits / 32) * 1.6, (total, fp32)
    kl = _kl(q, tiny_llama, ids)
    assert kl < kl_ceiling, f"KL {kl:.2e} too high for {config}"


def test_bnb_returns_a_new_model_and_leaves_the_input_as_it_was(tiny_llama):
    model = copy.deepcopy(tiny_llama)
    q = apply_(model, make_config("bnb", mode="nf4"))
    assert q is not model
    assert type(model.model.layers[0].mlp.down_proj) is nn.Linear
    assert getattr(model.config, "quantization_config", None) is None
    assert q.get_memory_footprint() < 0.5 * tiny_llama.get_memory_footprint()


def test_bnb_quality_orders_int8_before_the_4_bit_modes(tiny_llama, ids):
    kl = {
        m: _kl(apply_(copy.deepcopy(tiny_llama), make_config("bnb", mode=m)), tiny_llama, ids)
        for m in ("int8", "nf4", "fp4")
    }
    assert kl["int8"] < kl["nf4"] / 10 and kl["int8"] < kl["fp4"] / 10, kl
    assert 1 / 4 < kl["nf4"] / kl["fp4"] < 4, kl  # the two 4-bit grids are of the same quality


def test_quanto_quality_orders_with_bits(tiny_llama, ids):
    kl = [
        _kl(apply_(copy.deepcopy(tiny_llama), make_config("quanto", weights=w)), tiny_llama, ids)
        for w in ("int8", "int4", "int2")
    ]
    assert kl[0] < kl[1] < kl[2], kl


def test_int8_threshold_keeps_outlier_features_in_higher_precision(tiny_llama, ids):
    model = copy.deepcopy(tiny_llama)
    with torch.no_grad():
        for layer in model.model.layers:  # a few large hidden features, the case LLM.int8 was made for
            layer.post_attention_layernorm.weight[:4] = 20.0
    kl = {
        th: _kl(apply_(copy.deepcopy(model), make_config("bnb", mode="int8", int8_threshold=th)), model, ids)
        for th in (0.0, 6.0)
    }
    assert kl[6.0] < kl[0.0], kl


def test_bnb_compute_dtype_sets_the_dtype_of_the_matmuls(tiny_llama, ids):
    q = apply_(copy.deepcopy(tiny_llama), make_config("bnb", mode="nf4", compute_dtype="bfloat16"))
    assert q.model.embed_tokens.weight.dtype == torch.bfloat16
    lin = q.model.layers[0].mlp.down_proj
    assert lin.compute_dtype == torch.bfloat16
    assert _kl(q, tiny_llama, ids) < 5e-3


def test_int8_on_the_cpu_prints_no_per_layer_noise(tiny_llama, ids, capfd):
    q = apply_(copy.deepcopy(tiny_llama), make_config("bnb", mode="int8"))
    with torch.no_grad():
        q(ids)
        q(ids)
    err = capfd.readouterr().err
    assert "cast" not in err and "kernels" not in err, err


@pytest.mark.parametrize(
    ("name", "params", "needle"),
    [
        ("bnb", {"mode": "int3"}, "mode='int3' is unknown"),
        ("bnb", {"mode": "int8", "double_quant": True}, "double_quant"),
        ("bnb", {"compute_dtype": "float64"}, "compute_dtype"),
        ("bnb", {"mode": "int8", "int8_threshold": -1.0}, "int8_threshold"),
        ("bnb", {"mode": "nf4", "int8_threshold": 3.0}, "int8_threshold applies to mode='int8'"),
        ("quanto", {"weights": "int3"}, "int8, int4, int2"),
        ("quanto", {"weights": "int4", "group_size": 0}, "group_size"),
        ("quanto", {"weights": "int8", "group_size": 64}, "int8"),
    ],
)
def test_bad_backend_parameters_are_refused(name, params, needle):
    with pytest.raises(ConfigError, match=needle):
        make_config(name, **params)


def test_quanto_group_size_that_does_not_divide_a_layer_is_named(tiny_llama):
    with pytest.raises(ConfigError, match=r"group_size=48 does not divide in_features=64 of 'model.layers.0"):
        check(tiny_llama, make_config("quanto", weights="int4", group_size=48))


@pytest.mark.parametrize(("module", "name"), [("bitsandbytes", "bnb"), ("optimum.quanto", "quanto")])
def test_missing_backend_gives_an_install_hint_before_any_work(monkeypatch, tiny_llama, module, name):
    real_import = builtins.__import__

    def without(mod, *args, **kwargs):
        if mod == module or mod.startswith(module + "."):
            raise ImportError(mod)
        return real_import(mod, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", without)
    model = copy.deepcopy(tiny_llama)
    with pytest.raises(ConfigError, match=r"pip install 'efficiency-workbench\[quant\]'"):
        apply_(model, make_config(name))
    assert type(model.model.layers[0].mlp.down_proj) is nn.Linear


@pytest.mark.parametrize("name", ["bnb", "quanto"])
def test_a_device_without_kernels_is_refused(name):
    from workbench.tiny import tiny_llama

    with torch.device("meta"):
        model = tiny_llama()
    with pytest.raises(ConfigError, match="'meta'"):
        check(model, make_config(name))


def test_quanto_refuses_a_model_it_already_quantized(tiny_llama):
    q = apply_(copy.deepcopy(tiny_llama), make_config("quanto", weights="int8"))
    with pytest.raises(ConfigError, match="already quantized"):
        check(q, make_config("quanto", weights="int4"))


def _fake_model(device: str, hf_device_map: dict | None = None) -> SimpleNamespace:
    param = SimpleNamespace(device=torch.device(device))
    return SimpleNamespace(parameters=lambda: iter([param]), hf_device_map=hf_device_map)


@pytest.mark.parametrize(
    ("device", "spread", "expected"),
    [
        ("cpu", None, "cpu"),
        ("cuda:0", None, {"": "cuda:0"}),
        ("cuda:1", {"": 1}, {"": "cuda:1"}),
        ("cuda:0", {"model.layers.0": 0, "model.layers.1": 1}, "auto"),
    ],
)
def test_quantized_model_goes_where_the_model_lives(device, spread, expected):
    from workbench.techniques.bnb import device_map_for

    assert device_map_for(_fake_model(device, spread)) == expected


@pytest.mark.parametrize(
    ("name", "params"),
    [
        ("bnb", {"mode": "fp4", "double_quant": True, "compute_dtype": "bfloat16"}),
        ("bnb", {"mode": "int8", "int8_threshold": 4.0}),
        ("quanto", {"weights": "int2", "group_size": 32}),
        ("quanto", {"weights": "int4"}),
    ],
)
def test_backend_configs_round_trip(name, params):
    config = make_config(name, **params)
    assert config_from_dict(config_to_dict(config)) == config


@pytest.mark.parametrize(
    "params",
    [{"weights": "int4"}, {"weights": "int2"}, {"weights": "int8"}],
    ids=["quanto-int4", "quanto-int2", "quanto-int8"],
)
def test_packed_quanto_models_evaluate_through_run_experiment(params, tmp_path):
    # quanto's 4/2-bit weights are tensor subclasses whose matmul makes views: under torch.inference_mode that
    # failed with "Cannot set version_counter for inference tensor"; evaluation must pick no_grad for them.
    from workbench.experiment import run_experiment

    res = run_experiment(
        "tiny-llama", [make_config("quanto", **params)], registry=f"sqlite:///{tmp_path / 'r.db'}"
    )
    assert res.status == "done", res.error
    assert res.metrics["kl_mean"] >= 0 and res.metrics["decode_tok_s"] > 0 and res.generations
