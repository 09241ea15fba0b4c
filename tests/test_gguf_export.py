"""GGUF export and the llama.cpp runtime: bit-exact files, llama.cpp's logits, runtime runs with their parent.

The llama.cpp tests need llama-cpp-python, which `make test` installs; without it they fail (set
WORKBENCH_SKIP_LLAMA=1 to skip them on purpose).
"""

from __future__ import annotations

import copy
import os

import pytest
import torch

from workbench.errors import ConfigError
from workbench.models import load_model
from workbench.runtimes import SIMULATED, runtime_of
from workbench.runtimes.codes import recover_codes
from workbench.runtimes.gguf import NoExactType, expected_weights, export_gguf, read_gguf_weights
from workbench.techniques._quant import fake_quantize_
from workbench.techniques.base import ApplyContext, apply_, apply_pipeline_
from workbench.techniques.gptq import GPTQConfig
from workbench.techniques.rtn import RTNConfig


def _need_llama_cpp() -> None:
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        if os.environ.get("WORKBENCH_SKIP_LLAMA") == "1":
            pytest.skip("WORKBENCH_SKIP_LLAMA=1: llama.cpp tests skipped on request")
        pytest.fail(
            "llama-cpp-python is not installed (make setup installs it); WORKBENCH_SKIP_LLAMA=1 skips"
        )


def _variant(source: str, config=None):
    loaded = load_model(source)
    model = copy.deepcopy(loaded.model)
    if config is not None:
        ctx = ApplyContext(tokenizer=loaded.tokenizer, model_spec=loaded.spec)
        if getattr(config, "technique", "") == "gptq":
            from workbench.corpus import get_corpus

            ctx.corpus = get_corpus("python-docs")
        model = apply_(model, config, ctx)
    return loaded, model


def _round_trip(loaded, model, path):
    report = export_gguf(model, path, tokenizer=loaded.tokenizer, spec=loaded.spec)
    got = read_gguf_weights(report.path, config=model.config)
    want = expected_weights(model)
    assert set(got) == set(want)
    for name, w in want.items():
        assert torch.equal(got[name], w.reshape(got[name].shape)), name
    return report


@pytest.mark.parametrize("source", ["tiny-llama", "tiny-moe"])
@pytest.mark.parametrize(
    ("config", "qtype"),
    [
        (RTNConfig(bits=4, group_size=32, symmetric=True), "Q4_0"),
        (RTNConfig(bits=4, group_size=32), "Q4_1"),
        (RTNConfig(bits=8, group_size=32, symmetric=True), "Q8_0"),
        (RTNConfig(bits=5, group_size=32, symmetric=True), "Q5_0"),
        (RTNConfig(bits=5, group_size=32), "Q5_1"),
    ],
)
def test_quantized_round_trip_is_bit_exact(tmp_path, source, config, qtype):
    loaded, model = _variant(source, config)
    report = _round_trip(loaded, model, tmp_path / "m.gguf")
    counts = report.type_counts()
    assert counts.get(qtype, 0) >= 2 * 7 - 2, counts  # every decoder linear (and the experts) in that type
    if source == "tiny-moe":
        assert any(name.endswith("ffn_gate_exps.weight") for name in report.types)
        assert report.types["blk.0.ffn_down_exps.weight"] == qtype


def test_f16_export_is_exact_and_keeps_f32_where_f16_would_round(tmp_path):
    loaded, model = _variant("tiny-llama")
    layer = model.model.layers[0].mlp.up_proj
    layer.weight.data = layer.weight.data.half().float()  # exactly representable: written as F16
    report = export_gguf(
        model, tmp_path / "m.gguf", tokenizer=loaded.tokenizer, float_type="F16", detect=False
    )
    assert report.types["blk.0.ffn_up.weight"] == "F16"
    assert report.types["blk.0.ffn_down.weight"] == "F32"  # random fp32 values would round in F16
    got = read_gguf_weights(report.path, config=model.config)
    want = expected_weights(model)
    assert all(torch.equal(got[k], want[k].reshape(got[k].shape)) for k in want)


def test_gptq_codes_recovered_without_assuming_extreme_codes(tmp_path):
    loaded, model = _variant("tiny-llama", GPTQConfig(bits=4, group_size=32, symmetric=True))
    report = _round_trip(loaded, model, tmp_path / "gptq.gguf")
    assert report.type_counts()["Q4_0"] == 14


def test_gptq_per_module_map_exports_each_tensor_in_its_own_type(tmp_path):
    config = GPTQConfig(
        bits=4,
        group_size=32,
        symmetric=True,
        module_bits=(("*.v_proj", 8), ("model.layers.1.*", 5)),  # first match wins: layer 1's v stays 8
    )
    loaded, model = _variant("tiny-llama", config)
    assert model.model.layers[1].self_attn.v_proj.wb_quant["bits"] == 8
    assert model.model.layers[1].mlp.up_proj.wb_quant["bits"] == 5
    assert model.model.layers[0].mlp.up_proj.wb_quant["bits"] == 4
    report = _round_trip(loaded, model, tmp_path / "map.gguf")
    assert report.types["blk.0.attn_v.weight"] == "Q8_0"
    assert report.types["blk.1.attn_v.weight"] == "Q8_0"
    assert report.types["blk.1.ffn_down.weight"] == "Q5_0"
    assert report.types["blk.0.ffn_down.weight"] == "Q4_0"


