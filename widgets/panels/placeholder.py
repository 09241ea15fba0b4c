"""A tab for a technique family that has no panel yet: says plainly that it is coming, and what exists already.

If the library already registers techniques of that kind (``technique_names(kind)``), the tab lists them and
shows how to run one from code, so nothing the library can do is hidden behind a missing panel.
"""

from __future__ import annotations

import html

import ipywidgets as W


class PlaceholderPanel(W.VBox):
    def __init__(self, title: str, text: str, *, kind: str | None = None) -> None:
        self.title = title
        names: list[str] = []
        if kind is not None:
            from workbench.techniques import technique_names

            names = technique_names(kind=kind)
        body = (f"<h3 style='margin:4px 0'>{html.escape(title)}: coming soon</h3>"
                f"<p>{html.escape(text)}</p>")
        if names:
            example = f"run_experiment(model, [make_config({names[0]!r}, ...)])"
            body += ("<p>Already in the library (usable from code and the command line): "
                     f"<code>{html.escape(', '.join(names))}</code>, e.g. <code>{html.escape(example)}</code>.</p>")
        self.text = W.HTML(body)
        super().__init__([self.text], layout=W.Layout(padding="8px"))


__all__ = ["PlaceholderPanel"]
