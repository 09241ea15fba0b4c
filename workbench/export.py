"""Tables of runs for reports: a DataFrame to CSV, Markdown, HTML, LaTeX or JSON text.

CSV and JSON keep every value as it is (for other programs); Markdown, HTML and LaTeX are for people, so
floats are shown with about four significant digits and dates without microseconds. Markdown, HTML and LaTeX
escape every cell: run notes are free text typed by anyone sharing the registry, and a note must never become
markup (``<script>``) or break the document (``50% & more``). For the same reason a CSV text cell that a
spreadsheet would run as a formula (it starts with ``= + - @``, a tab or a carriage return) gets a leading
single quote, as OWASP's CSV-injection advice says; numbers, and text that is a plain number, stay as they are.
"""

from __future__ import annotations

import html
import math
import numbers
import re
from collections.abc import Mapping
from datetime import date, datetime
from pathlib import Path
from typing import Any

import pandas as pd

from workbench.errors import ConfigError

EXPORT_FORMATS = ("csv", "md", "html", "tex", "json")
_ALIASES = {"markdown": "md", "latex": "tex", "htm": "html"}


def format_significant(value: float, digits: int) -> str:
    """``value`` with ``digits`` significant digits in plain positional notation, trailing zeros kept so a
    column reads at one precision: 0.00000772 and 0.0123 (KL), 12.35 (perplexity), 538.0 (MB).

    Scientific notation only where positional would be unreadable: below 1e-6 and from 1e15.
    """
    if math.isnan(value):
        return ""
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    if value == 0:
        return "0"
    magnitude = abs(value)
    if magnitude < 1e-6 or magnitude >= 1e15:
        return f"{value:.{max(digits - 1, 0)}e}"
    decimals = max(0, digits - 1 - math.floor(math.log10(magnitude)))
    return f"{value:.{decimals}f}"


def format_number(value: float) -> str:
    """About four significant digits, but whole numbers (parameter counts, bytes) in full; no scientific
    notation for ordinary values (7.718e-06 reads as 0.000007718)."""
    if math.isnan(value) or math.isinf(value):
        return format_significant(value, 4)
    if float(value).is_integer() and abs(value) < 1e15:
        return str(int(value))
    if abs(value) >= 1e4:
        return f"{value:.0f}"
    text = format_significant(value, 4)
    return text if "e" in text or "." not in text else text.rstrip("0").rstrip(".")


def _cell(value: Any, digits: int | None = None) -> str:
    """A value as a person reads it: '' for missing, rounded floats, dates to the second, one line."""
    if value is None or value is pd.NA or value is pd.NaT:
        return ""
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, numbers.Integral):
        return str(int(value))
    if isinstance(value, numbers.Real):
        return format_number(float(value)) if digits is None else format_significant(float(value), digits)
    if isinstance(value, pd.Timestamp | datetime):
        return pd.Timestamp(value).strftime("%Y-%m-%d %H:%M:%S")
    if isinstance(value, date):
        return value.isoformat()
    return " ".join(str(value).split())  # newlines and tabs would break a table row


def _text_cells(
    df: pd.DataFrame, digits: Mapping[str, int] | None = None
) -> tuple[list[str], list[list[str]], list[bool]]:
    """Header, rows of cell text, and which columns are numeric (right-aligned)."""
    header = [str(c) for c in df.columns]
    numeric = [
        pd.api.types.is_numeric_dtype(df[c]) and not pd.api.types.is_bool_dtype(df[c]) for c in df.columns
    ]
    per_column = [(digits or {}).get(str(c)) for c in df.columns]
    rows = [[_cell(v, d) for v, d in zip(row, per_column)] for row in df.itertuples(index=False, name=None)]
    return header, rows, numeric


def _markdown(df: pd.DataFrame, digits: Mapping[str, int] | None = None) -> str:
    header, rows, numeric = _text_cells(df, digits)

    def esc(text: str) -> str:
        # Markdown renderers pass raw HTML through: escaped, a note's <script> is shown, not run.
        return html.escape(text, quote=False).replace("\\", "\\\\").replace("|", "\\|")

    widths = [max([len(esc(h)), 3, *(len(esc(r[i])) for r in rows)]) for i, h in enumerate(header)]

    def line(cells: list[str]) -> str:
        return (
            "| "
            + " | ".join(
                esc(c).rjust(w) if num else esc(c).ljust(w) for c, w, num in zip(cells, widths, numeric)
            )
            + " |"
        )

    rule = (
        "| " + " | ".join(("-" * (w - 1) + ":") if num else "-" * w for w, num in zip(widths, numeric)) + " |"
    )
    return "\n".join([line(header), rule, *(line(r) for r in rows)]) + "\n"


