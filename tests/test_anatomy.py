"""The model anatomy on tiny random models of every MoE family transformers builds here, and dense ones.

Each model is built from a small config (hidden 64, 2 layers, 4 experts, top-2) in milliseconds. Expected
layouts are the ones printed from the modules transformers builds (see workbench/anatomy.py's docstring); a
family this transformers cannot build is skipped with the reason.
"""

from __future__ import annotations

import copy
import warnings
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from workbench.anatomy import anatomy
from workbench.models import size_report
from workbench.techniques import apply_, make_config
from workbench.techniques._quant import packed_bytes

H, I, E, K = 64, 48, 4, 2  # I != H/2 and 2I != H, so a transposed layout cannot pass for the usual one

BASE = {
    "vocab_size": 128,
    "hidden_size": H,
    "intermediate_size": I,
    "moe_intermediate_size": I,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "num_experts": E,
    "num_local_experts": E,
    "n_routed_experts": E,
    "num_experts_per_tok": K,
    "max_position_embeddings": 128,
    "n_group": 1,
    "topk_group": 1,
    "shared_expert_intermediate_size": 32,
    "moe_shared_expert_intermediate_size": 32,
    "shared_intermediate_size": 32,
    "decoder_sparse_step": 1,
    "first_k_dense_replace": 0,
    "kv_lora_rank": 16,
    "q_lora_rank": None,
    "qk_rope_head_dim": 8,
    "qk_nope_head_dim": 8,
    "v_head_dim": 16,
    "n_shared_experts": 1,
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "mlp_only_layers": [],
}

