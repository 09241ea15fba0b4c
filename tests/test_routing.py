"""Expert routing on tiny random MoE models of every family the anatomy covers.

The reference for "k changed live" is a model *built* with that k: the same state_dict loaded into a model from a
config with ``num_experts_per_tok=K`` (transformers reads k only at build time). Logits must match, and setting
k back must give the original logits bit for bit.
"""

from __future__ import annotations

import copy
import dataclasses
import warnings

import pytest
import torch
from test_anatomy import MOE, E, K, _build

from workbench.anatomy import anatomy
from workbench.corpus import get_corpus
from workbench.errors import ConfigError
from workbench.routing import measure_routing, probe_router, restore_routing_, routed_blocks, router_form
from workbench.techniques import apply_, make_config
from workbench.techniques.base import ApplyContext
from workbench.techniques.route import RouteConfig, route_space
from workbench.tiny import byte_tokenizer, tiny_llama, tiny_moe

IDS = torch.randint(3, 100, (2, 12), generator=torch.Generator().manual_seed(1))
SETTABLE = sorted(f for f, (_, _, want) in MOE.items() if want.get("settable", True))


def _logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids).logits


def _rebuilt(model, k: int):
    """A fresh model of the same class from a config with k experts per token, holding ``model``'s weights."""
    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(model.config)
    if hasattr(config, "ffn_config") and hasattr(config.ffn_config, "moe_top_k"):  # DBRX
        config.ffn_config.moe_top_k = k
    else:
        config.num_experts_per_tok = k
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fresh = AutoModelForCausalLM.from_config(config).eval()
    missing, unexpected = fresh.load_state_dict(model.state_dict(), strict=False)
    assert not unexpected and not [m for m in missing if "rotary" not in m], (missing, unexpected)
    return fresh


