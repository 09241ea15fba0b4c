"""Compare panel: every run on one trade-off plot, a sortable table, exports, notes/tags and outputs per run.

One refresh reads the registry once (``runs_frame`` with the filters), then draws the plot
(:func:`workbench.views.tradeoff_figure`) and the table (:func:`workbench.tables.comparison_table`, the same
table ``workbench runs`` prints) from that same frame, so both always show the same runs. The panel builds
widgets over those library calls and decides nothing about columns, units or formats itself.
The Host filter keeps the runs of one machine, and a note above the plot says when the runs shown were measured
on several (latency from two machines is not comparable). The Suite filter starts on the app's evaluation suite
and follows it while left there: metrics from different suites (other text, other scoring) are not comparable,
so runs of other suites show only on request.
Exports go through :func:`workbench.export.export_frame` (tables) and plotly's ``write_html`` (the plot) into
the export folder set in the app's settings row, and come back as download links that carry the file itself
(a ``data:`` URI): they work in JupyterLab, Notebook and Voilà whatever the server's root or routes.
"""

from __future__ import annotations

import base64
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
from workbench.tables import (
    COLUMNS_BY_KEY,
    DEFAULT_COLUMNS,
    MORE_COLUMNS,
    available_columns,
    comparison_table,
    export_table,
    generations_table,
    no_match_message,
    only_suite,
)
from workbench.views import title, with_display_metrics

if TYPE_CHECKING:
    from widgets.app import Workbench

# Plot choices. Latency and top-token % are derived from the stored rates and fraction for display
# (:func:`workbench.views.with_display_metrics`); ``workbench.views.METRICS`` says which direction is better.
QUALITY = ("metric_ppl", "metric_kl_mean", "metric_top1_agree_pct")
AGAINST = (
    "metric_size_mb",
    "metric_bits_per_weight",
    "metric_bits_per_weight_linear",
    "metric_decode_ms_per_tok",
    "metric_prefill_ms_per_tok",
)
# Colour by method first: the latency of simulated quantizers (rtn, gptq, awq, mixed) is the float model's, so
# a latency colour would rank them by noise. Latency stays one choice away, marked simulated on the colour bar.
COLOURS = (
    "technique",
    "metric_decode_ms_per_tok",
    "metric_prefill_ms_per_tok",
    "metric_decode_tok_s",
    "metric_size_mb",
    "metric_peak_mem_mb",
    "metric_bits_per_weight",
)
# Rows drawn in the notebook; exports hold every row. A longer HTML table only slows each redraw (about 0.3 ms a
# row) and nobody scrolls a thousand rows: the sort order picks which runs come first.
TABLE_ROWS_SHOWN = 100
TABLE_FORMATS = (("CSV", "csv"), ("Markdown", "md"), ("HTML", "html"), ("LaTeX", "tex"), ("JSON", "json"))
# MIME type of a download link's data, by file suffix (the plot export is .html).
MIME_TYPES = {
    "csv": "text/csv",
    "md": "text/markdown",
    "html": "text/html",
    "tex": "application/x-latex",
    "json": "application/json",
}
# A data link this long says its size next to it: the whole file travels to the browser inside the widget (a plot
# with plotly.js inlined is ~6 MB as base64) and some browsers refuse to download very long data URIs.
LARGE_LINK_CHARS = 8 * 1024 * 1024
LINKS_KEPT = 8  # newest export links shown; each carries its file, so the list must not grow without end
# Continuations are free text several lines long: wrap them in cells of a readable width, top-aligned.
_OUTPUTS_STYLE = (
    "<style>.wb-outputs td{white-space:pre-wrap;vertical-align:top;max-width:480px;padding:4px 8px}"
    ".wb-outputs th{text-align:left;padding:4px 8px}</style>"
)


def _colour_label(column: str) -> str:
    return "method" if column == "technique" else title(column)


