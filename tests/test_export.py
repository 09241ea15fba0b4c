"""Exporting run tables: every format, escaping of free text in HTML and LaTeX, raw values in CSV and JSON."""

from __future__ import annotations

import io
import json

import pandas as pd
import pytest

from workbench.errors import ConfigError
from workbench.export import EXPORT_FORMATS, export_frame, format_number


@pytest.fixture()
def frame() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "run_id": [1, 2],
            "created_at": pd.to_datetime(
                ["2026-11-23 10:00:00.123456", "2026-11-23 11:30:00.000000"], utc=True
            ),
            "pipeline": ["baseline", "rtn(bits=4) → gptq(bits=3)"],
            "notes": ["<script>alert('x')</script>", "50% & $x_1$ #1 {a} ~b ^c \\d | pipe\nsecond line"],
            "metric_ppl": [12.345678901, float("nan")],
            "metric_n_params": [134515008.0, 134515008.0],
        }
    )


def test_unknown_format_lists_the_known_ones(frame):
    with pytest.raises(ConfigError, match="Unknown export format 'xlsx'. Formats: csv, md, html, tex, json"):
        export_frame(frame, "xlsx")


@pytest.mark.parametrize("fmt", EXPORT_FORMATS)
def test_every_format_writes_the_file_it_returns(frame, fmt, tmp_path):
    target = tmp_path / "out" / f"runs.{fmt}"
    text = export_frame(frame, fmt, path=target)
    assert target.read_text(encoding="utf-8") == text
    assert "ppl" in text and "baseline" in text


def test_html_escapes_notes_so_they_never_become_markup(frame):
    text = export_frame(frame, "html")
    assert "<script>" not in text
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in text
    assert "12.35" in text and "134515008" in text  # four significant digits; whole numbers in full
    assert text.count("<tr>") == 3


def test_latex_escapes_special_characters(frame):
    text = export_frame(frame, "tex")
    assert r"50\% \& \$x\_1\$ \#1 \{a\} \textasciitilde{}b \textasciicircum{}c \textbackslash{}d" in text
    assert r"\textless{}script\textgreater{}" in text
    assert r"rtn(bits=4) $\rightarrow$ gptq(bits=3)" in text
    assert text.startswith(r"\begin{tabular}{rlllrr}")  # numbers right-aligned
    assert r"metric\_ppl" in text and text.rstrip().endswith(r"\end{tabular}")
    body = [line for line in text.splitlines() if line.endswith(r"\\")]
    assert all(line.count(" & ") == 5 for line in body), body  # one cell per column in every row


def test_markdown_is_one_line_per_run_with_escaped_pipes(frame):
    text = export_frame(frame, "md")
    lines = text.strip().splitlines()
    assert len(lines) == 4  # header, rule, two runs: the newline inside a note did not split a row
    assert "\\| pipe second line" in lines[3]
    assert "12.35" in lines[2] and "2026-11-23 10:00:00" in lines[2]
    assert lines[1].split("|")[1].strip().endswith(":")  # numbers right-aligned


def test_csv_and_json_keep_raw_values(frame):
    back = pd.read_csv(io.StringIO(export_frame(frame, "csv")))
    assert back.loc[0, "metric_ppl"] == 12.345678901 and pd.isna(back.loc[1, "metric_ppl"])
    assert back.loc[1, "notes"] == frame.loc[1, "notes"]
    records = json.loads(export_frame(frame, "json"))
    assert records[0]["metric_ppl"] == 12.345678901 and records[1]["metric_ppl"] is None
    assert records[0]["created_at"].startswith("2026-11-23T10:00:00.123")
    assert records[0]["notes"] == "<script>alert('x')</script>"


def test_format_number_rounds_for_people():
    assert format_number(0.000123456) == "0.0001235"
    assert format_number(3.14159) == "3.142"
    assert format_number(12345.678) == "12346"
    assert format_number(7.0) == "7"
    assert format_number(float("nan")) == ""


def test_a_registry_frame_exports_in_every_format(tmp_path):
    from workbench.registry import Registry

    with Registry.open(tmp_path / "runs.db") as reg:
        run_id = reg.start_run(
            "fp", "tiny", "[]", "baseline", "quick:k", "quick", {}, notes="<b>bold</b> & 5%"
        )
        reg.finish_run(run_id, {"ppl": 10.0, "kl_mean": 0.0})
        frame = reg.runs_frame()
        empty = reg.runs_frame(status="failed")
    for fmt in EXPORT_FORMATS:
        text = export_frame(frame, fmt)
        assert "baseline" in text
        export_frame(empty, fmt)  # an empty selection still exports (a header only)
    assert "&lt;b&gt;bold&lt;/b&gt; &amp; 5%" in export_frame(frame, "html")
    assert json.loads(export_frame(empty, "json")) == []