def _close(a, b):
    return torch.allclose(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", SETTABLE)
@pytest.mark.parametrize("k", [1, E])
def test_live_k_equals_a_model_built_with_that_k_and_restores_exactly(family, k):
    config_cls, extra, _ = MOE[family]
    model = _build(config_cls, extra)
    before = _logits(model)
    routed = apply_(model, RouteConfig(k=k, measure_tokens=0))
    assert routed is model
    after = _logits(model)
    assert not torch.equal(before, after), "k changed nothing"
    blocks = routed_blocks(anatomy(model))
    assert {b.top_k for b in blocks} == {k}
    if family != "jetmoe":  # JetMoE's config k also sets its attention's head count: no fresh-model reference
        ref = _logits(_rebuilt(model, k))
        assert _close(after, ref), (family, float((after - ref).abs().max()))
    restore_routing_(model)
    assert torch.equal(_logits(model), before)
    assert {b.top_k for b in anatomy(model).experts} == {K}


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral", "dbrx", "jetmoe"])
def test_per_layer_k_changes_only_that_layer(family):
    config_cls, extra, _ = MOE[family]
    model = _build(config_cls, extra)
    blocks = routed_blocks(anatomy(model))
    layer = blocks[-1].layer
    apply_(model, RouteConfig(k_per_layer={layer: 1}, measure_tokens=0))
    assert [b.top_k for b in routed_blocks(anatomy(model))] == [1 if b.layer == layer else K for b in blocks]
    # the same as setting that layer's k by hand on a fresh copy's router
    ref = _build(config_cls, extra)
    for b in routed_blocks(anatomy(ref)):
        if b.layer == layer:
            for module, attr in b.top_k_attrs:
                setattr(ref.get_submodule(module), attr, 1)
    assert torch.equal(_logits(model), _logits(ref))


def test_per_layer_k_wins_over_global_k_and_json_round_trip():
    from workbench.techniques import config_from_dict, config_to_dict

    cfg = make_config("route", k=2, k_per_layer={"1": 1})
    assert cfg.k_per_layer == ((1, 1),)
    assert make_config("route", k_per_layer="3:2, 0:1").k_per_layer == ((0, 1), (3, 2))  # command-line form
    with pytest.raises(ConfigError, match="layer:k"):
        make_config("route", k_per_layer="0-1")
    assert config_from_dict(config_to_dict(cfg)) == cfg
    model = tiny_moe(experts=4, top_k=2)
    apply_(model, make_config("route", k=3, k_per_layer={1: 1}, measure_tokens=0))
    assert [b.top_k for b in anatomy(model).experts] == [3, 1]
    assert cfg.label() == "route k=2 k=L1:1"


@pytest.mark.parametrize("family", ["qwen2_moe", "olmoe", "deepseek_v3"])
def test_renormalize_flips_norm_topk_prob_like_a_model_built_with_it(family):
    config_cls, extra, _ = MOE[family]
    model = _build(config_cls, extra)
    flag = model.get_submodule(anatomy(model).experts[0].router.name).norm_topk_prob
    apply_(model, RouteConfig(k=1, renormalize=not flag, measure_tokens=0))
    ref = _rebuilt(model, 1)
    ref.config.norm_topk_prob = not flag
    ref = _rebuilt(ref, 1)
    assert _close(_logits(model), ref(IDS).logits.detach())
    assert _logits(model).shape == ref(IDS).logits.shape
    restore_routing_(model)
    assert model.get_submodule(anatomy(model).experts[0].router.name).norm_topk_prob == flag


def test_renormalize_on_a_fixed_rule_family_is_refused_or_a_no_op():
    mixtral = _build(*MOE["mixtral"][:2])
    apply_(mixtral, RouteConfig(k=1, renormalize=True, measure_tokens=0))  # Mixtral renormalises in code
    with pytest.raises(ConfigError, match="renormalize=False is not available for mixtral"):
        apply_(mixtral, RouteConfig(k=1, renormalize=False))
    jamba = _build(*MOE["jamba"][:2])
    with pytest.raises(ConfigError, match="never renormalises"):
        apply_(jamba, RouteConfig(k=1, renormalize=True))


def test_bad_inputs_are_refused_before_work():
    model = tiny_moe(experts=4, top_k=2)
    before = _logits(model)
    with pytest.raises(ConfigError, match="k=0 leaves no routed expert"):
        RouteConfig(k=0)
    with pytest.raises(ConfigError, match="k=5 is more than the 4 experts"):
        apply_(model, RouteConfig(k=5))
    with pytest.raises(ConfigError, match=r"layer\(s\) \[7\] without experts; the MoE layers are \[0, 1\]"):
        apply_(model, RouteConfig(k_per_layer={7: 1}))
    with pytest.raises(ConfigError, match="top_p=1.5"):
        RouteConfig(top_p=1.5)
    with pytest.raises(ConfigError, match="renormalize='yes'"):
        RouteConfig(renormalize="yes")
    assert torch.equal(_logits(model), before)  # nothing was touched
    with pytest.raises(ConfigError, match="has no experts"):
        apply_(tiny_llama(), RouteConfig(k=1))
    with pytest.raises(ConfigError, match="has no experts"):
        route_space(tiny_llama())


def test_phimoe_is_refused_with_the_reason():
    model = _build(*MOE["phimoe"][:2])
    with pytest.raises(ConfigError, match="always picks exactly 2 experts"):
        apply_(model, RouteConfig(k=1))
    with pytest.raises(ConfigError, match="always picks exactly 2"):
        apply_(model, RouteConfig(top_p=0.5))
    apply_(model, RouteConfig(k=2, measure_tokens=0))  # its own k is fine
    space = route_space(model)
    assert space.ks == (2,) and not space.settable and "fixed" in space.reason


def test_route_space_for_the_tiny_moe():
    space = route_space(tiny_moe(experts=8, top_k=2))
    assert space.ks == tuple(range(1, 9)) and space.default_k == 2 and space.n_experts == 8
    assert space.dynamic and space.moe_layers == (0, 1)
    assert set(space.renormalize) == {"model", True, False}


# ---- dynamic routing ------------------------------------------------------------------------------------


DYNAMIC = sorted(f for f in SETTABLE if f not in ("dbrx", "jetmoe", "llama4_text"))


@pytest.mark.parametrize("family", DYNAMIC)
def test_top_p_one_is_k_equal_e_and_top_p_tiny_is_k_one(family):
    config_cls, extra, _ = MOE[family]
    model = _build(config_cls, extra)
    before = _logits(model)
    everything = copy.deepcopy(model)
    apply_(everything, RouteConfig(k=E, measure_tokens=0))
    one = copy.deepcopy(model)
    apply_(one, RouteConfig(k=1, measure_tokens=0))
    high = apply_(copy.deepcopy(model), RouteConfig(top_p=1.0, measure_tokens=0))
    low = apply_(copy.deepcopy(model), RouteConfig(top_p=1e-6, measure_tokens=0))
    assert _close(_logits(high), _logits(everything)), family
    assert _close(_logits(low), _logits(one)), family
    # skipping with beta=1 keeps only the top expert, unless the top two weights tie (tiny AFMoE's saturated
    # sigmoid scores do: then both reach beta x the top one and both stay)
    skip = apply_(copy.deepcopy(model), RouteConfig(skip_beta=1.0, measure_tokens=0))
    weights = probe_router(model, anatomy(model).experts[0])[1].reshape(-1, K)
    if not torch.isclose(weights[:, 0], weights[:, 1]).any():
        assert _close(_logits(skip), _logits(one)), family
    restore_routing_(high)
    assert torch.equal(_logits(high), before)


def test_dynamic_routing_reports_the_measured_active_experts():
    model = tiny_moe(experts=8, top_k=2)
    ids = torch.randint(0, 256, (1, 64), generator=torch.Generator().manual_seed(3))
    mid = apply_(copy.deepcopy(model), RouteConfig(top_p=0.5, measure_tokens=0))
    stats = measure_routing(mid, ids)
    assert all(1.0 <= a <= 8.0 for a in stats.active_experts)
    assert 1.0 < sum(stats.active_experts) / 2 < 8.0, stats.active_experts  # tokens differ in what they need
    skip = apply_(copy.deepcopy(model), RouteConfig(skip_beta=0.9, measure_tokens=0))
    assert 1.0 <= measure_routing(skip, ids).metrics()["active_experts"] < 2.0
    assert _logits(mid).isfinite().all() and router_form(model, anatomy(model).experts[0]) == "standard"


def test_dynamic_routing_survives_a_deep_copy():
    model = apply_(tiny_moe(experts=4, top_k=2), RouteConfig(top_p=0.6, measure_tokens=0))
    twin = copy.deepcopy(model)
    assert torch.equal(_logits(model), _logits(twin))
    restore_routing_(twin)
    assert not torch.equal(_logits(model), _logits(twin))


# ---- measured routing -------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", sorted(MOE))
def test_load_sums_to_one_per_layer_and_matches_k(family):
    config_cls, extra, _ = MOE[family]
    model = _build(config_cls, extra)
    stats = measure_routing(model, IDS)
    assert len(stats.load) == len(anatomy(model).experts)
    for share, active in zip(stats.load, stats.active_experts):
        assert len(share) == E and abs(sum(share) - 1) < 1e-9
        assert active == pytest.approx(K, abs=1e-9), family  # every token picks K experts
    m = stats.metrics()
    assert 1 <= m["load_max_over_mean"] <= E and 0 <= m["load_entropy"] <= 1 + 1e-9
    assert 0 < m["active_params"] < stats.total_params and m["flops_per_token"] > 0


def test_load_is_exact_from_the_routers_picks_including_a_selection_bias():
    model = _build(*MOE["deepseek_v3"][:2])
    block = anatomy(model).experts[0]
    bias = model.get_submodule(block.router.name).e_score_correction_bias
    with torch.no_grad():
        bias.zero_()
        bias[3] = 100.0  # expert 3 wins every selection, whatever the logits say
    stats = measure_routing(model, IDS)
    share = stats.load[0]
    assert share[3] == pytest.approx(1 / K)  # in every token's K picks: half of all picks with K=2


def test_active_params_count_shared_experts_and_scale_with_k():
    from workbench.models import size_report
    from workbench.routing import expert_params

    model = tiny_moe(experts=8, top_k=2)
    anat = anatomy(model)
    per_expert = expert_params(model, anat.experts[0])
    full = measure_routing(model, IDS)
    assert full.active_params == size_report(model).n_params - 2 * (8 - 2) * per_expert
    one = measure_routing(apply_(copy.deepcopy(model), RouteConfig(k=1, measure_tokens=0)), IDS)
    assert full.active_params - one.active_params == pytest.approx(2 * per_expert)
    assert full.flops_per_token - one.flops_per_token == pytest.approx(2 * 2 * per_expert)


def test_apply_records_routing_metrics_and_the_load_matrix():
    model = tiny_moe(experts=8, top_k=2)
    ctx = ApplyContext(tokenizer=byte_tokenizer(), corpus=get_corpus("python-docs"))
    apply_(model, RouteConfig(k=1, measure_tokens=128), ctx)
    assert ctx.metrics["active_experts"] == pytest.approx(1.0)
    assert ctx.metrics["routing_tokens"] == 128
    load = ctx.extras["routing"]["load"]
    assert len(load) == 2 and all(abs(sum(row) - 1) < 1e-9 for row in load)


def test_load_heatmap_names_the_decoder_layers_and_takes_pruned_rows():
    import math

    from workbench.views import expert_load_figure

    fig = expert_load_figure([[0.5, 0.5, 0.0], [0.6, 0.4]], layers=[1, 3])
    heat = fig.data[0]
    assert list(heat.y) == ["layer 1", "layer 3"] and list(heat.x) == ["e0", "e1", "e2"]
    assert math.isnan(heat.z[1][2])


# ---- post-hoc load balancing -------------------------------------------------------------------------------


def _hot_expert_0(model, strength: float = 4.0):
    """Tilt every router toward expert 0: its row gains the mean hidden state's direction (most tokens)."""
    inputs = {}

    def keep(name):
        def hook(module, args, out):
            inputs.setdefault(name, args[0].reshape(-1, args[0].shape[-1]).mean(0))

        return hook

    hooks = [
        model.get_submodule(b.router.name).register_forward_hook(keep(b.name)) for b in anatomy(model).experts
    ]
    with torch.no_grad():
        model(IDS)
    for h in hooks:
        h.remove()
    with torch.no_grad():
        for b in anatomy(model).experts:
            mean = inputs[b.name]
            model.get_parameter(b.router.weight)[0] += strength * mean / mean.norm() ** 2


def test_a_zero_selection_bias_changes_nothing():
    from workbench.techniques.balance_experts import add_selection_bias_

    model = tiny_moe(experts=8, top_k=2)
    before = _logits(model)
    for b in anatomy(model).experts:
        assert float(add_selection_bias_(model, b).abs().sum()) == 0.0
    assert _close(_logits(model), before)
    mixtral = _build(*MOE["mixtral"][:2])  # a renormalising rule: the re-mixed weights sum as the router's do
    before = _logits(mixtral)
    for b in anatomy(mixtral).experts:
        add_selection_bias_(mixtral, b)
    assert _close(_logits(mixtral), before)


@pytest.mark.parametrize("family", ["qwen2_moe", "mixtral", "deepseek_v3"])
def test_balancing_lowers_imbalance_on_a_deliberately_imbalanced_router(family):
    from workbench.techniques.balance_experts import BalanceExpertsConfig, native_bias

    model = tiny_moe(experts=8, top_k=2) if family == "qwen2_moe" else _build(*MOE[family][:2])
    _hot_expert_0(model)
    ctx = ApplyContext(tokenizer=byte_tokenizer(), corpus=get_corpus("python-docs"))
    apply_(model, BalanceExpertsConfig(iterations=25, step=0.05, calibration_tokens=256), ctx)
    m = ctx.metrics
    assert m["load_cv_after"] < m["load_cv_before"], m
    assert m["load_max_over_mean_after"] < m["load_max_over_mean_before"], m
    assert _logits(model).isfinite().all()
    if family == "deepseek_v3":  # fitted into the router's own e_score_correction_bias: saved with the model
        name = native_bias(model, anatomy(model).experts[0])
        assert name.endswith("e_score_correction_bias") and float(model.get_buffer(name).abs().sum()) > 0


# ---- per-layer k under a budget ------------------------------------------------------------------------------


def test_budget_lowers_k_in_the_least_sensitive_layer_first():
    from workbench.routing import expert_params
    from workbench.techniques.route import layer_k_sensitivity, route_for_budget

    model = tiny_moe(experts=8, top_k=4)
    anat = anatomy(model)
    with torch.no_grad():  # layer 1's experts write 30x larger outputs: losing one there costs far more
        model.get_parameter(next(t.name for t in anat.experts[1].tensors if t.role == "down")).mul_(30)
    ids = torch.randint(0, 256, (1, 48), generator=torch.Generator().manual_seed(5))
    before = _logits(model, ids)
    sens = layer_k_sensitivity(model, ids)
    assert torch.equal(_logits(model, ids), before)  # left as it was
    assert sorted(set(sens["layer"])) == [0, 1] and sorted(set(sens["k"])) == [1, 2, 3]
    at1 = sens.set_index(["layer", "k"])["kl_mean"]
    assert at1[(1, 1)] > at1[(0, 1)] and at1[(0, 1)] > at1[(0, 3)]
    per = expert_params(model, anat.experts[0])
    full = measure_routing(model, ids).active_params
    cfg = route_for_budget(model, sens, active_params=full - 3 * per)
    assert cfg.k_per_layer == ((0, 1),)  # three experts fewer, all from the insensitive layer
    routed = apply_(copy.deepcopy(model), dataclasses.replace(cfg, measure_tokens=0))
    assert measure_routing(routed, ids).active_params <= full - 3 * per
    with pytest.raises(ConfigError, match="below what k=1 in every layer reaches"):
        route_for_budget(model, sens, active_params=1000)
    assert route_for_budget(model, sens, fraction=1.0).k_per_layer == ()


def test_route_budget_chooses_per_layer_k_on_calibration_text():
    model = tiny_moe(experts=8, top_k=4)
    ctx = ApplyContext(tokenizer=byte_tokenizer(), corpus=get_corpus("python-docs"))
    ids = torch.randint(0, 256, (1, 48), generator=torch.Generator().manual_seed(5))
    full = measure_routing(model, ids).active_params
    apply_(model, RouteConfig(budget=0.8, measure_tokens=64), ctx)
    assert measure_routing(model, ids).active_params <= 0.8 * full
    chosen = ctx.extras["route_budget"]["k_per_layer"]
    assert chosen and all(1 <= k < 4 for k in chosen.values())
    assert [b.top_k for b in anatomy(model).experts] == [chosen.get(str(i), 4) for i in (0, 1)]
    assert RouteConfig(budget=0.8).label() == "route budget 80%"
    with pytest.raises(ConfigError, match="budget chooses each layer's k itself"):
        RouteConfig(budget=0.5, k=2)
    with pytest.raises(ConfigError, match="budget=1.5"):
        RouteConfig(budget=1.5)
    with pytest.raises(ConfigError, match=r"below what k=1 in every layer reaches .*; choose budget >="):
        apply_(tiny_moe(experts=8, top_k=4), RouteConfig(budget=0.1), ctx)
