"""Views: the data behind the plots (Pareto flags, directions, hover), not pixels."""

from __future__ import annotations

import json

import pandas as pd
import plotly.graph_objects as go
import pytest

from workbench.errors import ConfigError
from workbench.views import (
    bits_figure,
    expert_load_figure,
    loss_curve_figure,
    pareto_mask,
    sensitivity_figure,
    setting_labels,
    short_model_name,
    simulated_latency,
    technique_colour,
    tradeoff_figure,
    tradeoff_info,
    with_display_metrics,
)


def _runs() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "run_id": [1, 2, 3, 4, 5],
            "technique": ["baseline", "rtn", "rtn", "gptq", "rtn"],
            "pipeline": ["baseline", "rtn(bits=4)", "rtn(bits=3)", "gptq(bits=3)", "rtn(bits=2)"],
            "metric_bits_per_weight": [32.0, 4.5, 3.5, 3.5, 2.5],
            "metric_kl_mean": [0.0, 0.05, 0.20, 0.10, 0.90],
            "metric_top1_agree": [1.0, 0.95, 0.85, 0.90, 0.60],
            "metric_decode_tok_s": [50.0, 60.0, 61.0, 61.0, 62.0],
            "tags": ["", "", "<b>x</b>", "", ""],
        }
    )


def test_pareto_front_keeps_only_undominated_runs():
    info = tradeoff_info(_runs())
    assert sorted(info.front["run_id"]) == [
        1,
        2,
        4,
        5,
    ]  # run 3 (rtn 3-bit) is beaten by gptq at the same size
    assert list(info.front["metric_bits_per_weight"]) == sorted(info.front["metric_bits_per_weight"])


def test_higher_is_better_metrics_flip_the_direction():
    info = tradeoff_info(_runs(), y="metric_top1_agree")
    assert sorted(info.front["run_id"]) == [1, 2, 4, 5]
    mask = pareto_mask(pd.Series([1.0, 2.0]).to_numpy(), pd.Series([0.5, 0.9]).to_numpy(), "min", "max")
    assert mask.tolist() == [True, True]
    mask = pareto_mask(pd.Series([1.0, 2.0]).to_numpy(), pd.Series([0.9, 0.5]).to_numpy(), "min", "max")
    assert mask.tolist() == [True, False]


def test_hover_names_the_pipeline_and_escapes_user_text():
    info = tradeoff_info(_runs())
    hover = dict(zip(info.points["run_id"], info.points["hover"], strict=True))
    assert "gptq(bits=3)" in hover[4] and "Mean KL divergence vs base: 0.1" in hover[4]
    assert "&lt;b&gt;x&lt;/b&gt;" in hover[3]


def test_figures_draw_points_per_technique_front_and_baseline_as_a_reference_line():
    fig = tradeoff_figure(_runs())
    names = [t.name for t in fig.data]
    assert names == ["rtn", "gptq", "Pareto front"]
    assert sum(len(t.x) for t in fig.data if t.customdata is not None) == 4  # the baseline is not a point
    assert max(max(t.x) for t in fig.data) == 4.5  # so its 32 bits do not stretch the axis
    assert fig.layout.xaxis.title.text == "Bits per weight (all weights)"
    # A dashed line at the baseline's quality; its size (far off the variants' range) is named in the label.
    (line,) = fig.layout.shapes
    assert line.y0 == line.y1 == 0.0 and line.line.dash == "dash"
    assert any("baseline" in a.text and "32" in a.text for a in fig.layout.annotations)
    lines = bits_figure(_runs())
    assert {t.name for t in lines.data} == {"rtn", "gptq"}
    assert len(lines.layout.shapes) == 1 and lines.layout.shapes[0].y0 == 0.0


def test_baseline_near_the_variants_gets_a_vertical_line_too():
    runs = _runs().assign(metric_decode_tok_s=[50.0, 60.0, 61.0, 61.0, 62.0])
    fig = tradeoff_figure(runs, x="metric_decode_tok_s")
    kinds = sorted((s.x0 == s.x1, s.y0 == s.y1) for s in fig.layout.shapes)
    assert len(kinds) == 2 and fig.layout.shapes[1].x0 == 50.0  # horizontal at KL 0, vertical at 50 tok/s
    only_base = tradeoff_figure(_runs().iloc[:1])
    assert not only_base.data and len(only_base.layout.shapes) == 2  # a lone baseline: both lines, no note


