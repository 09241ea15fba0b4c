"""The Route experts tab on the app's tiny MoE: controls from the model's routing space, runs, load heatmap."""

from __future__ import annotations

import pytest

from widgets import Workbench
from widgets.panels.route import RoutePanel, parse_per_layer
from workbench.errors import ConfigError
from workbench.evaluate import Suite

WAIT = 120
SUITE = Suite(
    "ui-test",
    n_tokens=256,
    context_length=64,
    n_generations=0,
    speed_prompt=16,
    speed_tokens=2,
    speed_repeats=1,
)


def _app(registry_url, model):
    bench = Workbench(registry_url, model=model, suite=SUITE, poll_interval=0)
    bench.workspace.load()  # listeners (the panel's refresh) run now, on this thread
    return bench


@pytest.fixture()
def moe_app(registry_url, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    bench = _app(registry_url, "tiny-moe")
    yield bench
    bench.close()


def test_route_tab_replaces_the_placeholder_and_fits_the_model(moe_app):
    panel = moe_app.route
    assert isinstance(panel, RoutePanel)
    assert (panel.k.min, panel.k.max, panel.k.value) == (1, 8, 2)
    assert panel.controls.layout.display == ""
    assert "8 experts per MoE layer" in panel.status.value
    assert [v for _, v in panel.mode.options] == ["k", "top_p", "skip", "budget"]
    assert {v for _, v in panel.renormalize.options} == {"model", True, False}
    assert panel.prune_keep.min == 2 and panel.prune_keep.max == 7


def test_moving_k_runs_route_and_draws_the_load(moe_app):
    panel = moe_app.route
    panel.k.value = 1
    assert moe_app.jobs.wait(WAIT)
    result = panel.results[-1]
    assert result.status == "done", result.error
    assert result.metrics["active_experts"] == pytest.approx(1.0)
    assert result.metrics["active_params"] < result.metrics["n_params"]
    assert len(panel.load_matrix) == 2 and all(abs(sum(r) - 1) < 1e-9 for r in panel.load_matrix)
    assert panel.heatmap.data and panel.heatmap.data[0].type == "heatmap"
    frame = panel.frame()
    assert "route" in set(frame["technique"]) and "metric_active_params" in frame.columns
    # the same k again is answered from the registry
    panel.submit(1)
    assert panel.results[-1].reused


def test_top_p_mode_and_per_layer_k_build_their_configs(moe_app):
    panel = moe_app.route
    panel.mode.value = "top_p"
    panel.top_p.value = 0.5
    assert moe_app.jobs.wait(WAIT)
    assert panel.results[-1].status == "done"
    assert 1.0 <= panel.results[-1].metrics["active_experts"] <= 8.0
    panel.mode.value = "k"
    panel.per_layer.value = "1:3"
    assert panel.config(k=1).k_per_layer == ((1, 3),)
    panel.per_layer.value = "1-3"
    panel.submit()
    assert "not layer:k" in panel.errors.value
    with pytest.raises(ConfigError):
        parse_per_layer("x:1")


def test_bad_k_is_refused_before_work(moe_app):
    panel = moe_app.route
    panel.per_layer.value = "5:1"
    assert panel.submit() is None
    assert "without experts" in panel.errors.value


def test_prune_runs_and_the_heatmap_shows_fewer_experts(moe_app):
    panel = moe_app.route
    panel.prune_keep.value = 5
    panel.prune_method.value = "frequency"
    panel.prune()
    assert moe_app.jobs.wait(WAIT)
    result = panel.results[-1]
    assert result.status == "done", result.error
    assert [len(r) for r in panel.load_matrix] == [5, 5]
    assert result.metrics["experts_kept"] == 5
    assert [len(r) for r in panel.before_matrix] == [8, 8] and panel.before_box.layout.display == ""
    panel.k.value = 1  # a plain routing run: no before view
    assert moe_app.jobs.wait(WAIT)
    assert panel.before_box.layout.display == "none"


def test_balance_shows_load_before_and_after(moe_app):
    panel = moe_app.route
    panel.balance()
    assert moe_app.jobs.wait(WAIT)
    result = panel.results[-1]
    assert result.status == "done", result.error
    assert result.metrics["load_cv_after"] <= result.metrics["load_cv_before"]
    assert len(panel.before_matrix) == 2 and panel.before_box.layout.display == ""


def test_dense_model_says_it_has_no_experts(registry_url, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    bench = _app(registry_url, "tiny-llama")
    try:
        panel = bench.route
        assert "has no experts" in panel.status.value
        assert panel.controls.layout.display == "none"
    finally:
        bench.close()


def test_budget_mode_chooses_per_layer_k(moe_app):
    panel = moe_app.route
    panel.mode.value = "budget"
    assert panel.per_layer.disabled and panel.budget.layout.display == ""
    panel.budget.value = 0.5  # below k=1 everywhere (79% of now on tiny-moe): refused before work
    assert "choose budget &gt;= 0.79" in panel.errors.value  # the error area escapes HTML
    panel.budget.value = 0.9
    assert moe_app.jobs.wait(WAIT)
    result = panel.results[-1]
    assert result.status == "done", result.error
    assert result.label == "route budget 90%" and result.metrics["active_experts"] < 2


def _carved_loader(byte_tokenizer):
    """A loader whose "tiny-carved" is the tiny Llama carved by moefy (4 experts of 28 neurons + 16 shared, k = 4)."""
    import copy

    from workbench.corpus import get_corpus
    from workbench.models.loading import LoadedModel
    from workbench.models.size import size_report
    from workbench.models.spec import ModelSpec
    from workbench.techniques import ApplyContext, apply_, make_config
    from workbench.tiny import tiny_llama

    ctx = ApplyContext(tokenizer=byte_tokenizer, corpus=get_corpus("python-docs"), seed=0)
    model = apply_(
        copy.deepcopy(tiny_llama()), make_config("moefy", n_experts=4, top_k=4, calibration_tokens=512), ctx
    ).eval()
    loaded = LoadedModel(
        model, byte_tokenizer, ModelSpec("tiny-carved"), "tiny-carved-fp", "tiny-carved", size_report(model)
    )
    return lambda spec, progress=None: loaded


def test_converted_model_shows_its_recipe_and_measured_quality(
    registry_url, tmp_path, monkeypatch, byte_tokenizer
):
    """On a model moefy made, the tab says how it was made, then fills the quality table from the user's runs."""
    monkeypatch.chdir(tmp_path)
    bench = Workbench(
        registry_url,
        model="tiny-carved",
        suite=SUITE,
        poll_interval=0,
        loader=_carved_loader(byte_tokenizer),
    )
    try:
        bench.workspace.load()
        panel = bench.route
        summary = panel.summary
        assert summary is not None and summary.source == "" and summary.points == ()
        recipe = dict(summary.recipe)
        assert recipe["experts per FFN"].startswith("4 ") and recipe["neurons per expert"] == "28"
        assert recipe["shared neurons"].startswith("16") and recipe["router"] == "regression"
        assert "How this model was made" in panel.about.value and "Nothing measured yet" in panel.about.value
        bench.workspace.submit_run([])  # the baseline: the reference for Δppl
        assert bench.jobs.wait(WAIT)
        panel.k.value = 2
        assert bench.jobs.wait(WAIT)
        assert panel.results[-1].status == "done", panel.results[-1].error
        panel.refresh_about()  # what the registry watcher does on its next poll
        summary = panel.summary
        assert summary.source == "registry"
        (point,) = summary.points
        assert (point.k, point.run_id) == (2, panel.results[-1].run_id)
        assert point.ffn_active == pytest.approx((16 + 2 * 28) / 128)
        assert point.ppl == pytest.approx(panel.results[-1].metrics["ppl"])
        assert point.delta_ppl is not None and point.kl_mean > 0
        assert "How good it is" in panel.about.value and "56.2%" in panel.about.value
        # "Recover at k" (route k → distill, the loaded model at k = E as the teacher) adds a row of its own.
        assert panel.recover_box.layout.display == ""
        panel.recover_steps.value = 3
        panel.recover()
        assert bench.jobs.wait(WAIT)
        recovered = panel.results[-1]
        assert recovered.status == "done", recovered.error
        assert recovered.metrics["training_steps"] == 3
        panel.refresh_about()
        labels = {p.label: p for p in panel.summary.points}
        assert set(labels) == {"k = 2", "k = 2 + distill 3 steps"}
        assert labels["k = 2 + distill 3 steps"].run_id == recovered.run_id
    finally:
        bench.close()


def test_native_moe_and_dense_models_show_no_recipe(moe_app):
    assert moe_app.route.summary is None and moe_app.route.about.value == ""
    assert moe_app.route.recover_box.layout.display == "none"
