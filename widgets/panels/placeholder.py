"""A tab for a technique family that has no panel yet: says plainly that it is coming, and what exists already.

If the library already registers techniques of that kind (``technique_names(kind)``), the tab lists them and
shows how to run one from code, so nothing the library can do is hidden behind a missing panel. The tabs here
are registered as placeholders: a real panel file registering the same ``attr`` (``route``, ``distill``)
takes the tab over.
"""

from __future__ import annotations

import html

import ipywidgets as W

from widgets.panels import Tab, register_tab


class PlaceholderPanel(W.VBox):
    def __init__(self, title: str, text: str, *, kind: str | None = None) -> None:
        self.title = title
        names: list[str] = []
        if kind is not None:
            from workbench.techniques import technique_names

            names = technique_names(kind=kind)
        body = f"<h3 style='margin:4px 0'>{html.escape(title)}: coming soon</h3><p>{html.escape(text)}</p>"
        if names:
            example = f"run_experiment(model, [make_config({names[0]!r}, ...)])"
            body += (
                "<p>Already in the library (usable from code and the command line): "
                f"<code>{html.escape(', '.join(names))}</code>, e.g. <code>{html.escape(example)}</code>.</p>"
            )
        self.text = W.HTML(body)
        super().__init__([self.text], layout=W.Layout(padding="8px"))


register_tab(
    Tab(
        "Route experts",
        attr="route",
        order=20,
        placeholder=True,
        build=lambda _host: PlaceholderPanel(
            "Route experts",
            "Expert routing is coming: a slider for the number of active experts per token on Mixture-of-Experts "
            "models (and on dense models split into experts), quality against active parameters, and per-layer "
            "expert load heatmaps.",
            kind="route",
        ),
    )
)
register_tab(
    Tab(
        "Distill",
        attr="distill",
        order=30,
        placeholder=True,
        build=lambda _host: PlaceholderPanel(
            "Distill",
            "Distillation is coming: train a smaller student from the loaded model as teacher, watch the loss "
            "curve, then stack quantization on the student and compare it with everything else.",
            kind="distill",
        ),
    )
)

__all__ = ["PlaceholderPanel"]
