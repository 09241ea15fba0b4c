"""The torch packed runtime (torchao int4 / int8 kernels) as the last step of a pipeline, on tiny models."""

from __future__ import annotations

import builtins
import copy
import io

import pytest
import torch
from _require import require
from torch import nn

from workbench.errors import ConfigError
from workbench.runtimes import runtime_of
from workbench.techniques import ApplyContext, apply_, check, config_from_dict, config_to_dict
from workbench.techniques._quant import decoder_linears
from workbench.techniques.rtn import RTNConfig

require("torchao")

from workbench.runtimes.torch_packed import TorchPackedConfig


def _inner(t: torch.Tensor) -> list[torch.Tensor]:
    """The plain tensors a (possibly subclassed) tensor holds, read without the workbench's own helper."""
    if type(t) is torch.Tensor or not hasattr(t, "__tensor_flatten__"):
        return [t]
    out = []
    for name in t.__tensor_flatten__()[0]:
        out += _inner(getattr(t, name))
    return out


def _stored_bytes(model: nn.Module) -> int:
    """Bytes of every tensor the state dict holds (tied tensors once), inner tensors of packed ones."""
    seen, total = set(), 0
    for t in model.state_dict(keep_vars=True).values():
        if id(t) in seen:  # a tied parameter appears under both names
            continue
        seen.add(id(t))
        data = t.data if isinstance(t, nn.Parameter) else t
        total += sum(p.numel() * p.element_size() for p in _inner(data))
    return total


def _variant(bits: int = 4, group_size: int = 32, **kw):
    from workbench.tiny import tiny_llama

    model = tiny_llama(**kw)
    apply_(model, RTNConfig(bits=bits, group_size=group_size))
    return model


def _int4_runs() -> str | None:
    """Why torchao's int4 CPU kernel cannot run here, or None when it can."""
    from workbench.runtimes.torch_packed import torchao_config

    lin = nn.Sequential(nn.Linear(64, 32, bias=False))
    try:
        from torchao.quantization import quantize_

        quantize_(lin, torchao_config(TorchPackedConfig(kind="int4")))
        lin(torch.randn(2, 64))
    except (RuntimeError, NotImplementedError, AssertionError) as err:
        return f"{type(err).__name__}: {err}"
    return None


def test_config_defaults_resolve_per_kind_and_round_trip():
    assert TorchPackedConfig(kind="int4").group_size == 32
    assert TorchPackedConfig(kind="int8").group_size == -1
    assert TorchPackedConfig(kind="int8") == TorchPackedConfig(kind="int8", group_size=-1)
    for cfg in (TorchPackedConfig(kind="int4", group_size=64, dtype="bfloat16"), TorchPackedConfig()):
        assert config_from_dict(config_to_dict(cfg)) == cfg
    assert TorchPackedConfig(kind="int4", dtype="bfloat16").label() == "torch int4 g32 bf16"
    assert runtime_of([RTNConfig(), TorchPackedConfig()]) == "torch packed"


@pytest.mark.parametrize(
    ("params", "needle"),
    [
        ({"kind": "int3"}, "kind='int3' is unknown"),
        ({"kind": "int4", "group_size": 96}, "group_size=96 is not one torchao's int4 kernel takes"),
        ({"kind": "int8_dynamic", "group_size": 32}, "int8_dynamic quantizes weights per output row"),
        ({"dtype": "float16"}, "dtype='float16' is unknown"),
    ],
)
def test_bad_settings_are_refused_with_the_value_and_the_fix(params, needle):
    with pytest.raises(ConfigError, match=needle):
        TorchPackedConfig(**params)


def test_a_group_size_that_does_not_divide_a_layer_is_named_before_any_work(tiny_llama):
    model = copy.deepcopy(tiny_llama)
    with pytest.raises(ConfigError, match=r"group_size=48 does not divide in_features=64 of 'model.layers.0"):
        apply_(model, TorchPackedConfig(kind="int8", group_size=48))
    assert all(type(lin.weight.data) is torch.Tensor for _, lin in decoder_linears(model))


def test_int4_refuses_output_rows_its_cpu_packing_cannot_take_before_any_work():
    from workbench.tiny import tiny_llama

    model = tiny_llama(hidden_size=40)  # q_proj: 40 output rows, not a multiple of 16
    with pytest.raises(
        ConfigError, match=r"multiples of 16; 'model.layers.0.self_attn.q_proj' has out_features=40"
    ):
        check(model, TorchPackedConfig(kind="int4"))


