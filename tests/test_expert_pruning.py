"""Expert pruning: the pruned model is smaller, runs, saves and reloads, and the choice follows the scores."""

from __future__ import annotations

import copy

import pytest
import torch
from test_anatomy import MOE, E, K, _build

from workbench.anatomy import anatomy
from workbench.corpus import get_corpus
from workbench.errors import ConfigError
from workbench.models import size_report
from workbench.routing import measure_routing
from workbench.techniques import apply_
from workbench.techniques.base import ApplyContext
from workbench.techniques.prune_experts import PruneExpertsConfig, expert_scores, prune_experts_
from workbench.tiny import byte_tokenizer, tiny_llama, tiny_moe

IDS = torch.randint(3, 100, (2, 16), generator=torch.Generator().manual_seed(2))


def _logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids).logits


def _ctx():
    return ApplyContext(tokenizer=byte_tokenizer(), corpus=get_corpus("python-docs"))


@pytest.mark.parametrize(
    "family", ["qwen2_moe", "mixtral", "gpt_oss", "deepseek_v3", "dbrx", "afmoe", "llama4_text"]
)
def test_pruned_model_runs_is_smaller_and_reloads(family, tmp_path):
    from transformers import AutoModelForCausalLM

    model = _build(*MOE[family][:2])
    before = size_report(model).n_params
    method = "frequency" if family in ("dbrx", "llama4_text") else "reap"
    ctx = ApplyContext(tokenizer=None, corpus=None)
    scores = expert_scores(model, IDS, method)
    keep = {name: sorted(range(E), key=lambda e: -float(s[e]))[: E - 1] for name, s in scores.items()}
    prune_experts_(model, keep)
    assert all(b.n_experts == E - 1 for b in anatomy(model).experts if "attention" not in b.name)
    assert size_report(model).n_params < before
    out = _logits(model)
    assert out.isfinite().all()
    model.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert torch.allclose(_logits(again), out, atol=1e-5), family
    assert ctx.metrics == {}


def test_pruning_a_never_selected_expert_changes_nothing():
    # DeepSeek-V3 selects by score + e_score_correction_bias: a very negative bias keeps expert 3 out of every
    # selection while the other experts' weights stay as they were.
    model = _build(*MOE["deepseek_v3"][:2])
    block = anatomy(model).experts[0]
    bias = model.get_submodule(block.router.name).e_score_correction_bias
    with torch.no_grad():
        bias.zero_()
        bias[3] = -100.0
    ref = _logits(model)
    scores = expert_scores(model, IDS, "frequency")
    assert float(scores[block.name][3]) == 0.0
    prune_experts_(model, {block.name: [0, 1, 2]})
    assert tuple(model.get_submodule(block.router.name).e_score_correction_bias.shape) == (3,)
    assert torch.allclose(_logits(model), ref, atol=1e-6)
    assert len(measure_routing(model, IDS).load[0]) == 3


@pytest.mark.parametrize("method", ["frequency", "router_mass", "reap"])
def test_apply_keeps_the_best_scored_experts_and_records_them(method):
    model = tiny_moe(experts=8, top_k=2)
    base = copy.deepcopy(model)
    ctx = _ctx()
    apply_(model, PruneExpertsConfig(keep=5, method=method, calibration_tokens=128), ctx)
    kept = ctx.extras["prune_experts"]["kept"]
    scores = ctx.extras["prune_experts"]["scores"]
    for name, idx in kept.items():
        s = scores[name]
        assert len(idx) == 5 and min(s[i] for i in idx) >= max(s[i] for i in range(8) if i not in idx)
    assert ctx.metrics["experts_kept"] == 5
    assert ctx.metrics["params_removed"] == size_report(base).n_params - size_report(model).n_params > 0
    assert model.config.num_experts == 5
    assert _logits(model).isfinite().all()


def test_bad_pruning_is_refused_before_work():
    model = tiny_moe(experts=4, top_k=2)
    with pytest.raises(ConfigError, match="keeping 4 of 4 experts prunes nothing"):
        apply_(model, PruneExpertsConfig(keep=4), _ctx())
    with pytest.raises(ConfigError, match="fewer than the 2 each token is routed to"):
        apply_(model, PruneExpertsConfig(keep=1), _ctx())
    with pytest.raises(ConfigError, match="fraction=0"):
        PruneExpertsConfig(fraction=0)
    with pytest.raises(ConfigError, match="method='best'"):
        PruneExpertsConfig(method="best")
    with pytest.raises(ConfigError, match="no experts"):
        apply_(tiny_llama(), PruneExpertsConfig(keep=1), _ctx())
    assert anatomy(model).experts[0].n_experts == 4
    assert K == 2


def test_a_later_step_is_checked_on_the_pruned_shapes_before_any_scoring():
    from workbench.techniques import make_config
    from workbench.techniques.base import check_pipeline

    model = tiny_moe(experts=8, top_k=2)
    pipeline = [PruneExpertsConfig(keep=6), make_config("route", k=7)]
    with pytest.raises(ConfigError, match=r"Step 2 of 2 \(route\): route: k=7 is more than the 6 experts"):
        check_pipeline(model, pipeline)
    assert check_pipeline(model, [PruneExpertsConfig(keep=6), make_config("route", k=6)]) == []
    assert anatomy(model).experts[0].n_experts == 8  # the preview touched nothing


def test_naee_finds_the_subset_that_leaves_the_layer_unchanged():
    # An expert no token selects can be dropped at zero error, so NAEE's best 3-of-4 subset leaves it out.
    model = _build(*MOE["deepseek_v3"][:2])
    block = anatomy(model).experts[0]
    bias = model.get_submodule(block.router.name).e_score_correction_bias
    with torch.no_grad():
        bias.zero_()
        bias[1] = -100.0
    before = {n: t.clone() for n, t in model.state_dict().items()}
    ref = _logits(model)
    from workbench.techniques.prune_experts import naee_search

    kept, errors = naee_search(model, IDS, 3)
    assert kept[block.name] == [0, 2, 3] and errors[block.name][0] == pytest.approx(0.0, abs=1e-8)
    assert len(errors[block.name]) == 4 and errors[block.name][1] > 0
    # every trial was put back: same tensors, counts and config
    assert all(torch.equal(before[n], t) for n, t in model.state_dict().items())
    assert anatomy(model).experts[0].n_experts == 4 and model.config.n_routed_experts == 4
    assert torch.equal(_logits(model), ref)
    ctx = _ctx()
    apply_(model, PruneExpertsConfig(keep=3, method="naee", calibration_tokens=64), ctx)
    assert ctx.extras["prune_experts"]["kept"][block.name] == [0, 2, 3]
    assert torch.allclose(_logits(model), ref, atol=1e-6)


def test_naee_is_refused_for_many_experts():
    model = tiny_moe(experts=32, top_k=2)
    with pytest.raises(ConfigError, match="meant for small expert counts"):
        apply_(model, PruneExpertsConfig(keep=16, method="naee"), _ctx())
