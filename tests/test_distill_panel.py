"""The Distill tab on the app's tiny-llama: student shape, training with live curves, stop, resume, quantize."""

from __future__ import annotations

import time

import pytest

from widgets import Workbench
from workbench.evaluate import Suite
from workbench.registry import Registry

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
SMALL = {"batch_size": 2, "seq_len": 32, "warmup_steps": 1, "lr": 1e-3}


@pytest.fixture()
def app(registry_url, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WORKBENCH_HOME", str(tmp_path / "home"))
    bench = Workbench(registry_url, model="tiny-llama", suite=SUITE, poll_interval=0)
    bench.distill.overrides = dict(SMALL)
    yield bench
    bench.close()


def _runs(url: str):
    with Registry.open(url) as reg:
        return reg.runs_frame(status=None)


def _loaded(app) -> None:
    app.workspace.load()
    deadline = time.monotonic() + WAIT
    while app.workspace.loaded_model() is None and time.monotonic() < deadline:
        time.sleep(0.05)


def test_the_distill_tab_replaces_its_placeholder_and_shows_the_student_shape(app):
    from widgets.panels.distill import DistillPanel

    assert isinstance(app.distill, DistillPanel)
    _loaded(app)
    panel = app.distill
    panel.drop.value = 0
    panel.drop.value = 1
    assert panel.drop.max == 1  # tiny-llama has 2 layers: at most one can go
    assert "1 of 2 layers" in panel.shape_note.value and "% of the teacher" in panel.shape_note.value
    panel.ffn.value = 500
    assert "FFN width is 128" in panel.shape_note.value  # refused before any run


def test_train_records_a_student_with_its_curves_and_the_hard_baseline_beside_it(app, registry_url):
    _loaded(app)
    panel = app.distill
    panel.drop.value, panel.steps.value, panel.eval_every.value = 1, 4, 62
    before = panel.curves_plot.refreshes
    assert panel.train() is not None
    assert app.jobs.wait(WAIT)
    result = panel.results[-1]
    assert result.status == "done", result.error
    assert result.extras["loss_curve"]["step"] == [1, 2, 3, 4]
    curve = panel.curves[result.label]
    assert curve["tokens"] == [62.0, 124.0, 186.0, 248.0] and len(curve["eval_ppl"]) == 5
    assert panel.curves_plot.refreshes >= before + 2  # drawn while training (partials) and when recorded
    assert not panel.quantize_button.disabled
    panel.train(hard=True)
    assert app.jobs.wait(WAIT)
    hard = panel.results[-1]
    assert hard.status == "done" and "hard" in hard.label
    names = [t.name for t in panel.curves_plot.figure.data]
    assert any("hard" in n for n in names) and any("forward_kl" in n for n in names)
    frame = panel.frame()
    assert {result.run_id, hard.run_id} <= set(frame["run_id"])
    assert panel.plot.trace_points() >= 2


def test_quantize_student_stacks_on_the_distilled_student(app, registry_url):
    _loaded(app)
    panel = app.distill
    panel.drop.value, panel.steps.value = 1, 2
    panel.train()
    assert app.jobs.wait(WAIT)
    student = panel.results[-1]
    job = panel.quantize_student()
    assert job is not None and app.jobs.wait(WAIT)
    q = panel.results[-1]
    assert q.status == "done", q.error
    assert [s["technique"] for s in q.extras["stages"]] == ["prune", "distill", "rtn"]
    assert q.parent_id == student.run_id


def test_stop_keeps_the_student_and_resume_continues_it(app, registry_url):
    _loaded(app)
    panel = app.distill
    panel.drop.value, panel.steps.value = 0, 400
    assert panel.train() is not None
    deadline = time.monotonic() + WAIT
    while not panel.curves.get(job_label(panel), {}).get("loss") and time.monotonic() < deadline:
        time.sleep(0.02)
    panel.progress.stop.click()
    assert app.jobs.wait(WAIT)
    stopped = panel.results[-1]
    assert stopped.status == "interrupted" and "saved in" in stopped.error
    assert not panel.resume_button.disabled and "stopped" in panel.message.value
    runs = _runs(registry_url)
    assert "interrupted" in set(runs["status"])
    panel.steps.value = 400  # the same settings
    panel.resume()
    assert app.jobs.wait(WAIT)
    resumed = panel.results[-1]
    assert resumed.status == "done", resumed.error
    assert resumed.metrics["resumed_from_step"] >= 1 and resumed.metrics["training_steps"] == 400
    assert panel.resume_button.disabled


def job_label(panel) -> str:
    from workbench.techniques import describe_pipeline

    return describe_pipeline(panel.pipeline())


def test_bad_settings_show_their_message_and_queue_nothing(app, registry_url):
    panel = app.distill
    panel.steps.value = 0
    assert panel.train() is None
    assert "budget" in panel.errors.message
    assert panel.quantize_student() is None and "Train a student first" in panel.errors.message
