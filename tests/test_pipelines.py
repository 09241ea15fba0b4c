"""Stacked pipelines as runs: every step checked up front, per-stage columns, technique metrics, prefix reuse,
lineage. On the tiny random Llama (``tiny-llama``: hidden 64, intermediate 128, 2 layers), with real quantizers
where they stack (rtn 8-bit, then mixed 4-bit with the down projections at 8) and test-only techniques that
count their calls.
"""

from __future__ import annotations

import collections
import dataclasses

import pytest
import torch

from workbench.errors import ConfigError
from workbench.evaluate import get_suite
from workbench.experiment import find_recorded, run_experiment
from workbench.models import load_model
from workbench.prefix_cache import PrefixCache, tensor_bytes
from workbench.registry import Registry
from workbench.techniques import base as tbase
from workbench.techniques.mixed import MixedPrecisionConfig
from workbench.techniques.rtn import RTNConfig

CALLS: collections.Counter[str] = collections.Counter()


@dataclasses.dataclass(frozen=True)
class CountConfig:
    """Test technique: scales every decoder linear by `factor`, counts its calls under `name`, reports a metric."""

    factor: float = 0.95
    name: str = "a"
    metric: str = "scaled_linears"


def _apply_count(model, config, ctx):
    CALLS[config.name] += 1
    n = 0
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            module.weight.data.mul_(config.factor)
            n += 1
    ctx.metrics[config.metric] = n
    ctx.extras["count"] = {"name": config.name}
    return model


@dataclasses.dataclass(frozen=True)
class RandomConfig:
    """Test technique: adds noise from an unseeded generator (a result that must not be cached)."""

    scale: float = 1e-3


def _apply_random(model, config, ctx):
    CALLS["random"] += 1
    for p in model.parameters():
        p.data.add_(
            torch.randn(p.shape, generator=torch.Generator().manual_seed(CALLS["random"])) * config.scale
        )
    return model


@dataclasses.dataclass(frozen=True)
class PruneConfig:
    """Test technique: keeps the first `keep` feed-forward channels of every layer (a shape-changing step)."""

    keep: int = 96


@dataclasses.dataclass(frozen=True)
class BlindPruneConfig:
    """The same pruning, declaring nothing: later checks must wait until it has run."""

    keep: int = 96


def _check_prune(model, config) -> None:
    width = model.config.intermediate_size
    if not 0 < config.keep <= width:
        raise ConfigError(f"prune: keep={config.keep} must be between 1 and the width {width}.")


def _apply_prune(model, config, ctx):
    CALLS["prune"] += 1
    k = config.keep
    for layer in model.model.layers:
        mlp = layer.mlp
        for name in ("gate_proj", "up_proj"):  # (intermediate, hidden) -> (k, hidden)
            old = getattr(mlp, name)
            new = torch.nn.Linear(old.in_features, k, bias=False)
            new.weight.data.copy_(old.weight.data[:k])
            setattr(mlp, name, new)
        old = mlp.down_proj  # (hidden, intermediate) -> (hidden, k)
        new = torch.nn.Linear(k, old.out_features, bias=False)
        new.weight.data.copy_(old.weight.data[:, :k])
        mlp.down_proj = new
    model.config.intermediate_size = k
    return model


_TEST_TECHNIQUES = {
    "test-count": (CountConfig, _apply_count, None, "other"),
    "test-random": (RandomConfig, _apply_random, None, "other"),
    "test-prune": (PruneConfig, _apply_prune, _check_prune, "prune"),
    "test-blind-prune": (BlindPruneConfig, _apply_prune, _check_prune, "prune"),
}


