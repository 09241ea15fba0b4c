"""Compare panel: every run on one trade-off plot, a sortable table, exports, and notes/tags per run.

One refresh reads the registry once (``runs_frame`` with the filters), then draws the plot
(:func:`workbench.views.tradeoff_figure`) and the table from that same frame, so both always show the same runs.
Exports go through :func:`workbench.export.export_frame` (tables) and plotly's ``write_html`` (the plot) into
the export folder set in the app's settings row, and come back as download links.
"""

from __future__ import annotations

import html
import threading
from datetime import date, datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import ipywidgets as W
import pandas as pd
import plotly.graph_objects as go

from widgets.common import ErrorArea, LivePlot, render_note
from workbench.errors import ConfigError

if TYPE_CHECKING:
    from widgets.app import Workbench

QUALITY = ("metric_ppl", "metric_kl_mean", "metric_top1_agree")
AGAINST = ("metric_size_mb", "metric_bits_per_weight", "metric_decode_tok_s", "metric_prefill_tok_s")
COLOURS = ("metric_decode_tok_s", "metric_prefill_tok_s", "metric_peak_mem_mb", "metric_size_mb",
           "metric_bits_per_weight")
# The table: identity first, then the metrics a report compares, then what people wrote.
TABLE_METRICS = ("metric_ppl", "metric_kl_mean", "metric_kl_p99", "metric_top1_agree", "metric_bits_per_weight",
                 "metric_size_mb", "metric_prefill_tok_s", "metric_decode_tok_s", "metric_peak_mem_mb")
TABLE_COLUMNS = ("run_id", "pipeline", "technique", "model", "suite", *TABLE_METRICS, "tags", "notes", "created_at")
# Rows drawn in the notebook; exports hold every row. A longer HTML table only slows each redraw (about 0.3 ms a
# row) and nobody scrolls a thousand rows: the sort order picks which runs come first.
TABLE_ROWS_SHOWN = 100
TABLE_FORMATS = (("CSV", "csv"), ("Markdown", "md"), ("HTML", "html"), ("LaTeX", "tex"), ("JSON", "json"))


def _column_title(column: str) -> str:
    from workbench.views import title

    return title(column) if column.startswith("metric_") else column.replace("_", " ")


def comparison_table(frame: pd.DataFrame, sort_by: str = "run_id", descending: bool = False) -> pd.DataFrame:
    """The runs as a report table: chosen columns, baseline rows first, then sorted by ``sort_by``.

    Column names lose their ``metric_`` prefix (``kl_mean``), which reads well in every export format.
    """
    columns = [c for c in TABLE_COLUMNS if c in frame.columns]
    table = frame[columns].copy()
    if table.empty:
        return table.rename(columns=lambda c: c.removeprefix("metric_"))
    key = next((c for c in (sort_by, f"metric_{sort_by}") if c in table.columns), "run_id")
    not_baseline = (table["technique"] != "baseline") if "technique" in table.columns else pd.Series(False, table.index)
    table = table.assign(_not_baseline=not_baseline.astype(int))
    table = table.sort_values(["_not_baseline", key], ascending=[True, not descending], kind="stable",
                              na_position="last")
    table = table.drop(columns="_not_baseline").reset_index(drop=True)
    if "created_at" in table.columns:
        table["created_at"] = pd.to_datetime(table["created_at"], utc=True).dt.strftime("%Y-%m-%d %H:%M")
    return table.rename(columns=lambda c: c.removeprefix("metric_"))


def _download_link(path: Path) -> str:
    """``<a href="files/…" download>`` relative to the notebook server's root (the kernel's working folder)."""
    absolute = path.resolve()
    try:
        relative = absolute.relative_to(Path.cwd().resolve()).as_posix()
        href = "files/" + relative
    except ValueError:  # outside the server's root: no link the server could serve, the path is still shown
        href = None
    name = html.escape(path.name)
    link = f'<a href="{html.escape(href)}" download="{name}" target="_blank">{name}</a>' if href else name
    return f"{link} <span style='color:#777;font-size:11px'>{html.escape(str(absolute))}</span>"


