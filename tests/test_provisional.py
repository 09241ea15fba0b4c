"""A new slider point shows a first estimate on the plot while it evaluates, replaced by the recorded point."""

from __future__ import annotations

import pytest

from widgets import Workbench
from workbench.evaluate import Suite

WAIT = 60
# 4 chunks in batches of 1: three provisional estimates before the result.
SUITE = Suite(
    "provisional-test",
    n_tokens=256,
    context_length=64,
    batch_size=1,
    n_generations=0,
    speed_prompt=16,
    speed_tokens=2,
    speed_repeats=1,
)


@pytest.fixture()
def app(registry_url, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    bench = Workbench(registry_url, model="tiny-llama", suite=SUITE, poll_interval=0)
    yield bench
    bench.close()


def test_a_new_point_is_drawn_provisionally_then_replaced_by_the_recorded_one(app):
    panel = app.quantize
    seen: list[list] = []  # after every redraw: the provisional traces drawn (name, x, y, hover)
    refresh = panel.plot.refresh

    def spy():
        refresh()
        seen.append(
            [
                (t.name, list(t.x), list(t.y), t.hovertext[0])
                for t in panel.plot.figure.data
                if t.name == "provisional"
            ]
        )

    panel.plot.refresh = spy
    app.run_baseline()
    assert app.jobs.wait(WAIT)
    assert not any(seen)  # the baseline is no quantize point: nothing provisional drawn for it
    panel.bits.value = 3
    assert app.jobs.wait(WAIT)
    drawn = [traces for traces in seen if traces]
    assert len(drawn) == 3, seen
    # Each estimate sits at the variant's real size, one point each; the recorded point then replaces it.
    result = panel.results[-1]
    assert result.status == "done"
    assert all(len(traces) == 1 and len(traces[0][1]) == 1 for traces in drawn)
    xs = {traces[0][1][0] for traces in drawn}
    assert len(xs) == 1 and xs.pop() == pytest.approx(result.metrics["bits_per_weight_linear"])
    assert "25% of the text" in drawn[0][0][3] and "75% of the text" in drawn[-1][0][3]
    assert seen[-1] == [] and panel.provisional is None
    assert panel.plot.trace_points("provisional") == 0 and panel.plot.trace_points() == 1


def test_log_scale_checkbox_sets_the_quality_axis(app):
    panel = app.quantize
    panel.log_y.value = True
    app.run_baseline()
    panel.bits.value = 3
    assert app.jobs.wait(WAIT)
    panel.plot.refresh()
    assert panel.plot.figure.layout.yaxis.type == "log"
    panel.log_y.value = False
    assert panel.plot.figure.layout.yaxis.type in (None, "linear", "-")
