"""Views: the data behind the plots (Pareto flags, directions, hover), not pixels."""

from __future__ import annotations

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
    tradeoff_figure,
    tradeoff_info,
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
    assert sorted(info.front["run_id"]) == [1, 2, 4, 5]  # run 3 (rtn 3-bit) is beaten by gptq at the same size
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


def test_figures_draw_points_front_and_baseline():
    fig = tradeoff_figure(_runs())
    names = [t.name for t in fig.data]
    assert names == ["runs", "Pareto front", "baseline"]
    assert len(fig.data[0].x) == 5 and fig.layout.xaxis.title.text == "Bits per weight (all weights)"
    lines = bits_figure(_runs())
    assert {t.name for t in lines.data} == {"baseline", "rtn", "gptq"}


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
    info = tradeoff_info(_runs().assign(metric_decode_tok_s=[50.0, 60.0, 61.0, 59.0, 62.0]),
                         x="metric_decode_tok_s", y="metric_kl_mean")
    assert sorted(info.front["run_id"]) == [1, 2, 3, 5]  # 4 is now slower than 2 and has more KL


def test_runs_missing_a_plotted_metric_are_left_out_not_plotted_at_zero():
    runs = _runs()
    runs.loc[2, "metric_kl_mean"] = float("nan")
    info = tradeoff_info(runs)
    assert 3 not in set(info.points["run_id"]) and len(info.points) == 4


def test_colour_scale_is_titled_and_optional():
    fig = tradeoff_figure(_runs())
    assert fig.data[0].marker.colorbar.title.text == "Decode tokens/s"
    fig = tradeoff_figure(_runs().drop(columns="metric_decode_tok_s"))
    assert fig.data[0].marker.showscale is None and len(fig.data[0].x) == 5


def test_bits_figure_draws_one_line_per_method_sorted_by_bits_with_latency_in_hover():
    fig = bits_figure(_runs())
    rtn = next(t for t in fig.data if t.name == "rtn")
    assert list(rtn.x) == [2.5, 3.5, 4.5] and rtn.mode == "lines+markers"
    assert all("Decode tokens/s" in h for h in rtn.hovertext)
    assert fig.layout.yaxis.title.text == "Mean KL divergence vs base"
    assert "No quantized runs" in bits_figure(pd.DataFrame()).layout.annotations[0].text


def test_bits_figure_draws_one_line_per_grid_and_one_per_format_method():
    # The frame's param_* columns (first step's parameters): rtn at two group sizes, symmetric and not, an
    # integer zero point, per-channel; gptq; quanto and bnb, whose widths are formats (one line each).
    runs = pd.DataFrame({
        "run_id": list(range(1, 13)),
        "technique": ["baseline", "rtn", "rtn", "rtn", "rtn", "rtn", "rtn", "rtn", "gptq", "quanto", "quanto",
                      "bnb"],
        "param_bits": [None, 4, 3, 4, 3, 4, 4, 4, 4, None, None, None],
        "param_group_size": [None, 32, 32, 64, 64, 32, 32, -1, 32, 64, None, None],
        "param_symmetric": [None, False, False, False, False, True, False, False, False, None, None, None],
        "param_zero_point": [None, "float", "float", "float", "float", "float", "int", "float", "float", None,
                             None, None],
        "metric_bits_per_weight_linear": [32.0, 5.0, 4.0, 4.5, 3.5, 4.5, 4.75, 4.01, 5.0, 4.5, 8.0, 4.1],
        "metric_kl_mean": [0.0, 0.05, 0.2, 0.07, 0.3, 0.06, 0.05, 0.2, 0.03, 0.1, 0.01, 0.08],
        "metric_decode_tok_s": [50.0] * 12,
    })
    fig = bits_figure(runs, x="metric_bits_per_weight_linear")
    names = [t.name for t in fig.data]
    assert names == ["baseline", "bnb", "gptq g32", "quanto", "rtn g32", "rtn g32 int-zero", "rtn g32 sym",
                     "rtn g64", "rtn per-channel"]
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
    runs = pd.DataFrame({"run_id": np.arange(n), "pipeline": ["rtn(bits=3)"] * n, "technique": ["rtn"] * n,
                         "metric_bits_per_weight": rng.uniform(2, 8, n), "metric_kl_mean": rng.uniform(0, 1, n),
                         "tags": [""] * n})
    info = tradeoff_info(runs)
    assert len(info.points) == n and info.points["hover"].str.startswith("<b>run ").all()
    # The front of random points is a staircase: sorted by x, KL strictly falls.
    front = info.front
    assert (np.diff(front["metric_bits_per_weight"]) >= 0).all() and (np.diff(front["metric_kl_mean"]) < 0).all()
