"""Looking at a model before quantizing it: is it already on a low-bit grid, and which layers are sensitive.

**Grid detection.** A model dequantized from a low-bit format keeps its grid: every group of weights holds at
most 2^b distinct values, evenly spaced. The demo model was dequantized from llama.cpp's Q4_1 (groups of 32, a
float scale and minimum each), so 4-bit group-32 RTN with a float minimum reproduces it exactly and its KL is
~0 — which says nothing about the method. :func:`detect_grid` finds such grids so the panel and reports warn.

**Sensitivity.** :func:`layer_sensitivity` quantizes one decoder block (or one linear type across all blocks)
at a time and measures the KL divergence it alone causes; the most sensitive parts are the ones to keep at
higher precision (:class:`~workbench.techniques.mixed.MixedPrecisionConfig`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pandas as pd
import torch
from torch import nn

from workbench.progress import Progress
from workbench.techniques._quant import decoder_linears, fake_quantize


@dataclass(frozen=True)
class GridReport:
    """A low-bit grid the weights already sit on."""

    bits: int
    group_size: int
    form: str  # "asymmetric" (a minimum per group, Q4_1-style) or "symmetric" (Q4_0-style)
    fraction_of_layers: float

    @property
    def message(self) -> str:
        return (
            f"This model's weights already sit on a {self.bits}-bit grid (groups of {self.group_size}, "
            f"{'a float scale and minimum each: Q4_1-style' if self.form == 'asymmetric' else 'one scale each: Q4_0-style'}"
            f"). {self.bits}-bit group-{self.group_size} RTN of that form reproduces it exactly, which says nothing "
            f"about the method. Compare methods at {self.bits - 1} or {self.bits - 2} bits, {self.bits}-bit "
            f"{'symmetric' if self.form == 'asymmetric' else 'asymmetric'}, or group {2 * self.group_size} / "
            f"per-channel."
        )


def _on_grid(w: torch.Tensor, bits: int, group: int, symmetric: bool) -> bool:
    """True when every group of ``w`` is reproduced by ``bits``-bit RTN of that form (to float precision)."""
    if w.shape[1] % group:
        return False
    q = fake_quantize(w.float(), bits, group, symmetric, "float")
    tol = 1e-5 * w.abs().amax().clamp_min(1e-12)
    return bool(((q - w.float()).abs() <= tol).all())


def detect_grid(model: nn.Module, *, max_layers: int = 6, rows: int = 64) -> GridReport | None:
    """The coarsest grid (fewest bits, largest group) that sampled decoder linears sit on, or None."""
    linears = list(decoder_linears(model))
    if not linears:
        return None
    step = max(1, len(linears) // max_layers)
    sample = [m.weight.detach()[:rows] for _, m in linears[::step][:max_layers]]
    for bits in (2, 3, 4, 5, 6, 8):
        for group in (128, 64, 32, 16):
            for symmetric in (False, True):
                hits = sum(_on_grid(w, bits, group, symmetric) for w in sample)
                if hits == len(sample):
                    return GridReport(bits, group, "symmetric" if symmetric else "asymmetric", 1.0)
    return None


def _kl(base_logp: torch.Tensor, logits: torch.Tensor) -> float:
    q = torch.log_softmax(logits.float(), -1)
    return float((base_logp.exp() * (base_logp - q)).sum(-1).mean())


_TYPES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def layer_sensitivity(
    model: nn.Module,
    input_ids: torch.Tensor,
    *,
    config: Any = None,
    by: str = "layer",
    progress: Progress | None = None,
) -> pd.DataFrame:
    """KL divergence caused by quantizing one part at a time (``by="layer"`` blocks or ``by="type"`` linears).

    ``config`` is an RTN-style config (bits, group_size, symmetric, zero_point); default 3-bit group 32 RTN,
    where differences between parts are clear. ``input_ids``: (batch, seq) token ids (calibration text).
    Returns columns ``name, kl_mean, n_params`` sorted by the part's position.
    """
    from workbench.techniques.rtn import RTNConfig

    config = config or RTNConfig(bits=3, group_size=32)
    progress = progress or Progress.null()
    linears = list(decoder_linears(model))
    if by == "layer":
        keys = sorted({int(n.split(".layers.")[1].split(".")[0]) for n, _ in linears})
        parts = {f"layer {k}": [(n, m) for n, m in linears if f".layers.{k}." in f".{n}"] for k in keys}
    elif by == "type":
        parts = {t: [(n, m) for n, m in linears if n.endswith(t)] for t in _TYPES}
        parts = {k: v for k, v in parts.items() if v}
    else:
        raise ValueError(f"by={by!r} must be 'layer' or 'type'")
    with torch.inference_mode():
        base_logp = torch.log_softmax(model(input_ids).logits.float(), -1)
    rows = []
    for name, members in progress.iter(list(parts.items()), desc="sensitivity"):
        saved = [m.weight.data.clone() for _, m in members]
        try:
            with torch.no_grad():
                for _, m in members:
                    m.weight.data = fake_quantize(m.weight.data, config.bits, config.group_size, config.symmetric,
                                                  getattr(config, "zero_point", "float"))
                kl = _kl(base_logp, model(input_ids).logits)
        finally:
            for (_, m), w in zip(members, saved, strict=True):
                m.weight.data = w
        rows.append({"name": name, "kl_mean": kl, "n_params": sum(m.weight.numel() for _, m in members),
                     "modules": [n for n, _ in members]})
    return pd.DataFrame(rows)


def sensitivity_patterns(frame: pd.DataFrame, top_n: int) -> tuple[str, ...]:
    """Module-name glob patterns for the ``top_n`` most sensitive parts of a :func:`layer_sensitivity` frame."""
    top = frame.sort_values("kl_mean", ascending=False).head(top_n)
    patterns: list[str] = []
    for modules in top["modules"]:
        patterns.extend(modules)
    return tuple(patterns)


__all__ = ["GridReport", "detect_grid", "layer_sensitivity", "sensitivity_patterns"]