def test_each_technique_keeps_its_colour_and_marker_whatever_else_is_plotted():
    alone = tradeoff_figure(_runs()[_runs()["technique"] != "gptq"])
    together = tradeoff_figure(_runs())

    def marker(fig, name):
        trace = next(t for t in fig.data if t.name == name)
        return trace.marker.color, trace.marker.symbol

    assert marker(alone, "rtn") == marker(together, "rtn") == (technique_colour("rtn"), "circle")
    assert marker(together, "gptq")[0] != marker(together, "rtn")[0]
    assert technique_colour("brand-new") == technique_colour("brand-new")  # unknown names: stable too
    bits = bits_figure(_runs())
    assert next(t for t in bits.data if t.name == "rtn").line.color == technique_colour("rtn")


def test_log_quality_axis_and_a_baseline_at_zero_kl():
    fig = tradeoff_figure(_runs(), log_y=True)
    assert fig.layout.yaxis.type == "log" and not fig.layout.shapes  # KL 0 has no place on a log axis...
    assert any(a.text.startswith("baseline: Mean KL") for a in fig.layout.annotations)  # ...so it is named
    assert bits_figure(_runs(), log_y=True).layout.yaxis.type == "log"
    assert tradeoff_figure(_runs()).layout.yaxis.type == "linear"


def test_points_are_labelled_with_their_setting_and_plots_follow_the_container_width():
    runs = _runs().assign(
        param_bits=[None, 4, 3, 3, 2],
        param_group_size=[None, 64, 64, 32, 64],
        param_symmetric=[None, True, False, False, False],
    )
    fig = tradeoff_figure(runs)
    rtn = next(t for t in fig.data if t.name == "rtn")
    assert list(rtn.text) == ["4b g64 sym", "3b g64", "2b g64"] and "text" in rtn.mode
    assert setting_labels(
        pd.DataFrame(
            {
                "technique": ["bnb", "quanto", "baseline"],
                "param_mode": ["nf4", None, None],
                "param_double_quant": [True, None, None],
                "param_weights": [None, "int4", None],
                "param_group_size": [None, 64, None],
            }
        )
    ) == ["nf4 dq", "int4 g64", "float"]
    for figure in (fig, bits_figure(runs), tradeoff_figure(pd.DataFrame())):
        assert figure.layout.autosize is True and figure.layout.width is None and figure.layout.height
    many = pd.concat([runs] * 20, ignore_index=True).assign(run_id=range(100))
    assert all(t.text is None for t in tradeoff_figure(many).data)  # 80 labels would only overlap


def test_simulated_latency_is_marked_in_axis_colour_and_hover():
    runs = with_display_metrics(
        _runs().assign(
            technique=["baseline", "rtn", "rtn", "bnb", "rtn"], notes=["", "", "", "packed <nf4>", ""]
        )
    )
    assert simulated_latency(runs).tolist() == [False, True, True, False, True]
    fig = tradeoff_figure(runs, x="metric_decode_ms_per_tok", color="metric_decode_tok_s")
    assert fig.layout.xaxis.title.text == "Decode latency (ms/token; simulated for rtn)"
    assert fig.data[0].marker.colorbar.title.text == "Decode tokens/s (simulated for rtn)"
    hover = dict(zip(tradeoff_info(runs).points["run_id"], tradeoff_info(runs).points["hover"]))
    assert "Decode tokens/s: 60 (simulated)" in hover[2] and "(simulated)" not in hover[4]
    assert "notes: packed &lt;nf4&gt;" in hover[4]
    # A stacked pipeline is simulated when any step is, whatever its first step.
    stacked = pd.DataFrame(
        {
            "technique": ["bnb", "bnb"],
            "pipeline_json": [
                json.dumps([{"technique": "bnb"}]),
                json.dumps([{"technique": "bnb"}, {"technique": "gptq"}]),
            ],
        }
    )
    assert simulated_latency(stacked).tolist() == [False, True]


