"""Views: plain functions from a runs DataFrame (``Registry.runs_frame``) to a plotly figure.

Pattern from Optuna's Pareto-front plot: ``tradeoff_info`` does the data work (validation, Pareto flags, hover
text) and is what tests check; ``tradeoff_figure`` only draws it. Panels wrap these figures in a FigureWidget.
"""

from __future__ import annotations

import html
import json
import math
import zlib
from collections.abc import Mapping, Sequence
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
    # The process peak includes the base model kept beside the variant for KL; the variant's own memory is its
    # stored size (``metric_size_mb``).
    "metric_peak_mem_mb": ("Peak memory of the process, base kept for KL included (MB)", "min"),
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
_HOVER_METRICS = (
    "metric_ppl",
    "metric_kl_mean",
    "metric_top1_agree",
    "metric_bits_per_weight",
    "metric_size_mb",
    "metric_decode_tok_s",
)


def title(column: str) -> str:
    return METRICS.get(column, (column.removeprefix("metric_").replace("_", " "), "min"))[0]


def direction(column: str) -> str:
    return METRICS.get(column, ("", "min"))[1]


# Techniques whose variants are only simulated: weights are rounded onto the low-bit grid and stored back as
# floats, so the variant runs at the float model's speed (often a little slower) and its latency says nothing
# about a deployed low-bit model. bnb and quanto run packed kernels for real, so theirs is measured. A pipeline
# is simulated when any of its steps is, unless it ends in a runtime step (workbench.runtimes), which measures
# the exported variant for real.
SIMULATED_LATENCY = frozenset({"rtn", "gptq", "awq", "mixed"})
LATENCY_METRICS = frozenset(
    {"metric_decode_tok_s", "metric_prefill_tok_s", "metric_decode_ms_per_tok", "metric_prefill_ms_per_tok"}
)


def _pipeline_simulated(pipeline_json: Any) -> bool:
    try:
        steps = json.loads(pipeline_json) if isinstance(pipeline_json, str) else []
    except ValueError:
        return False
    if not isinstance(steps, list) or not steps:
        return False
    from workbench.runtimes import SIMULATED, runtime_of_names

    if runtime_of_names([str(s.get("technique", "")) for s in steps if isinstance(s, dict)]) != SIMULATED:
        return False  # measured in a real runtime (llama.cpp, torch packed): its latency is real
    return any(isinstance(step, dict) and step.get("technique") in SIMULATED_LATENCY for step in steps)


def simulated_latency(runs: pd.DataFrame) -> pd.Series:
    """Per run, True when its latency was measured on a simulated variant (see ``SIMULATED_LATENCY``).

    Read from ``pipeline_json`` (every step) when the frame has it, else from ``technique`` (the first step);
    parsed once per distinct pipeline, since a sweep repeats a few pipelines many times.
    """
    if "pipeline_json" in runs.columns:
        cache: dict[Any, bool] = {}
        flags = [
            cache.setdefault(p, _pipeline_simulated(p)) if p not in cache else cache[p]
            for p in runs["pipeline_json"].tolist()
        ]
        return pd.Series(flags, index=runs.index, dtype=bool)
    if "technique" in runs.columns:
        return runs["technique"].isin(SIMULATED_LATENCY)
    return pd.Series(False, index=runs.index, dtype=bool)


def axis_title(column: str, runs: pd.DataFrame | None = None) -> str:
    """``title(column)``, marked "simulated" when it is a latency and some of ``runs`` only simulate theirs:
    "Decode latency (ms/token; simulated for gptq, rtn)"."""
    text = title(column)
    if runs is None or column not in LATENCY_METRICS or runs.empty:
        return text
    simulated = simulated_latency(runs)
    if not simulated.any():
        return text
    names = sorted(set(runs.loc[simulated, "technique"].astype(str))) if "technique" in runs.columns else []
    which = "simulated" if simulated.all() or not names else f"simulated for {', '.join(names)}"
    return f"{text[:-1]}; {which})" if text.endswith(")") else f"{text} ({which})"


