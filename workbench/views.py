"""Views: plain functions from a runs DataFrame (``Registry.runs_frame``) to a plotly figure.

Pattern from Optuna's Pareto-front plot: ``tradeoff_info`` does the data work (validation, Pareto flags, hover
text) and is what tests check; ``tradeoff_figure`` only draws it. Panels wrap these figures in a FigureWidget.
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from workbench.errors import ConfigError

# Human titles and which direction is better, for every metric a plot can use.
METRICS: dict[str, tuple[str, str]] = {
    "metric_ppl": ("Perplexity", "min"),
    "metric_kl_mean": ("Mean KL divergence vs base", "min"),
    "metric_kl_median": ("Median KL divergence vs base", "min"),
    "metric_kl_p99": ("99th-percentile KL divergence vs base", "min"),
    "metric_top1_agree": ("Same top token as base (fraction)", "max"),
    "metric_size_mb": ("Size (MB)", "min"),
    "metric_bits_per_weight": ("Bits per weight (all weights)", "min"),
    "metric_bits_per_weight_linear": ("Bits per weight (decoder linears)", "min"),
    "metric_prefill_tok_s": ("Prefill tokens/s", "max"),
    "metric_decode_tok_s": ("Decode tokens/s", "max"),
    "metric_peak_mem_mb": ("Peak memory of the process (MB)", "min"),
    "metric_work_mem_mb": ("Evaluation working memory (MB)", "min"),
    "metric_eval_tok_s": ("Evaluation tokens/s", "max"),
    # Derived for display by ``with_display_metrics`` (the registry stores only the measured ones above).
    "metric_decode_ms_per_tok": ("Decode latency (ms/token)", "min"),
    "metric_prefill_ms_per_tok": ("Prefill latency (ms/token)", "min"),
    "metric_top1_agree_pct": ("Same top token as base (%)", "max"),
}
# Display metric -> (stored metric, function of its values). Latency is the inverse of throughput: the speed
# suite times one prompt of ``speed_prompt`` tokens and ``speed_tokens`` greedy steps, and the frame keeps only the
# rates, so latency is per token (the prompt length differs between suites and is not in the frame).
DERIVED_METRICS: dict[str, tuple[str, Any]] = {
    "metric_decode_ms_per_tok": ("metric_decode_tok_s", lambda v: 1000.0 / v),
    "metric_prefill_ms_per_tok": ("metric_prefill_tok_s", lambda v: 1000.0 / v),
    "metric_top1_agree_pct": ("metric_top1_agree", lambda v: 100.0 * v),
}
_HOVER_METRICS = ("metric_ppl", "metric_kl_mean", "metric_top1_agree", "metric_bits_per_weight", "metric_size_mb",
                  "metric_decode_tok_s")


def title(column: str) -> str:
    return METRICS.get(column, (column.removeprefix("metric_").replace("_", " "), "min"))[0]


def direction(column: str) -> str:
    return METRICS.get(column, ("", "min"))[1]


def with_display_metrics(runs: pd.DataFrame) -> pd.DataFrame:
    """``runs`` plus the derived display columns of ``DERIVED_METRICS`` whose source column it has.

    A new frame (the input is not changed). A rate of zero or less gives NaN latency, not infinity, so such a
    run drops out of a latency plot instead of pinning its axis.
    """
    added = {}
    for column, (source, fn) in DERIVED_METRICS.items():
        if source in runs.columns:
            values = pd.to_numeric(runs[source], errors="coerce").astype(float)
            if source.endswith("_tok_s"):
                values = values.where(values > 0)
            added[column] = fn(values)
    return runs.assign(**added) if added else runs.copy()


# A small white template, built once. plotly's "plotly_white" is a large object that every figure deep-copies
# (~25 ms each); the plots only need a white background and light grid lines.
TEMPLATE = go.layout.Template(layout={
    "paper_bgcolor": "white",
    "plot_bgcolor": "white",
    "font": {"color": "#2a3f5f"},
    "xaxis": {"gridcolor": "#ebf0f8", "linecolor": "#ebf0f8", "zerolinecolor": "#ebf0f8", "automargin": True},
    "yaxis": {"gridcolor": "#ebf0f8", "linecolor": "#ebf0f8", "zerolinecolor": "#ebf0f8", "automargin": True},
    "hoverlabel": {"align": "left"},
})


class TradeoffInfo(NamedTuple):
    points: pd.DataFrame  # the plotted runs, with a boolean "pareto" column and "hover" text
    front: pd.DataFrame  # the Pareto-optimal runs sorted along x
    x: str
    y: str
    color: str | None


def pareto_mask(xs: np.ndarray, ys: np.ndarray, x_dir: str = "min", y_dir: str = "min") -> np.ndarray:
    """True for points no other point beats on both axes (ties kept). O(n log n): sort by x, sweep y."""
    x = xs if x_dir == "min" else -xs
    y = ys if y_dir == "min" else -ys
    order = np.lexsort((y, x))  # by x, then y
    mask = np.zeros(len(x), dtype=bool)
    best_y, best_x = np.inf, np.nan
    for i in order:
        if y[i] < best_y:
            best_y, best_x = y[i], x[i]
            mask[i] = True
        elif y[i] == best_y and x[i] == best_x:
            mask[i] = True  # an exact duplicate of an optimal point is optimal too
    return mask


def hover_texts(points: pd.DataFrame) -> list[str]:
    """Hover text per run: run id, pipeline label, the headline metrics, tags (user text escaped).

    Built column by column with plain list comprehensions (about 5 µs a run): the trade-off plot is redrawn
    whenever the registry changes, and pandas' per-row machinery (``iterrows``, ``Series.where`` on strings)
    made hover text the slowest step of a redraw with a thousand runs.
    """
    if points.empty:
        return []
    n = len(points)
    pipeline = points["pipeline"].fillna("").astype(str) if "pipeline" in points.columns else [""] * n
    columns = [[f"<b>run {r}</b>: {html.escape(p)}" for r, p in zip(points["run_id"].tolist(), pipeline)]]
    for col in _HOVER_METRICS:
        if col in points.columns:
            name = title(col)
            columns.append([f"{name}: {v:.4g}" if not math.isnan(v) else ""
                            for v in points[col].astype(float).tolist()])
    if "tags" in points.columns:
        columns.append([f"tags: {html.escape(t)}" if t else "" for t in points["tags"].fillna("").astype(str)])
    return ["<br>".join(part for part in parts if part) for parts in zip(*columns)]


def tradeoff_info(runs: pd.DataFrame, x: str = "metric_bits_per_weight", y: str = "metric_kl_mean",
                  color: str | None = "metric_decode_tok_s") -> TradeoffInfo:
    """Validate columns, drop runs lacking x or y, flag the Pareto front (direction per metric)."""
    for col in (x, y):
        if not runs.empty and col not in runs.columns:
            known = ", ".join(c for c in runs.columns if c.startswith("metric_"))
            raise ConfigError(f"No column {col!r} in the runs; metric columns are: {known}.")
    if runs.empty or x not in runs.columns or y not in runs.columns:
        empty = pd.DataFrame(columns=["run_id", x, y, "pareto", "hover"])
        return TradeoffInfo(empty, empty, x, y, color)
    points = runs[runs[x].notna() & runs[y].notna()].copy()
    points["pareto"] = pareto_mask(points[x].to_numpy(float), points[y].to_numpy(float), direction(x), direction(y))
    points["hover"] = hover_texts(points)
    front = points[points["pareto"]].sort_values(x)
    use_color = color if color and color in points.columns and points[color].notna().any() else None
    return TradeoffInfo(points, front, x, y, use_color)


def _empty_figure(message: str) -> go.Figure:
    fig = go.Figure()
    fig.add_annotation(text=message, showarrow=False, x=0.5, y=0.8, xref="paper", yref="paper", font={"size": 14})
    fig.update_xaxes(visible=False)
    fig.update_yaxes(visible=False)
    return fig.update_layout(height=420, template=TEMPLATE)


def tradeoff_figure(runs: pd.DataFrame, x: str = "metric_bits_per_weight", y: str = "metric_kl_mean",
                    color: str | None = "metric_decode_tok_s") -> go.Figure:
    """Quality against size (or latency), a third quantity as colour, the Pareto front drawn and marked."""
    info = tradeoff_info(runs, x=x, y=y, color=color)
    if info.points.empty:
        return _empty_figure("No runs yet: record a baseline, then quantize.")
    pts = info.points
    marker: dict[str, Any] = {"size": 10, "line": {"width": 1, "color": "#333"}}
    if info.color:
        marker.update(color=pts[info.color], colorscale="Viridis", showscale=True,
                      colorbar={"title": {"text": title(info.color)}})
    fig = go.Figure()
    fig.add_trace(go.Scatter(x=pts[x], y=pts[y], mode="markers", name="runs", marker=marker,
                             hovertext=pts["hover"], hoverinfo="text", customdata=pts["run_id"]))
    fig.add_trace(go.Scatter(x=info.front[x], y=info.front[y], mode="lines+markers", name="Pareto front",
                             line={"color": "#d62728", "width": 2, "shape": "hv"},
                             marker={"symbol": "diamond-open", "size": 16, "color": "#d62728"},
                             hoverinfo="skip"))
    base = pts[pts.get("technique", pd.Series(dtype=str)) == "baseline"] if "technique" in pts else pts.iloc[:0]
    if len(base):
        fig.add_trace(go.Scatter(x=base[x], y=base[y], mode="markers+text", name="baseline", text=["base"] * len(base),
                                 textposition="top center", marker={"symbol": "star", "size": 16, "color": "#1f77b4"},
                                 hoverinfo="skip"))
    return fig.update_layout(xaxis_title=title(x), yaxis_title=title(y), template=TEMPLATE, height=460,
                             legend={"orientation": "h", "y": -0.2}, margin={"l": 60, "r": 20, "t": 30, "b": 60})


def _is_set(value: Any) -> bool:
    """A parameter cell that holds a value (frames fill parameters a technique lacks with None or NaN)."""
    return value is not None and not (isinstance(value, float) and math.isnan(value))


def _bits_line_name(technique: str, group_size: Any, symmetric: Any, zero_point: Any) -> str:
    """``rtn g32``, ``rtn g64 sym``, ``gptq per-channel int-zero``: a technique and its grid's settings."""
    parts = [technique]
    if _is_set(group_size):
        parts.append("per-channel" if int(group_size) == -1 else f"g{int(group_size)}")
    if _is_set(symmetric) and bool(symmetric):
        parts.append("sym")
    elif _is_set(zero_point) and zero_point != "float":
        parts.append(f"{zero_point}-zero")  # the asymmetric form other than the default fp16 minimum
    return " ".join(parts)