class ComparePanel(W.VBox):
    """The trade-off plot, filters, a sortable table, export buttons and a notes/tags editor."""

    def __init__(self, app: Workbench) -> None:
        self.app = app
        self.frame = pd.DataFrame()  # the filtered runs on show (plot and table)
        self.table = pd.DataFrame()  # the table as shown and exported
        self._lock = threading.RLock()  # the watcher thread and the kernel may refresh at the same time
        self._updating = False

        # Filters.
        self.model = W.Dropdown(options=[("All models", "")], value="", description="Model",
                                layout=W.Layout(width="340px"))
        self.technique = W.Dropdown(options=[("All", "")], value="", description="Technique",
                                    layout=W.Layout(width="220px"))
        self.tag = W.Text(value="", description="Tag", continuous_update=False, placeholder="any",
                          layout=W.Layout(width="200px"))
        self.since = W.DatePicker(description="Since", value=None, layout=W.Layout(width="230px"))
        # Axes.
        from workbench.views import title

        self.y = W.Dropdown(options=[(title(c), c) for c in QUALITY], value="metric_kl_mean", description="Quality",
                            layout=W.Layout(width="330px"))
        self.x = W.Dropdown(options=[(title(c), c) for c in AGAINST], value="metric_bits_per_weight",
                            description="against", layout=W.Layout(width="330px"))
        self.color = W.Dropdown(options=[(title(c), c) for c in COLOURS] + [("none", "")],
                                value="metric_decode_tok_s", description="colour", layout=W.Layout(width="300px"))
        self.plot = LivePlot(self._figure, on_click=self.select_run)
        # Table.
        self.sort_by = W.Dropdown(options=[("run", "run_id")], value="run_id", description="Sort by",
                                  layout=W.Layout(width="300px"))
        self.descending = W.Checkbox(value=False, description="descending", indent=False)
        self.table_html = W.HTML("")
        # Export.
        self.export_buttons = {fmt: W.Button(description=label, tooltip=f"Export the table as {label}",
                                             layout=W.Layout(width="100px"))
                               for label, fmt in TABLE_FORMATS}
        self.export_plot_button = W.Button(description="Plot (HTML)", icon="image",
                                           tooltip="The trade-off plot as a standalone HTML page",
                                           layout=W.Layout(width="120px"))
        self.export_links = W.HTML("")
        # Notes and tags.
        self.run_picker = W.Dropdown(options=[], description="Run", layout=W.Layout(width="420px"))
        self.tags_box = W.Text(description="Tags", placeholder="comma-separated", layout=W.Layout(width="420px"))
        self.notes_box = W.Textarea(description="Notes", layout=W.Layout(width="600px", height="70px"))
        self.save_button = W.Button(description="Save", icon="save", button_style="primary")
        self.edit_message = W.HTML("")
        self.errors = ErrorArea()

        for control in (self.model, self.technique, self.tag, self.since):
            control.observe(lambda _c: None if self._updating else self.refresh(), names="value")
        for control in (self.y, self.x, self.color):
            control.observe(lambda _c: self.plot.refresh(), names="value")
        for control in (self.sort_by, self.descending):
            control.observe(lambda _c: self._render_table(), names="value")
        for fmt, button in self.export_buttons.items():
            button.on_click(lambda _b, fmt=fmt: self.export(fmt))
        self.export_plot_button.on_click(lambda _b: self.export_plot())
        self.run_picker.observe(lambda _c: self._fill_editor(), names="value")
        self.save_button.on_click(lambda _b: self.save_edits())
        app.watcher.subscribe(self.refresh)

        super().__init__([
            W.HBox([self.model, self.technique, self.tag, self.since]),
            W.HBox([self.y, self.x, self.color]),
            self.plot,
            W.HBox([self.sort_by, self.descending]),
            self.table_html,
            W.HBox([W.HTML("<b>Export</b>&nbsp;"), *self.export_buttons.values(), self.export_plot_button]),
            self.export_links,
            W.HTML("<b>Notes and tags</b> (click a point to pick its run)"),
            self.run_picker, self.tags_box, self.notes_box, W.HBox([self.save_button, self.edit_message]),
            self.errors,
        ])

    # ---- reading --------------------------------------------------------------------------------------

    def _filters(self) -> dict[str, Any]:
        since = self.since.value
        return {
            "model": self.model.value or None,
            "technique": self.technique.value or None,
            "tag": self.tag.value.strip() or None,
            "since": datetime(since.year, since.month, since.day, tzinfo=timezone.utc)
            if isinstance(since, date) else None,
        }

    def refresh(self) -> None:
        """Read the registry once and redraw plot, table, filter choices and the run picker from that frame."""
        with self._lock:
            try:
                filters = self._filters()
                full = self.app.runs_frame()
                active = {k: v for k, v in filters.items() if v is not None}
                frame = self.app.runs_frame(**active) if active else full
            except ConfigError as err:
                self.errors.show(err)
                return
            except Exception as err:  # noqa: BLE001 - shown folded, the panel stays usable
                self.errors.show(err)
                return
            self.errors.clear()
            self.frame = frame
            self._update_choices(full)
            self.plot.refresh()
            self._render_table()

    def _update_choices(self, full: pd.DataFrame) -> None:
        models = [("All models", "")]
        if not full.empty:
            pairs = full[["model_fingerprint", "model"]].drop_duplicates("model_fingerprint")
            models += [(f"{m} · {fp[:8]}", fp) for fp, m in pairs.itertuples(index=False, name=None)]
        techniques = [("All", "")] + [(t, t) for t in sorted(full["technique"].dropna().unique())] \
            if not full.empty else [("All", "")]
        self._updating = True  # new options may reset a value; that must not start a refresh inside this one
        try:
            _set_options(self.model, models)
            _set_options(self.technique, techniques)
        finally:
            self._updating = False
        sortable = [("run", "run_id"), ("created", "created_at")] + [
            (_column_title(c), c.removeprefix("metric_")) for c in TABLE_METRICS if c in self.frame.columns]
        _set_options(self.sort_by, sortable, quiet=True)
        runs = [(f"{r} · {p}", int(r)) for r, p in zip(self.frame.get("run_id", []), self.frame.get("pipeline", []))]
        _set_options(self.run_picker, runs, quiet=False)

    # ---- drawing --------------------------------------------------------------------------------------

    def _figure(self) -> go.Figure:
        from workbench.views import tradeoff_figure

        frame = self.frame
        for column in (self.y.value, self.x.value):
            if not frame.empty and column not in frame.columns:
                from workbench.views import title

                return _message_figure(f"No run in this selection has {title(column).lower()} yet.")
        return tradeoff_figure(frame, x=self.x.value, y=self.y.value, color=self.color.value or None)

    def _render_table(self) -> None:
        from workbench.export import export_frame

        self.table = comparison_table(self.frame, self.sort_by.value or "run_id", self.descending.value)
        if self.table.empty:
            self.table_html.value = render_note("No runs match these filters.")
            return
        shown = self.table.head(TABLE_ROWS_SHOWN).rename(
            columns=lambda c: _column_title("metric_" + c) if "metric_" + c in TABLE_METRICS else c.replace("_", " "))
        more = len(self.table) - len(shown)
        note = (f"<div style='color:#555'>Showing the first {len(shown)} of {len(self.table)} runs in this order; "
                "exports contain all of them.</div>") if more > 0 else ""
        # One line per run (long model names would otherwise make every row tall); the box scrolls sideways.
        style = ("<style>.wb-table td{white-space:nowrap;padding:2px 6px}"
                 ".wb-table th{padding:2px 6px;vertical-align:bottom}</style>")
        self.table_html.value = (style + '<div class="wb-table" style="max-height:360px;overflow:auto;'
                                 'font-size:12px">' + export_frame(shown, "html") + "</div>" + note)

    # ---- exporting ------------------------------------------------------------------------------------

    def _export_path(self, suffix: str) -> Path:
        folder = Path(str(self.app.export_dir.value or "exports")).expanduser()
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        path = folder / f"runs-{stamp}.{suffix}"
        n = 1
        while path.exists():
            n += 1
            path = folder / f"runs-{stamp}-{n}.{suffix}"
        return path

    def export(self, fmt: str) -> Path | None:
        """Write the table as shown (filters, order) in ``fmt``; returns the file and shows a download link."""
        from workbench.export import export_frame

        path = self._export_path(fmt)
        try:
            export_frame(self.table, fmt, path)
        except ConfigError as err:
            self.errors.show(err)
            return None
        self._add_link(path)
        return path

    def export_plot(self) -> Path | None:
        """The trade-off plot as a standalone HTML page (plotly.js inlined: it opens offline)."""
        table_path = self._export_path("html")
        path = table_path.with_name(table_path.stem + "-plot.html")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            go.Figure(self.plot.figure).write_html(str(path), include_plotlyjs=True, full_html=True)
        except OSError as err:
            self.errors.show(ConfigError(f"Cannot write the plot to {path}: {err.strerror or err}. "
                                         "Choose a writable export folder."))
            return None
        self._add_link(path)
        return path

    def _add_link(self, path: Path) -> None:
        self.errors.clear()
        self.export_links.value = f"<div>{_download_link(path)}</div>" + self.export_links.value

    # ---- notes and tags -------------------------------------------------------------------------------

    def select_run(self, run_id: int) -> None:
        """Pick ``run_id`` in the editor (a click on its point does this)."""
        if run_id in [v for _, v in self.run_picker.options]:
            self.run_picker.value = run_id

    def _fill_editor(self) -> None:
        run_id = self.run_picker.value
        if run_id is None or self.frame.empty:
            self.tags_box.value, self.notes_box.value = "", ""
            return
        row = self.frame[self.frame["run_id"] == run_id]
        if row.empty:
            return
        self.tags_box.value = str(row["tags"].iloc[0] or "")
        self.notes_box.value = str(row["notes"].iloc[0] or "")

    def save_edits(self) -> bool:
        """Store the editor's tags and notes on the picked run (the registry validates them)."""
        run_id = self.run_picker.value
        if run_id is None:
            self.errors.show(ConfigError("Pick a run first (the Run menu, or click its point)."))
            return False
        tags = [t.strip() for t in self.tags_box.value.split(",") if t.strip()]
        try:
            self.app.registry.set_tags(run_id, tags)
            self.app.registry.set_notes(run_id, self.notes_box.value)
        except Exception as err:  # noqa: BLE001 - RegistryError/ConfigError say what; others folded
            self.errors.show(err)
            return False
        self.edit_message.value = render_note(f"Saved tags and notes of run {run_id}.", "ok")
        self.app.watcher.poke()
        return True


def _set_options(dropdown: W.Dropdown, options: list[tuple[str, Any]], quiet: bool = False) -> None:
    """Replace a dropdown's options, keeping its value when still offered (ipywidgets would reset it)."""
    if list(dropdown.options) == options:
        return
    value = dropdown.value
    values = [v for _, v in options]
    dropdown.options = options
    if value in values:
        dropdown.value = value
    elif values and not quiet:
        dropdown.value = values[0]


def _message_figure(message: str) -> go.Figure:
    fig = go.Figure()
    fig.add_annotation(text=message, showarrow=False, x=0.5, y=0.5, xref="paper", yref="paper")
    fig.update_xaxes(visible=False)
    fig.update_yaxes(visible=False)
    return fig.update_layout(height=420, template="plotly_white")


__all__ = ["ComparePanel", "comparison_table"]