def _html(df: pd.DataFrame, digits: Mapping[str, int] | None = None) -> str:
    header, rows, numeric = _text_cells(df, digits)
    out = ['<table class="workbench-runs">', "  <thead>", "    <tr>"]
    out += [f"      <th>{html.escape(h)}</th>" for h in header]
    out += ["    </tr>", "  </thead>", "  <tbody>"]
    for row in rows:
        out.append("    <tr>")
        out += [
            f'      <td style="text-align: right">{html.escape(c)}</td>'
            if num
            else f"      <td>{html.escape(c)}</td>"
            for c, num in zip(row, numeric)
        ]
        out.append("    </tr>")
    out += ["  </tbody>", "</table>"]
    return "\n".join(out) + "\n"


_TEX_SPECIAL = {
    "\\": r"\textbackslash{}",
    "&": r"\&",
    "%": r"\%",
    "$": r"\$",
    "#": r"\#",
    "_": r"\_",
    "{": r"\{",
    "}": r"\}",
    "~": r"\textasciitilde{}",
    "^": r"\textasciicircum{}",
    "<": r"\textless{}",
    ">": r"\textgreater{}",
    # Pipeline labels join steps with an arrow, which pdflatex cannot typeset from a bare Unicode character.
    "→": r"$\rightarrow$",
}


def escape_latex(text: str) -> str:
    return "".join(_TEX_SPECIAL.get(ch, ch) for ch in text)


def _latex(df: pd.DataFrame, digits: Mapping[str, int] | None = None) -> str:
    header, rows, numeric = _text_cells(df, digits)
    spec = "".join("r" if num else "l" for num in numeric)
    # booktabs rules: the usual look of tables in papers (\usepackage{booktabs}).
    out = [
        f"\\begin{{tabular}}{{{spec}}}",
        r"\toprule",
        " & ".join(escape_latex(h) for h in header) + r" \\",
        r"\midrule",
    ]
    out += [" & ".join(escape_latex(c) for c in row) + r" \\" for row in rows]
    out += [r"\bottomrule", r"\end{tabular}"]
    return "\n".join(out) + "\n"


_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")
_PLAIN_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")


def csv_safe(value: Any) -> Any:
    """``value`` as a CSV cell no spreadsheet runs as a formula: text starting with ``= + - @``, a tab or a
    carriage return gets a leading ``'``; numbers and plain-number text (``-1.5``) are returned as they are."""
    if isinstance(value, str) and value.startswith(_FORMULA_START) and not _PLAIN_NUMBER.fullmatch(value):
        return "'" + value
    return value


def _csv_text(value: Any) -> Any:
    value = csv_safe(value)
    if isinstance(value, str) and "\r" in value:
        # Python 3.11's csv writer quotes a field with "\n" but not one with a bare "\r", which readers then
        # take for the end of the row: carriage returns become newlines, and the field is quoted.
        value = value.replace("\r\n", "\n").replace("\r", "\n")
    return value


def _csv(df: pd.DataFrame) -> str:
    text_columns = [c for c in df.columns if df[c].dtype == object or pd.api.types.is_string_dtype(df[c])]
    safe = df.copy()
    for column in text_columns:
        safe[column] = safe[column].map(_csv_text)
    safe.columns = [csv_safe(str(c)) for c in safe.columns]
    return safe.to_csv(index=False, date_format="%Y-%m-%dT%H:%M:%S.%f%z")


def _json(df: pd.DataFrame) -> str:
    # Records with ISO 8601 dates; NaN becomes null so any JSON parser can read it.
    return df.to_json(orient="records", date_format="iso", force_ascii=False, indent=1) + "\n"


def export_frame(
    df: pd.DataFrame,
    fmt: str,
    path: str | Path | None = None,
    *,
    digits: Mapping[str, int] | None = None,
) -> str:
    """``df`` as text in ``fmt`` (csv, md, html, tex, json); also written to ``path`` when given.

    ``digits`` gives columns a fixed number of significant digits in the formats for people (md, html, tex;
    see :func:`format_significant`); CSV and JSON always keep full values.

    Raises:
        ConfigError: an unknown format (the message lists the known ones), or ``path`` cannot be written.
    """
    key = _ALIASES.get(str(fmt).lower().lstrip("."), str(fmt).lower().lstrip("."))
    if key not in EXPORT_FORMATS:
        raise ConfigError(f"Unknown export format {fmt!r}. Formats: {', '.join(EXPORT_FORMATS)}.")
    df = df.reset_index(drop=True)
    if key == "csv":
        text = _csv(df)
    elif key == "md":
        text = _markdown(df, digits)
    elif key == "html":
        text = _html(df, digits)
    elif key == "tex":
        text = _latex(df, digits)
    else:
        text = _json(df)
    if path is not None:
        target = Path(path).expanduser()
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(text, encoding="utf-8")
        except OSError as err:
            raise ConfigError(
                f"Cannot write the export to {target}: {err.strerror or err}. Choose a writable path."
            ) from None
    return text


__all__ = [
    "EXPORT_FORMATS",
    "csv_safe",
    "escape_latex",
    "export_frame",
    "format_number",
    "format_significant",
]
