"""The Deploy tab without a browser: pick a recorded run, press an export button, read what the panel shows.

The runs are recorded once on the tiny model; every test builds its own app on that registry in its own working
folder (exports land under ``tmp_path/exports``).
"""

from __future__ import annotations

import pytest

from widgets import Workbench
from workbench.evaluate import Suite
from workbench.registry import Registry
from workbench.runtimes import SIMULATED
from workbench.techniques.rtn import RTNConfig

WAIT = 120
SUITE = Suite(
    "deploy-test",
    n_tokens=256,
    context_length=64,
    n_generations=0,
    speed_prompt=16,
    speed_tokens=2,
    speed_repeats=1,
)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, object]:
    """A registry holding rtn 4-bit symmetric g32 (exact as GGUF Q4_0), then rtn 3-bit g32 (no GGUF type)."""
    path = tmp_path_factory.mktemp("deploy") / "runs.db"
    url = f"sqlite:///{path}"
    bench = Workbench(url, model="tiny-llama", suite=SUITE, poll_interval=0)
    try:
        four = bench.run([RTNConfig(bits=4, group_size=32, symmetric=True)])
        three = bench.run([RTNConfig(bits=3, group_size=32)])
        assert bench.jobs.wait(WAIT)
        assert four.result.status == "done" and three.result.status == "done"
        return {"url": url, "four": four.result.run_id, "three": three.result.run_id}
    finally:
        bench.close()


@pytest.fixture()
def app(runs, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    bench = Workbench(runs["url"], model="tiny-llama", suite=SUITE, poll_interval=0)
    yield bench
    bench.close()


def test_the_deploy_tab_comes_after_compare_and_lists_done_runs_newest_first(app, runs):
    assert app.tabs.titles[-2:] == ("Compare", "Deploy")
    panel = app.deploy
    ids = [v for _, v in panel.run_picker.options]
    assert ids == [runs["three"], runs["four"]]
    label = {v: k for k, v in panel.run_picker.options}[runs["four"]]
    assert label.startswith(f"{runs['four']} · rtn") and "KL " in label and "bpw " in label
    assert panel.run_picker.value == runs["three"]  # the newest is picked at first


def test_a_gguf_export_writes_the_file_and_its_card_and_shows_them(app, runs, tmp_path):
    panel = app.deploy
    panel.select(runs["four"])
    job = panel.export("gguf")
    assert app.jobs.wait(WAIT) and job.status == "done", job.traceback
    folder = tmp_path / "exports" / f"run-{runs['four']}-gguf"
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "model.gguf"]
    assert "model.gguf" in panel.written.value and "README.md" in panel.written.value
    assert " MB)" in panel.written.value and panel.errors.message == ""
    card = (folder / "README.md").read_text()
    assert "Exported as **gguf**" in card and "Q4_0" in card
    assert "Q4_0" in panel.card.value and "<table" in panel.card.value.lower()  # rendered Markdown
    assert panel.progress.bar.bar_style == "success"
    # The same button again writes a new folder beside the first (an export never overwrites one).
    panel.export_buttons["gguf"].click()
    assert app.jobs.wait(WAIT)
    assert (tmp_path / "exports" / f"run-{runs['four']}-gguf-2" / "model.gguf").is_file()


def test_the_panel_writes_what_workbench_export_writes(registry_url, tmp_path, monkeypatch):
    from workbench.cli import main
    from workbench.experiment import run_experiment

    # On the quick suite: the command line finds a run's suite by name (a custom one lives only in the app).
    with Registry.open(registry_url) as reg:
        run_id = run_experiment(
            "tiny-llama", [RTNConfig(bits=4, group_size=32)], "quick", registry=reg
        ).run_id
    monkeypatch.chdir(tmp_path)
    app = Workbench(registry_url, model="tiny-llama", suite="quick", poll_interval=0)
    try:
        app.deploy.select(run_id)
        app.deploy.export("safetensors")
        assert app.jobs.wait(WAIT) and app.deploy.errors.message == ""
    finally:
        app.close()
    ours = tmp_path / "exports" / f"run-{run_id}-safetensors"
    theirs = tmp_path / "cli"
    argv = ["export", str(run_id), "--format", "safetensors", "--out", str(theirs)]
    assert main([*argv, "--model", "tiny-llama", "--registry", registry_url]) == 0
    assert sorted(p.name for p in ours.iterdir()) == sorted(p.name for p in theirs.iterdir())
    assert (ours / "model.safetensors").read_bytes() == (theirs / "model.safetensors").read_bytes()


def test_a_variant_no_gguf_type_holds_shows_the_closest_type_and_writes_nothing(app, runs, tmp_path):
    panel = app.deploy
    panel.select(runs["three"])
    job = panel.export("gguf")
    assert app.jobs.wait(WAIT) and job.status == "failed"
    message = panel.errors.message
    assert "fits no GGUF type exactly" in message and "The closest is Q4_1" in message
    assert "Traceback" not in message and "<details" not in message
    exports = tmp_path / "exports"
    assert not exports.exists() or not any(exports.iterdir())
    assert panel.written.value == "" and panel.card.value == ""


def test_the_fit_planner_follows_the_picked_run_and_the_note_says_where_it_was_measured(app, runs):
    panel = app.deploy
    panel.select(runs["four"])
    assert panel.fit.runs.value == (runs["four"],) and len(panel.fit.plans) == 1
    panel.select(runs["three"])
    assert panel.fit.runs.value == (runs["three"],) and len(panel.fit.plans) == 1
    row = panel.frame[panel.frame["run_id"] == runs["three"]].iloc[0]
    assert row["runtime"] == SIMULATED
    note = panel.runtime_html.value
    assert "simulated (torch float)" in note and "Runtime choice" in note and "llama.cpp" in note
    # A run recorded elsewhere appears in the picker; the pick (and the planner) stay on the chosen run.
    with Registry.open(runs["url"]) as reg:
        from workbench.experiment import run_experiment

        new = run_experiment("tiny-llama", [RTNConfig(bits=8, group_size=32)], SUITE, registry=reg)
    app.refresh()
    assert panel.run_picker.options[0][1] == new.run_id
    assert panel.run_picker.value == runs["three"] and panel.fit.runs.value == (runs["three"],)
    with Registry.open(runs["url"]) as reg:
        reg.delete_run(new.run_id)


def test_a_run_that_is_gone_is_refused_with_a_message(app, runs):
    from workbench.errors import ConfigError

    with pytest.raises(ConfigError, match="Run 999 is not a done run"):
        app.deploy.select(999)
