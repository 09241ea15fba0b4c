"""One run end to end on the tiny model: load -> apply -> evaluate -> record, plus failure and interruption."""

from __future__ import annotations

import dataclasses

import pytest

from workbench.errors import ConfigError
from workbench.experiment import run_experiment
from workbench.progress import Progress
from workbench.registry import Registry
from workbench.techniques import base as tbase


@dataclasses.dataclass(frozen=True)
class _ScaleConfig:
    """Test technique: scales every linear weight (a crude, measurable perturbation)."""

    factor: float = 0.9
    fail: bool = False

    def __post_init__(self) -> None:
        if self.factor <= 0:
            raise ConfigError("scale: factor must be positive.")


def _check_scale(model, config) -> None:
    if config.factor > 10:
        raise ConfigError("scale: factor > 10 would blow up the logits; pick a factor up to 10.")


def _apply_scale(model, config, ctx):
    import torch

    for module in ctx.progress.iter(list(model.modules()), desc="scale"):
        if isinstance(module, torch.nn.Linear):
            module.weight.data.mul_(config.factor)
    if config.fail:
        raise RuntimeError("boom inside the technique")
    return model


if "test-scale" not in tbase._TECHNIQUES:
    tbase.register("test-scale", _ScaleConfig, check=_check_scale)(_apply_scale)


def test_baseline_run_is_recorded_with_metrics(registry_url):
    res = run_experiment("tiny-llama", [], "quick", registry=registry_url)
    assert res.status == "done" and not res.reused
    for name in ("ppl", "kl_mean", "top1_agree", "size_mb", "bits_per_weight", "decode_tok_s"):
        assert name in res.metrics, name
    assert res.metrics["kl_mean"] == pytest.approx(0.0, abs=1e-6)
    frame = Registry.open(registry_url).runs_frame()
    assert list(frame["run_id"]) == [res.run_id]
    assert frame.loc[0, "pipeline"] == "baseline"


def test_same_model_pipeline_and_suite_is_found_again_instead_of_recomputed(registry_url):
    first = run_experiment("tiny-llama", [_ScaleConfig(0.8)], "quick", registry=registry_url)
    again = run_experiment("tiny-llama", [_ScaleConfig(0.8)], "quick", registry=registry_url)
    assert first.status == "done" and again.reused and again.run_id == first.run_id
    assert again.metrics == pytest.approx(first.metrics)
    other = run_experiment("tiny-llama", [_ScaleConfig(0.7)], "quick", registry=registry_url)
    assert not other.reused and other.run_id != first.run_id
    assert other.metrics["kl_mean"] > 0


def test_technique_does_not_modify_the_cached_base_model(registry_url):
    from workbench.models import load_model

    loaded = load_model("tiny-llama")
    before = {k: v.clone() for k, v in loaded.model.state_dict().items()}
    run_experiment(loaded, [_ScaleConfig(0.5)], "quick", registry=registry_url, reuse=False)
    after = loaded.model.state_dict()
    assert all((before[k] == after[k]).all() for k in before)


def test_failure_is_recorded_and_earlier_runs_stay_intact(registry_url):
    ok = run_experiment("tiny-llama", [], "quick", registry=registry_url)
    bad = run_experiment("tiny-llama", [_ScaleConfig(0.9, fail=True)], "quick", registry=registry_url)
    assert bad.status == "failed" and "boom inside the technique" in bad.error
    reg = Registry.open(registry_url)
    assert reg.get_run(bad.run_id).status == "failed"
    assert "boom" in reg.get_run(bad.run_id).error
    kept = reg.get_run(ok.run_id)
    assert kept.status == "done" and kept.metrics == pytest.approx(ok.metrics)


def test_cancelled_run_is_recorded_interrupted(registry_url):
    progress = Progress()
    seen = []

    def cancel_when_evaluating(fraction: float, message: str) -> None:
        seen.append(fraction)
        if fraction > 0.6:
            progress.cancel()

    progress = Progress(cancel_when_evaluating)
    res = run_experiment("tiny-llama", [_ScaleConfig(0.6)], "quick", registry=registry_url, progress=progress)
    assert res.status == "interrupted"
    assert Registry.open(registry_url).get_run(res.run_id).status == "interrupted"


def test_bad_input_is_refused_before_anything_is_recorded(registry_url):
    with pytest.raises(ConfigError, match="blow up"):
        run_experiment("tiny-llama", [_ScaleConfig(11.0)], "quick", registry=registry_url)
    with pytest.raises(ConfigError, match="Unknown technique"):
        run_experiment(
            "tiny-llama", [{"technique": "gtpq", "version": 1, "params": {}}], registry=registry_url
        )
    with pytest.raises(ConfigError):
        run_experiment("tiny-llama", [], "no-such-suite", registry=registry_url)
    assert Registry.open(registry_url).runs_frame(status=None).empty


def test_lineage_tags_and_notes_are_stored(registry_url):
    parent = run_experiment("tiny-llama", [], "quick", registry=registry_url)
    child = run_experiment(
        "tiny-llama",
        [_ScaleConfig(0.95)],
        "quick",
        registry=registry_url,
        parent_id=parent.run_id,
        tags=("team-a", "sweep"),
        notes="first try",
    )
    run = Registry.open(registry_url).get_run(child.run_id)
    assert run.parent_id == parent.run_id
    assert set(run.tags) == {"team-a", "sweep"} and run.notes == "first try"
    assert run.environment["torch"]


def test_a_run_records_its_device_and_workbench_version(registry_url):
    import workbench

    res = run_experiment("tiny-llama", registry=registry_url)
    reg = Registry.open(registry_url)
    try:
        env = reg.get_run(res.run_id).environment
    finally:
        reg.close()
    assert env["device"] == "cpu" and env["workbench"] == workbench.__version__


def test_workbench_threads_sets_torch_threads_and_rejects_nonsense(monkeypatch):
    import torch

    from workbench.evaluation.runtime import configure_threads

    before = torch.get_num_threads()
    try:
        monkeypatch.setenv("WORKBENCH_THREADS", "1")
        assert configure_threads() == 1 and torch.get_num_threads() == 1
        monkeypatch.setenv("WORKBENCH_THREADS", "many")
        with pytest.raises(ConfigError, match="WORKBENCH_THREADS"):
            configure_threads()
        monkeypatch.delenv("WORKBENCH_THREADS")
        assert configure_threads() == 1  # unset: torch's own setting stands
    finally:
        torch.set_num_threads(before)
