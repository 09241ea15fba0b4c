"""Dense models made into Mixture-of-Experts blocks (technique ``moefy``): carving and upcycling a tiny Llama."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from workbench import moefy
from workbench.anatomy import anatomy
from workbench.corpus import get_corpus
from workbench.errors import ConfigError
from workbench.techniques import ApplyContext, apply_, apply_pipeline_, make_config
from workbench.techniques.base import check_pipeline

IDS = torch.randint(0, 256, (2, 48), generator=torch.Generator().manual_seed(1))


def _ctx(byte_tokenizer):
    return ApplyContext(tokenizer=byte_tokenizer, corpus=get_corpus("python-docs"), seed=0)


@pytest.fixture(scope="module")
def carved(byte_tokenizer):
    """The tiny Llama (intermediate 128) carved into 4 experts of 28 neurons plus 16 shared, at k = E."""
    from workbench.tiny import tiny_llama

    dense = tiny_llama()
    model = copy.deepcopy(dense)
    ctx = _ctx(byte_tokenizer)
    config = make_config("moefy", n_experts=4, top_k=4, calibration_tokens=1024)
    model = apply_(model, config, ctx)
    return dense, model, ctx


def _logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids).logits


def _flops(model, ids=IDS):
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(ids)
    return counter.get_total_flops()


def test_carved_at_k_equal_e_reproduces_the_dense_model(carved):
    dense, model, _ = carved
    diff = (_logits(model) - _logits(dense)).abs().max().item()
    assert diff < 1e-5, f"logits differ by {diff} at k = E"
    assert torch.equal(_logits(model).argmax(-1), _logits(dense).argmax(-1))


def test_carved_block_layout(carved):
    _, model, _ = carved
    block = model.model.layers[0].mlp
    assert isinstance(block, moefy.MoEfiedMLP)
    assert tuple(block.experts.gate_up_proj.shape) == (4, 56, 64)  # (E, 2m, H), m = (128 - 16) / 4
    assert tuple(block.experts.down_proj.shape) == (4, 64, 28)
    assert block.shared_expert.gate_proj.out_features == 16
    # Every neuron of the dense MLP sits in exactly one place: its gate row is in the shared part or one expert.
    dense_rows = carved[0].model.layers[0].mlp.gate_proj.weight
    rows = torch.cat(
        [block.shared_expert.gate_proj.weight, block.experts.gate_up_proj[:, :28].reshape(-1, 64)]
    )
    assert rows.shape == dense_rows.shape
    assert torch.equal(torch.sort(rows.sum(1)).values, torch.sort(dense_rows.sum(1)).values)


def test_lower_k_changes_outputs_and_runs_fewer_flops(carved):
    dense, model, _ = carved
    model = copy.deepcopy(model)
    full = _flops(model)
    moefy.set_top_k_(model, 2)
    half = _flops(model)
    moefy.set_top_k_(model, 1)
    one = _flops(model)
    assert one < half < full, (one, half, full)
    moefy.set_top_k_(model, 2)
    diff = (_logits(model) - _logits(dense)).abs().max().item()
    assert diff > 1e-4, "k = E/2 should compute something different from the dense model"
    # Per block: (16 shared + 2 x 28) of 128 neurons.
    counts = moefy.active_counts(model)
    assert counts["active_ffn_fraction"] == pytest.approx((16 + 2 * 28) / 128)
    assert counts["active_params"] == counts["total_params"] - 2 * 2 * 3 * 28 * 64  # 2 layers, 2 idle experts
    moefy.set_top_k_(model, 4)
    assert (_logits(model) - _logits(dense)).abs().max().item() < 1e-5


def test_decoding_path_matches_the_batched_path(carved):
    """One token at a time (the k-expert loop without gathers) gives what a whole sequence gives."""
    _, model, _ = carved
    model = copy.deepcopy(model)
    moefy.set_top_k_(model, 2)
    block = model.model.layers[1].mlp
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        batched = block(x[None])[0]
        single = torch.stack([block(x[i : i + 1])[0] for i in range(5)])
    assert torch.allclose(batched, single, atol=1e-6)


def test_anatomy_sees_a_moe_block_whose_k_is_settable(carved):
    _, model, _ = carved
    model = copy.deepcopy(model)
    an = anatomy(model)
    assert an.is_moe and len(an.experts) == 2
    block = an.experts[0]
    assert (block.n_experts, block.top_k, block.layout, block.top_k_settable) == (4, 4, "fused", True)
    assert block.router.name == "model.layers.0.mlp.gate"
    assert block.shared == ("model.layers.0.mlp.shared_expert",)
    assert {t.role for t in block.tensors} == {"gate_up", "down"}
    weights = block.expert_weights(model, 1)
    assert tuple(weights["gate_up"].shape) == (56, 64) and tuple(weights["down"].shape) == (64, 28)
    before = _logits(model)
    # What a generic k setter does: every int copy of k the anatomy lists.
    for name, attr in block.top_k_attrs:
        setattr(model.get_submodule(name), attr, 1)
    assert model.model.layers[0].mlp.gate.top_k == 1
    assert anatomy(model).experts[0].top_k == 1
    assert not torch.allclose(_logits(model), before)


def test_technique_metrics_and_extras(carved):
    _, _, ctx = carved
    assert ctx.metrics["active_ffn_fraction"] == pytest.approx(1.0)
    assert ctx.metrics["active_params"] == ctx.metrics["moe_total_params"]
    assert ctx.metrics["conversion_seconds"] > 0
    plan = ctx.extras["moefy"]["plan"]
    assert plan["n_shared"] == [16, 16] and plan["width"] == [28, 28]


def test_representative_router_and_seeded_determinism(byte_tokenizer, tiny_llama):
    config = make_config("moefy", n_experts=4, top_k=2, router="representative", calibration_tokens=512)
    a = apply_(copy.deepcopy(tiny_llama), config, _ctx(byte_tokenizer))
    b = apply_(copy.deepcopy(tiny_llama), config, _ctx(byte_tokenizer))
    assert torch.equal(_logits(a), _logits(b))
    assert hasattr(a.model.layers[0].mlp.gate, "up_weight")
    moefy.set_top_k_(a, 4)
    assert (_logits(a) - _logits(tiny_llama)).abs().max().item() < 1e-5


def test_upcycled_uniform_router_reproduces_the_dense_model(tiny_llama):
    for k in (1, 3, 4):
        model = apply_(copy.deepcopy(tiny_llama), make_config("moefy", mode="upcycle", n_experts=4, top_k=k))
        diff = (_logits(model) - _logits(tiny_llama)).abs().max().item()
        assert diff < 1e-5, f"upcycled k={k}: logits differ by {diff}"
    block = model.model.layers[0].mlp
    assert tuple(block.experts.gate_up_proj.shape) == (4, 256, 64)  # E whole copies of the 128-neuron MLP
    assert block.shared_expert is None
    assert moefy.active_counts(model)["active_ffn_fraction"] == pytest.approx(
        4.0
    )  # k copies of the dense MLP


def test_upcycled_random_router_mixes_identical_copies(tiny_llama):
    """A random router changes which copies run, and their weights still sum to 1: still the dense output."""
    model = apply_(
        copy.deepcopy(tiny_llama), make_config("moefy", mode="upcycle", n_experts=4, top_k=2, router_std=0.5)
    )
    assert model.model.layers[0].mlp.gate.weight.abs().sum() > 0
    assert (_logits(model) - _logits(tiny_llama)).abs().max().item() < 1e-4


def test_bad_inputs_are_refused_before_work(tiny_llama, tiny_moe, byte_tokenizer):
    with pytest.raises(ConfigError, match="top_k=9 is out of range for n_experts=8"):
        make_config("moefy", n_experts=8, top_k=9)
    with pytest.raises(ConfigError, match="n_experts=1"):
        make_config("moefy", n_experts=1, top_k=1)
    model = copy.deepcopy(tiny_llama)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    # 128 - 10 shared = 118 neurons do not split into 4 experts; the message says which n_shared would.
    with pytest.raises(ConfigError, match=r"do not split into n_experts=4.*n_shared=12"):
        apply_(model, make_config("moefy", n_experts=4, top_k=2, n_shared=10), _ctx(byte_tokenizer))
    with pytest.raises(ConfigError, match="only 8 of the 128"):
        apply_(model, make_config("moefy", n_experts=16, top_k=2, n_shared=120), _ctx(byte_tokenizer))
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())  # untouched
    with pytest.raises(ConfigError, match="not a Llama-style MLP"):
        apply_(copy.deepcopy(tiny_moe), make_config("moefy", n_experts=4, top_k=2), _ctx(byte_tokenizer))
    once = apply_(copy.deepcopy(tiny_llama), make_config("moefy", mode="upcycle", n_experts=2, top_k=1))
    with pytest.raises(ConfigError, match="already a Mixture-of-Experts block"):
        apply_(once, make_config("moefy", mode="upcycle", n_experts=2, top_k=1))
    with pytest.raises(ConfigError, match="out of range"):
        moefy.set_top_k_(once, 3)


def test_stacks_with_quantization(tiny_llama, byte_tokenizer):
    """moefy -> rtn: the preview gives rtn the converted shapes before work; rtn quantizes the fused experts."""
    # 64 shared + 2 experts of 32 neurons: every width takes groups of 32.
    moe = make_config("moefy", n_experts=2, top_k=1, n_shared=64, calibration_tokens=512)
    pipeline = [moe, make_config("rtn", bits=4, group_size=32)]
    assert check_pipeline(tiny_llama, pipeline) == []  # nothing deferred: the preview answered
    model = apply_pipeline_(copy.deepcopy(tiny_llama), pipeline, _ctx(byte_tokenizer))
    experts = model.model.layers[0].mlp.experts
    assert torch.isfinite(_logits(model)).all()
    # A 4-bit grid per group of 32 along the input: at most 16 distinct values per group.
    group = experts.gate_up_proj[0, 0, :32]
    assert torch.unique(group).numel() <= 16
    # A group size the experts' 32-wide inputs do not take is refused at the start, naming the second step.
    bad = [pipeline[0], make_config("rtn", bits=4, group_size=64)]
    with pytest.raises(ConfigError, match="Step 2 of 2"):
        check_pipeline(tiny_llama, bad)


@pytest.mark.slow
def test_demo_moe_builds_caches_and_matches_the_dense_demo_at_k_equal_e():
    from workbench.evaluate import Suite, evaluate
    from workbench.models import clear_cache, load_model
    from workbench.models.demo_moe import DEMO_MOE_SETTINGS, demo_moe_folder, demo_moe_info

    messages = []
    loaded = load_model("demo-moe", progress=lambda f, msg: messages.append(msg))
    info = demo_moe_info()
    assert info is not None and info["settings"] == DEMO_MOE_SETTINGS
    assert (demo_moe_folder() / "experts.safetensors").is_file()
    assert "made into MoE" in loaded.description and "8 experts" in loaded.description
    an = anatomy(loaded.model)
    assert an.is_moe and len(an.experts) == 30 and {b.top_k for b in an.experts} == {8}
    dense = load_model("demo")
    suite = Suite(
        "moe-test", n_tokens=1024, context_length=512, scoring="second_half", speed=False, n_generations=0
    )
    full = evaluate(
        loaded.model, loaded.tokenizer, suite, base_model=dense.model, base_fingerprint=dense.fingerprint
    ).metrics
    ref = evaluate(dense.model, dense.tokenizer, suite).metrics
    assert full["ppl"] == pytest.approx(ref["ppl"], rel=1e-4), (full["ppl"], ref["ppl"])
    assert full["kl_mean"] < 1e-6
    model = copy.deepcopy(loaded.model)
    moefy.set_top_k_(model, 4)
    half = evaluate(
        model, loaded.tokenizer, suite, base_model=dense.model, base_fingerprint=dense.fingerprint
    ).metrics
    assert torch.isfinite(torch.tensor(half["ppl"])) and half["ppl"] > ref["ppl"] and half["kl_mean"] > 1e-3
    # A second load reads the cache (no rebuild) and gives the same weights.
    clear_cache()
    again = load_model("demo-moe")
    assert again.fingerprint == loaded.fingerprint


def test_route_technique_changes_k_on_a_converted_model(carved):
    """The expert-routing technique reads the converted blocks through the anatomy: k and top-p apply."""
    route = pytest.importorskip("workbench.techniques.route")
    dense, model, _ = carved
    by_route = apply_(copy.deepcopy(model), route.RouteConfig(k=2, measure_tokens=0))
    by_hand = copy.deepcopy(model)
    moefy.set_top_k_(by_hand, 2)
    assert torch.equal(_logits(by_route), _logits(by_hand))
    everything = apply_(copy.deepcopy(model), route.RouteConfig(k=2, top_p=1.0, measure_tokens=0))
    assert (_logits(everything) - _logits(dense)).abs().max().item() < 1e-5


def test_top_p_and_skipping_on_a_converted_model(carved):
    """The router's weights are predicted output shares, so dynamic routing has something to compare."""
    route = pytest.importorskip("workbench.techniques.route")
    dense, model, _ = carved
    gate = model.model.layers[0].mlp.gate
    with torch.no_grad():
        _, weights, _ = gate(torch.randn(6, 64, generator=torch.Generator().manual_seed(5)))
    assert torch.allclose(weights.sum(-1), torch.ones(6), atol=1e-4)  # at k = E the shares sum to 1
    assert (weights[:, :-1] >= weights[:, 1:]).all()  # in the order of the picks
    one = copy.deepcopy(model)
    moefy.set_top_k_(one, 1)
    tiny_p = apply_(copy.deepcopy(model), route.RouteConfig(top_p=1e-6, measure_tokens=0))
    assert torch.allclose(_logits(tiny_p), _logits(one), atol=1e-6)
    skip = apply_(copy.deepcopy(model), route.RouteConfig(skip_beta=0.5, measure_tokens=0))
    assert torch.isfinite(_logits(skip)).all()
    assert not torch.allclose(_logits(skip), _logits(dense), atol=1e-4)


