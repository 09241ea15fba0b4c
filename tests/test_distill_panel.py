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


def test_a_shape_change_shows_the_untrained_student_and_a_shape_measured_before_answers_at_once(
    app, registry_url
):
    from widgets.panels._distill_candidates import UNTRAINED_TRACE

    _loaded(app)
    panel = app.distill
    assert "not measured yet" in panel.untrained.note.value  # loading looks it up, queues nothing
    assert len(_runs(registry_url)) == 0
    panel.ffn.value = 64
    assert panel.untrained.job is not None and app.jobs.wait(WAIT)
    preview = panel.untrained.latest
    assert preview is not None and preview.shape == panel.pipeline()[0] and not preview.reused
    note = panel.untrained.note.value
    assert "Untrained: perplexity" in note and "mean KL" in note and f"run {preview.run_id}" in note
    assert preview.n_params < preview.teacher_params
    names = [t.name for t in panel.plot.figure.data]
    assert UNTRAINED_TRACE in names  # the ringed point, beside the prune run's own point
    runs = _runs(registry_url)
    assert set(runs["pipeline"]) == {"baseline", preview.label}
    panel.ffn.value = 0  # another shape (one layer dropped, full width): measured anew
    assert panel.untrained.latest is None and "measuring" in panel.untrained.note.value
    assert app.jobs.wait(WAIT) and panel.untrained.latest.shape == panel.pipeline()[0]
    panel.ffn.value = 64  # back: the registry answers on this thread, no job
    back = panel.untrained.latest
    assert back is not None and back.reused and back.run_id == preview.run_id
    assert "Untrained: perplexity" in panel.untrained.note.value


def test_rank_candidates_shows_the_ranked_table_and_the_points(app, registry_url):
    _loaded(app)
    panel = app.distill
    box = panel.candidates
    assert box.text.value == "drop=1; ffn=96; ffn=64"  # the model's default candidates
    box.text.value, panel.steps.value = "drop=1 samples=2 seq_len=32; ffn=64 samples=2 seq_len=32", 2
    assert box.rank() is not None and app.jobs.wait(WAIT)
    ranking = box.ranking
    assert ranking is not None and len(ranking.rows) == 2, panel.errors.message
    assert [r.score for r in ranking.rows] == sorted((r.score for r in ranking.rows), reverse=True)
    assert "<table" in box.table.value and "untrained_ppl" in box.table.value
    assert "drop=1 samples=2 seq_len=32" in box.table.value and "Best of 2 candidates" in panel.message.value
    assert {r.run_id for r in ranking.rows} <= set(panel.frame()["run_id"])
    assert panel.plot.trace_points() >= 5  # the teacher, two untrained and two trained students
    n = len(_runs(registry_url))
    box.button.click()  # again: every run answered by the registry
    assert app.jobs.wait(WAIT)
    assert box.ranking.reused and len(_runs(registry_url)) == n and "no training" in panel.message.value


def test_bad_candidates_are_refused_in_the_error_area_and_queue_nothing(app, registry_url):
    _loaded(app)
    panel = app.distill
    panel.candidates.text.value = "drop=1; ffn=500"
    assert panel.candidates.rank() is None
    assert "candidate 2 (ffn=500)" in panel.errors.message and "FFN width is 128" in panel.errors.message
    panel.candidates.text.value = " ; "
    assert panel.candidates.rank() is None and "no candidates" in panel.errors.message
    assert len(_runs(registry_url)) == 0
