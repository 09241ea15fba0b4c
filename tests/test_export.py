"""Exporting run tables: every format, escaping of free text in HTML and LaTeX, raw values in CSV and JSON."""

from __future__ import annotations

import io
import json

import pandas as pd
import pytest

from workbench.errors import ConfigError
from workbench.export import EXPORT_FORMATS, export_frame, format_number, format_significant


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


def test_small_values_read_without_scientific_notation():
    assert format_number(7.718e-06) == "0.000007718"
    assert format_number(0.01234) == "0.01234" and format_number(0.5) == "0.5"
    assert format_number(1e-9) == "1.000e-09"  # positional would be unreadable this small


def test_format_significant_keeps_one_precision_per_column():
    assert format_significant(7.718e-06, 3) == "0.00000772" and format_significant(0.01234, 3) == "0.0123"
    assert format_significant(12.3456, 4) == "12.35" and format_significant(0.5, 3) == "0.500"
    assert format_significant(538.04, 3) == "538" and format_significant(123456.7, 3) == "123457"
    assert format_significant(0.0, 3) == "0" and format_significant(float("nan"), 3) == ""


def test_digits_per_column_apply_to_people_formats_only():
    df = pd.DataFrame({"kl_mean": [7.718e-06, 0.01234], "ppl": [12.3456, 13.0]})
    md = export_frame(df, "md", digits={"kl_mean": 3, "ppl": 4})
    assert "0.00000772" in md and "0.0123 " in md and "13.00" in md and "e-06" not in md
    assert "0.00000772" in export_frame(df, "html", digits={"kl_mean": 3})
    assert "0.00000772" in export_frame(df, "tex", digits={"kl_mean": 3})
    assert pd.read_csv(io.StringIO(export_frame(df, "csv", digits={"kl_mean": 3})))["kl_mean"][0] == 7.718e-06