def test_recorded_run_then_route_on_top(registry_url):
    """moefy as a recorded run on tiny-llama, and moefy -> route k=1 as a stacked one (active params drop)."""
    from workbench.experiment import run_experiment
    from workbench.registry import Registry

    moe = make_config("moefy", n_experts=4, top_k=4, calibration_tokens=512)
    first = run_experiment("tiny-llama", [moe], "quick", registry=registry_url)
    assert first.status == "done", first.error
    assert first.metrics["active_ffn_fraction"] == pytest.approx(1.0)
    assert first.metrics["kl_mean"] < 1e-6  # k = E: the dense model's outputs
    route = pytest.importorskip("workbench.techniques.route")
    stacked = run_experiment("tiny-llama", [moe, route.RouteConfig(k=1)], "quick", registry=registry_url)
    assert stacked.status == "done", stacked.error
    assert stacked.metrics["stage2_active_params"] < first.metrics["active_params"]
    assert stacked.metrics["kl_mean"] > 1e-4
    frame = Registry.open(registry_url).runs_frame()
    assert len(frame) == 2


def _peaky_llama():
    """The tiny Llama with a louder FFN and a sharper head, so that routing to fewer experts costs a visible KL
    (the random model's near-uniform outputs hide it)."""
    from workbench.tiny import tiny_llama

    model = tiny_llama()
    with torch.no_grad():
        model.model.norm.weight.mul_(30)
        for layer in model.model.layers:
            layer.mlp.down_proj.weight.mul_(8)
    return model


