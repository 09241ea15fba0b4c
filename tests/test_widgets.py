"""The notebook app without a browser: build it on a temp registry, press its buttons, read what it shows.

Everything runs through the real library on the tiny model (milliseconds per run); a fake back end is used
only where a test needs an error the library would never raise.
"""

from __future__ import annotations

import base64
import copy
import dataclasses
import json
import re
import sqlite3
import threading
import time

import pandas as pd
import pytest

from widgets import Workbench
from widgets.jobs import Jobs
from widgets.panels.compare import LARGE_LINK_CHARS
from workbench.errors import ConfigError
from workbench.evaluate import Suite
from workbench.registry import Registry
from workbench.techniques import base as tbase

WAIT = 60
# A small custom suite (given to the app like "quick"): every metric, a fraction of the tokens.
SUITE = Suite(
    "ui-test",
    n_tokens=256,
    context_length=64,
    n_generations=0,
    speed_prompt=16,
    speed_tokens=2,
    speed_repeats=1,
)


@pytest.fixture()
def app(registry_url, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # exports land under tmp_path/exports
    bench = Workbench(registry_url, model="tiny-llama", suite=SUITE, poll_interval=0)
    yield bench
    bench.close()


@pytest.fixture(scope="module")
def three_runs_db(tmp_path_factory) -> str:
    """A registry holding rtn 3-bit, the baseline and rtn 8-bit (in that order), recorded through the app once."""
    path = tmp_path_factory.mktemp("three") / "runs.db"
    bench = Workbench(f"sqlite:///{path}", model="tiny-llama", suite=SUITE, poll_interval=0)
    try:
        bench.quantize.bits.value = 3
        assert bench.jobs.wait(WAIT)
        bench.run_baseline()
        assert bench.jobs.wait(WAIT)
        bench.quantize.bits.value = 8
        assert bench.jobs.wait(WAIT)
        assert [r.status for r in bench.quantize.results] == ["done", "done"]
    finally:
        bench.close()
    return str(path)


@pytest.fixture()
def compare(three_runs_db, tmp_path, monkeypatch):
    """The Compare panel of an app on a private copy of the three-run registry."""
    monkeypatch.chdir(tmp_path)
    # Copied through SQLite's backup API: copying the file (and its -wal) with plain Python would read it
    # outside SQLite, which drops this process's locks on it (see workbench.registry.store._SharedEngine).
    with sqlite3.connect(three_runs_db) as src, sqlite3.connect(tmp_path / "runs.db") as dst:
        src.backup(dst)
    src.close()
    dst.close()
    url = f"sqlite:///{tmp_path / 'runs.db'}"
    bench = Workbench(url, model="tiny-llama", suite=SUITE, poll_interval=0)
    yield bench.compare
    bench.close()


def _done_runs(url: str) -> pd.DataFrame:
    with Registry.open(url) as reg:
        return reg.runs_frame(status=None)


def _until(condition, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


# ---- a slow technique, so a run can be stopped while it works -------------------------------------------


@dataclasses.dataclass(frozen=True)
class _SlowConfig:
    """Test technique: walks the linears slowly, checking for cancellation, so Stop has something to stop."""

    bits: int = 4
    steps: int = 400


_STARTED = threading.Event()


def _apply_slow(model, config, ctx):
    for _ in ctx.progress.iter(range(config.steps), desc="slow"):
        _STARTED.set()
        time.sleep(0.02)
    return model


if "test-slow" not in tbase._TECHNIQUES:
    tbase.register("test-slow", _SlowConfig, kind="other")(_apply_slow)


# ---- first run ------------------------------------------------------------------------------------------


def test_empty_registry_offers_a_baseline_button_that_records_the_baseline(app, registry_url):
    assert app.first_run.layout.display != "none"
    app.baseline_button.click()
    assert app.jobs.wait(WAIT)
    runs = _done_runs(registry_url)
    assert list(runs["technique"]) == ["baseline"] and runs.loc[0, "status"] == "done"
    assert app.first_run.layout.display == "none"
    assert app.baseline_progress.bar.value == 1.0
    assert "fingerprint" in app.model_info.value and app.fingerprint == runs.loc[0, "model_fingerprint"]


# ---- quantize panel -------------------------------------------------------------------------------------


def test_slider_step_runs_records_and_adds_a_point_to_the_plot(app, registry_url):
    app.run_baseline()
    assert app.jobs.wait(WAIT)
    before = app.quantize.plot.trace_points()
    app.quantize.bits.value = 3
    assert app.jobs.wait(WAIT)
    runs = _done_runs(registry_url)
    assert list(runs["pipeline"]) == ["baseline", "rtn 3b g32"]
    assert app.quantize.plot.trace_points() == before + 1
    assert "rtn g32" in [t.name for t in app.quantize.plot.figure.data]  # one line per method and grid
    assert "evaluated and recorded" in app.quantize.message.value
    # The compare panel follows the registry too.
    assert sorted(app.compare.frame["run_id"]) == sorted(runs["run_id"])


def test_slider_moved_back_hits_registry_instead_of_recomputing(app, registry_url):
    app.quantize.bits.value = 3
    assert app.jobs.wait(WAIT)
    app.quantize.bits.value = 5
    assert app.jobs.wait(WAIT)
    n_runs = len(_done_runs(registry_url))
    t0 = time.perf_counter()
    app.quantize.bits.value = 3
    assert app.jobs.wait(WAIT)
    elapsed = time.perf_counter() - t0
    assert len(_done_runs(registry_url)) == n_runs
    last = app.quantize.results[-1]
    assert last.reused and last.label == "rtn 3b g32"
    assert "found in the registry" in app.quantize.message.value
    assert elapsed < 2.0, f"a registry hit took {elapsed:.2f} s"


def test_the_same_point_is_not_queued_twice(app):
    slow = app.quantize
    slow.method.options = [*slow.method.options, "test-slow"]
    slow.method.value = "test-slow"
    first = slow.submit(bits=4)
    second = slow.submit(bits=4)
    assert first is second
    app.jobs.cancel_all()
    assert app.jobs.wait(WAIT)


def test_stop_button_interrupts_the_run_and_records_it_interrupted(app, registry_url):
    _STARTED.clear()
    panel = app.quantize
    panel.method.options = [*panel.method.options, "test-slow"]
    panel.method.value = "test-slow"
    panel.bits.value = 6
    assert _STARTED.wait(WAIT), "the slow run never started"
    assert not panel.progress.stop.disabled
    panel.progress.stop.click()
    assert app.jobs.wait(WAIT)
    runs = _done_runs(registry_url)
    assert list(runs["status"]) == ["interrupted"]
    assert panel.results[-1].status == "interrupted"
    assert "interrupted" in panel.message.value
    assert panel.progress.stop.disabled and panel.progress.bar.bar_style == "warning"


def test_config_error_is_shown_as_its_message_without_a_traceback(app, registry_url):
    panel = app.quantize
    panel.group_size.value = 128  # tiny-llama's layers are 64 wide: the library's check refuses this
    panel.run_button.click()
    assert app.jobs.wait(WAIT)
    shown = panel.errors.value
    assert "does not divide" in shown and "Traceback" not in shown and "<details>" not in shown
    assert _done_runs(registry_url).empty  # refused before anything was recorded


def test_bits_a_method_cannot_take_give_a_message_and_no_run(app, registry_url):
    panel = app.quantize
    panel.method.value = "bnb"
    assert panel.group_size.disabled and panel.symmetric.disabled
    panel.bits.value = 3
    assert "takes 4 (nf4), 8 (int8) bits" in panel.errors.value
    assert not app.jobs.busy and not app.jobs.history
    assert _done_runs(registry_url).empty


def test_unexpected_error_shows_one_line_and_folds_the_traceback(registry_url):
    def broken_runner(*_args, **_kwargs):
        raise RuntimeError("disk on fire\nsecond line")

    bench = Workbench(registry_url, model="tiny-llama", runner=broken_runner, poll_interval=0)
    try:
        bench.quantize.run_button.click()
        assert bench.jobs.wait(WAIT)
        shown = bench.quantize.errors.value
        assert "Unexpected error: RuntimeError: disk on fire" in shown
        assert "second line" not in shown.split("<details>")[0]
        assert "<details>" in shown and "Traceback" in shown.split("<details>")[1]
    finally:
        bench.close()


def test_sweep_queues_every_width_the_method_takes(registry_url):
    seen: list[str] = []

    def recording_runner(model, pipeline, suite, **_kwargs):
        from workbench.experiment import RunResult

        seen.append(pipeline[0].weights)
        return RunResult(len(seen), "done", {}, label=seen[-1])

    bench = Workbench(registry_url, model="tiny-llama", runner=recording_runner, poll_interval=0)
    try:
        bench.quantize.method.value = "quanto"
        jobs = bench.quantize.sweep()
        assert bench.jobs.wait(WAIT)
        assert len(jobs) == 3 and "Skipped 7, 6, 5, 3 bits" in bench.quantize.sweep_message.value
        assert seen == ["int8", "int4", "int2"]
    finally:
        bench.close()


def test_grid_warning_names_the_grid_the_weights_sit_on(app, tiny_llama):
    from workbench.models import load_model
    from workbench.techniques import apply_, make_config

    loaded = copy.copy(load_model("tiny-llama"))
    loaded.model = apply_(copy.deepcopy(tiny_llama), make_config("rtn", bits=4, group_size=32))
    app.quantize._check_grid(loaded)
    assert "Grid detected" in app.quantize.grid_warning.value and "4-bit" in app.quantize.grid_warning.value
    app.quantize._check_grid(load_model("tiny-llama"))  # random weights: no grid
    assert app.quantize.grid_warning.value == ""


def _hold_the_queue(app):
    """Occupy the app's single worker with a job that waits on an Event (a sweep or GPTQ run in progress)."""
    started, gate = threading.Event(), threading.Event()

    def slow(_progress):
        started.set()
        gate.wait(WAIT)

    app.jobs.submit(slow, label="a slow job")
    assert started.wait(WAIT), "the slow job never started"
    return gate


def test_a_measured_point_answers_at_once_while_the_queue_is_busy(app, registry_url):
    panel = app.quantize
    panel.bits.value = 3
    assert app.jobs.wait(WAIT)  # also loads the model: its fingerprint is now known
    panel.bits.value = 5
    assert app.jobs.wait(WAIT)
    n_runs = len(_done_runs(registry_url))
    gate = _hold_the_queue(app)
    try:
        t0 = time.perf_counter()
        panel.bits.value = 3
        elapsed = time.perf_counter() - t0
        assert elapsed < 0.5, f"a registry hit behind a busy queue took {elapsed:.2f} s"
        last = panel.results[-1]
        assert last.reused and last.status == "done" and last.label == "rtn 3b g32"
        assert last.metrics and "found in the registry" in panel.message.value
        assert app.jobs.busy and not app.jobs.pending  # nothing was queued behind the slow job
    finally:
        gate.set()
    assert app.jobs.wait(WAIT)
    assert len(_done_runs(registry_url)) == n_runs


def test_the_group_dropdown_offers_what_the_loaded_model_takes_and_other_sizes_are_refused_at_once(
    app, registry_url
):
    panel = app.quantize
    assert [v for _, v in panel.group_size.options] == [32, 64, 128, -1]  # no model yet: the generic choices
    app.load()
    assert app.jobs.wait(WAIT)
    assert [v for _, v in panel.group_size.options] == [32, 64, -1]  # tiny-llama's layers are 64 and 128 wide
    gate = _hold_the_queue(app)
    try:
        # A config built in code (or by another front end) is refused by the same library check, at once.
        with pytest.raises(ConfigError, match="does not divide"):
            app.workspace.answer_now([tbase.make_config("rtn", group_size=128)])
        assert not app.jobs.pending
    finally:
        gate.set()
    assert app.jobs.wait(WAIT)
    assert _done_runs(registry_url).empty


def test_the_default_point_moves_off_a_grid_the_weights_sit_on_and_the_panel_says_why(app):
    from workbench.techniques import apply_, make_config

    loaded = copy.copy(app.workspace.load())
    loaded.model = apply_(copy.deepcopy(loaded.model), make_config("rtn", bits=4, group_size=32))
    loaded.fingerprint = "on-a-grid"
    app.workspace._set_loaded(loaded)  # as a load of such a model would (listeners run)
    panel = app.quantize
    assert panel.group_size.value == 64 and not panel.symmetric.value
    assert "Grid detected" in panel.grid_warning.value and "group size 64" in panel.space_note.value.lower()
    assert panel.config(bits=4) == app.workspace.space("rtn").config(bits=4)
    panel.method.value = "quanto"
    assert "takes 2 (int2), 4 (int4), 8 (int8) bits" in panel.space_note.value and panel.group_size.disabled


def test_moving_a_control_clears_the_last_runs_progress_and_notes(app, monkeypatch):
    from widgets.panels import quantize

    monkeypatch.setattr(quantize, "HIDE_AFTER_S", 0.1)
    panel = app.quantize
    panel.bits.value = 3
    assert app.jobs.wait(WAIT)
    assert "evaluated and recorded" in panel.message.value
    # The finished bar (and its Stop button) go away a moment after the run.
    assert _until(lambda: panel.progress.layout.visibility == "hidden")
    panel.progress.layout.visibility = "visible"  # as if still shown: a control moved now clears it
    panel.symmetric.value = True
    assert panel.progress.label.value == "" and panel.progress.layout.visibility == "hidden"
    panel.sweep_message.value = "<p>an old sweep note</p>"
    panel.method.value = "bnb"
    assert panel.message.value == "" and panel.sweep_message.value == ""


def test_cancel_queue_stops_a_whole_sweep(app, registry_url):
    panel = app.quantize
    app.load()
    assert app.jobs.wait(WAIT)
    gate = _hold_the_queue(app)
    jobs = panel.sweep()
    assert len(jobs) == 7 and not panel.cancel_button.disabled
    panel.cancel_button.click()
    gate.set()
    assert app.jobs.wait(WAIT)
    assert all(j.status == "cancelled" for j in jobs) and "Cancelled 8" in panel.sweep_message.value
    assert panel.cancel_button.disabled and _done_runs(registry_url).empty


@pytest.mark.parametrize(("method", "bits"), [("rtn", None), ("bnb", ["8", "4"]), ("quanto", None)])
def test_the_panel_and_the_cli_enumerate_the_same_space(method, bits, registry_url, monkeypatch):
    import workbench.experiment
    from workbench.cli import main
    from workbench.experiment import RunResult
    from workbench.techniques import pipeline_to_json

    def recorder(seen):
        def run(model, pipeline, suite, **_kwargs):
            seen.append(pipeline_to_json(pipeline))
            return RunResult(len(seen), "done", {}, label=str(len(seen)))

        return run

    from_panel: list[str] = []
    bench = Workbench(registry_url, model="tiny-llama", runner=recorder(from_panel), poll_interval=0)
    try:
        bench.quantize.method.value = method
        if method == "bnb":
            bench.quantize.bits.value = 3  # refused (bnb has no 3 bits); the sweep does not depend on it
        bench.quantize.sweep()
        assert bench.jobs.wait(WAIT)
    finally:
        bench.close()
    from_cli: list[str] = []
    monkeypatch.setattr(workbench.experiment, "run_experiment", recorder(from_cli))
    argv = ["sweep", "--model", "tiny-llama", "--technique", method, "--registry", registry_url]
    assert main(argv + (["--bits", *bits] if bits else [])) == 0
    assert from_panel == from_cli and len(from_cli) == {"rtn": 7, "bnb": 2, "quanto": 3}[method]


def test_tabs_come_from_the_panel_files_and_a_real_panel_replaces_its_placeholder(registry_url):
    import ipywidgets as W

    from widgets import panels

    bench = Workbench(registry_url, model="tiny-llama", poll_interval=0)
    try:
        assert bench.tabs.titles == ("Quantize", "Route experts", "Distill", "Compare", "Deploy")
        assert bench.panels["quantize"] is bench.quantize and bench.compare in bench.tabs.children
    finally:
        bench.close()
    real = panels._TABS.get(("route", False))  # the Route experts panel, put back afterwards
    panels.register_tab(
        panels.Tab("Route experts", attr="route", order=20, build=lambda host: W.HTML("real"))
    )
    try:
        bench = Workbench(registry_url, model="tiny-llama", poll_interval=0)
        assert bench.route.value == "real" and bench.tabs.titles[1] == "Route experts"
        bench.close()
    finally:
        del panels._TABS[("route", False)]
        if real is not None:
            panels.register_tab(real)


def test_the_plot_defaults_to_bits_per_weight_of_the_decoder_linears(app):
    panel = app.quantize
    assert panel.size_axis.value == "metric_bits_per_weight_linear"
    panel.bits.value = 3
    assert app.jobs.wait(WAIT)
    layout = panel.plot.figure.layout
    assert layout.xaxis.title.text == "Bits per weight (decoder linears)"
    (line,) = [t for t in panel.plot.figure.data if t.name == "rtn g32"]
    assert 3 < line.x[0] <= 4.0  # 3-bit codes plus an fp16 scale and minimum per 32 weights; no embedding
    panel.size_axis.value = "metric_bits_per_weight"
    assert panel.plot.figure.layout.xaxis.title.text == "Bits per weight (all weights)"


# ---- model bar --------------------------------------------------------------------------------------------


def test_a_bad_model_spec_shows_a_clear_message(app):
    app.model_box.value = "/no/such/model/folder"
    app.load_button.click()
    assert app.jobs.wait(WAIT)
    assert "neither" in app.model_errors.value and "Traceback" not in app.model_errors.value
    assert app.loaded is None


# ---- compare panel ----------------------------------------------------------------------------------------


def test_compare_table_puts_the_baseline_first_whatever_the_sort(compare):
    compare.sort_by.value = "kl_mean"
    compare.descending.value = True
    table = compare.table
    assert list(table["setting"]) == ["float", "3b g32", "8b g32"]
    compare.descending.value = False
    assert list(compare.table["setting"]) == ["float", "8b g32", "3b g32"]
    assert "<table" in compare.table_html.value and "<th>KL mean</th>" in compare.table_html.value
    names = [t.name for t in compare.plot.figure.data]
    assert names == ["rtn", "Pareto front"]  # one trace per method; the baseline is a reference line
    assert any("baseline" in a.text for a in compare.plot.figure.layout.annotations)
    assert compare.plot.figure.layout.xaxis.title.text == "Bits per weight (all weights)"


def test_compare_axes_switch_quality_and_size(compare):
    compare.y.value = "metric_top1_agree_pct"
    compare.x.value = "metric_size_mb"
    layout = compare.plot.figure.layout
    assert layout.yaxis.title.text == "Same top token as base (%)" and layout.xaxis.title.text == "Size (MB)"
    rtn = compare.plot.figure.data[0]
    assert rtn.name == "rtn" and len(rtn.x) == 2
    top1 = dict(zip(compare.frame["run_id"], 100 * compare.frame["metric_top1_agree"]))
    assert list(rtn.y) == pytest.approx([top1[r] for r in rtn.customdata])


def test_compare_filters_narrow_plot_and_table(compare):
    assert ("rtn", "rtn") in compare.technique.options
    compare.technique.value = "rtn"
    assert set(compare.table["technique"]) == {"rtn"} and len(compare.table) == 2
    assert len(compare.plot.figure.data[0].x) == 2
    compare.technique.value = ""
    compare.tag.value = "nothing-has-this"
    # Nothing matches: the panel says which filter to loosen, not that the registry is empty.
    assert compare.table.empty and "No run matches the filters" in compare.table_html.value
    assert "Tag: empty it to see 3 run(s)" in compare.table_html.value
    note = compare.plot.figure.layout.annotations[0].text
    assert "No runs yet" not in note and "Tag = nothing-has-this" in note


def test_exports_write_the_table_and_plot_with_download_links(compare, tmp_path):
    written = {fmt: compare.export(fmt) for fmt in ("csv", "md", "html", "tex", "json")}
    for path in written.values():
        assert path is not None and path.resolve().parent == (tmp_path / "exports").resolve()
    csv = pd.read_csv(written["csv"])
    assert list(csv["run_id"]) == list(compare.table["run_id"]) and csv.loc[0, "technique"] == "baseline"
    assert csv["kl_mean"].tolist() == pytest.approx(compare.table["kl_mean"].tolist())
    records = json.loads(written["json"].read_text())
    assert [r["run_id"] for r in records] == list(compare.table["run_id"])
    markdown = written["md"].read_text()
    assert markdown.startswith("| run_id") and "3b g32" in markdown
    assert "\\begin{tabular}" in written["tex"].read_text()
    assert "<table" in written["html"].read_text()
    plot = compare.export_plot()
    text = plot.read_text()
    assert "Pareto front" in text and "plotly" in text.lower()
    links = compare.export_links.value
    assert "files/exports/" not in links and str(plot.resolve()) in links
    # Each link carries its file as a data: URI with the format's MIME type, and names the file to save.
    mimes = {
        "csv": "text/csv",
        "md": "text/markdown",
        "html": "text/html",
        "tex": "application/x-latex",
        "json": "application/json",
    }
    for fmt, path in [*written.items(), ("html", plot)]:
        mime, data = _link_data(links, path.name)
        assert mime == mimes[fmt] and data == path.read_bytes(), path.name
    assert len(links) < LARGE_LINK_CHARS and "MB link" not in links  # the plot (~6 MB as base64) fits


def _link_data(links: str, name: str) -> tuple[str, bytes]:
    """The MIME type and decoded bytes of the ``<a download="name" href="data:...">`` in the links' HTML."""
    match = re.search(r'<a href="data:([^;"]+);base64,([^"]*)" download="' + re.escape(name) + '"', links)
    assert match, f"no data link for {name}"
    return match.group(1), base64.b64decode(match.group(2), validate=True)


def test_notes_and_tags_are_saved_to_the_registry(compare):
    run_id = int(compare.table.loc[1, "run_id"])
    compare.select_run(run_id)
    compare.tags_box.value = "keep, report "
    compare.notes_box.value = "best at 3 bits <b>really</b>"
    assert compare.save_edits()
    with Registry.open(compare.app.registry_url.value) as reg:
        run = reg.get_run(run_id)
    assert list(run.tags) == ["keep", "report"] and run.notes == "best at 3 bits <b>really</b>"
    row = compare.table[compare.table["run_id"] == run_id].iloc[0]
    assert row["tags"] == "keep,report"
    compare.more_columns.value = ("notes",)  # notes are one choice away in the table
    assert "&lt;b&gt;really" in compare.table_html.value  # notes are text, never markup
    compare.tag.value = "keep"
    assert list(compare.table["run_id"]) == [run_id]


def test_plot_follows_runs_written_by_another_process(registry_url):
    bench = Workbench(registry_url, model="tiny-llama", poll_interval=0.1)
    try:
        assert bench.watcher.running
        before = bench.compare.plot.refreshes
        other = Registry.open(registry_url)  # another writer: its own engine and connections
        run_id = other.start_run(
            model_fingerprint="f" * 16,
            model_description="other model",
            pipeline_json="[]",
            pipeline_label="baseline",
            suite_key="quick-x",
            suite_name="quick",
            environment={},
        )
        other.finish_run(run_id, {"kl_mean": 0.0, "bits_per_weight": 16.0, "ppl": 10.0})
        other.close()
        assert _until(
            lambda: bench.compare.plot.refreshes > before and bench.first_run.layout.display == "none"
        )
        assert list(bench.compare.frame["run_id"]) == [run_id]
        assert len(bench.compare.plot.figure.layout.shapes) == 2  # a lone baseline: its reference lines
    finally:
        bench.close()
    time.sleep(0.3)
    assert not bench.watcher.running


def test_opening_a_bad_registry_url_keeps_the_old_one_and_says_why(app, registry_url):
    assert not app.open_registry("notadialect://x/y")
    assert app.settings_errors.value and "Traceback" not in app.settings_errors.value.split("<details>")[0]
    assert app.registry_url.value.endswith("runs.db")


def test_a_long_export_link_says_its_size_and_still_downloads(compare, monkeypatch):
    monkeypatch.setattr("widgets.panels.compare.LARGE_LINK_CHARS", 100)
    path = compare.export("csv")
    links = compare.export_links.value
    assert "MB link" in links and _link_data(links, path.name)[1] == path.read_bytes()


def _add_run_of_another_suite(url: str, fingerprint: str) -> int:
    with Registry.open(url) as reg:
        run_id = reg.start_run(
            model_fingerprint=fingerprint,
            model_description="tiny-llama",
            pipeline_json="[]",
            pipeline_label="baseline",
            suite_key="standard-0123456789ab",
            suite_name="standard",
            environment={},
        )
        reg.finish_run(
            run_id,
            {
                "kl_mean": 0.0,
                "bits_per_weight": 32.0,
                "ppl": 9.0,
                "decode_tok_s": 40.0,
                "top1_agree": 1.0,
                "size_mb": 20.0,
                "eval_loss_only": 1.0,
            },
        )
    return run_id


def _variant_points(compare) -> int:
    """Runs drawn as points (one trace per method; the front and the baseline lines carry no run ids)."""
    return sum(len(t.x) for t in compare.plot.figure.data if t.customdata is not None)


def _baselines_drawn(compare) -> int:
    return sum("baseline" in (a.text or "") for a in compare.plot.figure.layout.annotations)


def test_compare_shows_the_apps_suite_unless_asked_for_all(compare):
    app = compare.app
    ours = set(compare.frame["run_id"])
    other = _add_run_of_another_suite(app.registry_url.value, compare.frame["model_fingerprint"].iloc[0])
    compare.refresh()
    # Default: the app's (custom) suite, matched by its key; the registry's other suite is offered by name.
    assert compare.suite.value == app.suite_filter == SUITE.key
    assert ("standard", "standard") in compare.suite.options and compare.suite.options[0] == (
        "All suites",
        "",
    )
    assert set(compare.frame["run_id"]) == ours and set(compare.table["run_id"]) == ours
    assert _variant_points(compare) == 2 and _baselines_drawn(compare) == 1
    assert "metric_eval_loss_only" not in compare.frame.columns  # only the other suite's run has it
    compare.suite.value = ""
    assert set(compare.frame["run_id"]) == ours | {other} and len(compare.table) == 4
    assert _variant_points(compare) == 2 and _baselines_drawn(compare) == 2
    compare.suite.value = "standard"
    assert list(compare.frame["run_id"]) == [other] and list(compare.table["run_id"]) == [other]
    # Picked by hand, the filter stays when the app's suite changes; left on the app's suite, it follows.
    app.suite_picker.value = "quick"
    assert compare.suite.value == "standard"
    compare.suite.value = "quick"
    assert compare.table.empty and "All suites" in compare.table_html.value
    app.suite_picker.value = SUITE
    assert compare.suite.value == SUITE.key and set(compare.frame["run_id"]) == ours
    # Other filters go to the registry query, the suite with them.
    compare.technique.value = "baseline"
    assert len(compare.frame) == 1 and compare.frame["suite_key"].iloc[0] == SUITE.key


def test_display_metrics_latency_and_top_token_percent():
    from workbench.views import direction, title, tradeoff_info, with_display_metrics

    runs = pd.DataFrame(
        {
            "run_id": [1, 2, 3, 4],
            "technique": ["baseline", "rtn", "rtn", "rtn"],
            "metric_decode_tok_s": [50.0, 100.0, 25.0, 0.0],
            "metric_prefill_tok_s": [1e3, 2e3, 500, 1e3],
            "metric_top1_agree": [1.0, 0.9, 0.95, 0.5],
        }
    )
    shown = with_display_metrics(runs)
    assert "metric_decode_ms_per_tok" not in runs.columns  # the input frame is left as it was
    assert shown["metric_decode_ms_per_tok"].tolist()[:3] == pytest.approx([20.0, 10.0, 40.0])
    assert pd.isna(shown["metric_decode_ms_per_tok"].iloc[3])  # no rate: no latency (not infinity)
    assert shown["metric_prefill_ms_per_tok"].tolist() == pytest.approx([1.0, 0.5, 2.0, 1.0])
    assert shown["metric_top1_agree_pct"].tolist() == pytest.approx([100.0, 90.0, 95.0, 50.0])
    assert with_display_metrics(runs[["run_id"]]).columns.tolist() == ["run_id"]
    assert direction("metric_decode_ms_per_tok") == direction("metric_prefill_ms_per_tok") == "min"
    assert direction("metric_top1_agree_pct") == "max" and title("metric_top1_agree_pct").endswith("(%)")
    # Lower latency and more same top tokens are better: run 3 (slower, less agreement than run 1) is beaten.
    info = tradeoff_info(shown, x="metric_decode_ms_per_tok", y="metric_top1_agree_pct", color=None)
    assert sorted(info.front["run_id"]) == [1, 2] and len(info.points) == 3


def test_compare_offers_quality_against_latency_and_linear_bits(compare):
    assert [v for _, v in compare.y.options] == ["metric_ppl", "metric_kl_mean", "metric_top1_agree_pct"]
    assert [v for _, v in compare.x.options][:4] == [
        "metric_size_mb",
        "metric_bits_per_weight",
        "metric_bits_per_weight_linear",
        "metric_decode_ms_per_tok",
    ]
    assert "metric_decode_ms_per_tok" in [v for _, v in compare.color.options]
    compare.x.value = "metric_decode_ms_per_tok"
    compare.y.value = "metric_top1_agree_pct"
    fig = compare.plot.figure
    assert fig.layout.xaxis.title.text == "Decode latency (ms/token; simulated)"  # every variant is rtn
    by_run = dict(zip(compare.frame["run_id"], compare.frame["metric_decode_tok_s"]))
    assert list(fig.data[0].x) == pytest.approx([1000 / by_run[r] for r in fig.data[0].customdata])
    compare.x.value = "metric_bits_per_weight_linear"
    assert compare.plot.figure.layout.xaxis.title.text == "Bits per weight (decoder linears)"
    assert _variant_points(compare) == 2
    assert (
        "metric_decode_ms_per_tok" not in _done_runs(compare.app.registry_url.value).columns
    )  # display only


# ---- jobs ---------------------------------------------------------------------------------------------------


def test_jobs_run_in_order_off_the_calling_thread_and_report_errors():
    jobs = Jobs()
    seen: list[tuple[int, str]] = []
    main = threading.current_thread().name

    def work(i):
        def fn(_progress):
            seen.append((i, threading.current_thread().name))
            if i == 2:
                raise ConfigError("bad two")
            return i * 10

        return fn

    submitted = [jobs.submit(work(i), label=str(i)) for i in range(4)]
    assert jobs.wait(10)
    assert [i for i, _ in seen] == [0, 1, 2, 3] and all(name != main for _, name in seen)
    assert [j.status for j in submitted] == ["done", "done", "failed", "done"]
    assert submitted[3].result == 30 and str(submitted[2].error) == "bad two"
    jobs.close()


def test_an_app_without_a_registry_opens_and_says_what_to_do(tmp_path):
    bench = Workbench("notadialect://x/y", model="tiny-llama", poll_interval=0.05)
    try:
        first = bench.settings_errors.value
        assert first and "Traceback" not in first.split("<details>")[0]
        bench.quantize.bits.value = 3
        assert "No registry is open" in bench.quantize.errors.value and not bench.jobs.history
        time.sleep(0.3)  # the watcher must not replace the real reason with its own complaint
        assert bench.settings_errors.value == first
        assert bench.open_registry(f"sqlite:///{tmp_path / 'ok.db'}") and bench.settings_errors.value == ""
    finally:
        bench.close()