def _bits_lines(data: pd.DataFrame, x: str) -> list[tuple[str, pd.DataFrame]]:
    """The runs split into lines, each sorted by ``x``: one per technique, and for methods with a ``bits``
    parameter one per (technique, group size, symmetric or zero-point form), so that settings on different
    grids do not join into one zig-zag line. Format-based methods (bnb, quanto: no ``bits``) keep one line."""
    n = len(data)

    def column(name: str) -> list[Any]:
        return data[name].tolist() if name in data.columns else [None] * n

    names, order = [], {}
    for t, b, g, s, z in zip(data["technique"].tolist(), column("param_bits"), column("param_group_size"),
                             column("param_symmetric"), column("param_zero_point")):
        name = _bits_line_name(str(t), g, s, z) if _is_set(b) else str(t)
        names.append(name)
        # Legend order: by technique, then group size as a number (g32 before g128, per-channel last).
        order[name] = (str(t), int(g) if _is_set(b) and _is_set(g) and int(g) > 0 else math.inf, name)
    keyed = data.assign(_line=names)
    groups = {name: group.drop(columns="_line").sort_values(x, kind="stable")
              for name, group in keyed.groupby("_line", sort=False)}
    return [(name, groups[name]) for name in sorted(groups, key=order.__getitem__)]