def _kl_to(model, reference_logits, ids):
    from workbench.distill.losses import soft_loss

    with torch.no_grad():
        return float(soft_loss(model(input_ids=ids).logits.float(), reference_logits, "forward_kl"))


def test_recovery_by_distillation_at_the_reduced_k(byte_tokenizer, tmp_path, monkeypatch):
    """moefy -> route k=2 -> distill against the dense model: KL to it falls on held-out text, the model still
    routes at k = 2, the same pipeline again loads the trained student, and the saved folder reloads."""
    from safetensors.torch import load_file

    monkeypatch.setenv("WORKBENCH_HOME", str(tmp_path))  # where the distilled student is kept
    dense = _peaky_llama()
    corpus = get_corpus("python-docs")
    ids = torch.tensor(byte_tokenizer(corpus.text("evaluation")[:2000])["input_ids"][:256]).reshape(4, 64)
    with torch.no_grad():
        reference = dense(input_ids=ids).logits.float()
    carve = [
        make_config("moefy", n_experts=4, top_k=4, calibration_tokens=1024),
        make_config("route", k=2, measure_tokens=0),
    ]
    recover = [*carve, make_config("distill", steps=20, seq_len=64, lr=1e-3, alpha=1.0, temperature=1.0)]

    def run(pipeline):
        ctx = ApplyContext(tokenizer=byte_tokenizer, corpus=corpus, base=dense, seed=0)
        return apply_pipeline_(copy.deepcopy(dense), pipeline, ctx), ctx

    carved, _ = run(carve)
    recovered, ctx = run(recover)
    before, after = _kl_to(carved, reference, ids), _kl_to(recovered, reference, ids)
    assert before > 0.1, before  # k = 2 of 4 loses something to recover
    assert after < 0.95 * before, (before, after)
    assert ctx.metrics["training_steps"] == 20 and ctx.metrics["training_reused"] == 0
    # Trained at k = 2, and still routing there (the experts a token skips are still skipped).
    assert {b.top_k for _, b in moefy.moe_blocks(recovered)} == {2}
    assert {b.top_k for b in anatomy(recovered).experts} == {2}
    assert moefy.active_counts(recovered)["active_ffn_fraction"] == pytest.approx((16 + 2 * 28) / 128)
    # The same pipeline again loads the finished student instead of training.
    again, again_ctx = run(recover)
    assert again_ctx.metrics["training_reused"] == 1
    assert torch.equal(_logits(again), _logits(recovered))
    # The student folder holds the carved tensors: the structure from the plan takes them back.
    from workbench.tiny import tiny_llama

    fresh = moefy.build_structure_(tiny_llama(), moefy.Plan.from_dict(ctx.extras["moefy"]["plan"]))
    state = load_file(str(next(iter(Path(ctx.extras["student_folder"]).glob("*.safetensors")))))
    missing, unexpected = fresh.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}  # tied to the embeddings
    moefy.set_top_k_(fresh, 2)
    assert torch.allclose(_logits(fresh), _logits(recovered), atol=1e-6)