@pytest.fixture(autouse=True)
def _techniques():
    """Register the test techniques for one test and remove them afterwards."""
    for name, (cls, fn, check, kind) in _TEST_TECHNIQUES.items():
        tbase.register(name, cls, kind=kind, check=check)(fn)
    tbase.register_stacking(CountConfig, same_shapes=True)
    tbase.register_stacking(RandomConfig, same_shapes=True, cacheable=False)
    tbase.register_stacking(PruneConfig, preview=lambda m, c: tbase.meta_model(m, intermediate_size=c.keep))
    CALLS.clear()
    yield
    for name, (cls, *_rest) in _TEST_TECHNIQUES.items():
        tbase._TECHNIQUES.pop(name, None)
        tbase._BY_CONFIG.pop(cls, None)
        tbase._STACKING.pop(cls, None)


@pytest.fixture()
def loaded():
    return load_model("tiny-llama")


def _n_linears_of(model) -> int:
    return sum(isinstance(m, torch.nn.Linear) for m in model.modules())


def _n_linears(loaded) -> int:
    return _n_linears_of(loaded.model)


def _frame(url, **filters):
    with Registry.open(url) as reg:
        return reg.runs_frame(**filters)


MIXED = MixedPrecisionConfig(bits=4, group_size=32, high_precision=("*.down_proj",))


def test_three_step_pipeline_is_recorded_found_again_and_has_a_column_per_stage_parameter(
    loaded, registry_url
):
    pipeline = [RTNConfig(bits=8, group_size=32), CountConfig(0.99), MIXED]
    res = run_experiment(loaded, pipeline, "quick", registry=registry_url, prefix_cache=PrefixCache())
    assert res.status == "done", res.error
    parts = res.label.split(" → ")  # the label names every stage, in order
    assert (
        len(parts) == 3
        and [p.startswith(n) for p, n in zip(parts, ("rtn", "test-count", "mixed"))] == [True] * 3
    )

    again = run_experiment(loaded, pipeline, "quick", registry=registry_url)
    assert again.reused and again.run_id == res.run_id
    with Registry.open(registry_url) as reg:
        found = find_recorded(loaded, pipeline, "quick", reg)
    assert found is not None and found.run_id == res.run_id and found.metrics == pytest.approx(res.metrics)

    row = _frame(registry_url).set_index("run_id").loc[res.run_id]
    assert (row["stage1_technique"], row["stage2_technique"], row["stage3_technique"]) == (
        "rtn",
        "test-count",
        "mixed",
    )
    assert row["stage1_param_bits"] == 8 and row["stage3_param_bits"] == 4
    assert row["stage3_param_high_precision"] == '["*.down_proj"]' and row["stage2_param_factor"] == 0.99
    assert row["param_bits"] == 8 and row["technique"] == "rtn"  # today's first-step columns stay
    assert row["pipeline"] == res.label

    assert list(_frame(registry_url, stage_technique="mixed")["run_id"]) == [res.run_id]
    assert list(_frame(registry_url, stage_technique=["gptq", "test-count"])["run_id"]) == [res.run_id]
    assert _frame(registry_url, technique="mixed").empty  # `technique` is the first step
    assert _frame(registry_url, stage_technique="gptq").empty

    with Registry.open(registry_url) as reg:
        extras = reg.get_run(res.run_id).extras
    assert [s["technique"] for s in extras["stages"]] == ["rtn", "test-count", "mixed"]
    assert extras["mixed"]["high_modules"] == 2 and extras["count"] == {"name": "a"}