def bits_figure(runs: pd.DataFrame, y: str = "metric_kl_mean", x: str = "metric_bits_per_weight") -> go.Figure:
    """Quality against bits per weight, one line per technique and grid (group size, symmetry); latency and the
    plotted size in the hover."""
    if runs.empty or y not in runs.columns or x not in runs.columns:
        return _empty_figure("No quantized runs yet: move the bit-width slider.")
    data = runs[runs[x].notna() & runs[y].notna()]
    fig = go.Figure()
    for name, group in _bits_lines(data, x):
        hover = hover_texts(group)
        if x not in _HOVER_METRICS:  # e.g. bits per weight of the decoder linears: show the plotted value too
            hover = [f"{h}<br>{title(x)}: {v:.4g}" for h, v in zip(hover, group[x].astype(float).tolist())]
        baseline = name == "baseline"
        fig.add_trace(go.Scatter(x=group[x], y=group[y], mode="markers" if baseline else "lines+markers",
                                 name=name, hovertext=hover, hoverinfo="text", customdata=group["run_id"],
                                 marker={"size": 9, "symbol": "star" if baseline else "circle"}))
    return fig.update_layout(xaxis_title=title(x), yaxis_title=title(y), template=TEMPLATE, height=420,
                             margin={"l": 60, "r": 20, "t": 30, "b": 50})


