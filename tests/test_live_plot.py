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


def test_a_plot_sits_beside_the_watcher_that_sizes_its_views_to_the_panel():
    # plotly draws a view that was hidden or not yet attached at a 700 px fallback; the watcher's script makes
    # it measure again once it is laid out (see widgets.common._WIDTH_WATCHER_ESM), for elements of this class.
    from widgets import common

    plot = LivePlot(lambda: _figure(2))
    watcher = plot.children[0]
    assert isinstance(watcher, common._WidthWatcher) and plot.children[1] is plot.figure
    assert "wb-figure" in plot.figure._dom_classes
    assert ".wb-figure" in watcher._css and ".wb-figure" in watcher._esm
    assert 'new Event("resize")' in watcher._esm
    assert watcher.layout.display == "none"  # it shows nothing


def test_a_shown_tab_gives_its_plots_new_views_and_keeps_their_watchers():
    import ipywidgets as W

    from widgets import common

    plot, other = LivePlot(lambda: _figure(2)), LivePlot(lambda: _figure(3))
    plot.refresh()
    other.refresh()
    tabs = W.Tab(children=[W.VBox([plot]), W.VBox([other])])
    common.fit_plots_when_shown(tabs)
    before, watcher, kept = other.figure, other.children[0], plot.figure
    tabs.selected_index = 1
    # The shown tab's plot gets a new widget (a view created while visible) with the same figure...
    assert other.figure is not before and other.children[1] is other.figure
    assert [list(t.x) for t in other.figure.data] == [list(t.x) for t in before.data] == [[0, 1, 2]]
    assert other.figure.get_state()["_widget_layout"]["title"]["text"] == "trade-off"
    assert "wb-figure" in other.figure._dom_classes and other.figure._config["responsive"] is True
    # ...in front of the same watcher (a box redraws the views after the first child that changed), and the
    # plot of the hidden tab is left alone.
    assert other.children[0] is watcher
    assert plot.figure is kept