def test_a_variant_with_no_gguf_type_names_the_closest(tmp_path):
    loaded, model = _variant("tiny-llama", RTNConfig(bits=3, group_size=32))
    with pytest.raises(NoExactType) as err:
        export_gguf(model, tmp_path / "m.gguf", tokenizer=loaded.tokenizer)
    assert err.value.closest == "Q4_1"
    assert "closest is Q4_1" in str(err.value) and "quant='Q4_1'" in str(err.value)
    loaded, model = _variant("tiny-llama", RTNConfig(bits=4, group_size=64, symmetric=True))
    with pytest.raises(NoExactType, match="GGUF blocks hold 32 weights"):
        export_gguf(model, tmp_path / "m.gguf", tokenizer=loaded.tokenizer)
    assert not (tmp_path / "m.gguf").exists() and not list(tmp_path.glob(".*part"))


def test_codes_round_trip_every_form():
    torch.manual_seed(0)
    for form, sym, zp in (
        ("symmetric", True, "float"),
        ("float_min", False, "float"),
        ("int_zero", False, "int"),
    ):
        for bits in (3, 4, 8):
            w = fake_quantize_(torch.randn(64, 128) * 0.05, bits, 32, sym, zp)
            codes = recover_codes(w, bits, 32, form)
            assert codes is not None and torch.equal(codes.dequantize(), w), (form, bits)
    assert recover_codes(torch.randn(64, 128), 4, 32, "symmetric") is None


def test_unquantized_weights_on_a_grid_are_detected(tmp_path):
    loaded, model = _variant("tiny-llama")
    fake_quantize_(
        model.model.layers[1].self_attn.o_proj.weight.data, 4, 32, False
    )  # on a Q4_1 grid, unmarked
    report = export_gguf(model, tmp_path / "m.gguf", tokenizer=loaded.tokenizer)
    assert report.types["blk.1.attn_output.weight"] == "Q4_1"
    assert report.types["blk.0.attn_output.weight"] == "F32"


# ---- llama.cpp -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("source", ["tiny-llama", "tiny-moe"])
def test_llama_cpp_logits_equal_the_workbench(source):
    _need_llama_cpp()
    from workbench.runtimes.llamacpp import LlamaCppConfig, LlamaCppModule

    loaded = load_model(source)
    ids = torch.randint(0, 256, (2, 48), generator=torch.Generator().manual_seed(0))
    for steps in ([LlamaCppConfig()], [RTNConfig(bits=4, group_size=32, symmetric=True), LlamaCppConfig()]):
        ctx = ApplyContext(tokenizer=loaded.tokenizer, model_spec=loaded.spec)
        simulated = (
            apply_pipeline_(copy.deepcopy(loaded.model), steps[:-1], ApplyContext())
            if steps[:-1]
            else loaded.model
        )
        runtime = apply_pipeline_(copy.deepcopy(loaded.model), steps, ctx)
        assert isinstance(runtime, LlamaCppModule)
        with torch.inference_mode():
            want = simulated(input_ids=ids).logits
        got = runtime(input_ids=ids).logits
        # F32: float rounding only; Q4_0: llama.cpp also rounds activations to 8 bits for its dot products.
        tol = 1e-3 if len(steps) == 1 else 2e-2
        assert (got - want).abs().max() < tol * want.abs().max(), (source, steps)
        runtime.close()


def test_runtime_run_is_recorded_with_its_parent(tmp_path):
    _need_llama_cpp()
    from workbench.experiment import run_experiment
    from workbench.registry import Registry
    from workbench.runtimes.llamacpp import LlamaCppConfig

    rtn = RTNConfig(bits=4, group_size=32, symmetric=True)
    with Registry.open(f"sqlite:///{tmp_path / 'runs.db'}") as reg:
        simulated = run_experiment("tiny-llama", [rtn], "quick", registry=reg)
        deployed = run_experiment("tiny-llama", [rtn, LlamaCppConfig()], "quick", registry=reg)
        assert deployed.ok, deployed.error
        assert deployed.parent_id == simulated.run_id
        assert runtime_of([rtn, LlamaCppConfig()]) == "llama.cpp" and runtime_of([rtn]) == SIMULATED
        m = deployed.metrics
        # The size is the file's: Q4_0 linears (4.5 bits) and F32 embeddings/norms.
        assert m["bits_per_weight_linear"] == pytest.approx(4.5)
        assert m["size_bytes"] < simulated.metrics["size_bytes"] * 1.01
        assert abs(m["ppl"] / simulated.metrics["ppl"] - 1) < 0.01
        assert m["decode_tok_s"] > 0 and m["prefill_tok_s"] > 0
        assert deployed.extras["gguf"]["types"]["Q4_0"] == 14
        # llama.cpp's own quantizer as a technique on the float model.
        k = run_experiment("tiny-llama", [LlamaCppConfig(quant="Q8_0")], "quick", registry=reg)
        assert k.ok, k.error
        assert k.metrics["kl_mean"] < 0.01 and k.metrics["bits_per_weight_linear"] == pytest.approx(8.5)