# family: (config class, extra settings, expected). Expected: layout, router leaf, attention linears per layer,
# shared experts (bool), MoE layers, whether k can be changed live, expert tensor roles.
FUSED = ("gate_up", "down")
MOE = {
    "qwen2_moe": (
        "Qwen2MoeConfig",
        {},
        {"layout": "fused", "router": "gate", "attn": 4, "shared": True, "moe": 2, "roles": FUSED},
    ),
    "qwen3_moe": (
        "Qwen3MoeConfig",
        {},
        {"layout": "fused", "router": "gate", "attn": 4, "shared": False, "moe": 2, "roles": FUSED},
    ),
    "mixtral": (
        "MixtralConfig",
        {},
        {"layout": "fused", "router": "gate", "attn": 4, "shared": False, "moe": 2, "roles": FUSED},
    ),
    "olmoe": (
        "OlmoeConfig",
        {},
        {"layout": "fused", "router": "gate", "attn": 4, "shared": False, "moe": 2, "roles": FUSED},
    ),
    "phimoe": (
        "PhimoeConfig",
        {},
        {
            "layout": "fused",
            "router": "router",
            "attn": 4,
            "shared": False,
            "moe": 2,
            "roles": FUSED,
            "settable": False,
        },
    ),
    "gpt_oss": (
        "GptOssConfig",
        {},
        {
            "layout": "fused_transposed",
            "router": "router",
            "attn": 4,
            "shared": False,
            "moe": 2,
            "roles": ("gate_up", "gate_up_bias", "down", "down_bias"),
            "interleaved": True,
        },
    ),
    "deepseek_v3": (
        "DeepseekV3Config",
        {"head_dim": 8, "first_k_dense_replace": 1},
        {"layout": "fused", "router": "gate", "attn": 4, "shared": True, "moe": 1, "roles": FUSED},
    ),
    "deepseek_v2": (
        "DeepseekV2Config",
        {"head_dim": 8, "qk_rope_head_dim": 8, "first_k_dense_replace": 1},
        {"layout": "fused", "router": "gate", "attn": 4, "shared": True, "moe": 1, "roles": FUSED},
    ),
    "granitemoe": (
        "GraniteMoeConfig",
        {},
        {"layout": "fused", "router": "router", "attn": 4, "shared": False, "moe": 2, "roles": FUSED},
    ),
    "granitemoeshared": (
        "GraniteMoeSharedConfig",
        {},
        {"layout": "fused", "router": "router", "attn": 4, "shared": True, "moe": 2, "roles": FUSED},
    ),
    # Layer 0 Mamba + dense MLP, layer 1 attention + MoE.
    "jamba": (
        "JambaConfig",
        {
            "attn_layer_period": 2,
            "attn_layer_offset": 1,
            "expert_layer_period": 2,
            "expert_layer_offset": 1,
            "use_mamba_kernels": False,
            "mamba_d_state": 8,
            "mamba_dt_rank": 8,
        },
        {"layout": "fused", "router": "router", "attn": None, "shared": False, "moe": 1, "roles": FUSED},
    ),
    "dbrx": (
        "DbrxConfig",
        {
            "d_model": H,
            "n_heads": 4,
            "n_layers": 2,
            "max_seq_len": 128,
            "attn_config": {"kv_n_heads": 2, "rope_theta": 10000.0, "clip_qkv": 8.0},
            "ffn_config": {"ffn_hidden_size": I, "moe_num_experts": E, "moe_top_k": K},
        },
        {
            "layout": "flattened",
            "router": "router",
            "attn": 2,
            "shared": False,
            "moe": 2,
            "roles": ("gate", "up", "down"),
        },
    ),
    "llama4_text": (
        "Llama4TextConfig",
        {"intermediate_size_mlp": 96, "interleave_moe_layer_step": 1},
        {
            "layout": "fused_transposed",
            "router": "router",
            "attn": 4,
            "shared": True,
            "moe": 2,
            "roles": FUSED,
        },
    ),
    "qwen3_next": (
        "Qwen3NextConfig",
        {
            "layer_types": ["linear_attention", "full_attention"],
            "linear_num_key_heads": 2,
            "linear_num_value_heads": 4,
            "linear_key_head_dim": 16,
            "linear_value_head_dim": 16,
        },
        {"layout": "fused", "router": "gate", "attn": None, "shared": True, "moe": 2, "roles": FUSED},
    ),
    "ernie4_5_moe": (
        "Ernie4_5_MoeConfig",
        {"moe_layer_start_index": 0},
        {"layout": "fused", "router": "gate", "attn": 4, "shared": True, "moe": None, "roles": FUSED},
    ),
    "glm4_moe": (
        "Glm4MoeConfig",
        {},
        {"layout": "fused", "router": "gate", "attn": 4, "shared": True, "moe": 2, "roles": FUSED},
    ),
    "hunyuan_v1_moe": (
        "HunYuanMoEV1Config",
        {},
        {"layout": "fused", "router": "gate", "attn": 4, "shared": True, "moe": 2, "roles": FUSED},
    ),
    "dots1": (
        "Dots1Config",
        {},
        {"layout": "fused", "router": "gate", "attn": 4, "shared": True, "moe": 2, "roles": FUSED},
    ),
    "minimax": (
        "MiniMaxConfig",
        {},
        {"layout": "fused", "router": "gate", "attn": None, "shared": False, "moe": 2, "roles": FUSED},
    ),
    "minimax_m2": (
        "MiniMaxM2Config",
        {},
        {"layout": "fused", "router": "gate", "attn": 4, "shared": False, "moe": 2, "roles": FUSED},
    ),
    "jetmoe": (
        "JetMoeConfig",
        {},
        {
            "layout": "fused",
            "router": "router",
            "attn": None,
            "shared": False,
            "moe": 4,
            "roles": ("input", "output"),
        },
    ),
    "exaone_moe": (
        "ExaoneMoeConfig",
        {},
        {"layout": "fused", "router": "gate", "attn": 4, "shared": True, "moe": None, "roles": FUSED},
    ),
    "afmoe": (
        "AfmoeConfig",
        {"num_dense_layers": 1},
        {"layout": "fused", "router": "router", "attn": None, "shared": True, "moe": 1, "roles": FUSED},
    ),
    "cohere2_moe": (
        "Cohere2MoeConfig",
        {},
        {"layout": "fused", "router": "gate", "attn": 4, "shared": False, "moe": 2, "roles": FUSED},
    ),
    "flex_olmo": (
        "FlexOlmoConfig",
        {},
        {"layout": "fused", "router": "gate", "attn": 4, "shared": False, "moe": 2, "roles": FUSED},
    ),
    "glm4_moe_lite": (
        "Glm4MoeLiteConfig",
        {},
        {"layout": "fused", "router": "gate", "attn": None, "shared": True, "moe": None, "roles": FUSED},
    ),
    "lfm2_moe": (
        "Lfm2MoeConfig",
        {"layer_types": ["conv", "full_attention"], "num_dense_layers": 0},
        {"layout": "fused", "router": "gate", "attn": None, "shared": False, "moe": 2, "roles": FUSED},
    ),
}
DENSE = {
    "llama": ("LlamaConfig", {}, {"attn": 4, "mlp": 3}),
    "qwen2": ("Qwen2Config", {}, {"attn": 4, "mlp": 3}),
    "mistral": ("MistralConfig", {}, {"attn": 4, "mlp": 3}),
    "gemma": ("GemmaConfig", {}, {"attn": 4, "mlp": 3}),
    "phi3": ("Phi3Config", {}, {"attn": 2, "mlp": 2}),  # fused qkv_proj and gate_up_proj linears
}