# One colour and one marker per technique, fixed, so that a method keeps its colour whatever else is plotted
# (rtn stays orange when gptq appears). Names not listed get one from the spare palette by a stable hash.
TECHNIQUE_COLOURS = {
    "baseline": "#1f77b4",
    "rtn": "#ff7f0e",
    "gptq": "#2ca02c",
    "awq": "#9467bd",
    "mixed": "#8c564b",
    "bnb": "#e377c2",
    "quanto": "#17becf",
    "hqq": "#bcbd22",
}
_SPARE_COLOURS = ("#7f7f7f", "#393b79", "#637939", "#8c6d31", "#843c39", "#7b4173", "#3182bd", "#e6550d")
TECHNIQUE_SYMBOLS = {
    "baseline": "star",
    "rtn": "circle",
    "gptq": "square",
    "awq": "diamond",
    "mixed": "cross",
    "bnb": "triangle-up",
    "quanto": "triangle-down",
    "hqq": "pentagon",
}
_SPARE_SYMBOLS = ("hexagon", "x", "star-triangle-up", "hourglass", "bowtie", "circle-x")
_DASHES = ("solid", "dash", "dot", "dashdot", "longdash", "longdashdot")
_REFERENCE_LINE = {"color": "#555", "dash": "dash", "width": 1}
LABELS_UP_TO = 40  # points labelled with their setting; more labels than this only overlap


def technique_colour(technique: str) -> str:
    return (
        TECHNIQUE_COLOURS.get(technique)
        or _SPARE_COLOURS[zlib.crc32(technique.encode()) % len(_SPARE_COLOURS)]
    )


def technique_symbol(technique: str) -> str:
    return (
        TECHNIQUE_SYMBOLS.get(technique)
        or _SPARE_SYMBOLS[zlib.crc32(technique.encode()) % len(_SPARE_SYMBOLS)]
    )


def _setting(
    technique: str,
    bits: Any,
    group_size: Any,
    symmetric: Any,
    zero_point: Any,
    high_bits: Any,
    mode: Any,
    double_quant: Any,
    weights: Any,
) -> str:
    if technique == "baseline":
        return "float"
    parts: list[str] = []
    if _is_set(bits):
        high = f"/{int(high_bits)}" if technique == "mixed" and _is_set(high_bits) else ""
        parts.append(f"{int(bits)}{high}b")
    elif _is_set(mode):  # bnb: the format is the setting
        parts.append(str(mode) + (" dq" if _is_set(double_quant) and bool(double_quant) else ""))
    elif _is_set(weights):  # quanto
        parts.append(str(weights))
    if _is_set(group_size):
        parts.append("per-channel" if int(group_size) == -1 else f"g{int(group_size)}")
    if _is_set(symmetric) and bool(symmetric):
        parts.append("sym")
    elif _is_set(zero_point) and zero_point != "float":
        parts.append(f"{zero_point}-zero")
    return " ".join(parts)


def setting_labels(runs: pd.DataFrame) -> list[str]:
    """A short label per run from its first step's parameters: "4b g64 sym", "3/8b g32", "nf4 dq", "float"."""
    n = len(runs)

    def column(name: str) -> list[Any]:
        return runs[name].tolist() if name in runs.columns else [None] * n

    techniques = [str(t) for t in column("technique")]
    return [
        _setting(*row)
        for row in zip(
            techniques,
            column("param_bits"),
            column("param_group_size"),
            column("param_symmetric"),
            column("param_zero_point"),
            column("param_high_bits"),
            column("param_mode"),
            column("param_double_quant"),
            column("param_weights"),
        )
    ]


def short_model_name(description: Any, width: int = 32) -> str:
    """ "SmolLM2-135M-Instruct" from "SmolLM2-135M-Instruct (134.5M params, 538 MB f32)" or from a long path:
    the model's name without the size note, last path component only, cut to ``width`` characters."""
    if not isinstance(description, str) or not description:
        return ""
    name = description.split(" (", 1)[0].rstrip("/\\")
    name = name.replace("\\", "/").rsplit("/", 1)[-1] or name
    return name if len(name) <= width else name[: width - 1] + "…"


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
TEMPLATE = go.layout.Template(
    layout={
        "paper_bgcolor": "white",
        "plot_bgcolor": "white",
        "font": {"color": "#2a3f5f"},
        "xaxis": {
            "gridcolor": "#ebf0f8",
            "linecolor": "#ebf0f8",
            "zerolinecolor": "#ebf0f8",
            "automargin": True,
        },
        "yaxis": {
            "gridcolor": "#ebf0f8",
            "linecolor": "#ebf0f8",
            "zerolinecolor": "#ebf0f8",
            "automargin": True,
        },
        "hoverlabel": {"align": "left"},
    }
)