def sensitivity_figure(frame: pd.DataFrame, *, name: str = "name", value: str = "kl_mean") -> go.Figure:
    """Per-layer (or per-type) KL contribution as bars: the tall ones deserve more bits."""
    if frame.empty:
        return _empty_figure("No sensitivity scan yet.")
    fig = go.Figure(go.Bar(x=frame[name], y=frame[value], marker={"color": frame[value], "colorscale": "Reds"}))
    return fig.update_layout(xaxis_title="Quantized alone", yaxis_title="Mean KL divergence vs base",
                             template=TEMPLATE, height=380)


def expert_load_figure(matrix: Sequence[Sequence[float]] | np.ndarray, *, title_text: str = "Expert load") -> go.Figure:
    """Layers × experts heatmap of routed-token fractions: hot and cold experts at a glance."""
    arr = np.asarray(matrix, dtype=float)
    if arr.size == 0:
        return _empty_figure("No expert loads recorded.")
    fig = go.Figure(go.Heatmap(z=arr, colorscale="Viridis", colorbar={"title": {"text": "share of tokens"}},
                               x=[f"e{i}" for i in range(arr.shape[1])], y=[f"layer {i}" for i in range(arr.shape[0])]))
    return fig.update_layout(title=title_text, xaxis_title="Expert", yaxis_title="Layer", template=TEMPLATE)


def loss_curve_figure(steps: Sequence[int], losses: Sequence[float], *, name: str = "train loss") -> go.Figure:
    if not len(steps):
        return _empty_figure("No training steps recorded.")
    fig = go.Figure(go.Scatter(x=list(steps), y=list(losses), mode="lines", name=name))
    return fig.update_layout(xaxis_title="Step", yaxis_title="Loss", template=TEMPLATE, height=360)


__all__ = [
    "DERIVED_METRICS",
    "METRICS",
    "TradeoffInfo",
    "bits_figure",
    "expert_load_figure",
    "hover_texts",
    "loss_curve_figure",
    "pareto_mask",
    "sensitivity_figure",
    "title",
    "tradeoff_figure",
    "tradeoff_info",
    "with_display_metrics",
]