def test_missing_torchao_names_the_install_command(monkeypatch, tiny_llama):
    real_import = builtins.__import__

    def without(mod, *args, **kwargs):
        if mod == "torchao" or mod.startswith("torchao."):
            raise ImportError(mod)
        return real_import(mod, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", without)
    with pytest.raises(ConfigError, match=r"pip install torchao"):
        check(tiny_llama, TorchPackedConfig())


def test_an_already_packed_model_is_refused():
    model = apply_(_variant(), TorchPackedConfig(kind="int8"))
    with pytest.raises(ConfigError, match="already stored packed"):
        check(model, TorchPackedConfig(kind="int8"))


@pytest.mark.parametrize(
    "cfg",
    [TorchPackedConfig(kind="int8"), TorchPackedConfig(kind="int8_dynamic"), TorchPackedConfig(kind="int4")],
    ids=["int8", "int8_dynamic", "int4"],
)
def test_linears_hold_packed_tensors_whose_bytes_are_the_reported_size(cfg):
    if cfg.kind == "int4" and (why := _int4_runs()):
        pytest.skip(f"torchao's int4 CPU kernel does not run here: {why}")
    from workbench.models import size_report

    model = _variant(hidden_size=256)
    model = apply_(model, cfg)
    for name, lin in decoder_linears(model):
        assert type(lin.weight.data) is not torch.Tensor, name  # a torchao tensor subclass
        assert lin.wb_storage_bytes == sum(t.numel() * t.element_size() for t in _inner(lin.weight.data))
    codes = [t for _, lin in decoder_linears(model) for t in _inner(lin.weight.data)[:1]]
    assert {t.dtype for t in codes} == ({torch.uint8} if cfg.kind == "int4" else {torch.int8})
    report = size_report(model)
    assert report.n_bytes == _stored_bytes(model)
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    # What torch.save writes is the same bytes plus a few hundred bytes of pickle per tensor.
    assert report.n_bytes < buf.tell() < report.n_bytes * 1.05
    float_bytes = size_report(_variant(hidden_size=256)).n_params * 4
    assert report.n_bytes < 0.6 * float_bytes


def test_int4_at_the_variants_own_grid_reproduces_it_and_another_grid_is_measured_as_requantized():
    if why := _int4_runs():
        pytest.skip(f"torchao's int4 CPU kernel does not run here: {why}")
    ids = torch.randint(0, 256, (1, 48))
    same, other = _variant(), _variant()
    with torch.no_grad():
        simulated = same(ids).logits
    ctx = ApplyContext()
    same = apply_(same, TorchPackedConfig(kind="int4", group_size=32), ctx)
    # RTN 4-bit g32 with a float minimum puts each group's min and max on the end codes, as torchao's int4 does.
    assert ctx.metrics["packed_max_abs_diff"] == 0.0
    assert ctx.metrics["packed_exact_linears"] == ctx.metrics["packed_linears"] == 14
    with torch.no_grad():
        torch.testing.assert_close(same(ids).logits, simulated, rtol=1e-5, atol=1e-5)
    ctx = ApplyContext()
    apply_(other, TorchPackedConfig(kind="int4", group_size=64), ctx)
    assert ctx.metrics["packed_max_abs_diff"] > 0 and 0 < ctx.metrics["packed_rel_error"] < 0.5
    assert ctx.metrics["packed_exact_linears"] == 0


def test_int4_weights_unpacked_from_the_packed_tensors_are_what_the_kernel_computes():
    if why := _int4_runs():
        pytest.skip(f"torchao's int4 CPU kernel does not run here: {why}")
    from workbench.runtimes.torch_packed import _int4_weight, _probe_weight

    model = apply_(_variant(), TorchPackedConfig(kind="int4", group_size=64))
    shapes = set()
    for name, lin in decoder_linears(model):
        torch.testing.assert_close(
            _int4_weight(lin.weight.data), _probe_weight(lin), rtol=0, atol=1e-6, msg=name
        )
        shapes.add(tuple(lin.weight.shape))
    assert len(shapes) >= 4  # several (out, in) shapes: the learned layout is per shape


def test_bfloat16_casts_the_rest_of_the_model_and_keeps_generating():
    if why := _int4_runs():
        pytest.skip(f"torchao's int4 CPU kernel does not run here: {why}")
    model = apply_(_variant(), TorchPackedConfig(kind="int4", dtype="bfloat16"))
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16
    assert model.model.norm.weight.dtype == torch.bfloat16
    out = model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 7)


def test_simulated_sizes_of_tensors_left_float_are_dropped():
    from workbench.models import size_report
    from workbench.tiny import tiny_llama

    model = tiny_llama()
    apply_(model, RTNConfig(bits=4, group_size=32, include_embeddings=True))
    ctx = ApplyContext()
    model = apply_(model, TorchPackedConfig(kind="int8"), ctx)
    assert ctx.extras["torch_packed"]["float_here"] == ["model.embed_tokens", "lm_head"]
    assert size_report(model).n_bytes == _stored_bytes(model)  # the embedding counts its float bytes here


@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_a_packed_run_is_recorded_under_the_simulated_run(kind, registry_url):
    if kind == "int4" and (why := _int4_runs()):
        pytest.skip(f"torchao's int4 CPU kernel does not run here: {why}")
    from workbench.experiment import run_experiment
    from workbench.registry import Registry

    rtn = RTNConfig(bits=4, group_size=32)
    simulated = run_experiment("tiny-llama", [rtn], registry=registry_url)
    packed = run_experiment("tiny-llama", [rtn, TorchPackedConfig(kind=kind)], registry=registry_url)
    assert simulated.status == "done" and packed.status == "done", packed.error
    assert packed.parent_id == simulated.run_id
    with Registry.open(registry_url) as reg:
        run = reg.get_run(packed.run_id)
    assert run.parent_id == simulated.run_id
    assert [s["technique"] for s in run.extras["stages"]] == ["rtn", "torch_packed"]
    assert run.extras["torch_packed"]["simulated_bits"] == [4]
    m = packed.metrics
    # The size is that of the packed tensors: the int8 codes take more bytes than the simulated 4-bit format.
    assert m["packed_weight_bytes"] > 0 and m["size_bytes"] != simulated.metrics["size_bytes"]
    assert m["bits_per_weight_linear"] == pytest.approx(
        8 * m["packed_weight_bytes"] / _linear_params(), rel=1e-9
    )
    assert m["ppl"] == pytest.approx(simulated.metrics["ppl"], rel=0.01)
    if kind == "int4":  # the same grid: the packed kernel computes what the simulation computed
        assert m["packed_max_abs_diff"] == 0.0
        assert m["ppl"] == pytest.approx(simulated.metrics["ppl"], rel=1e-4)
    assert m["decode_tok_s"] > 0 and packed.generations


def _linear_params() -> int:
    from workbench.tiny import tiny_llama

    return sum(lin.weight.numel() for _, lin in decoder_linears(tiny_llama()))
