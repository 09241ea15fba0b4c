"""The fit planner as a widget: pick runs, a context length, a batch size and a KV cache type; see what each
variant needs in memory, which device sizes hold it, and what the same precision needs at other model sizes.

``FitBox(app_or_workspace)`` is a self-contained box (no tab of its own; a deployment tab places it). All the
arithmetic is :mod:`workbench.fit`; the box only turns controls into arguments and plans into HTML tables.
"""

from __future__ import annotations

import html
from typing import Any

import ipywidgets as W

from widgets.common import ErrorArea, render_note
from workbench.errors import ConfigError, WorkbenchError
from workbench.fit import (
    DEFAULT_DEVICES_GB,
    KV_BYTES,
    extrapolate,
    format_table,
    moe_what_if,
    parse_devices,
    plan_fit,
)

CONTEXTS = (512, 1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072)
LOADED = "loaded"  # the option that plans the workspace's loaded model itself
SHOWN_RUNS = 3  # runs selected at first: the latest ones


def _devices_text(devices: tuple[float, ...]) -> str:
    return ", ".join(f"{g:g}" for g in devices)


class FitBox(W.VBox):
    """Controls (runs, context, batch, KV type, device sizes, flash attention) and three tables: the chosen
    variants' memory and fitting devices, their extrapolation to the family's reference sizes, and for MoE
    variants what fewer experts or a lower k change. Every control redraws at once (pure arithmetic)."""

    def __init__(self, app_or_workspace: Any) -> None:
        self.host = app_or_workspace
        self.workspace = getattr(app_or_workspace, "workspace", app_or_workspace)
        self.runs = W.SelectMultiple(options=[], rows=6, description="runs", layout=W.Layout(width="480px"))
        self.context = W.SelectionSlider(
            options=CONTEXTS, value=4096, description="context", continuous_update=False
        )
        self.batch = W.BoundedIntText(
            value=1, min=1, max=4096, description="batch", layout=W.Layout(width="180px")
        )
        self.kv = W.Dropdown(
            options=list(KV_BYTES), value="f16", description="KV cache", layout=W.Layout(width="200px")
        )
        self.devices = W.Text(
            value=_devices_text(DEFAULT_DEVICES_GB), description="devices GB", layout=W.Layout(width="260px")
        )
        self.flash = W.Checkbox(value=True, description="flash attention", indent=False)
        self.refresh_button = W.Button(
            description="Refresh runs", icon="refresh", layout=W.Layout(width="140px")
        )
        self.refresh_button.on_click(lambda _b: self.refresh())
        self.errors = ErrorArea()
        self.table = W.HTML("")
        self.extrapolation = W.HTML("")
        self.what_if = W.HTML("")
        self.plans: list[Any] = []
        self._frame: Any = None
        # The run list starts at the latest runs and follows new ones until a person picks runs themselves.
        self._auto_selection = True
        self._refreshing = False
        self.runs.observe(self._on_pick, names="value")
        for control in (self.context, self.batch, self.kv, self.devices, self.flash):
            control.observe(lambda _change: self.update(), names="value")
        controls = W.VBox(
            [
                W.HBox([self.runs, self.refresh_button]),
                W.HBox([self.context, self.batch, self.kv]),
                W.HBox([self.devices, self.flash]),
            ]
        )
        super().__init__([controls, self.errors, self.table, self.extrapolation, self.what_if])
        watcher = getattr(app_or_workspace, "watcher", None)
        if watcher is not None:
            watcher.subscribe(self.refresh)
        self.refresh()

    # ---- runs -----------------------------------------------------------------------------------------

    def refresh(self) -> None:
        """Re-read the registry's done runs (and the loaded model) into the run list, keeping the selection."""
        try:
            frame = self.workspace.runs_frame() if getattr(self.workspace, "has_registry", True) else None
        except WorkbenchError as err:
            self.errors.show(err)
            frame = None
        options: list[tuple[str, Any]] = []
        loaded = self.workspace.loaded_model() if hasattr(self.workspace, "loaded_model") else None
        if loaded is not None:
            options.append((f"loaded model: {loaded.description}", LOADED))
        if frame is not None and not frame.empty:
            frame = frame.sort_values("run_id", ascending=False)
            for _, row in frame.iterrows():
                name = str(row.get("model", "")).split(" (", 1)[0]
                options.append(
                    (
                        f"#{int(row['run_id'])} {name} · {row.get('pipeline') or 'baseline'}",
                        int(row["run_id"]),
                    )
                )
        self._frame = frame
        values = {v for _, v in options}
        keep = tuple(v for v in self.runs.value if v in values)
        if self._auto_selection or not keep:
            runs = tuple(v for _, v in options if v != LOADED)
            keep = runs[:SHOWN_RUNS] or tuple(v for _, v in options[:1])
        self._refreshing = True
        try:
            self.runs.options = options
            self.runs.value = keep
        finally:
            self._refreshing = False
        self.update()

    def _on_pick(self, _change: Any) -> None:
        if not self._refreshing:
            self._auto_selection = False
            self.update()

    def select(self, *run_ids: Any) -> None:
        """Choose these runs (ids, or ``LOADED``) and redraw."""
        self.runs.value = tuple(run_ids)

    # ---- plans ----------------------------------------------------------------------------------------

    def settings(self) -> dict[str, Any]:
        """The controls as :func:`workbench.fit.plan_fit` arguments (ConfigError for bad device sizes)."""
        return {
            "context": int(self.context.value),
            "batch": int(self.batch.value),
            "kv_dtype": str(self.kv.value),
            "devices_gb": parse_devices(self.devices.value),
            "flash_attention": bool(self.flash.value),
        }

    def _plan(self, choice: Any, settings: dict[str, Any]) -> Any:
        if choice == LOADED:
            loaded = self.workspace.loaded_model()
            if loaded is None:
                raise ConfigError("The model is no longer loaded; press Refresh runs.")
            return plan_fit(loaded, **settings)
        frame = self._frame
        rows = frame[frame["run_id"] == choice] if frame is not None else None
        if rows is None or rows.empty:
            raise ConfigError(f"Run {choice} is not in the registry any more; press Refresh runs.")
        return plan_fit(rows.iloc[0], workspace=self.workspace, **settings)

    def update(self) -> None:
        """Recompute every chosen variant's plan and redraw the tables (errors: one line each, no traceback)."""
        problems: list[str] = []
        try:
            settings = self.settings()
        except WorkbenchError as err:
            self.errors.show(err)
            return
        plans = []
        for choice in self.runs.value:
            try:
                plans.append(self._plan(choice, settings))
            except WorkbenchError as err:
                problems.append(str(err))
        self.plans = plans
        if problems:
            self.errors.show("; ".join(problems))
        else:
            self.errors.clear()
        if not plans:
            self.table.value = render_note(
                "Choose one or more runs (record one first, e.g. a quantized variant) to see what they need."
                if not self.runs.options
                else "Choose one or more runs above."
            )
            self.extrapolation.value = self.what_if.value = ""
            return
        where = f"Memory at context {settings['context']} × batch {settings['batch']}, KV cache {settings['kv_dtype']}"
        notes = sorted({n for p in plans for n in p.notes})
        self.table.value = _section(
            where + " (device sizes in GiB; overhead is an estimate)", format_table(plans, "html"), notes
        )
        others = [q for p in plans for q in extrapolate(p)]
        self.extrapolation.value = (
            _section(
                "The same precision at other sizes of the family (estimates)", format_table(others, "html")
            )
            if others
            else ""
        )
        what_if = [q for p in plans for q in moe_what_if(p)]
        self.what_if.value = (
            _section(
                "Fewer experts (memory down) or a lower k (compute down, memory unchanged), estimates",
                format_table(what_if, "html"),
            )
            if what_if
            else ""
        )


def _section(title: str, table_html: str, notes: list[str] | None = None) -> str:
    body = f"<h4 style='margin:8px 0 4px'>{html.escape(title)}</h4>"
    body += f"<div style='overflow-x:auto;font-size:12px'>{table_html}</div>"
    if notes:
        body += (
            "<ul style='font-size:12px;margin:4px 0'>"
            + "".join(f"<li>{html.escape(n)}</li>" for n in notes)
            + "</ul>"
        )
    return body


__all__ = ["CONTEXTS", "LOADED", "FitBox"]
