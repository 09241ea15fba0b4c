"""The plot widget every panel shares: what a browser view created after the kernel drew will show."""

from __future__ import annotations

import plotly.graph_objects as go

from widgets.common import LivePlot


def _figure(n: int) -> go.Figure:
    fig = go.Figure(go.Scatter(x=list(range(n)), y=list(range(n)), mode="markers", name="rtn"))
    return fig.update_layout(title="trade-off", height=400)


def test_a_view_created_after_a_refresh_draws_the_current_figure_not_the_placeholder():
    # A Voilà page (or a reloaded JupyterLab page) creates its views after the kernel drew: they render the
    # synced _widget_data/_widget_layout, so those must follow every refresh.
    calls = iter([_figure(3), _figure(5)])
    plot = LivePlot(lambda: next(calls))
    placeholder = plot.figure._widget_layout
    assert any("Reading the registry" in a["text"] for a in placeholder.get("annotations", []))

    plot.refresh()
    state = plot.figure.get_state()
    layout, data = state["_widget_layout"], state["_widget_data"]
    assert not layout.get("annotations"), "the placeholder note would stay above the points"
    assert layout["title"]["text"] == "trade-off"
    assert [len(trace["x"]) for trace in data] == [3]

    plot.refresh()
    assert [len(t["x"]) for t in plot.figure.get_state()["_widget_data"]] == [5]
    assert plot.trace_points() == 5


def test_plots_are_responsive_to_the_width_of_their_panel():
    plot = LivePlot(lambda: _figure(2))
    plot.refresh()
    assert plot.figure._config["responsive"] is True
    assert plot.figure.layout.width is None  # no fixed width: the browser sizes it to the panel


def test_every_row_of_the_app_wraps_and_no_label_is_clipped(registry_url, tmp_path, monkeypatch):
    import ipywidgets as W

    from widgets import Workbench

    monkeypatch.chdir(tmp_path)
    app = Workbench(registry_url, model="tiny-llama", poll_interval=0)
    try:
        rows, labelled, stack = [], [], [app]
        while stack:
            w = stack.pop()
            if isinstance(w, W.HBox):
                rows.append(w)
            if getattr(w, "description", "") and hasattr(getattr(w, "style", None), "description_width"):
                labelled.append(w)
            stack.extend(c for c in getattr(w, "children", ()) if isinstance(c, W.Widget))
        assert len(rows) > 5 and all(r.layout.flex_flow for r in rows)
        names = {w.description for w in labelled}
        assert {"Registry", "Model", "Bits"} <= names
        assert all(w.style.description_width for w in labelled)
    finally:
        app.close()


def test_no_plot_of_the_app_is_left_on_its_placeholder(registry_url, tmp_path, monkeypatch):
    # Every panel's plots draw at start (an empty state says so); "Reading the registry…" means nothing drew it.
    import ipywidgets as W

    from widgets import Workbench

    monkeypatch.chdir(tmp_path)
    app = Workbench(registry_url, model="tiny-llama", poll_interval=0)
    try:
        plots, stack = [], [app]
        while stack:
            w = stack.pop()
            if isinstance(w, LivePlot):
                plots.append(w)
            stack.extend(c for c in getattr(w, "children", ()) if isinstance(c, W.Widget))
        assert len(plots) >= 3
        for plot in plots:
            notes = [a.text for a in plot.figure.layout.annotations or ()]
            assert not any("Reading the registry" in n for n in notes), notes
    finally:
        app.close()


def test_a_plot_asks_its_view_to_remeasure_after_drawing_and_when_its_tab_is_shown(monkeypatch):
    # plotly draws a view that was hidden or detached at a 700 px fallback; any relayout makes it measure again.
    import ipywidgets as W

    from widgets import common

    monkeypatch.setattr(common.threading, "Timer", _ImmediateTimer)
    plot = LivePlot(lambda: _figure(2))
    plot.refresh()
    for _ in range(3):
        plot.figure._js2py_layoutDelta = {"layout_delta": {"width": 700}, "layout_edit_id": 0}
    assert plot.figure.layout.meta == {"fit": 2}  # measured again after drawing, twice at most (no loop)
    other = LivePlot(lambda: _figure(3))
    other.refresh()
    tabs = W.Tab(children=[W.VBox([plot]), W.VBox([other])])
    common.fit_plots_when_shown(tabs)
    before = other.figure
    tabs.selected_index = 1
    # The shown tab's plot gets a new widget (a view created while visible) with the same figure.
    assert other.figure is not before and other.children[1] is other.figure
    assert [list(t.x) for t in other.figure.data] == [list(t.x) for t in before.data] == [[0, 1, 2]]
    assert other.figure.get_state()["_widget_layout"]["title"]["text"] == "trade-off"
    assert plot.figure.layout.meta == {"fit": 2}  # the hidden one is left alone


class _ImmediateTimer:
    def __init__(self, _delay, fn):
        self.fn, self.daemon = fn, True

    def start(self):
        self.fn()