class TradeoffInfo(NamedTuple):
    points: pd.DataFrame  # the plotted runs, with a boolean "pareto" column, "hover" and "setting" text
    front: pd.DataFrame  # the Pareto-optimal runs sorted along x
    x: str
    y: str
    color: str | None  # a metric column, "technique", or None
    baseline: pd.DataFrame | None = None  # with reference_baseline: the baseline runs, drawn as lines


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


_NOTE_CHARS = 160  # notes longer than this are cut in the hover (the Compare panel shows them whole)


def hover_texts(points: pd.DataFrame) -> list[str]:
    """Hover text per run: run id, pipeline label, the headline metrics, tags and notes (user text escaped).

    Latency of a simulated variant says so. Built column by column with plain list comprehensions (about 5 µs
    a run): the trade-off plot is redrawn whenever the registry changes, and pandas' per-row machinery
    (``iterrows``, ``Series.where`` on strings) made hover text the slowest step of a redraw with a thousand runs.
    """
    if points.empty:
        return []
    n = len(points)
    pipeline = points["pipeline"].fillna("").astype(str) if "pipeline" in points.columns else [""] * n
    columns = [[f"<b>run {r}</b>: {html.escape(p)}" for r, p in zip(points["run_id"].tolist(), pipeline)]]
    simulated = None
    for col in _HOVER_METRICS:
        if col in points.columns:
            name = title(col)
            suffix = [""] * n
            if col in LATENCY_METRICS:
                simulated = simulated_latency(points).tolist() if simulated is None else simulated
                suffix = [" (simulated)" if s else "" for s in simulated]
            columns.append(
                [
                    f"{name}: {v:.4g}{s}" if not math.isnan(v) else ""
                    for v, s in zip(points[col].astype(float).tolist(), suffix)
                ]
            )
    if "tags" in points.columns:
        columns.append(
            [f"tags: {html.escape(t)}" if t else "" for t in points["tags"].fillna("").astype(str)]
        )
    if "notes" in points.columns:
        columns.append(
            [
                f"notes: {html.escape(_shorten(t))}" if t else ""
                for t in points["notes"].fillna("").astype(str)
            ]
        )
    return ["<br>".join(part for part in parts if part) for parts in zip(*columns)]


