"""Hugging Face exports of variants (compressed-tensors pack-quantized, plain safetensors), the model card written
beside them, and `workbench export`, on tiny models."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from _require import require

from workbench.errors import ConfigError
from workbench.techniques import apply_
from workbench.techniques.mixed import MixedPrecisionConfig
from workbench.techniques.rtn import RTNConfig

compressed_tensors = require("compressed_tensors")

from workbench.runtimes.hf_export import (
    _pack_int32,
    export_compressed_tensors,
    export_safetensors,
)

IDS = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(1))


def _variant(*steps):
    from workbench.tiny import tiny_llama

    model = tiny_llama()
    for step in steps:
        model = apply_(model, step)
    return model


def _loaded(tokenizer) -> SimpleNamespace:
    return SimpleNamespace(tokenizer=tokenizer, fingerprint="tiny")


def _logits(model, ids=IDS):
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def _reload(folder, **kwargs):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(folder), **kwargs).eval()


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("dim", [0, 1])
def test_codes_are_packed_exactly_as_compressed_tensors_packs_them(bits, dim):
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    half = 2 ** (bits - 1)
    codes = torch.randint(-half, half, (40, 72), dtype=torch.int8)  # 72 columns: the last word is padded
    assert torch.equal(_pack_int32(codes, bits, dim), pack_to_int32(codes, bits, packed_dim=dim))


@pytest.mark.parametrize(
    "rtn",
    [
        RTNConfig(bits=4, group_size=32, symmetric=True),
        RTNConfig(bits=4, group_size=32, zero_point="int"),
        RTNConfig(bits=8, group_size=-1, zero_point="int"),
        RTNConfig(bits=8, group_size=64, symmetric=True),
    ],
    ids=["4b-g32-sym", "4b-g32-int-zero", "8b-channel-int-zero", "8b-g64-sym"],
)
def test_compressed_tensors_folder_reloads_through_transformers_with_the_simulated_logits(
    rtn, tmp_path, byte_tokenizer
):
    from transformers import CompressedTensorsConfig

    variant = _variant(rtn)
    info = export_compressed_tensors(_loaded(byte_tokenizer), variant, tmp_path / "ct")
    assert info.details["reload_check"] == "passed"
    assert info.details["packed_linears"] == 14
    config = json.loads((tmp_path / "ct" / "config.json").read_text())
    qc = config["quantization_config"]
    assert (qc["quant_method"], qc["format"]) == ("compressed-tensors", "pack-quantized")
    weights = qc["config_groups"]["group_0"]["weights"]
    assert weights["num_bits"] == rtn.bits and weights["symmetric"] == rtn.symmetric
    assert weights["strategy"] == ("channel" if rtn.group_size == -1 else "group")
    assert weights["group_size"] == (None if rtn.group_size == -1 else rtn.group_size)
    assert "lm_head" in qc["ignore"]
    # Transformers' default path refuses packed zero points (llm-compressor #1618): asymmetric folders load
    # with the weights unpacked on load.
    kwargs = {} if rtn.symmetric else {"quantization_config": CompressedTensorsConfig(dequantize=True)}
    reloaded = _reload(tmp_path / "ct", **kwargs)
    torch.testing.assert_close(_logits(reloaded), _logits(variant), rtol=0, atol=1e-5)
    assert (tmp_path / "ct" / "tokenizer.json").is_file()


def test_packed_tensors_decompress_with_compressed_tensors_to_the_variants_weights_bit_for_bit(
    tmp_path, byte_tokenizer
):
    from compressed_tensors.compressors.pack_quantized import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationConfig
    from safetensors.torch import load_file

    variant = _variant(RTNConfig(bits=4, group_size=32, zero_point="int"))
    export_compressed_tensors(_loaded(byte_tokenizer), variant, tmp_path / "ct", verify=False)
    qc = QuantizationConfig.model_validate(
        json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    )
    scheme = qc.config_groups["group_0"]
    tensors = load_file(str(tmp_path / "ct" / "model.safetensors"))
    name = "model.layers.1.mlp.down_proj"
    assert f"{name}.weight" not in tensors
    parts = {k.rsplit(".", 1)[1]: v for k, v in tensors.items() if k.startswith(name + ".")}
    assert parts["weight_packed"].dtype == torch.int32 and parts["weight_zero_point"].dtype == torch.int32
    assert parts["weight_packed"].shape == (64, 128 * 4 // 32)
    assert parts["weight_zero_point"].shape == (64 * 4 // 32, 128 // 32)  # packed along the output rows
    weight = PackedQuantizationCompressor.decompress(dict(parts), scheme)["weight"]
    assert torch.equal(weight, variant.get_submodule(name).weight.data)


def test_mixed_precision_writes_one_config_group_per_scheme(tmp_path, byte_tokenizer):
    variant = _variant(
        MixedPrecisionConfig(
            bits=4, high_bits=8, group_size=32, symmetric=True, high_precision=("*.down_proj",)
        )
    )
    info = export_compressed_tensors(_loaded(byte_tokenizer), variant, tmp_path / "ct")
    groups = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]["config_groups"]
    by_bits = {g["weights"]["num_bits"]: g["targets"] for g in groups.values()}
    assert by_bits[8] == [r"re:^model\.layers\.0\.mlp\.down_proj$", r"re:^model\.layers\.1\.mlp\.down_proj$"]
    assert len(by_bits[4]) == 12
    assert info.details["reload_check"] == "passed"
    torch.testing.assert_close(_logits(_reload(tmp_path / "ct")), _logits(variant), rtol=0, atol=1e-5)


def test_the_float_minimum_form_is_refused_with_the_closest_form_and_what_converting_moves(tmp_path):
    variant = _variant(RTNConfig(bits=4, group_size=32))  # zero_point="float": w = q·d + m
    with pytest.raises(ConfigError) as err:
        export_compressed_tensors(_loaded(None), variant, tmp_path / "ct")
    message = str(err.value)
    assert "float minimum" in message and "integer zero point (w = (q − z)·s)" in message
    assert "moving weights by up to" in message and "zero_point='int'" in message
    assert not (tmp_path / "ct").exists()  # refused before anything is written


@pytest.mark.parametrize(
    ("steps", "needle"),
    [
        ((RTNConfig(bits=3, group_size=32, symmetric=True),), "quantized at 3 bits"),
        ((), "no decoder linear of this variant is quantized"),
    ],
    ids=["3-bit", "float"],
)
def test_variants_without_a_pack_quantized_form_are_refused(steps, needle, tmp_path):
    with pytest.raises(ConfigError, match=needle):
        export_compressed_tensors(_loaded(None), _variant(*steps), tmp_path / "ct")


def test_fused_moe_experts_are_refused_by_compressed_tensors_and_kept_by_safetensors(
    tmp_path, byte_tokenizer
):
    from workbench.tiny import tiny_moe

    variant = apply_(tiny_moe(), RTNConfig(bits=4, group_size=32, symmetric=True))
    with pytest.raises(ConfigError, match=r"keeps its routed experts fused \('model.layers.0.mlp.experts"):
        export_compressed_tensors(_loaded(byte_tokenizer), variant, tmp_path / "ct")
    info = export_safetensors(variant, byte_tokenizer, tmp_path / "st")
    assert info.details["reload_check"] == "passed"
    assert torch.equal(_logits(_reload(tmp_path / "st")), _logits(variant))


def test_weights_off_their_recorded_grid_are_refused(tmp_path):
    variant = _variant(RTNConfig(bits=4, group_size=32, symmetric=True))
    with torch.no_grad():
        variant.model.layers[0].mlp.up_proj.weight[0, 0] += 1e-3  # no longer q · s
    with pytest.raises(ConfigError, match=r"'model.layers.0.mlp.up_proj' is recorded as 4-bit symmetric"):
        export_compressed_tensors(_loaded(None), variant, tmp_path / "ct")


def test_a_variant_packed_by_a_runtime_is_refused_by_both_exports(tmp_path, byte_tokenizer):
    require("torchao")
    from workbench.runtimes.torch_packed import TorchPackedConfig

    variant = _variant(RTNConfig(bits=4, group_size=32, symmetric=True), TorchPackedConfig(kind="int8"))
    with pytest.raises(ConfigError, match="stored packed by torch_packed"):
        export_compressed_tensors(_loaded(byte_tokenizer), variant, tmp_path / "ct")
    with pytest.raises(ConfigError, match="stored packed by torch_packed"):
        export_safetensors(variant, byte_tokenizer, tmp_path / "st")


def test_safetensors_folder_of_any_variant_reloads_with_identical_logits(tmp_path, byte_tokenizer):
    from transformers import AutoTokenizer

    variant = _variant(RTNConfig(bits=3, group_size=32))  # a form no packed format here takes
    info = export_safetensors(variant, byte_tokenizer, tmp_path / "st")
    assert info.details["reload_max_abs_logit_diff"] == 0.0
    assert torch.equal(_logits(_reload(tmp_path / "st")), _logits(variant))
    assert "stored dequantized" in info.notes[0]
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(info.files)
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "st"))
    assert tok("def f(x): return 1")["input_ids"] == byte_tokenizer("def f(x): return 1")["input_ids"]


def test_an_occupied_folder_is_refused(tmp_path, byte_tokenizer):
    (tmp_path / "st").mkdir()
    (tmp_path / "st" / "notes.txt").write_text("keep me")
    with pytest.raises(ConfigError, match="is not empty"):
        export_safetensors(_variant(), byte_tokenizer, tmp_path / "st")


# ---- the model card ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    """A symmetric RTN run on tiny-llama with a baseline, and (with torchao) its torch-packed measurement."""
    from workbench.experiment import run_experiment

    registry_url = f"sqlite:///{tmp_path_factory.mktemp('registry') / 'runs.db'}"
    rtn = RTNConfig(bits=4, group_size=32, symmetric=True)
    base = run_experiment("tiny-llama", [], registry=registry_url)
    sim = run_experiment("tiny-llama", [rtn], registry=registry_url)
    packed = None
    try:
        from workbench.runtimes.torch_packed import TorchPackedConfig

        packed = run_experiment("tiny-llama", [rtn, TorchPackedConfig(kind="int8")], registry=registry_url)
    except ConfigError:  # torchao missing: the card has no runtime row
        pass
    return SimpleNamespace(url=registry_url, base=base, sim=sim, packed=packed)


def test_model_card_lists_pipeline_metrics_runtime_runs_files_and_how_to_load(recorded, tmp_path):
    import workbench
    from workbench.registry import Registry
    from workbench.runtimes.card import ExportInfo, model_card

    with Registry.open(recorded.url) as reg:
        (tmp_path / "model.safetensors").write_bytes(b"x" * 1000)
        info = ExportInfo(
            "compressed-tensors", str(tmp_path), ["model.safetensors"], 1000, {"packed_linears": 14}
        )
        card = model_card(recorded.sim.run_id, registry=reg, export_info=info)
    assert card.startswith("# rtn 4b g32 sym")
    assert (
        "| 1 | `rtn` |" in card
        and "`bits=4`" in card
        and "`group_size=32`" in card
        and "`symmetric=true`" in card
    )
    assert "**simulated** (torch float)" in card
    assert f"{recorded.sim.metrics['ppl']:.4g}" in card
    assert "| speed | decode |" in card and "| simulated |" in card
    assert "## Runtime measurements" in card and "base model (float)" in card
    if recorded.packed is not None:
        assert f"| {recorded.packed.run_id} | torch packed | rtn 4b g32 sym → torch int8 |" in card
    assert "- `model.safetensors` (0.00 MB)" in card and "packed linears: 14" in card
    assert "vllm serve" in card and "AutoModelForCausalLM.from_pretrained" in card
    assert f"Efficiency Workbench {workbench.__version__}" in card


def test_model_card_of_a_runtime_run_says_where_it_was_measured_and_takes_a_plain_mapping(recorded):
    if recorded.packed is None:
        pytest.skip("torchao is not installed")
    from workbench.registry import Registry
    from workbench.runtimes.card import model_card

    with Registry.open(recorded.url) as reg:
        run = reg.get_run(recorded.packed.run_id)
        card = model_card(run, registry=reg, export_info={"format": "gguf", "files": ["model.gguf"]})
    assert "measured in the runtime **torch packed**" in card and "simulated" not in card.split("## Files")[0]
    assert "`torch_packed`" in card and "llama-cli" in card
    with pytest.raises(ConfigError, match="export_info needs 'format'"):
        model_card(run, export_info={"files": []})


# ---- workbench export --------------------------------------------------------------------------------------


def test_cli_export_rebuilds_the_variant_and_writes_the_folder_and_its_card(recorded, tmp_path, capsys):
    from workbench.cli import main

    out = tmp_path / "ct"
    argv = ["export", str(recorded.sim.run_id), "--format", "compressed-tensors", "--out", str(out)]
    rc = main([*argv, "--model", "tiny-llama", "--registry", recorded.url])
    text = capsys.readouterr().out
    assert rc == 0, text
    assert "README.md" in text and "model.safetensors" in text and "passed" in text
    card = (out / "README.md").read_text()
    assert "Exported as **compressed-tensors**" in card and "reload check: passed" in card
    # The rebuilt variant is the recorded one: the folder gives the run's own simulated logits.
    variant = _variant(RTNConfig(bits=4, group_size=32, symmetric=True))
    torch.testing.assert_close(_logits(_reload(out)), _logits(variant), rtol=0, atol=1e-5)

    rc = main(
        [
            "export",
            str(recorded.sim.run_id),
            "--format",
            "safetensors",
            "--out",
            str(tmp_path / "st"),
            "--model",
            "tiny-llama",
            "--registry",
            recorded.url,
        ]
    )
    assert rc == 0 and (tmp_path / "st" / "README.md").is_file()


@pytest.mark.parametrize(
    ("case", "needle"),
    [
        ("other-model", "was recorded on tiny-llama"),
        ("runtime-run", "export its parent, run"),
        ("occupied", "is not an empty folder"),
        ("missing-run", "No run 999"),
    ],
)
def test_cli_export_bad_input_is_one_line(case, needle, recorded, tmp_path, capsys):
    from workbench.cli import main

    if case == "runtime-run" and recorded.packed is None:
        pytest.skip("torchao is not installed")
    run_id = {"runtime-run": recorded.packed.run_id if recorded.packed else 0, "missing-run": 999}.get(
        case, recorded.sim.run_id
    )
    out = tmp_path / "out"
    if case == "occupied":
        out.mkdir()
        (out / "x").write_text("x")
    model = "tiny-moe" if case == "other-model" else "tiny-llama"
    argv = ["export", str(run_id), "--format", "safetensors", "--out", str(out), "--model", model]
    assert main([*argv, "--registry", recorded.url]) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]  # beside the progress bar
    assert len(errors) == 1 and needle in errors[0] and "Traceback" not in err