def test_runtime_step_must_be_last_and_checks_its_settings():
    _need_llama_cpp()
    from workbench.runtimes.llamacpp import LlamaCppConfig
    from workbench.techniques.base import check_pipeline

    model = load_model("tiny-llama").model
    with pytest.raises(ConfigError, match="must be the last step"):
        check_pipeline(model, [LlamaCppConfig(), RTNConfig()])
    with pytest.raises(ConfigError, match="not a type this llama.cpp build writes"):
        check_pipeline(model, [LlamaCppConfig(quant="Q4_X")])


@pytest.mark.slow
def test_demo_export_keeps_its_types_and_tokenizes_like_the_workbench(tmp_path):
    """The demo came from a Q4_1 file: its baseline export is that file's types again, bit for bit, and
    llama.cpp tokenizes digits and whitespace exactly as the workbench (the transformers tokenizer of this
    GGUF lacks the digit split; the workbench restores it)."""
    _need_llama_cpp()
    from llama_cpp import Llama

    loaded = load_model("demo")
    report = export_gguf(loaded.model, tmp_path / "demo.gguf", tokenizer=loaded.tokenizer, spec=loaded.spec)
    counts = report.type_counts()
    assert counts["Q4_1"] == 210 and counts["Q8_0"] == 1, counts  # 7 linears x 30 layers; tied token_embd
    got = read_gguf_weights(report.path, config=loaded.model.config)
    want = expected_weights(loaded.model)
    assert all(torch.equal(got[k], want[k].reshape(got[k].shape)) for k in want)
    llm = Llama(model_path=str(report.path), vocab_only=True, verbose=False)
    for text in ["In 1999, 12345 people", "x = 3.14159\n\n    y  =  42", "  \t 2024-12-01 ", "a1b22c333"]:
        ours = loaded.tokenizer(text, add_special_tokens=False)["input_ids"]
        theirs = llm.tokenize(text.encode(), add_bos=False, special=False)
        assert ours == theirs, text


def test_cli_exports_a_recorded_run_as_gguf_with_its_card(tmp_path, capsys):
    from workbench.cli import main
    from workbench.experiment import run_experiment
    from workbench.registry import Registry

    url = f"sqlite:///{tmp_path / 'runs.db'}"
    rtn = RTNConfig(bits=4, group_size=32, symmetric=True)
    with Registry.open(url) as reg:
        run = run_experiment("tiny-llama", [rtn], "quick", registry=reg)
    out = tmp_path / "export"
    rc = main(
        [
            "export",
            str(run.run_id),
            "--format",
            "gguf",
            "--out",
            str(out),
            "--model",
            "tiny-llama",
            "--registry",
            url,
        ]
    )
    assert rc == 0
    printed = capsys.readouterr().out
    assert "model.gguf" in printed and "README.md" in printed
    card = (out / "README.md").read_text()
    assert "gguf" in card.lower() and "Q4_0" in card
    _, model = _variant("tiny-llama", rtn)
    got = read_gguf_weights(out / "model.gguf", config=model.config)
    want = expected_weights(model)
    assert all(torch.equal(got[k], want[k].reshape(got[k].shape)) for k in want)


def test_builtin_runtime_names_match_the_registered_runtime_steps():
    from workbench.runtimes import BUILTIN_RUNTIMES
    from workbench.techniques.base import get_technique, technique_names

    registered = {name: get_technique(name).config_cls.RUNTIME for name in technique_names(kind="deploy")}
    assert registered == BUILTIN_RUNTIMES


def test_a_killed_runtime_steps_files_are_removed_by_the_next_one():
    _need_llama_cpp()
    import subprocess
    import sys

    from workbench.models.demo import demo_home
    from workbench.runtimes.llamacpp import LlamaCppConfig

    root = demo_home() / "runtime"
    root.mkdir(parents=True, exist_ok=True)
    made = subprocess.run(
        [
            sys.executable,
            "-c",
            f"from workbench.tempdirs import owned_tempdir; print(owned_tempdir({str(root)!r}, 'llama-cpp-'))",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    leftover = root / made.rsplit("/", 1)[-1]
    (leftover / "model.gguf").write_bytes(b"GGUF" + bytes(64))  # what a killed step leaves behind
    loaded = load_model("tiny-llama")
    module = apply_(copy.deepcopy(loaded.model), LlamaCppConfig(), ApplyContext(tokenizer=loaded.tokenizer))
    assert not leftover.exists()
    assert module.path.is_file()
    module.close()