def _shorten(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= _NOTE_CHARS else text[: _NOTE_CHARS - 1] + "…"


def _is_baseline(runs: pd.DataFrame) -> pd.Series:
    if "technique" not in runs.columns:
        return pd.Series(False, index=runs.index, dtype=bool)
    return runs["technique"] == "baseline"


def tradeoff_info(
    runs: pd.DataFrame,
    x: str = "metric_bits_per_weight",
    y: str = "metric_kl_mean",
    color: str | None = "metric_decode_tok_s",
    *,
    reference_baseline: bool = False,
) -> TradeoffInfo:
    """Validate columns, drop runs lacking x or y, flag the Pareto front (direction per metric).

    With ``reference_baseline`` the baseline runs leave ``points`` (and the front) for ``baseline``: the figure
    draws them as reference lines, since a 32-bit baseline as a point would stretch the size axis.
    """
    for col in (x, y):
        if not runs.empty and col not in runs.columns:
            known = ", ".join(c for c in runs.columns if c.startswith("metric_"))
            raise ConfigError(f"No column {col!r} in the runs; metric columns are: {known}.")
    if runs.empty or x not in runs.columns or y not in runs.columns:
        empty = pd.DataFrame(columns=["run_id", x, y, "pareto", "hover", "setting"])
        return TradeoffInfo(empty, empty, x, y, color, empty.copy() if reference_baseline else None)
    points = runs[runs[x].notna() & runs[y].notna()].copy()
    baseline = None
    if reference_baseline:
        is_base = _is_baseline(points)
        baseline, points = points[is_base].copy(), points[~is_base].copy()
    points["pareto"] = pareto_mask(
        points[x].to_numpy(float), points[y].to_numpy(float), direction(x), direction(y)
    )
    points["hover"] = hover_texts(points)
    points["setting"] = setting_labels(points)
    front = points[points["pareto"]].sort_values(x)
    if color == "technique":
        use_color = color if "technique" in points.columns else None
    else:
        use_color = color if color and color in points.columns and points[color].notna().any() else None
    return TradeoffInfo(points, front, x, y, use_color, baseline)


def _empty_figure(message: str) -> go.Figure:
    fig = go.Figure()
    fig.add_annotation(
        text=message, showarrow=False, x=0.5, y=0.8, xref="paper", yref="paper", font={"size": 14}
    )
    fig.update_xaxes(visible=False)
    fig.update_yaxes(visible=False)
    return fig.update_layout(height=420, template=TEMPLATE, autosize=True)


BASELINES_DRAWN = 6  # reference lines at most: one per model and suite (the latest); more would be a thicket


def _draw_baseline(
    fig: go.Figure, baseline: pd.DataFrame | None, points: pd.DataFrame, x: str, y: str, log_y: bool
) -> None:
    """Each model's baseline as a dashed horizontal line at its quality, labelled "baseline"; and a vertical
    line at its size too when that lies near the other points (a 32-bit baseline beside 3-5 bit points is named
    in the label instead, so the axis keeps to the variants).

    Shapes and labels are built as plain dicts and set in one layout update: plotly's ``add_hline`` copies the
    layout on every call, which made a registry with many baseline runs take minutes to draw.
    """
    if baseline is None or baseline.empty:
        return
    # Baselines of one model and suite repeat the same numbers: keep the latest. Another suite (other text) has
    # another quality, so it keeps its own line.
    same = [c for c in ("model_fingerprint", "suite_key") if c in baseline.columns]
    if same:
        baseline = baseline.drop_duplicates(same, keep="last")
    baseline = baseline.tail(BASELINES_DRAWN)
    models = baseline["model"].nunique() if "model" in baseline.columns else 1
    suites = baseline["suite"].nunique() if "suite" in baseline.columns else 1
    xs = points[x].astype(float) if not points.empty else pd.Series(dtype=float)
    shapes: list[dict[str, Any]] = []
    notes: list[dict[str, Any]] = []
    font = {"size": 11, "color": "#555"}
    for row in baseline.to_dict("records"):
        label = (
            "baseline"
            + (f" · {short_model_name(row.get('model'))}" if models > 1 else "")
            + (f" · {row.get('suite')}" if suites > 1 else "")
        )
        bx, by = float(row[x]), float(row[y])
        vertical = xs.empty
        if not xs.empty:
            # Near: the line widens the axis by at most the variants' own span (or a quarter of their largest
            # value, for variants that sit close together); 32 bits beside 2.5-4.5 is far, 50 tok/s beside 60 near.
            lo, hi = float(xs.min()), float(xs.max())
            pad = max(hi - lo, 0.25 * max(abs(lo), abs(hi)))
            vertical = lo - pad <= bx <= hi + pad
        horizontal = not (log_y and by <= 0)  # KL 0 has no place on a log axis
        where = f"{title(x)} {bx:.4g}"
        if horizontal:
            shapes.append(
                {
                    "type": "line",
                    "xref": "x domain",
                    "x0": 0,
                    "x1": 1,
                    "yref": "y",
                    "y0": by,
                    "y1": by,
                    "line": _REFERENCE_LINE,
                }
            )
            notes.append(
                {
                    "text": html.escape(label if vertical else f"{label} ({where})"),
                    "showarrow": False,
                    "xref": "x domain",
                    "x": 0,
                    "yref": "y",
                    "y": by,
                    "xanchor": "left",
                    "yanchor": "bottom",
                    "font": font,
                }
            )
        if vertical:
            shapes.append(
                {
                    "type": "line",
                    "xref": "x",
                    "x0": bx,
                    "x1": bx,
                    "yref": "y domain",
                    "y0": 0,
                    "y1": 1,
                    "line": _REFERENCE_LINE,
                }
            )
            if not horizontal:
                notes.append(
                    {
                        "text": html.escape(label),
                        "showarrow": False,
                        "xref": "x",
                        "x": bx,
                        "yref": "y domain",
                        "y": 1,
                        "xanchor": "left",
                        "yanchor": "top",
                        "font": font,
                    }
                )
        if not horizontal and not vertical:
            notes.append(
                {
                    "text": html.escape(f"{label}: {title(y)} {by:.4g}, {where}"),
                    "showarrow": False,
                    "x": 0,
                    "y": 1.06,
                    "xref": "paper",
                    "yref": "paper",
                    "xanchor": "left",
                    "font": font,
                }
            )
    fig.update_layout(shapes=[*fig.layout.shapes, *shapes], annotations=[*fig.layout.annotations, *notes])


def _technique_order(techniques: Sequence[str]) -> list[str]:
    known = list(TECHNIQUE_COLOURS)
    return sorted(set(techniques), key=lambda t: (known.index(t) if t in known else len(known), t))


def tradeoff_figure(
    runs: pd.DataFrame,
    x: str = "metric_bits_per_weight",
    y: str = "metric_kl_mean",
    color: str | None = "technique",
    *,
    log_y: bool = False,
    labels: bool = True,
    empty_message: str | None = None,
) -> go.Figure:
    """Quality against size (or latency): one trace per technique (its fixed colour and marker), the Pareto front
    drawn, the baseline as reference lines.

    ``color`` is "technique" (the default: simulated latency would mislead as a colour), a metric column (a
    shared colour scale; the marker still says the technique) or None (one colour). ``log_y`` puts quality on a
    log axis, so one 2-bit point with KL 10 does not flatten the rest. ``labels`` writes each point's setting
    ("4b g64 sym") beside it, up to ``LABELS_UP_TO`` points. ``empty_message`` replaces the note shown when
    there is nothing to plot (a front end knows whether that is an empty registry or a filter).
    """
    info = tradeoff_info(runs, x=x, y=y, color=color, reference_baseline=True)
    pts = info.points
    if pts.empty and (info.baseline is None or info.baseline.empty):
        return _empty_figure(empty_message or "No runs yet: record a baseline, then quantize.")
    fig = go.Figure()
    if pts.empty:
        groups: list[tuple[str, pd.DataFrame]] = []
    elif "technique" in pts.columns:
        groups = [
            (t, pts[pts["technique"] == t]) for t in _technique_order(pts["technique"].astype(str).tolist())
        ]
    else:
        groups = [("runs", pts)]
    show_text = labels and len(pts) <= LABELS_UP_TO
    scale = None
    if info.color and info.color != "technique":
        values = pts[info.color].astype(float)
        scale = {
            "colorscale": "Viridis",
            "cmin": float(values.min()),
            "cmax": float(values.max()),
            "colorbar": {"title": {"text": axis_title(info.color, pts)}},
        }
    for i, (name, group) in enumerate(groups):
        marker: dict[str, Any] = {
            "size": 11,
            "symbol": technique_symbol(name),
            "line": {"width": 1, "color": "#333"},
        }
        if scale is not None:
            marker.update(scale, color=group[info.color], showscale=i == 0)
        elif info.color == "technique":
            marker["color"] = technique_colour(name)
        else:
            marker["color"] = "#4c78a8"
        fig.add_trace(
            go.Scatter(
                x=group[x],
                y=group[y],
                mode="markers+text" if show_text else "markers",
                name=name,
                text=group["setting"] if show_text else None,
                textposition="top center",
                textfont={"size": 10, "color": "#555"},
                marker=marker,
                legendgroup=name,
                hovertext=group["hover"],
                hoverinfo="text",
                customdata=group["run_id"],
            )
        )
    if not pts.empty:
        fig.add_trace(
            go.Scatter(
                x=info.front[x],
                y=info.front[y],
                mode="lines",
                name="Pareto front",
                line={"color": "#333", "width": 2, "shape": "hv"},
                opacity=0.6,
                hoverinfo="skip",
            )
        )
    _draw_baseline(fig, info.baseline, pts, x, y, log_y)
    fig.update_yaxes(type="log" if log_y else "linear")
    return fig.update_layout(
        xaxis_title=axis_title(x, pts),
        yaxis_title=title(y),
        template=TEMPLATE,
        height=460,
        autosize=True,
        legend={"orientation": "h", "y": -0.2, "title": {"text": "method"}},
        margin={"l": 60, "r": 20, "t": 30, "b": 60},
    )


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
    for t, b, g, s, z in zip(
        data["technique"].tolist(),
        column("param_bits"),
        column("param_group_size"),
        column("param_symmetric"),
        column("param_zero_point"),
    ):
        name = _bits_line_name(str(t), g, s, z) if _is_set(b) else str(t)
        names.append(name)
        # Legend order: by technique, then group size as a number (g32 before g128, per-channel last).
        order[name] = (str(t), int(g) if _is_set(b) and _is_set(g) and int(g) > 0 else math.inf, name)
    keyed = data.assign(_line=names)
    groups = {
        name: group.drop(columns="_line").sort_values(x, kind="stable")
        for name, group in keyed.groupby("_line", sort=False)
    }
    return [(name, groups[name]) for name in sorted(groups, key=order.__getitem__)]


def bits_figure(
    runs: pd.DataFrame,
    y: str = "metric_kl_mean",
    x: str = "metric_bits_per_weight",
    *,
    log_y: bool = False,
    labels: bool = True,
    provisional: Mapping[str, Any] | None = None,
) -> go.Figure:
    """Quality against bits per weight, one line per technique and grid (group size, symmetry); latency and the
    plotted size in the hover.

    A technique keeps its fixed colour (``TECHNIQUE_COLOURS``) on every line; its grids differ by dash. The
    baseline is a reference line (its 32 bits would stretch the axis away from the 2-8 bit points). ``log_y``
    and ``labels`` as in :func:`tradeoff_figure`.

    ``provisional``: a run still evaluating, drawn as a hollow point: metric columns (``x``, ``y``) plus
    ``technique``, ``label`` and ``provisional`` (the share of the text scored so far).
    """
    if runs.empty or y not in runs.columns or x not in runs.columns:
        return _empty_figure("No quantized runs yet: move the bit-width slider.")
    data = runs[runs[x].notna() & runs[y].notna()]
    is_base = _is_baseline(data)
    baseline, data = data[is_base], data[~is_base]
    fig = go.Figure()
    show_text = labels and len(data) <= LABELS_UP_TO
    lines_of: dict[str, int] = {}  # technique -> lines drawn so far, which picks the next line's dash
    for name, group in _bits_lines(data, x):
        technique = str(group["technique"].iloc[0])
        k = lines_of.get(technique, 0)
        lines_of[technique] = k + 1
        hover = hover_texts(group)
        if x not in _HOVER_METRICS:  # e.g. bits per weight of the decoder linears: show the plotted value too
            hover = [f"{h}<br>{title(x)}: {v:.4g}" for h, v in zip(hover, group[x].astype(float).tolist())]
        fig.add_trace(
            go.Scatter(
                x=group[x],
                y=group[y],
                mode="lines+markers+text" if show_text else "lines+markers",
                name=name,
                hovertext=hover,
                hoverinfo="text",
                customdata=group["run_id"],
                text=setting_labels(group) if show_text else None,
                textposition="top center",
                textfont={"size": 10, "color": "#555"},
                line={"color": technique_colour(technique), "dash": _DASHES[k % len(_DASHES)]},
                marker={
                    "size": 9,
                    "symbol": technique_symbol(technique),
                    "color": technique_colour(technique),
                },
            )
        )
    near = data
    if provisional is not None and provisional.get(x) is not None and provisional.get(y) is not None:
        px, py = float(provisional[x]), float(provisional[y])
        colour = technique_colour(str(provisional.get("technique", "")))
        share = 100.0 * float(provisional.get("provisional", 0.0))
        text = f"{provisional.get('label', 'running')} (provisional, {share:.0f}% of the text)"
        fig.add_trace(
            go.Scatter(
                x=[px],
                y=[py],
                mode="markers",
                name="provisional",
                hoverinfo="text",
                hovertext=[f"{html.escape(text)}<br>{title(y)}: {py:.4g}"],
                marker={"size": 14, "symbol": "circle-open", "color": colour, "line": {"width": 2}},
            )
        )
        near = pd.concat([data[[x, y]], pd.DataFrame({x: [px], y: [py]})], ignore_index=True)
    _draw_baseline(fig, baseline, near, x, y, log_y)
    if near.empty:
        fig.add_annotation(
            text="Only the baseline so far: move the bit-width slider to add quantized points.",
            showarrow=False,
            x=0.5,
            y=0.9,
            xref="paper",
            yref="paper",
            font={"size": 13},
        )
    fig.update_yaxes(type="log" if log_y else "linear")
    return fig.update_layout(
        xaxis_title=title(x),
        yaxis_title=title(y),
        template=TEMPLATE,
        height=420,
        autosize=True,
        margin={"l": 60, "r": 20, "t": 30, "b": 50},
        showlegend=True,
    )


def sensitivity_figure(frame: pd.DataFrame, *, name: str = "name", value: str = "kl_mean") -> go.Figure:
    """Per-layer (or per-type) KL contribution as bars: the tall ones deserve more bits."""
    if frame.empty:
        return _empty_figure("No sensitivity scan yet.")
    fig = go.Figure(
        go.Bar(x=frame[name], y=frame[value], marker={"color": frame[value], "colorscale": "Reds"})
    )
    return fig.update_layout(
        xaxis_title="Quantized alone", yaxis_title="Mean KL divergence vs base", template=TEMPLATE, height=380
    )


def expert_load_figure(
    matrix: Sequence[Sequence[float]] | np.ndarray,
    *,
    title_text: str = "Expert load",
    layers: Sequence[int] | None = None,
) -> go.Figure:
    """Layers × experts heatmap of routed-token fractions: hot and cold experts at a glance.

    ``layers``: the decoder layer of each row (a model whose first layers are dense starts at layer 1, not 0);
    rows of a pruned model may have fewer experts than ``matrix``'s widest row and are padded with gaps."""
    rows = (
        [list(map(float, row)) for row in matrix] if not isinstance(matrix, np.ndarray) else matrix.tolist()
    )
    if not rows or not any(len(r) for r in rows):
        return _empty_figure("No expert loads recorded.")
    width = max(len(r) for r in rows)
    arr = np.array([r + [np.nan] * (width - len(r)) for r in rows], dtype=float)
    names = list(layers) if layers is not None and len(layers) == len(rows) else list(range(len(rows)))
    fig = go.Figure(
        go.Heatmap(
            z=arr,
            colorscale="Viridis",
            colorbar={"title": {"text": "share of tokens"}},
            x=[f"e{i}" for i in range(width)],
            y=[f"layer {i}" for i in names],
        )
    )
    return fig.update_layout(title=title_text, xaxis_title="Expert", yaxis_title="Layer", template=TEMPLATE)


def loss_curve_figure(
    steps: Sequence[int], losses: Sequence[float], *, name: str = "train loss"
) -> go.Figure:
    if not len(steps):
        return _empty_figure("No training steps recorded.")
    fig = go.Figure(go.Scatter(x=list(steps), y=list(losses), mode="lines", name=name))
    return fig.update_layout(xaxis_title="Step", yaxis_title="Loss", template=TEMPLATE, height=360)


__all__ = [
    "DERIVED_METRICS",
    "LATENCY_METRICS",
    "METRICS",
    "SIMULATED_LATENCY",
    "TECHNIQUE_COLOURS",
    "TECHNIQUE_SYMBOLS",
    "TradeoffInfo",
    "axis_title",
    "bits_figure",
    "expert_load_figure",
    "hover_texts",
    "loss_curve_figure",
    "pareto_mask",
    "sensitivity_figure",
    "setting_labels",
    "short_model_name",
    "simulated_latency",
    "technique_colour",
    "technique_symbol",
    "title",
    "tradeoff_figure",
    "tradeoff_info",
    "with_display_metrics",
]