def test_short_model_names():
    assert short_model_name("SmolLM2-135M-Instruct (134.5M params, 538 MB f32)") == "SmolLM2-135M-Instruct"
    assert (
        short_model_name("/home/me/models/llama-3.2-1b-instruct-q4 (1236.0M params, 4944 MB f32)")
        == "llama-3.2-1b-instruct-q4"
    )
    assert short_model_name("HuggingFaceTB/SmolLM2-360M") == "SmolLM2-360M"
    assert len(short_model_name("x" * 80)) == 32 and short_model_name(None) == ""


def test_empty_registry_gives_a_friendly_empty_figure():
    empty = pd.DataFrame(columns=["run_id", "status"])
    assert tradeoff_info(empty).points.empty
    fig = tradeoff_figure(empty)
    assert isinstance(fig, go.Figure) and "No runs yet" in fig.layout.annotations[0].text


def test_unknown_metric_column_is_refused_with_the_known_ones():
    with pytest.raises(ConfigError, match="metric_kl_mean"):
        tradeoff_info(_runs(), y="metric_nope")


def test_higher_is_better_on_the_x_axis_too():
    # Latency view: decode speed (higher is better) against mean KL (lower is better).
    info = tradeoff_info(_runs(), x="metric_decode_tok_s", y="metric_kl_mean")
    # 1 has the lowest KL, 5 is the fastest; 3 is beaten by 4 (as fast, less KL).
    assert sorted(info.front["run_id"]) == [1, 2, 4, 5]
    info = tradeoff_info(
        _runs().assign(metric_decode_tok_s=[50.0, 60.0, 61.0, 59.0, 62.0]),
        x="metric_decode_tok_s",
        y="metric_kl_mean",
    )
    assert sorted(info.front["run_id"]) == [1, 2, 3, 5]  # 4 is now slower than 2 and has more KL


def test_runs_missing_a_plotted_metric_are_left_out_not_plotted_at_zero():
    runs = _runs()
    runs.loc[2, "metric_kl_mean"] = float("nan")
    info = tradeoff_info(runs)
    assert 3 not in set(info.points["run_id"]) and len(info.points) == 4


def test_colour_is_the_technique_by_default_and_a_metric_scale_on_request():
    fig = tradeoff_figure(_runs())
    assert fig.data[0].marker.showscale is None and fig.data[0].marker.color == technique_colour("rtn")
    fig = tradeoff_figure(_runs(), color="metric_decode_tok_s")
    assert fig.data[0].marker.colorbar.title.text == "Decode tokens/s (simulated)"
    assert fig.data[0].marker.showscale and not fig.data[1].marker.showscale  # one colour bar for all traces
    assert fig.data[0].marker.cmin == fig.data[1].marker.cmin == 60.0
    fig = tradeoff_figure(_runs().drop(columns="metric_decode_tok_s"), color="metric_decode_tok_s")
    assert fig.data[0].marker.showscale is None and sum(len(t.x) for t in fig.data[:2]) == 4


def test_bits_figure_draws_one_line_per_method_sorted_by_bits_with_latency_in_hover():
    fig = bits_figure(_runs())
    rtn = next(t for t in fig.data if t.name == "rtn")
    assert list(rtn.x) == [2.5, 3.5, 4.5] and rtn.mode.startswith("lines+markers")
    assert all("Decode tokens/s" in h for h in rtn.hovertext)
    assert fig.layout.yaxis.title.text == "Mean KL divergence vs base"
    assert "No quantized runs" in bits_figure(pd.DataFrame()).layout.annotations[0].text


