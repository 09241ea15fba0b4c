"""The app's tabs: one file per panel in this folder, each registering its tab when imported.

A new panel is one new file here::

    class RoutePanel(W.VBox):
        def __init__(self, host: PanelHost) -> None: ...

    register_tab(Tab("Route experts", attr="route", build=RoutePanel, order=20))

:func:`tabs` imports every module of this package and returns the tabs in ``order``; a real panel replaces a
placeholder registered under the same ``attr`` (``placeholder.py`` holds the "coming soon" tabs). The app shows
them in that order and keeps each panel as ``app.<attr>``.

**What a panel may use of the app** (:class:`PanelHost`): nothing else, so the app can change behind it.

- ``workspace``: the :class:`~workbench.workspace.Workspace` (registry, suite, loaded model, run queue,
  parameter spaces, ``answer_now`` / ``check``): every decision goes through it.
- ``run(pipeline, *, label, progress_bar, errors, on_result, tags, on_partial) -> Job``: queue a run with a
  bar and an error area wired to it (the one UI hook for running); ``on_partial`` hears provisional metrics.
- ``watcher``: the registry watcher; ``watcher.subscribe(redraw)`` redraws when any process records a run.
- ``on_model_loaded(listener)``: hear of a newly loaded model (on the worker thread).
- ``export_dir``: the settings row's export-folder field (a ``Text``; Compare writes there).
- Read-throughs of the workspace kept for brevity: ``registry``, ``suite``, ``suite_filter``, ``fingerprint``,
  ``runs_frame(**filters)``.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import ipywidgets as W


class PanelHost(Protocol):
    """The interface panels get from the app (see the module docstring)."""

    workspace: Any
    watcher: Any
    export_dir: Any

    def run(
        self,
        pipeline: Sequence[Any],
        *,
        label: str = "",
        progress_bar: Any = None,
        errors: Any = None,
        on_result: Callable[[Any], None] | None = None,
        tags: Sequence[str] = (),
        on_partial: Callable[[dict[str, Any]], None] | None = None,
    ) -> Any: ...

    def on_model_loaded(self, listener: Callable[[Any], None]) -> None: ...

    def runs_frame(self, **filters: Any) -> Any: ...

    @property
    def registry(self) -> Any: ...

    @property
    def suite(self) -> Any: ...

    @property
    def suite_filter(self) -> str: ...

    @property
    def fingerprint(self) -> str | None: ...


@dataclass(frozen=True)
class Tab:
    """One tab: its title, the app attribute its panel is kept as, and how to build the panel from the host.

    ``placeholder``: a "coming soon" tab, replaced by a real panel registered under the same ``attr``.
    """

    title: str
    attr: str
    build: Callable[[PanelHost], W.Widget]
    order: int = 50
    placeholder: bool = False


_TABS: dict[tuple[str, bool], Tab] = {}


def register_tab(tab: Tab) -> Tab:
    """Add ``tab`` to the app (called at import by each panel module); registering again replaces it."""
    if not tab.attr.isidentifier():
        raise ValueError(
            f"Tab {tab.title!r}: attr={tab.attr!r} must be a Python identifier (app.{tab.attr})."
        )
    _TABS[(tab.attr, tab.placeholder)] = tab
    return tab


def _discover() -> None:
    # Importing each module registers its tab; private modules (_foo.py) are helpers, not panels.
    for info in pkgutil.iter_modules(__path__):
        if not info.name.startswith("_"):
            importlib.import_module(f"{__name__}.{info.name}")


def tabs() -> list[Tab]:
    """Every registered tab in ``order`` (then title); a real panel hides the placeholder of its ``attr``."""
    _discover()
    real = {attr for attr, placeholder in _TABS if not placeholder}
    chosen = [t for (attr, placeholder), t in _TABS.items() if not placeholder or attr not in real]
    return sorted(chosen, key=lambda t: (t.order, t.title))


from widgets.panels.compare import ComparePanel  # after the registry: panel modules register with it
from widgets.panels.placeholder import PlaceholderPanel
from widgets.panels.quantize import QuantizePanel, build_config

# Compare's module predates the tab registry; its tab is registered here until compare.py does it itself.
if ("compare", False) not in _TABS:
    register_tab(Tab("Compare", attr="compare", build=ComparePanel, order=90))

__all__ = [
    "ComparePanel",
    "PanelHost",
    "PlaceholderPanel",
    "QuantizePanel",
    "Tab",
    "build_config",
    "register_tab",
    "tabs",
]