def test_changing_only_the_last_step_reuses_the_prefix_and_matches_a_fresh_computation(
    loaded, registry_url, tmp_path
):
    cache = PrefixCache()
    a, b = CountConfig(0.9, name="a"), CountConfig(0.95, name="b")
    first = run_experiment(
        loaded, [a, b, RTNConfig(bits=4)], "quick", registry=registry_url, prefix_cache=cache
    )
    assert first.ok and CALLS == {"a": 1, "b": 1} and len(cache) == 2  # [a, b] and the whole [a, b, rtn]

    second = run_experiment(
        loaded, [a, b, RTNConfig(bits=3)], "quick", registry=registry_url, prefix_cache=cache
    )
    assert second.ok and not second.reused
    assert CALLS == {"a": 1, "b": 1}, "the prefix [a, b] was applied again"
    assert [s["reused"] for s in second.extras["stages"]] == [True, True, False]
    assert second.metrics["stage1_scaled_linears"] == _n_linears(loaded)  # reused stages still report

    # The same pipeline computed from scratch gives the same quality: the cached prefix was never modified.
    fresh = run_experiment(
        loaded,
        [a, b, RTNConfig(bits=3)],
        "quick",
        registry=f"sqlite:///{tmp_path / 'o.db'}",
        prefix_cache=False,
    )
    assert CALLS == {"a": 2, "b": 2}
    for name in ("ppl", "kl_mean", "top1_agree", "size_bytes"):
        assert second.metrics[name] == pytest.approx(fresh.metrics[name], rel=1e-5), name
    third = run_experiment(
        loaded, [a, b, RTNConfig(bits=4)], "quick", registry=registry_url, prefix_cache=cache, reuse=False
    )
    assert CALLS == {"a": 2, "b": 2} and third.metrics["kl_mean"] == pytest.approx(first.metrics["kl_mean"])


def test_a_run_extended_by_one_step_starts_from_the_runs_own_model(loaded, registry_url):
    """Measured in a runtime after its simulation (the same steps plus one), a variant is not computed again."""
    cache = PrefixCache()
    a = CountConfig(0.9, name="a")
    alone = run_experiment(loaded, [a], "quick", registry=registry_url, prefix_cache=cache)
    assert alone.ok and CALLS == {"a": 1} and len(cache) == 1
    extended = run_experiment(
        loaded, [a, RTNConfig(bits=4)], "quick", registry=registry_url, prefix_cache=cache
    )
    assert extended.ok and CALLS == {"a": 1}
    assert [s["reused"] for s in extended.extras["stages"]] == [True, False]


def test_a_technique_that_opts_out_is_never_reused_from_the_cache(loaded, registry_url):
    cache = PrefixCache()
    for bits in (4, 3):
        res = run_experiment(
            loaded, [RandomConfig(), RTNConfig(bits=bits)], "quick", registry=registry_url, prefix_cache=cache
        )
        assert res.ok, res.error
    assert CALLS["random"] == 2 and len(cache) == 0


def test_bad_value_in_step_three_is_refused_before_step_one_runs(loaded, registry_url):
    pipeline = [CountConfig(name="a"), CountConfig(name="b"), RTNConfig(bits=4, group_size=48)]
    with pytest.raises(ConfigError, match=r"Step 3 of 3 \(rtn\): rtn: group_size=48 does not divide"):
        run_experiment(loaded, pipeline, "quick", registry=registry_url, prefix_cache=PrefixCache())
    assert sum(CALLS.values()) == 0
    assert _frame(registry_url, status=None).empty


def test_a_declared_preview_lets_later_checks_see_the_pruned_shapes(loaded, registry_url):
    # down_proj becomes 96 wide: 64 divides the unpruned 128 but not 96, so only a check on the preview refuses it.
    with pytest.raises(ConfigError, match=r"Step 2 of 2 \(rtn\).*in_features=96"):
        run_experiment(loaded, [PruneConfig(96), RTNConfig(bits=4, group_size=64)], registry=registry_url)
    assert CALLS["prune"] == 0 and _frame(registry_url, status=None).empty
    ok = run_experiment(
        loaded,
        [PruneConfig(96), RTNConfig(bits=4, group_size=32)],
        registry=registry_url,
        prefix_cache=PrefixCache(),
    )
    assert ok.ok, ok.error
    assert ok.metrics["n_params"] < run_experiment(loaded, [], registry=registry_url).metrics["n_params"]
    assert loaded.model.config.intermediate_size == 128  # the base model is left alone


