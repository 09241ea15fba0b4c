"""The Quantize panel's runtime choice: a slider point measured in llama.cpp is its own run, plotted apart."""

from __future__ import annotations

import pytest
from _require import require

from widgets import Workbench
from workbench.evaluate import Suite
from workbench.registry import Registry
from workbench.runtimes import SIMULATED

WAIT = 120
SUITE = Suite(
    "ui-runtime",
    n_tokens=256,
    context_length=64,
    n_generations=0,
    speed_prompt=16,
    speed_tokens=2,
    speed_repeats=1,
)


@pytest.fixture()
def app(registry_url, tmp_path, monkeypatch):
    require("llama_cpp")
    monkeypatch.chdir(tmp_path)
    bench = Workbench(registry_url, model="tiny-llama", suite=SUITE, poll_interval=0)
    yield bench
    bench.close()


def test_a_point_measured_in_llama_cpp_is_its_own_run_plotted_apart(app, registry_url):
    panel = app.quantize
    app.run_baseline()  # loads the model: the panel then shows its space (and resets the controls once)
    assert app.jobs.wait(WAIT)
    panel.symmetric.value = True
    panel.submit()
    assert app.jobs.wait(WAIT)
    panel.runtime.value = "llama.cpp"
    panel.submit()
    assert app.jobs.wait(WAIT)
    with Registry.open(registry_url) as reg:
        runs = reg.runs_frame(status="done")
    assert sorted(runs["runtime"]) == ["llama.cpp", SIMULATED, SIMULATED]
    simulated = runs[(runs["runtime"] == SIMULATED) & (runs["technique"] == "rtn")].iloc[0]
    deployed = runs[runs["runtime"] == "llama.cpp"].iloc[0]
    assert deployed["parent_id"] == simulated["run_id"]
    assert "llama.cpp" in deployed["pipeline"]
    # The plot shows the chosen runtime's points only.
    shown = panel.frame()
    assert sorted(zip(shown["technique"], shown["runtime"])) == [
        ("baseline", SIMULATED),
        ("rtn", "llama.cpp"),
    ]
    panel.runtime.value = SIMULATED
    assert set(panel.frame()["runtime"]) == {SIMULATED}

    # Compare filters by runtime, and a runtime's latency is not marked simulated.
    from workbench.views import simulated_latency

    compare = app.compare
    compare.refresh()
    assert "llama.cpp" in [v for _, v in compare.runtime.options]
    compare.runtime.value = "llama.cpp"
    assert list(compare.frame["runtime"]) == ["llama.cpp"]
    assert not simulated_latency(compare.frame).any()
    compare.runtime.value = ""
    flags = dict(zip(compare.frame["pipeline"], simulated_latency(compare.frame)))
    assert flags["rtn 4b g32 sym"] and not flags["rtn 4b g32 sym → llama.cpp"]


def test_a_variant_llama_cpp_cannot_hold_is_refused_before_anything_runs(app, registry_url):
    panel = app.quantize
    panel.runtime.value = "llama.cpp"
    panel.symmetric.value = False
    panel.bits.value = 3
    assert "closest is Q4_1" in panel.errors.value
    assert "llama.cpp Q4_1" in panel.errors.value
    assert not app.jobs.history
    with Registry.open(registry_url) as reg:
        assert reg.runs_frame().empty
