"""Views: the data behind the plots (Pareto flags, directions, hover), not pixels."""

from __future__ import annotations

import pandas as pd
import plotly.graph_objects as go
import pytest

from workbench.errors import ConfigError
from workbench.views import bits_figure, pareto_mask, tradeoff_figure, tradeoff_info


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