def data_uri(path: Path) -> str:
    """The file as a ``data:<mime>;base64,…`` URI (MIME type by suffix; unknown suffixes are octet streams)."""
    mime = MIME_TYPES.get(path.suffix.lstrip(".").lower(), "application/octet-stream")
    return f"data:{mime};base64,{base64.b64encode(path.read_bytes()).decode('ascii')}"


def _download_link(path: Path) -> str:
    """``<a href="data:…" download="name">`` carrying the file, then the path it was written to.

    A ``files/…`` link would depend on the server: JupyterLab resolves it against ``/lab/tree/…`` and only serves
    files under its root, and Voilà has no ``/files`` route. The data URI needs neither.
    """
    absolute = path.resolve()
    uri = data_uri(path)
    name = html.escape(path.name)
    size = ""
    if len(uri) > LARGE_LINK_CHARS:
        size = (
            f" <span style='color:#a15c00'>({len(uri) / 1e6:.1f} MB link; if the browser will not download "
            "it, open the file at the path shown)</span>"
        )
    link = f'<a href="{uri}" download="{name}" target="_blank">{name}</a>{size}'
    return f"{link} <span style='color:#777;font-size:11px'>{html.escape(str(absolute))}</span>"


class ComparePanel(W.VBox):
    """The trade-off plot, filters, a sortable table with more columns on request, export buttons, a notes/tags
    editor and the picked runs' continuations."""

    def __init__(self, app: Workbench) -> None:
        self.app = app
        self.frame = pd.DataFrame()  # the filtered runs on show (plot and table)
        self.full = pd.DataFrame()  # every run, whatever the filters (says which filter to loosen)
        self.table = pd.DataFrame()  # the table as shown and exported
        self._lock = threading.RLock()  # the watcher thread and the kernel may refresh at the same time
        self._updating = False
        self._links: list[str] = []  # export links, newest first
        self._suite_follows_app = True  # the Suite filter tracks the app's suite until someone picks another
        self._all_runs = 0  # runs in the registry, whatever the filters
        self._every_host = pd.DataFrame()  # the runs the other filters leave, from every host

        # Filters.
        self.model = W.Dropdown(
            options=[("All models", "")], value="", description="Model", layout=W.Layout(width="340px")
        )
        self.technique = W.Dropdown(
            options=[("All", "")], value="", description="Technique", layout=W.Layout(width="220px")
        )
        self.tag = W.Text(
            value="",
            description="Tag",
            continuous_update=False,
            placeholder="any",
            layout=W.Layout(width="200px"),
        )
        self.since = W.DatePicker(description="Since", value=None, layout=W.Layout(width="230px"))
        self.host = W.Dropdown(
            options=[("All hosts", "")],
            value="",
            description="Host",
            tooltip="The machine runs were measured on: latency compares only within one",
            layout=W.Layout(width="260px"),
        )
        self.host_note = W.HTML("")  # says so when the runs shown were measured on several machines
        self.runtime = W.Dropdown(
            options=[("All runtimes", "")],
            value="",
            description="Runtime",
            tooltip="Where runs were measured: simulated in torch (float weights), or exported and run in "
            "llama.cpp / torch's packed kernels (real size and latency)",
            layout=W.Layout(width="300px"),
        )
        app_suite = app.suite_filter
        self.suite = W.Dropdown(
            options=[("All suites", ""), (_suite_label(app.suite), app_suite)],
            value=app_suite,
            description="Suite",
            tooltip="Evaluation suite of the runs shown",
            layout=W.Layout(width="260px"),
        )
        # Axes.
        self.y = W.Dropdown(
            options=[(title(c), c) for c in QUALITY],
            value="metric_kl_mean",
            description="Quality",
            layout=W.Layout(width="330px"),
        )
        self.x = W.Dropdown(
            options=[(title(c), c) for c in AGAINST],
            value="metric_bits_per_weight",
            description="against",
            layout=W.Layout(width="330px"),
        )
        self.color = W.Dropdown(
            options=[(_colour_label(c), c) for c in COLOURS] + [("none", "")],
            value="technique",
            description="colour",
            layout=W.Layout(width="300px"),
        )
        self.log_y = W.Checkbox(
            value=False,
            description="log quality axis",
            indent=False,
            tooltip="A log scale keeps one very bad point from flattening the others",
        )
        self.labels = W.Checkbox(
            value=True,
            description="label points",
            indent=False,
            tooltip="Write each point's setting (4b g64 sym) beside it",
        )
        self.plot = LivePlot(self._figure, on_click=self.select_run)
        # Table.
        self.sort_by = W.Dropdown(
            options=[("run", "run_id")], value="run_id", description="Sort by", layout=W.Layout(width="300px")
        )
        self.descending = W.Checkbox(value=False, description="descending", indent=False)
        self.more_columns = W.SelectMultiple(
            options=[(COLUMNS_BY_KEY[k].header, k) for k in MORE_COLUMNS],
            value=(),
            rows=4,
            description="More columns",
            tooltip="Ctrl/Shift-click to add columns to the table and its exports",
            layout=W.Layout(width="320px"),
        )
        self.table_html = W.HTML("")
        # Export.
        self.export_buttons = {
            fmt: W.Button(
                description=label, tooltip=f"Export the table as {label}", layout=W.Layout(width="100px")
            )
            for label, fmt in TABLE_FORMATS
        }
        self.export_plot_button = W.Button(
            description="Plot (HTML)",
            icon="image",
            tooltip="The trade-off plot as a standalone HTML page",
            layout=W.Layout(width="120px"),
        )
        self.export_links = W.HTML("")
        # Notes and tags.
        self.run_picker = W.Dropdown(options=[], description="Run", layout=W.Layout(width="420px"))
        self.tags_box = W.Text(
            description="Tags", placeholder="comma-separated", layout=W.Layout(width="420px")
        )
        self.notes_box = W.Textarea(description="Notes", layout=W.Layout(width="600px", height="70px"))
        self.save_button = W.Button(description="Save", icon="save", button_style="primary")
        self.edit_message = W.HTML("")
        # Outputs: the picked run's continuations beside the base model's, and optionally a second run's.
        self.beside = W.Dropdown(
            options=[("none", None)],
            value=None,
            description="beside",
            tooltip="A second run whose continuations show next to the first",
            layout=W.Layout(width="420px"),
        )
        self.outputs_html = W.HTML("")
        self.errors = ErrorArea()

        for control in (self.model, self.technique, self.tag, self.since, self.host, self.runtime):
            control.observe(lambda _c: None if self._updating else self.refresh(), names="value")
        self.suite.observe(self._suite_picked, names="value")
        for control in (self.y, self.x, self.color, self.log_y, self.labels):
            control.observe(lambda _c: self.plot.refresh(), names="value")
        for control in (self.sort_by, self.descending, self.more_columns):
            control.observe(lambda _c: self._render_table(), names="value")
        for fmt, button in self.export_buttons.items():
            button.on_click(lambda _b, fmt=fmt: self.export(fmt))
        self.export_plot_button.on_click(lambda _b: self.export_plot())
        self.run_picker.observe(lambda _c: self._fill_editor(), names="value")
        for control in (self.run_picker, self.beside):
            control.observe(lambda _c: self.show_outputs(), names="value")
        self.save_button.on_click(lambda _b: self.save_edits())
        app.watcher.subscribe(self.refresh)

        super().__init__(
            [
                W.HBox(
                    [self.model, self.technique, self.suite, self.tag, self.since, self.host, self.runtime],
                    layout=W.Layout(flex_flow="row wrap"),
                ),  # seven filters: wrap rather than clip on a narrow page
                W.HBox(
                    [self.y, self.x, self.color, self.log_y, self.labels],
                    layout=W.Layout(flex_flow="row wrap"),
                ),
                self.host_note,
                self.plot,
                W.HBox(
                    [self.sort_by, self.descending, self.more_columns], layout=W.Layout(flex_flow="row wrap")
                ),
                self.table_html,
                W.HBox(
                    [W.HTML("<b>Export</b>&nbsp;"), *self.export_buttons.values(), self.export_plot_button]
                ),
                self.export_links,
                W.HTML("<b>Notes and tags</b> (click a point to pick its run)"),
                self.run_picker,
                self.tags_box,
                self.notes_box,
                W.HBox([self.save_button, self.edit_message]),
                W.HTML("<b>Outputs</b>: the picked run's continuations against the base model's"),
                self.beside,
                self.outputs_html,
                self.errors,
            ]
        )

    # ---- reading --------------------------------------------------------------------------------------

    def _filters(self) -> dict[str, Any]:
        since = self.since.value
        return {
            "model": self.model.value or None,
            "technique": self.technique.value or None,
            "tag": self.tag.value.strip() or None,
            "since": datetime(since.year, since.month, since.day, tzinfo=timezone.utc)
            if isinstance(since, date)
            else None,
            "suite": self.suite.value or None,
        }

    def _suite_picked(self, _change: Any) -> None:
        if self._updating:
            return
        self._suite_follows_app = self.suite.value == self.app.suite_filter
        self.refresh()

    def refresh(self) -> None:
        """Read the registry once and redraw plot, table, filter choices and the run picker from that frame.

        The unfiltered frame gives the filter choices. With only the suite filter set (the usual case) the runs on
        show are cut from it in pandas; other filters go to the registry query, suite included.
        """
        with self._lock:
            try:
                full = self.app.runs_frame()
                self._update_filter_choices(full)  # first: a vanished choice falls back before it filters
                filters = self._filters()
                active = {k: v for k, v in filters.items() if v is not None}
                if set(active) - {"suite"}:
                    frame = self.app.runs_frame(**active)
                elif "suite" in active:
                    frame = only_suite(full, active["suite"])
                else:
                    frame = full
                frame = with_display_metrics(frame)
                frame = _only(frame, "runtime", self.runtime.value)
                every_host = frame
                frame = _only_host(frame, self.host.value)
            except ConfigError as err:
                self.errors.show(err)
                return
            except Exception as err:  # noqa: BLE001 - shown folded, the panel stays usable
                self.errors.show(err)
                return
            self.errors.clear()
            self.frame, self.full, self._every_host = frame, full, every_host
            self._show_host_note(every_host)
            self._update_choices()
            self.plot.refresh()
            self._render_table()

    def _update_filter_choices(self, full: pd.DataFrame) -> None:
        models = [("All models", "")]
        if not full.empty:
            pairs = full[["model_fingerprint", "model"]].drop_duplicates("model_fingerprint")
            models += [(f"{m} · {fp[:8]}", fp) for fp, m in pairs.itertuples(index=False, name=None)]
        techniques = (
            [("All", "")] + [(t, t) for t in sorted(full["technique"].dropna().unique())]
            if not full.empty
            else [("All", "")]
        )
        # The suites in the registry by name, and the app's suite (a custom one is matched by its key).
        app_suite = self.app.suite_filter
        names = sorted(full["suite"].dropna().astype(str).unique()) if not full.empty else []
        suites = [("All suites", ""), (_suite_label(self.app.suite), app_suite)]
        suites += [(name, name) for name in names if name != app_suite]
        picked = self.suite.value
        if self._suite_follows_app or picked not in [v for _, v in suites]:
            picked, self._suite_follows_app = (
                app_suite,
                True,
            )  # a suite no longer offered falls back to the app's
        hosts = [("All hosts", "")]
        if not full.empty and "host" in full.columns:
            hosts += [(h, h) for h in sorted(full["host"].dropna().astype(str).unique())]
        runtimes = [("All runtimes", "")]
        if not full.empty and "runtime" in full.columns:
            runtimes += [(r, r) for r in sorted(full["runtime"].dropna().astype(str).unique())]
        self._updating = True  # new options may reset a value; that must not start a refresh inside this one
        try:
            _set_options(self.runtime, runtimes)
            _set_options(self.model, models)
            _set_options(self.technique, techniques)
            _set_options(self.host, hosts)
            _set_options(self.suite, suites, quiet=True)
            self.suite.value = picked
        finally:
            self._updating = False
        self._all_runs = len(full)

    def _update_choices(self) -> None:
        sortable = [("run", "run_id"), ("created", "created_at")] + [
            (COLUMNS_BY_KEY[k].header, k)
            for k in available_columns(self.frame)
            if k not in ("run_id", "created_at", "tags", "notes")
        ]
        _set_options(self.sort_by, sortable, quiet=True)
        runs = [
            (f"{r} · {p}", int(r))
            for r, p in zip(self.frame.get("run_id", []), self.frame.get("pipeline", []))
        ]
        _set_options(self.run_picker, runs, quiet=False)
        _set_options(self.beside, [("none", None), *runs], quiet=False)

    def _filter_labels(self) -> dict[str, str]:
        """The active filters as the user sees them (a model's name, not its fingerprint)."""
        since = self.since.value
        return {
            "model": str(self.model.label),
            "technique": str(self.technique.label),
            "suite": str(self.suite.label),
            "tag": self.tag.value.strip(),
            "since": since.isoformat() if isinstance(since, date) else "",
        }

    def empty_message(self) -> str:
        """Why nothing shows: no runs at all, or which filter to loosen (``workbench.tables.no_match_message``)."""
        if self.host.value and not self._every_host.empty:
            return (
                f"No run measured on {self.host.value} matches the other filters; "
                f'{len(self._every_host)} from other machines do: pick "All hosts" to see them.'
            )
        return no_match_message(self.full, self._filters(), self._filter_labels())

    def hosts_shown(self) -> list[str]:
        """The machines the runs on show were measured on (one: latency is comparable across them)."""
        return _hosts(self.frame)

    def _show_host_note(self, every_host: pd.DataFrame) -> None:
        """Warn when the runs on show come from several machines: their latencies are not comparable."""
        hosts = _hosts(every_host)
        if self.host.value or len(hosts) < 2:
            self.host_note.value = ""
            return
        counts = every_host["host"].fillna("unknown").astype(str).value_counts()
        listed = ", ".join(f"{h} ({counts.get(h, 0)})" for h in hosts)  # render_note escapes
        self.host_note.value = render_note(
            f"These runs were measured on {len(hosts)} machines: {listed}. Latency compares only within one "
            "machine; pick one under Host.",
            "warn",
        )

    # ---- drawing --------------------------------------------------------------------------------------

    def _figure(self) -> go.Figure:
        from workbench.views import tradeoff_figure

        frame = self.frame
        for column in (self.y.value, self.x.value):
            if not frame.empty and column not in frame.columns:
                return _message_figure(f"No run in this selection has {title(column).lower()} yet.")
        return tradeoff_figure(
            frame,
            x=self.x.value,
            y=self.y.value,
            color=self.color.value or None,
            log_y=self.log_y.value,
            labels=self.labels.value,
            empty_message=self.empty_message() if frame.empty else None,
        )

    def columns(self) -> list[str]:
        """The table's columns: the defaults, then those picked under "More columns" (in table order)."""
        picked = set(self.more_columns.value)
        return [*DEFAULT_COLUMNS, *(k for k in MORE_COLUMNS if k in picked)]

    def _render_table(self) -> None:
        self.table = comparison_table(
            self.frame, self.sort_by.value or "run_id", self.descending.value, columns=self.columns()
        )
        if self.table.empty:
            self.table_html.value = render_note(self.empty_message())
            return
        shown = self.table.head(TABLE_ROWS_SHOWN)
        more = len(self.table) - len(shown)
        note = (
            (
                f"<div style='color:#555'>Showing the first {len(shown)} of {len(self.table)} runs in this order; "
                "exports contain all of them.</div>"
            )
            if more > 0
            else ""
        )
        # One line per run (long model names would otherwise make every row tall); the box scrolls sideways.
        style = (
            "<style>.wb-table td{white-space:nowrap;padding:2px 6px}"
            ".wb-table th{padding:2px 6px;vertical-align:bottom}</style>"
        )
        self.table_html.value = (
            style + '<div class="wb-table" style="max-height:360px;overflow:auto;'
            'font-size:12px">' + export_table(shown, "html", headers=True) + "</div>" + note
        )

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
        """Write the table as shown (filters, order, columns) in ``fmt``; returns the file and shows a download
        link. Markdown, HTML and LaTeX show each metric at its fixed digits; CSV and JSON keep full values."""
        path = self._export_path(fmt)
        try:
            export_table(self.table, fmt, path)
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
            self.errors.show(
                ConfigError(
                    f"Cannot write the plot to {path}: {err.strerror or err}. "
                    "Choose a writable export folder."
                )
            )
            return None
        self._add_link(path)
        return path

    def _add_link(self, path: Path) -> None:
        self.errors.clear()
        try:
            link = _download_link(path)
        except OSError as err:  # written a moment ago; unreadable now (deleted, permissions)
            self.errors.show(
                ConfigError(
                    f"Wrote {path} but cannot read it back for a download link: {err.strerror or err}."
                )
            )
            return
        self._links = [link, *self._links][:LINKS_KEPT]
        self.export_links.value = "".join(f"<div>{entry}</div>" for entry in self._links)

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

    # ---- outputs --------------------------------------------------------------------------------------

    def show_outputs(self) -> pd.DataFrame:
        """Show the picked run's stored continuations (prompt, base, variant), and the "beside" run's next to
        them; returns the table shown (empty when no run is picked or none stored any)."""
        ids = list(dict.fromkeys(v for v in (self.run_picker.value, self.beside.value) if v is not None))
        if not ids:
            self.outputs_html.value = ""
            return pd.DataFrame()
        try:
            runs = [self.app.registry.get_run(run_id) for run_id in ids]
        except Exception as err:  # noqa: BLE001 - RegistryError says what; the panel stays usable
            self.errors.show(err)
            return pd.DataFrame()
        table = generations_table(runs)
        if table.empty:
            which = " and ".join(f"run {i}" for i in ids)
            self.outputs_html.value = render_note(
                f"No continuations stored for {which}: its suite generates none (n_generations=0). "
                "Runs of the quick and standard suites store a few."
            )
            return table
        self.outputs_html.value = (
            _OUTPUTS_STYLE + '<div class="wb-outputs" style="max-height:420px;overflow:auto;'
            'font-size:12px">' + _text_table(table) + "</div>"
        )
        return table


