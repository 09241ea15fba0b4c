"""The comparison table (``workbench.tables``) and the Compare panel over it: columns, units, digits, filters that
match nothing, simulated latency, continuations. Runs are written straight into a registry (no model runs), so
every value is known."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from workbench.errors import ConfigError
from workbench.registry import Registry
from workbench.tables import (
    DEFAULT_COLUMNS,
    MORE_COLUMNS,
    available_columns,
    comparison_table,
    export_table,
    filter_mask,
    generations_table,
    no_match_message,
    only_suite,
)

LONG_MODEL = "/home/someone/models/SmolLM2-135M-Instruct (134.5M params, 538 MB f32)"
GENERATIONS = [
    {"prompt": "def add(a, b):", "base": "\n    return a + b", "model": "\n    return a - b  # <wrong>"},
    {"prompt": "The sky is", "base": " blue", "model": " blue today"},
]


def _step(technique: str, **params) -> dict:
    return {"technique": technique, "version": 1, "params": params}


# (pipeline steps, label, metrics, tags, notes)
RUNS = [
    (
        [],
        "baseline",
        {
            "ppl": 12.0,
            "kl_mean": 0.0,
            "top1_agree": 1.0,
            "bits_per_weight": 32.0,
            "bits_per_weight_linear": 32.0,
            "size_mb": 538.0,
            "decode_tok_s": 50.0,
            "peak_mem_mb": 900.0,
        },
        (),
        "",
    ),
    (
        [_step("rtn", bits=4, group_size=64, symmetric=True)],
        "rtn(bits=4, group_size=64, symmetric=True)",
        {
            "ppl": 12.3456,
            "kl_mean": 0.01234,
            "top1_agree": 0.953,
            "bits_per_weight": 4.75,
            "bits_per_weight_linear": 4.5,
            "size_mb": 96.4,
            "decode_tok_s": 45.0,
            "peak_mem_mb": 1500.0,
        },
        ("keep",),
        "good enough <b>for</b> the report",
    ),
    (
        [_step("rtn", bits=8, group_size=32, symmetric=False)],
        "rtn(bits=8, group_size=32)",
        {
            "ppl": 12.0001,
            "kl_mean": 7.718e-06,
            "top1_agree": 0.999,
            "bits_per_weight": 9.0,
            "bits_per_weight_linear": 9.0,
            "size_mb": 160.0,
            "decode_tok_s": 44.0,
            "peak_mem_mb": 1600.0,
        },
        (),
        "",
    ),
    (
        [_step("bnb", mode="nf4", double_quant=True)],
        "bnb(mode=nf4, double_quant=True)",
        {
            "ppl": 12.5,
            "kl_mean": 0.03,
            "top1_agree": 0.94,
            "bits_per_weight": 4.6,
            "bits_per_weight_linear": 4.3,
            "size_mb": 92.0,
            "decode_tok_s": 20.0,
            "peak_mem_mb": 1200.0,
        },
        ("keep",),
        "",
    ),
]


def _fill(url: str, suite: str = "quick") -> list[int]:
    ids = []
    with Registry.open(url) as reg:
        for steps, label, metrics, tags, notes in RUNS:
            run_id = reg.start_run(
                "fp-demo",
                LONG_MODEL,
                json.dumps(steps),
                label,
                f"{suite}-key",
                suite,
                {},
                tags=tags,
                notes=notes,
            )
            reg.finish_run(run_id, metrics, extras={"generations": GENERATIONS if steps else []})
            ids.append(run_id)
    return ids


@pytest.fixture()
def frame(registry_url) -> pd.DataFrame:
    _fill(registry_url)
    with Registry.open(registry_url) as reg:
        return reg.runs_frame()


# ---- the table, in the library ---------------------------------------------------------------------------


def test_default_table_has_few_short_columns_in_one_unit_each(frame):
    table = comparison_table(frame, sort_by="kl_mean")
    assert list(table.columns) == list(DEFAULT_COLUMNS)
    assert len(table.columns) <= 13 and "pipeline" in MORE_COLUMNS and "peak_mem_mb" in MORE_COLUMNS
    assert set(table["model"]) == {"SmolLM2-135M-Instruct"}  # not the 60-character path and size note
    assert list(table["setting"]) == ["float", "8b g32", "4b g64 sym", "nf4 dq"]  # baseline first, then by KL
    assert table["top1_agree_pct"].tolist() == pytest.approx([100.0, 99.9, 95.3, 94.0])  # always %
    assert table["decode_ms_per_tok"].tolist() == pytest.approx([20.0, 1000 / 44, 1000 / 45, 50.0])
    # rtn only simulates (float weights on a grid: the float model's speed); bnb runs packed.
    assert list(table["latency"]) == ["measured", "simulated", "simulated", "measured"]
    assert "bits_per_weight_linear" in table.columns and "size_mb" in table.columns


def test_people_formats_show_each_metric_at_fixed_digits_and_exports_keep_values(frame, tmp_path):
    table = comparison_table(frame)
    md = export_table(table, "md")
    assert (
        "0.00000772" in md and "0.0123" in md and "e-06" not in md
    )  # KL: 3 significant digits, no 7.718e-06
    assert "12.35" in md and "99.9" in md and "96.4" in md
    shown = export_table(table, "html", headers=True)
    assert (
        "<th>KL mean</th>" in shown
        and "<th>top-1 same %</th>" in shown
        and "<th>decode ms/token</th>" in shown
    )
    export_table(table, "csv", tmp_path / "t.csv")
    csv = pd.read_csv(tmp_path / "t.csv")
    assert csv["kl_mean"].tolist() == pytest.approx(table["kl_mean"].tolist())  # CSV keeps full values
    assert csv.loc[2, "kl_mean"] == pytest.approx(7.718e-06)


def test_more_columns_and_unknown_ones(frame):
    table = comparison_table(frame, columns=[*DEFAULT_COLUMNS, "peak_mem_mb", "notes", "pipeline"])
    assert table.loc[1, "peak_mem_mb"] == 1500.0 and table.loc[1, "notes"].startswith("good enough")
    assert table.loc[0, "size_mb"] == 538.0  # the variant's own size, apart from the process peak
    with pytest.raises(ConfigError, match="Unknown table column.*'nope'.*Columns: run_id"):
        comparison_table(frame, columns=["run_id", "nope"])
    assert "work_mem_mb" not in available_columns(frame) and "latency" in available_columns(frame)
    assert comparison_table(frame.iloc[:0]).empty


def test_a_filter_that_matches_nothing_names_the_filter_to_loosen(frame):
    filters = {"technique": "gptq", "tag": "keep", "suite": "quick", "model": None, "since": None}
    assert not filter_mask(frame, filters).any()
    text = no_match_message(frame, filters)
    assert text.startswith("No run matches the filters (Technique = gptq, Tag = keep, Suite = quick)")
    assert 'Technique: pick "All" to see 2 run(s)' in text and "Tag" not in text.split("Loosen")[1]
    assert no_match_message(frame.iloc[:0], filters) == "No runs yet: record a baseline, then quantize."
    assert filter_mask(frame, {"tag": "keep"}).sum() == 2 and filter_mask(frame, {"tag": "kee"}).sum() == 0
    assert len(only_suite(frame, "quick")) == 4 and only_suite(frame, "standard").empty


def test_generations_side_by_side(registry_url):
    ids = _fill(registry_url)
    with Registry.open(registry_url) as reg:
        runs = [reg.get_run(ids[1]), reg.get_run(ids[3])]
        baseline = reg.get_run(ids[0])
    table = generations_table(runs)
    assert list(table.columns) == [
        "prompt",
        "base",
        f"run {ids[1]}: rtn(bits=4, group_size=64, symmetric=True)",
        f"run {ids[3]}: bnb(mode=nf4, double_quant=True)",
    ]
    assert table.loc[0, "prompt"] == "def add(a, b):" and table.loc[0, "base"] == "\n    return a + b"
    assert table.iloc[0, 2] == "\n    return a - b  # <wrong>"
    assert generations_table([baseline]).empty


def test_cli_runs_prints_the_same_table(registry_url, capsys):
    from workbench.cli import main

    _fill(registry_url)
    assert main(["runs", "--registry", registry_url]) == 0
    out = capsys.readouterr().out
    header = out.splitlines()[0]
    assert "setting" in header and "top1_agree_pct" in header and "pipeline_json" not in header
    assert "SmolLM2-135M-Instruct " in out and "/home/someone" not in out and "0.00000772" in out
    assert main(["runs", "--registry", registry_url, "--format", "csv"]) == 0
    assert "pipeline_json" in capsys.readouterr().out  # CSV for programs: every column


# ---- the panel over it ----------------------------------------------------------------------------------


@pytest.fixture()
def compare(registry_url, tmp_path, monkeypatch):
    from widgets import Workbench

    monkeypatch.chdir(tmp_path)
    _fill(registry_url)
    bench = Workbench(registry_url, model="tiny-llama", suite="quick", poll_interval=0)
    yield bench.compare
    bench.close()


def test_compare_colours_by_method_by_default_with_fixed_colours(compare):
    from workbench.views import technique_colour

    assert compare.color.value == "technique"
    fig = compare.plot.figure
    colours = {t.name: t.marker.color for t in fig.data if t.customdata is not None}
    assert colours == {"rtn": technique_colour("rtn"), "bnb": technique_colour("bnb")}
    assert (
        max(max(t.x) for t in fig.data if t.x is not None) == 9.0
    )  # the 32-bit baseline is a line, not a point
    assert fig.layout.autosize is True and fig.layout.width is None
    compare.color.value = "metric_decode_ms_per_tok"
    bar = next(t for t in compare.plot.figure.data if t.marker.showscale).marker.colorbar.title.text
    assert bar == "Decode latency (ms/token; simulated for rtn)"


def test_compare_log_axis_and_labels_checkboxes(compare):
    compare.log_y.value = True
    assert compare.plot.figure.layout.yaxis.type == "log"
    rtn = next(t for t in compare.plot.figure.data if t.name == "rtn")
    assert sorted(rtn.text) == ["4b g64 sym", "8b g32"]
    compare.labels.value = False
    assert next(t for t in compare.plot.figure.data if t.name == "rtn").text is None


def test_compare_table_more_columns_and_short_headers(compare):
    assert list(compare.table.columns) == list(DEFAULT_COLUMNS)
    html = compare.table_html.value
    assert "SmolLM2-135M-Instruct" in html and "/home/someone" not in html and "0.00000772" in html
    assert "peak" not in html
    compare.more_columns.value = ("peak_mem_mb",)
    assert "peak_mem_mb" in compare.table.columns and "<th>process peak MB</th>" in compare.table_html.value
    path = compare.export("md")
    assert "peak_mem_mb" in path.read_text() and "bits_per_weight_linear" in path.read_text()
    assert ("top-1 same %", "top1_agree_pct") in compare.sort_by.options


def test_compare_filter_that_matches_nothing_says_which_to_loosen(compare):
    compare.technique.value = "bnb"
    compare.tag.value = "nothing-has-this"
    note = compare.table_html.value
    assert "No runs yet" not in note and "Tag = nothing-has-this" in note
    assert "Tag: empty it to see 1 run(s)" in note
    assert "Tag = nothing-has-this" in compare.plot.figure.layout.annotations[0].text


def test_compare_shows_continuations_of_one_run_and_two_side_by_side(compare):
    ids = sorted(compare.frame["run_id"])
    compare.select_run(ids[1])
    shown = compare.outputs_html.value
    assert "def add(a, b):" in shown and "\n    return a + b" in shown  # line breaks kept (shown pre-wrap)
    assert "return a - b  # &lt;wrong&gt;" in shown and "<wrong>" not in shown  # model text is never markup
    compare.beside.value = ids[3]
    assert (
        f"run {ids[3]}: bnb" in compare.outputs_html.value
        and f"run {ids[1]}: rtn" in compare.outputs_html.value
    )
    compare.beside.value = None
    compare.select_run(ids[0])
    assert "No continuations stored" in compare.outputs_html.value


def test_compare_hover_shows_notes_and_tags(compare):
    rtn = next(t for t in compare.plot.figure.data if t.name == "rtn")
    hover = dict(zip(rtn.customdata, rtn.hovertext))
    (with_notes,) = [h for h in hover.values() if "notes:" in h]
    assert "notes: good enough &lt;b&gt;for&lt;/b&gt; the report" in with_notes and "tags: keep" in with_notes
    assert "(simulated)" in with_notes