def test_distilling_a_carved_model_at_k_equal_e_is_refused(byte_tokenizer, tiny_llama):
    """At k = E a carved model uses more parameters per token than the dense teacher (its routers): nothing
    to recover, and the message says to lower k first."""
    pipeline = [
        make_config("moefy", n_experts=4, top_k=4, calibration_tokens=512),
        make_config("distill", steps=1, seq_len=64),
    ]
    ctx = ApplyContext(tokenizer=byte_tokenizer, corpus=get_corpus("python-docs"), base=tiny_llama, seed=0)
    with pytest.raises(ConfigError, match="route to a lower k first"):
        apply_pipeline_(copy.deepcopy(tiny_llama), pipeline, ctx)
    from workbench.techniques.moefy import recovery_pipeline

    with pytest.raises(ConfigError, match="steps=0"):
        recovery_pipeline(2, 0)
    route, distill = recovery_pipeline(2, 5)
    assert (route.k, distill.steps, distill.alpha, distill.temperature) == (2, 5, 1.0, 1.0)


def test_quality_summary_ships_the_bench_table_only_for_the_cached_recipe(
    byte_tokenizer, tiny_llama, tmp_path, monkeypatch
):
    """demo-moe without runs of its own shows the table measured by bench/moe_routing.py, labelled so; another
    recipe, another model, or a model moefy did not make gets no such table."""
    import json

    from workbench.models import demo_moe

    monkeypatch.setenv("WORKBENCH_HOME", str(tmp_path))
    ctx = _ctx(byte_tokenizer)
    model = apply_(
        copy.deepcopy(tiny_llama), make_config("moefy", n_experts=8, top_k=8, calibration_tokens=512), ctx
    )
    folder = demo_moe.demo_moe_folder()
    folder.mkdir(parents=True)
    (folder / "experts.safetensors").write_bytes(b"")
    info = {
        "version": demo_moe.DEMO_MOE_VERSION,
        "settings": demo_moe.DEMO_MOE_SETTINGS,
        "plan": ctx.extras["moefy"]["plan"],
        "source": "demo",
        "build_seconds": 61.0,
    }
    (folder / "moefy.json").write_text(json.dumps(info))

    summary = demo_moe.quality_summary(model, source="demo-moe")
    assert summary.source == "shipped" and "bench/moe_routing.py" in summary.note
    recipe = dict(summary.recipe)
    assert recipe["neurons per expert"] == "14" and recipe["shared neurons"].startswith("16")
    assert recipe["calibration"].startswith("4096") and recipe["seed"] == "0" and recipe["build"] == "61 s"
    by_label = {p.label: p for p in summary.points}
    six = by_label["k = 6"]
    assert six.ppl == 15.288 and six.delta_ppl == pytest.approx(15.288 / 11.919 - 1)
    assert six.ffn_active == pytest.approx((16 + 6 * 14) / 128) and six.run_id is None
    assert by_label["k = 6 + distill 12 steps"].ppl < six.ppl  # the shipped recovery row

    # The same blocks under another name, or a cached copy of another recipe: the recipe only, nothing shipped.
    assert demo_moe.quality_summary(model, source="tiny-carved").source == ""
    (folder / "moefy.json").write_text(json.dumps({**info, "version": demo_moe.DEMO_MOE_VERSION + 1}))
    other = demo_moe.quality_summary(model, source="demo-moe")
    assert other.source == "" and other.points == () and "calibration" not in dict(other.recipe)
    assert demo_moe.quality_summary(tiny_llama, source="demo-moe") is None


def test_recovery_pipeline_as_a_recorded_run(registry_url, tmp_path, monkeypatch):
    """moefy -> route k=1 -> distill on tiny-llama through run_experiment: recorded with the training metrics,
    at k = 1, and the same request again is answered from the registry."""
    from workbench.experiment import run_experiment

    monkeypatch.setenv("WORKBENCH_HOME", str(tmp_path))
    pipeline = [
        make_config("moefy", n_experts=4, top_k=4, calibration_tokens=512),
        make_config("route", k=1),
        make_config("distill", steps=3, seq_len=64, alpha=1.0, temperature=1.0),
    ]
    first = run_experiment("tiny-llama", pipeline, "quick", registry=registry_url)
    assert first.status == "done", first.error
    assert first.metrics["training_steps"] == 3 and first.metrics["active_experts"] == pytest.approx(1.0)
    assert (
        first.metrics["stage2_active_params"] < first.metrics["stage1_active_params"]
    )  # route's k < moefy's
    again = run_experiment("tiny-llama", pipeline, "quick", registry=registry_url)
    assert again.reused and again.run_id == first.run_id