def test_a_failure_only_knowable_at_step_three_leaves_no_done_run(loaded, registry_url):
    pipeline = [BlindPruneConfig(96), CountConfig(), RTNConfig(bits=4, group_size=64)]
    res = run_experiment(loaded, pipeline, "quick", registry=registry_url, prefix_cache=PrefixCache())
    assert res.status == "failed"
    assert res.error.startswith("Step 3 of 3 (rtn): rtn: group_size=64 does not divide in_features=96")
    assert CALLS == {"prune": 1, "a": 1}  # steps 1 and 2 ran: nothing said what shapes they make
    frame = _frame(registry_url, status=None)
    assert list(frame["status"]) == ["failed"] and _frame(registry_url).empty
    with Registry.open(registry_url) as reg:
        assert (
            reg.find_done(loaded.fingerprint, tbase.pipeline_to_json(pipeline), get_suite("quick").key)
            is None
        )


def test_a_failure_inside_a_later_step_names_the_step(loaded, registry_url):
    def boom(model, config, ctx):
        raise RuntimeError("out of patience")

    @dataclasses.dataclass(frozen=True)
    class BoomConfig:
        """Test technique that fails while applying."""

    tbase.register("test-boom", BoomConfig)(boom)
    try:
        res = run_experiment(loaded, [CountConfig(), BoomConfig()], registry=registry_url, prefix_cache=False)
    finally:
        tbase._TECHNIQUES.pop("test-boom", None)
        tbase._BY_CONFIG.pop(BoomConfig, None)
    assert res.status == "failed" and res.error == "Step 2 of 2 (test-boom): RuntimeError: out of patience"


def test_technique_metrics_land_as_metric_columns_prefixed_by_stage_when_names_repeat(loaded, registry_url):
    one = run_experiment(loaded, [CountConfig(0.9)], registry=registry_url)
    two = run_experiment(
        loaded, [CountConfig(0.9), CountConfig(0.95, name="b")], registry=registry_url, prefix_cache=False
    )
    # A name the evaluation measures keeps the evaluation's value; the technique's gets its stage prefix.
    own_ppl = run_experiment(loaded, [CountConfig(0.8, metric="ppl")], registry=registry_url)
    n = _n_linears(loaded)
    assert one.metrics["scaled_linears"] == n
    assert "scaled_linears" not in two.metrics
    assert two.metrics["stage1_scaled_linears"] == two.metrics["stage2_scaled_linears"] == n
    assert own_ppl.metrics["stage1_ppl"] == n and own_ppl.metrics["ppl"] != n

    frame = _frame(registry_url).set_index("run_id")
    assert frame.loc[one.run_id, "metric_scaled_linears"] == n
    assert frame.loc[two.run_id, "metric_stage2_scaled_linears"] == n
    assert frame.loc[own_ppl.run_id, "metric_stage1_ppl"] == n
    with Registry.open(registry_url) as reg:
        extras = reg.get_run(two.run_id).extras
    assert extras["stage1_count"] == {"name": "a"} and extras["stage2_count"] == {"name": "b"}


def test_a_stacked_run_names_its_longest_recorded_prefix_as_parent(loaded, registry_url):
    a, b = CountConfig(0.9), CountConfig(0.95, name="b")
    cache = PrefixCache()
    only_a = run_experiment(loaded, [a], registry=registry_url, prefix_cache=cache)
    assert only_a.parent_id is None  # a single step builds on the base model, not on a run
    ab = run_experiment(loaded, [a, b], registry=registry_url, prefix_cache=cache)
    abc = run_experiment(loaded, [a, b, RTNConfig(bits=4)], registry=registry_url, prefix_cache=cache)
    a_c = run_experiment(loaded, [a, RTNConfig(bits=4)], registry=registry_url, prefix_cache=cache)
    assert ab.parent_id == only_a.run_id and abc.parent_id == ab.run_id and a_c.parent_id == only_a.run_id
    chosen = run_experiment(
        loaded, [a, b, RTNConfig(bits=3)], registry=registry_url, prefix_cache=cache, parent_id=only_a.run_id
    )
    with Registry.open(registry_url) as reg:
        assert reg.get_run(abc.run_id).parent_id == ab.run_id
        assert reg.get_run(chosen.run_id).parent_id == only_a.run_id  # the caller's choice wins
    frame = _frame(registry_url).set_index("run_id")
    assert frame.loc[abc.run_id, "parent_id"] == ab.run_id