def _build(config_cls: str, extra: dict) -> nn.Module:
    """A tiny random CausalLM, or a skip naming why this transformers cannot build one."""
    import transformers
    from transformers import AutoModelForCausalLM

    cls = getattr(transformers, config_cls, None)
    if cls is None:
        pytest.skip(f"transformers {transformers.__version__} has no {config_cls}")
    try:
        config = cls(num_hidden_layers=BASE["num_hidden_layers"], **extra)
        for key, value in BASE.items():
            if key not in extra and hasattr(config, key):
                setattr(config, key, value)
        torch.manual_seed(0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = AutoModelForCausalLM.from_config(config).eval()
            with torch.no_grad():
                model(torch.randint(3, 100, (1, 8)))
    except Exception as err:  # noqa: BLE001 - the reason is the skip message
        pytest.skip(
            f"{config_cls}: transformers {transformers.__version__} cannot build a tiny model: "
            f"{type(err).__name__}: {str(err)[:160]}"
        )
    return model


def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("family", sorted(MOE))
def test_moe_family_anatomy_matches_what_transformers_builds(family):
    config_cls, extra, want = MOE[family]
    model = _build(config_cls, extra)
    a = anatomy(model)
    n_layers = model.config.num_hidden_layers
    assert a.n_layers == n_layers and [layer.index for layer in a.layers] == list(range(n_layers))
    assert a.tied_embeddings == bool(model.config.tie_word_embeddings), family
    assert a.is_moe and len(a.routers) == len(a.experts)
    if want["moe"] is not None:
        assert len(a.experts) == want["moe"], [b.name for b in a.experts]
    hidden = a.hidden_size
    assert hidden == H
    linear_names = {lin.name for lin in a.linears}
    for block in a.experts:
        assert block.n_experts == E and block.router.n_experts == E, block.name
        assert block.layout == want["layout"], (block.name, block.layout)
        assert block.router.name.rsplit(".", 1)[-1] == want["router"], block.router.name
        assert tuple(model.get_parameter(block.router.weight).shape) == (E, H)
        assert block.router.name not in linear_names and not any(
            n.startswith(block.router.name) for n in linear_names
        )
        assert block.top_k == K and block.top_k_attrs, block.name
        assert block.top_k_settable == want.get("settable", True)
        assert sorted(t.role for t in block.tensors) == sorted(want["roles"]), [t.role for t in block.tensors]
        for t in block.tensors:
            param = model.get_parameter(t.name)
            assert tuple(param.shape) == t.shape, t.name
            if t.is_bias:
                assert t.shape == (E, t.out_features)
                continue
            mats = t.matrices(param)
            assert tuple(mats.shape) == (E, t.out_features, t.in_features), t.name
            assert mats.data_ptr() == param.data_ptr()  # a view of the stored tensor, not a copy
            if t.role in ("gate_up", "gate", "up") or (t.role == "input" and "self_attention" not in t.name):
                assert t.in_features == H, t.name  # input-side projections read the hidden state
            if t.role == "down" or (t.role == "output" and "self_attention" not in t.name):
                assert t.out_features == H, t.name
            assert t.interleaved == (want.get("interleaved", False) and t.role == "gate_up"), t.name
        w = block.expert_weights(model, E - 1)
        assert set(w) == {t.role for t in block.tensors}
        for t in block.tensors:
            assert tuple(w[t.role].shape) == (
                (t.out_features,) if t.is_bias else (t.out_features, t.in_features)
            )
        with pytest.raises(IndexError, match=f"expert {E}"):
            block.expert_weights(model, E)
        assert bool(block.shared) == want["shared"], block.name
    assert bool(a.shared_experts) == want["shared"]
    for shared in a.shared_experts:
        assert shared.linears and all(name in linear_names for name in shared.linears)
        assert shared.gate is None or shared.gate not in linear_names
    for layer in a.layers:
        if want["attn"] is not None:
            assert len(layer.attention) == want["attn"], (layer.name, layer.attention)
    # Size accounting counts exactly the anatomy's linears and expert weights as "linear".
    rep = size_report(model)
    expect = sum(lin.in_features * lin.out_features for lin in a.linears)
    expect += sum(model.get_parameter(t.name).numel() for _, t in a.expert_tensors())
    assert rep.linear_params == expect
    saved = {t.data_ptr(): t for t in model.state_dict().values()}  # what a checkpoint holds, ties once
    assert rep.n_params == sum(t.numel() for t in saved.values())


@pytest.mark.parametrize("family", sorted(MOE))
def test_setting_top_k_where_the_anatomy_says_changes_the_routing(family):
    config_cls, extra, want = MOE[family]
    model = _build(config_cls, extra)
    a = anatomy(model)
    ids = torch.randint(3, 100, (1, 12), generator=torch.Generator().manual_seed(1))
    before = _logits(model, ids)
    for block in a.experts:
        module, attr = block.top_k_attrs[0]
        setattr(model.get_submodule(module), attr, 1)
    after = _logits(model, ids)
    changed = not torch.allclose(before, after)
    # PhiMoE's sparsemixer always takes two experts, which is why the anatomy says k is not settable there.
    assert changed == want.get("settable", True), family


@pytest.mark.parametrize("family", sorted(DENSE))
def test_dense_family_anatomy(family):
    config_cls, extra, want = DENSE[family]
    model = _build(config_cls, extra)
    a = anatomy(model)
    assert a.n_layers == 2 and not a.is_moe and not a.routers and not a.shared_experts
    assert a.tied_embeddings == bool(model.config.tie_word_embeddings)
    assert a.embedding == "model.embed_tokens" and a.lm_head == "lm_head"
    for layer in a.layers:
        assert (len(layer.attention), len(layer.mlp)) == (want["attn"], want["mlp"]), layer
    assert {lin.role for lin in a.linears} == {"attention", "mlp"}
    assert size_report(model).linear_params == sum(
        p.numel() for n, p in model.named_parameters() if ".layers." in n and n.endswith("proj.weight")
    )


def test_tiny_moe_and_tied_embeddings():
    from workbench.tiny import tiny_llama, tiny_moe

    a = anatomy(tiny_llama())
    assert a.tied_embeddings and a.lm_head == "lm_head" and a.embedding == "model.embed_tokens"
    m = anatomy(tiny_moe(experts=8, top_k=3))
    assert [b.n_experts for b in m.experts] == [8, 8] and {b.top_k for b in m.experts} == {3}
    assert all(s.gate and s.gate.endswith("shared_expert_gate") for s in m.shared_experts)
    # a description of names and shapes: the same for a deep copy
    model = tiny_moe()
    assert anatomy(copy.deepcopy(model)) == anatomy(model)


class _ExpertMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w1, self.w3 = nn.Linear(32, 16, bias=False), nn.Linear(32, 16, bias=False)
        self.w2 = nn.Linear(16, 32, bias=False)


class _OldMoeLayer(nn.Module):
    """The per-expert module layout of older Mixtral checkpoints: a Linear gate and a ModuleList of MLPs."""

    def __init__(self) -> None:
        super().__init__()
        self.self_attn = nn.Module()
        self.self_attn.q_proj = nn.Linear(32, 32)
        self.block_sparse_moe = nn.Module()
        self.block_sparse_moe.gate = nn.Linear(32, 3, bias=False)
        self.block_sparse_moe.experts = nn.ModuleList(_ExpertMLP() for _ in range(3))
        self.block_sparse_moe.top_k = 2


def test_per_expert_module_layout():
    model = nn.Module()
    model.config = SimpleNamespace(
        num_hidden_layers=2, hidden_size=32, num_local_experts=3, num_experts_per_tok=2
    )
    model.model = nn.Module()
    model.model.layers = nn.ModuleList(_OldMoeLayer() for _ in range(2))
    a = anatomy(model)
    assert a.layers_name == "model.layers" and len(a.experts) == 2
    block = a.experts[1]
    assert (block.layout, block.n_experts, block.top_k) == ("modules", 3, 2)
    assert block.router.weight == "model.layers.1.block_sparse_moe.gate.weight"
    assert block.top_k_attrs == (("model.layers.1.block_sparse_moe", "top_k"),)
    assert {t.role for t in block.tensors} == {"gate", "up", "down"}
    assert (
        block.expert_weights(model, 2)["gate"] is model.model.layers[1].block_sparse_moe.experts[2].w1.weight
    )
    roles = {lin.name: lin.role for lin in a.linears}
    assert roles["model.layers.0.block_sparse_moe.experts.2.w2"] == "expert"
    assert roles["model.layers.0.self_attn.q_proj"] == "attention"
    assert "model.layers.0.block_sparse_moe.gate" not in roles  # the router stays in full precision
    assert len(roles) == 2 * (1 + 3 * 3)
    assert not list(a.expert_tensors())  # per-expert weights are ordinary linears, not fused tensors


def test_a_module_without_decoder_layers_has_an_empty_anatomy():
    a = anatomy(nn.Sequential(nn.Linear(4, 4)))
    assert a.layers_name is None and not a.layers and not a.linears and not a.experts


@pytest.mark.parametrize("family", ["qwen2_moe", "gpt_oss", "dbrx", "llama4_text"])
def test_rtn_quantizes_fused_experts_along_each_experts_input_and_size_counts_them(family):
    config_cls, extra, _ = MOE[family]
    model = _build(config_cls, extra)
    a = anatomy(model)
    bits, group = 2, 16
    q = apply_(copy.deepcopy(model), make_config("rtn", bits=bits, group_size=group))
    expected = 0
    for _, t in a.expert_tensors():
        before, after = model.get_parameter(t.name), q.get_parameter(t.name)
        assert not torch.equal(before, after), t.name
        # 2-bit groups of 16 along each expert's input: at most 4 levels per group. Grouping along the wrong
        # dimension (the stored last one of a transposed layout) would leave ~16 distinct values per group.
        groups = t.matrices(after.detach()).reshape(E, t.out_features, t.in_features // group, group)
        levels = torch.tensor([g.unique().numel() for g in groups.reshape(-1, group)])
        assert int(levels.max()) <= 2**bits, (t.name, int(levels.max()))
        expected += packed_bytes((E * t.out_features, t.in_features), bits, group, False)
    for _, t in a.expert_tensors(biases=True):
        if t.is_bias:
            assert torch.equal(
                model.get_parameter(t.name), q.get_parameter(t.name)
            )  # biases stay as they were
    for lin in a.linears:
        expected += packed_bytes((lin.out_features, lin.in_features), bits, group, False)
    rep = size_report(q)
    assert rep.linear_bytes == expected
    assert rep.linear_params == size_report(model).linear_params
    assert torch.isfinite(_logits(q, torch.randint(3, 100, (1, 8)))).all()