def test_bits_figure_draws_one_line_per_grid_and_one_per_format_method():
    # The frame's param_* columns (first step's parameters): rtn at two group sizes, symmetric and not, an
    # integer zero point, per-channel; gptq; quanto and bnb, whose widths are formats (one line each).
    runs = pd.DataFrame(
        {
            "run_id": list(range(1, 13)),
            "technique": [
                "baseline",
                "rtn",
                "rtn",
                "rtn",
                "rtn",
                "rtn",
                "rtn",
                "rtn",
                "gptq",
                "quanto",
                "quanto",
                "bnb",
            ],
            "param_bits": [None, 4, 3, 4, 3, 4, 4, 4, 4, None, None, None],
            "param_group_size": [None, 32, 32, 64, 64, 32, 32, -1, 32, 64, None, None],
            "param_symmetric": [
                None,
                False,
                False,
                False,
                False,
                True,
                False,
                False,
                False,
                None,
                None,
                None,
            ],
            "param_zero_point": [
                None,
                "float",
                "float",
                "float",
                "float",
                "float",
                "int",
                "float",
                "float",
                None,
                None,
                None,
            ],
            "metric_bits_per_weight_linear": [32.0, 5.0, 4.0, 4.5, 3.5, 4.5, 4.75, 4.01, 5.0, 4.5, 8.0, 4.1],
            "metric_kl_mean": [0.0, 0.05, 0.2, 0.07, 0.3, 0.06, 0.05, 0.2, 0.03, 0.1, 0.01, 0.08],
            "metric_decode_tok_s": [50.0] * 12,
        }
    )
    fig = bits_figure(runs, x="metric_bits_per_weight_linear")
    names = [t.name for t in fig.data]
    assert names == [
        "bnb",
        "gptq g32",
        "quanto",
        "rtn g32",
        "rtn g32 int-zero",
        "rtn g32 sym",
        "rtn g64",
        "rtn per-channel",
    ]
    lines = {t.name: t for t in fig.data}
    assert list(lines["rtn g32"].x) == [4.0, 5.0] and list(lines["rtn g32"].customdata) == [3, 2]
    assert list(lines["rtn g64"].x) == [3.5, 4.5]
    assert list(lines["quanto"].x) == [4.5, 8.0]  # quanto's group size does not split its line
    hovers = lines["rtn g64"].hovertext
    assert all("Decode tokens/s" in h and "Bits per weight (decoder linears)" in h for h in hovers)
    assert fig.layout.xaxis.title.text == "Bits per weight (decoder linears)"


def test_other_figures_draw_their_data_and_say_when_there_is_none():
    frame = pd.DataFrame({"name": ["layers.0", "layers.1"], "kl_mean": [0.3, 0.1]})
    bars = sensitivity_figure(frame)
    assert list(bars.data[0].y) == [0.3, 0.1] and bars.layout.yaxis.title.text == "Mean KL divergence vs base"
    heat = expert_load_figure([[0.5, 0.25, 0.25], [0.1, 0.1, 0.8]])
    assert heat.data[0].z.shape == (2, 3) and list(heat.data[0].x) == ["e0", "e1", "e2"]
    loss = loss_curve_figure([1, 2, 3], [2.0, 1.5, 1.2])
    assert list(loss.data[0].y) == [2.0, 1.5, 1.2]
    for empty in (sensitivity_figure(pd.DataFrame()), expert_load_figure([]), loss_curve_figure([], [])):
        assert empty.layout.annotations and not empty.data


def test_hover_text_is_built_for_every_run_in_a_large_registry():
    import numpy as np

    n = 3000
    rng = np.random.default_rng(0)
    runs = pd.DataFrame(
        {
            "run_id": np.arange(n),
            "pipeline": ["rtn(bits=3)"] * n,
            "technique": ["rtn"] * n,
            "metric_bits_per_weight": rng.uniform(2, 8, n),
            "metric_kl_mean": rng.uniform(0, 1, n),
            "tags": [""] * n,
        }
    )
    info = tradeoff_info(runs)
    assert len(info.points) == n and info.points["hover"].str.startswith("<b>run ").all()
    # The front of random points is a staircase: sorted by x, KL strictly falls.
    front = info.front
    assert (np.diff(front["metric_bits_per_weight"]) >= 0).all() and (
        np.diff(front["metric_kl_mean"]) < 0
    ).all()


def test_many_baseline_runs_draw_one_reference_line_per_model():
    import time

    n = 2000
    runs = pd.DataFrame(
        {
            "run_id": range(n),
            "technique": ["baseline"] * (n - 1) + ["rtn"],
            "model": [f"m{i % 2} (1M params)" for i in range(n)],
            "model_fingerprint": [f"fp{i % 2}" for i in range(n)],
            "metric_bits_per_weight": [32.0] * (n - 1) + [4.5],
            "metric_kl_mean": [0.0] * (n - 1) + [0.1],
        }
    )
    start = time.perf_counter()
    fig = tradeoff_figure(runs)
    assert time.perf_counter() - start < 2.0
    labels = sorted(a.text for a in fig.layout.annotations)
    assert (
        len(fig.layout.shapes) == 2
        and labels[0].startswith("baseline · m0")
        and labels[1].startswith("baseline · m1")
    )