def _hosts(frame: pd.DataFrame) -> list[str]:
    if frame.empty or "host" not in frame.columns:
        return []
    return sorted(frame["host"].dropna().astype(str).unique())


def _only(frame: pd.DataFrame, column: str, value: str) -> pd.DataFrame:
    """The runs whose ``column`` is ``value`` ("" keeps every run)."""
    if not value or frame.empty or column not in frame.columns:
        return frame
    return frame[frame[column] == value].reset_index(drop=True)


def _only_host(frame: pd.DataFrame, host: str) -> pd.DataFrame:
    """The runs measured on ``host`` ("" keeps every run)."""
    if not host or frame.empty or "host" not in frame.columns:
        return frame
    return frame[frame["host"] == host].reset_index(drop=True)


def _suite_label(suite: Any) -> str:
    """The app's suite in the Suite filter: its name, marked as the one runs use now."""
    return f"{suite} (app's suite)" if isinstance(suite, str) else f"{suite.name} (custom, app's suite)"


def _text_table(table: pd.DataFrame) -> str:
    """An HTML table of free text with its line breaks kept (``export_frame`` puts a cell on one line, right for
    reports, wrong for a code continuation); every cell escaped."""
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in table.columns)
    rows = "".join(
        "<tr>" + "".join(f"<td>{html.escape(str(v))}</td>" for v in row) + "</tr>"
        for row in table.itertuples(index=False, name=None)
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>"


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


__all__ = ["ComparePanel", "comparison_table", "data_uri"]