def test_apply_pipeline_merges_stage_metrics_and_checks_every_step_first(tiny_llama):
    import copy

    model = copy.deepcopy(tiny_llama)
    ctx = tbase.ApplyContext()
    tbase.apply_pipeline_(model, [CountConfig(name="a"), RTNConfig(bits=8), CountConfig(name="b")], ctx)
    assert [s.technique for s in ctx.stages] == ["test-count", "rtn", "test-count"]
    n = _n_linears_of(tiny_llama)
    assert ctx.metrics == {"stage1_scaled_linears": n, "stage3_scaled_linears": n}
    with pytest.raises(ConfigError, match=r"Step 2 of 2 \(rtn\)"):
        tbase.apply_pipeline_(copy.deepcopy(tiny_llama), [CountConfig(name="c"), RTNConfig(group_size=48)])
    assert CALLS["c"] == 0
    assert tbase.check_pipeline(tiny_llama, [BlindPruneConfig(96), RTNConfig(group_size=64)]) == [1]


def test_prefix_cache_is_bounded_by_bytes_and_evicts_the_least_recently_used(tiny_llama):
    size = tensor_bytes(tiny_llama)
    steps = [CountConfig(name="x")]
    key = lambda name: PrefixCache.key(_Fp(name), steps, device="cpu", corpus_key="c", seed=0)
    too_small = PrefixCache(max_bytes=size - 1)
    assert not too_small.put(key("m1"), tiny_llama, [], steps) and len(too_small) == 0

    cache = PrefixCache(max_bytes=2 * size, min_free_fraction=0.0)
    assert cache.put(key("m1"), tiny_llama, [], steps) and cache.put(key("m2"), tiny_llama, [], steps)
    assert cache.take(key("m1")) is not None  # m1 is now the most recently used
    assert cache.put(key("m3"), tiny_llama, [], steps)
    assert cache.peek(key("m2")) is None and cache.peek(key("m1")) is not None and len(cache) == 2
    assert cache.nbytes == 2 * size

    model, _records = cache.take(key("m1"))
    model.model.layers[0].mlp.down_proj.weight.data.zero_()  # a copy: the cached model is untouched
    assert cache.peek(key("m1")).model.layers[0].mlp.down_proj.weight.abs().sum() > 0
    assert not PrefixCache(max_bytes=0).put(key("m1"), tiny_llama, [], steps)


@dataclasses.dataclass(frozen=True)
class _Fp:
    fingerprint: str


def test_real_quantizers_stack_and_a_packed_model_is_refused_at_the_step_that_sees_it(loaded, registry_url):
    pytest.importorskip("bitsandbytes")
    from workbench.techniques.bnb import BnbConfig

    stacked = run_experiment(
        loaded, [MIXED, BnbConfig(mode="nf4")], registry=registry_url, prefix_cache=PrefixCache()
    )
    assert stacked.ok, stacked.error
    assert stacked.extras["mixed"]["high_modules"] == 2 and stacked.metrics["kl_mean"] > 0
    # The up-front check sees the float model (a quantizer keeps shapes); only the real output of step 1 shows
    # that it is already packed, so step 2's check refuses it just before it runs, and no run is done.
    twice = run_experiment(
        loaded,
        [BnbConfig(mode="nf4"), BnbConfig(mode="int8")],
        registry=registry_url,
        prefix_cache=PrefixCache(),
    )
    assert twice.status == "failed" and twice.error.startswith("Step 2 of 2 (bnb): bnb:"), twice.error
    assert "already" in twice.error
    assert list(_frame(registry_url)["run_id"]) == [stacked.run_id]
