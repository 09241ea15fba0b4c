"""Looking at a model before quantizing it: is it already on a low-bit grid, and which layers are sensitive.

**Grid detection.** A model dequantized from a low-bit format keeps its grid: every group of weights holds at
most 2^b distinct values, each equal to min + k·step. The demo model was dequantized from llama.cpp's Q4_1
(groups of 32, an fp16 scale and minimum each), so 4-bit group-32 asymmetric RTN with a float minimum reproduces
it exactly and its KL is ~0, which says nothing about the method. :func:`detect_grid` finds such grids (on a
sample of layers, in well under a second) so panels and reports can warn.

**Sensitivity.** :func:`layer_sensitivity` quantizes one decoder block (or one linear type across all blocks)
at a time, measures the KL divergence that part alone causes on a few calibration chunks, restores it, and moves
on. The most sensitive parts are the ones to keep at higher precision: :func:`mixed_from_sensitivity` in
:mod:`workbench.techniques.mixed` turns the frame into a :class:`~workbench.techniques.mixed.MixedPrecisionConfig`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pandas as pd
import torch
from torch import nn

from workbench.errors import ConfigError
from workbench.progress import Progress, ProgressCallback, as_progress
from workbench.techniques._quant import decoder_linears, fake_quantize_

# Searched coarsest first: the fewest bits, then the largest group that fits.
_GRID_BITS = (2, 3, 4, 5, 6, 8)
_GRID_GROUPS = (128, 64, 32)


@dataclass(frozen=True)
class GridReport:
    """A low-bit grid the sampled weights already sit on, and what that means for comparisons."""

    bits: int
    group_size: int
    form: str  # "asymmetric" (a float minimum per group, Q4_1-style) or "symmetric" (Q4_0-style)
    layers_checked: int

    @property
    def style(self) -> str:
        return f"Q{self.bits}_1-style" if self.form == "asymmetric" else f"Q{self.bits}_0-style"

    @property
    def message(self) -> str:
        """The warning shown next to results: why RTN at this setting looks perfect, and what to compare instead."""
        lower = " or ".join(str(b) for b in range(self.bits - 1, max(1, self.bits - 3), -1))
        other = f", {self.bits}-bit symmetric" if self.form == "asymmetric" else ""
        return (
            f"This model's weights already sit on a {self.bits}-bit grid (groups of {self.group_size}, "
            f"{self.style}). {self.bits}-bit group-{self.group_size} {self.form} RTN reproduces it exactly, which "
            f"says nothing about the method{self._finer_note()}. Compare methods at {lower} bits{other}, or group "
            f"{2 * self.group_size} / per-channel."
        )

    def finer_bits(self) -> list[int]:
        """Wider bit widths (up to 8) whose grid of the same form and group holds every level of this one.

        Asymmetric: the b'-bit step divides the b-bit step when 2^b' - 1 is a multiple of 2^b - 1 (4 → 8: 255 =
        15 x 17). Symmetric grids are not listed: whether they nest depends on the sign of each group's largest
        weight.
        """
        if self.form != "asymmetric":
            return []
        return [b for b in range(self.bits + 1, 9) if (2**b - 1) % (2**self.bits - 1) == 0]

    def _finer_note(self) -> str:
        finer = self.finer_bits()
        if not finer:
            return ""
        widths = " and ".join(f"{b}-bit" for b in finer)
        return (
            f"; {widths} group-{self.group_size} {self.form} RTN nearly does too (every {self.bits}-bit level "
            f"is one of its levels, up to the rounding of its fp16 scale)"
        )


def _on_grid(w: torch.Tensor, bits: int, group: int, symmetric: bool) -> bool:
    """True when every group of ``w`` holds values min + k·step, k integer, spanning at most 2^bits levels.

    The step of a group is its smallest gap between distinct values, so a grid whose extreme codes a group does
    not use (common with an integer zero point, whose range is widened to include 0) is still recognised; float
    weights fail because their smallest gap is a tiny fraction of their range. ``symmetric`` also asks for 0 to
    be a level within codes -2^(b-1) … 2^(b-1)-1 (llama.cpp's Q*_0 form).
    """
    if w.shape[1] % group:
        return False
    w3 = w.float().reshape(w.shape[0], -1, group).sort(-1).values  # (rows, groups, group)
    eps = 1e-6 * float(w3.abs().amax().clamp_min(1e-12))
    gaps = w3.diff(dim=-1)
    gaps = torch.where(gaps > eps, gaps, torch.full_like(gaps, float("inf")))
    step = gaps.amin(-1, keepdim=True)
    flat = torch.isinf(step)  # a group of one repeated value sits on every grid
    step = torch.where(flat, torch.ones_like(step), step)
    lo = w3[..., :1]
    k = (w3 - lo) / step
    on = ((k - k.round()).abs() <= 1e-3).all(-1, keepdim=True) & (k[..., -1:] <= 2**bits - 1 + 1e-3)
    if symmetric:
        half = 2 ** (bits - 1)
        k0 = lo / step  # code of the minimum when 0 is code 0
        kmin, kmax = k0.round(), k0.round() + k[..., -1:].round()
        # The scale may be negative (see quant_params), which mirrors the codes: -half … half-1 either way.
        fits = ((kmin >= -half) & (kmax <= half - 1)) | ((kmin >= -(half - 1)) & (kmax <= half))
        on &= ((k0 - kmin).abs() <= 1e-3) & fits
    return bool((on | flat).all())


def detect_grid(model: nn.Module, *, max_layers: int = 6, rows: int = 64) -> GridReport | None:
    """The coarsest grid (fewest bits, then largest group) that ``max_layers`` sampled decoder linears sit on.

    Only the first ``rows`` output rows of each sampled linear are read: grids are per group, so a slice is as
    telling as the whole weight and keeps this fast on any model size. Returns None for ordinary float weights.
    """
    linears = list(decoder_linears(model))
    if not linears:
        return None
    step = max(1, len(linears) // max_layers)
    sample = [m.weight.detach()[:rows].float() for _, m in linears[::step][:max_layers]]
    for bits in _GRID_BITS:
        for group in _GRID_GROUPS:
            # Symmetric first: a Q4_0-style grid is also reproduced by asymmetric RTN, not the other way round.
            for symmetric in (True, False):
                if all(_on_grid(w, bits, group, symmetric) for w in sample):
                    return GridReport(bits, group, "symmetric" if symmetric else "asymmetric", len(sample))
    return None


def _kl_per_token(base_logp: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """KL(base ‖ quantized) per position, as llama-perplexity's KL divergence statistics compute it."""
    q = torch.log_softmax(logits.float(), -1)
    return (base_logp.exp() * (base_logp - q)).sum(-1)


_TYPES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _calibration_chunks(tokenizer: Any, corpus: Any, n_chunks: int, chunk_len: int) -> torch.Tensor:
    from workbench.corpus import get_corpus

    corpus = get_corpus(corpus) if isinstance(corpus, str) else corpus
    ids = tokenizer(corpus.text("calibration"), add_special_tokens=False)["input_ids"]
    if len(ids) < chunk_len:
        raise ConfigError(
            f"sensitivity: the calibration text has {len(ids)} tokens, fewer than "
            f"chunk_len={chunk_len}. Use a smaller chunk_len or a larger corpus."
        )
    n = min(n_chunks, len(ids) // chunk_len)
    return torch.tensor(ids[: n * chunk_len], dtype=torch.long).view(n, chunk_len)


def _parts(model: nn.Module, by: str) -> dict[str, tuple[str, list[tuple[str, nn.Linear]]]]:
    """Part name → (module-name glob pattern, its linears)."""
    linears = list(decoder_linears(model))
    if not linears:
        raise ConfigError(f"sensitivity: found no decoder linear layers in {type(model).__name__}.")
    parts: dict[str, tuple[str, list[tuple[str, nn.Linear]]]] = {}
    if by == "layer":
        for name, module in linears:
            prefix, rest = (
                name.rsplit(".layers.", 1) if ".layers." in name else ("", name.split("layers.", 1)[1])
            )
            index = rest.split(".", 1)[0]
            base = f"{prefix}.layers.{index}" if prefix else f"layers.{index}"
            parts.setdefault(f"layer {index}", (f"{base}.*", []))[1].append((name, module))
    elif by == "module":
        for name, module in linears:
            parts[name] = (name, [(name, module)])  # the exact name is a glob matching only itself
    elif by == "type":
        for t in _TYPES:
            members = [(n, m) for n, m in linears if n.endswith(f".{t}")]
            if members:
                parts[t] = (f"*.{t}", members)
    else:
        raise ConfigError(
            f"sensitivity: by={by!r} must be 'layer' (one decoder block at a time), 'type' "
            "(one kind of linear, e.g. all down_proj, at a time) or 'module' (each linear alone)."
        )
    return parts


def layer_sensitivity(
    model: nn.Module,
    tokenizer_or_ids: Any,
    *,
    config: Any = None,
    by: str = "layer",
    corpus: Any = "python-docs",
    n_chunks: int = 4,
    chunk_len: int = 128,
    progress: Progress | ProgressCallback | None = None,
) -> pd.DataFrame:
    """KL divergence caused by quantizing one part at a time (``by="layer"`` blocks, ``by="type"`` linear kinds,
    ``by="module"`` each linear alone: one forward pass of the chunks per linear).

    ``tokenizer_or_ids``: a tokenizer (then ``n_chunks`` × ``chunk_len`` tokens of the corpus's calibration part
    are used, never its evaluation part) or a (batch, seq) tensor of token ids. ``config``: an RTN-style config
    (bits, group_size, symmetric, zero_point); default 3-bit group-32 RTN, where differences between parts are
    clear. The model is left as it was (each part's weights are restored).

    Returns one row per part, in model order: ``name``, ``kl_mean`` (mean KL per token vs the unquantized
    model), ``n_params``, ``pattern`` (a module-name glob selecting the part, for mixed precision),
    ``modules`` and ``shapes`` (each module's (out, in) weight shape, for exact packed sizes).
    """
    from workbench.techniques.rtn import RTNConfig

    config = config if config is not None else RTNConfig(bits=3, group_size=32)
    for needed in ("bits", "group_size"):
        if not hasattr(config, needed):
            raise ConfigError(
                f"sensitivity: config {type(config).__name__} has no `{needed}`; pass an RTN config, "
                "e.g. RTNConfig(bits=3)."
            )
    progress = as_progress(progress)
    parts = _parts(model, by)
    if isinstance(tokenizer_or_ids, torch.Tensor):
        ids = tokenizer_or_ids.long()
        ids = ids.unsqueeze(0) if ids.dim() == 1 else ids
    else:
        ids = _calibration_chunks(tokenizer_or_ids, corpus, n_chunks, chunk_len)
    device = next(model.parameters()).device
    symmetric, zero_point = bool(getattr(config, "symmetric", False)), getattr(config, "zero_point", "float")

    with torch.no_grad():
        base = [
            torch.log_softmax(model(ids[i : i + 1].to(device)).logits.float(), -1) for i in range(len(ids))
        ]
    rows = []
    for name, (pattern, members) in progress.iter(list(parts.items()), desc="sensitivity"):
        saved = [m.weight.data.clone() for _, m in members]
        try:
            with torch.no_grad():
                for _, m in members:
                    fake_quantize_(m.weight.data, config.bits, config.group_size, symmetric, zero_point)
                kl = torch.cat(
                    [
                        _kl_per_token(b, model(ids[i : i + 1].to(device)).logits).flatten()
                        for i, b in enumerate(base)
                    ]
                )
        finally:
            for (_, m), w in zip(members, saved, strict=True):
                m.weight.data = w
        rows.append(
            {
                "name": name,
                "kl_mean": float(kl.mean()),
                "n_params": sum(m.weight.numel() for _, m in members),
                "pattern": pattern,
                "modules": [n for n, _ in members],
                "shapes": [tuple(m.weight.shape) for _, m in members],
            }
        )
    return pd.DataFrame(rows, columns=["name", "kl_mean", "n_params", "pattern", "modules", "shapes"])


@dataclass(frozen=True)
class BitsPlan:
    """Bits per module chosen under a size budget: ``bits`` for most, ``module_bits`` for the rest.

    ``module_bits`` is ready for a quantizer's per-module map (:class:`~workbench.techniques.gptq.GPTQConfig`):
    (glob pattern, bits) pairs, first match wins. ``predicted_kl`` is the planner's estimate (the measured
    per-part KL scaled by 4^-(extra bits)), not a measurement: evaluate the result.
    """

    bits: int
    module_bits: tuple[tuple[str, int], ...]
    bytes: int  # packed bytes of the planned parts (codes + scales + zero points)
    n_params: int
    predicted_kl: float
    counts: dict[int, int]  # bits -> number of parts

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.bytes / max(self.n_params, 1)


def plan_module_bits(
    frame: pd.DataFrame,
    *,
    choices: tuple[int, ...] = (4, 5, 8),
    measured_bits: int = 4,
    budget_bytes: int | None = None,
    budget_bpw: float | None = None,
    group_size: int = 32,
    symmetric: bool = True,
    zero_point: str = "float",
) -> BitsPlan:
    """Choose each part's bits from ``choices`` so the packed parts fit a budget at the lowest predicted KL.

    ``frame``: a :func:`layer_sensitivity` frame (any ``by``; ``by="module"`` gives a per-tensor map) measured
    at ``measured_bits``. The estimate for a part at b bits is its measured KL × 4^(measured_bits - b): one more
    bit halves the rounding step, so the squared error, to which a small KL is proportional, falls by 4. Every
    part starts at the fewest bits; upgrades are taken greedily by predicted KL saved per extra byte (the
    savings per byte shrink with each step up, so the greedy order is the knapsack's relaxation order) while
    they fit. Give exactly one of ``budget_bytes`` (packed bytes of these parts) or ``budget_bpw``.
    The predicted KL adds parts' KLs (parts interact little at these error sizes; measure the result).
    """
    import heapq

    from workbench.techniques._grid import check_bits
    from workbench.techniques._quant import packed_bytes

    if (budget_bytes is None) == (budget_bpw is None):
        raise ConfigError("plan: give exactly one of budget_bytes or budget_bpw.")
    missing = {"kl_mean", "n_params", "pattern", "shapes"} - set(frame.columns)
    if missing:
        raise ConfigError(
            f"plan: the sensitivity frame lacks {', '.join(sorted(missing))}; build it with "
            "workbench.quant_analysis.layer_sensitivity."
        )
    if not choices:
        raise ConfigError("plan: choices is empty; give the bit widths to choose from, e.g. (4, 5, 8).")
    for b in choices:
        check_bits("plan", "choices", b)
    levels = sorted(set(choices))
    n_params = int(frame["n_params"].sum())
    budget = budget_bytes if budget_bytes is not None else budget_bpw * n_params / 8  # type: ignore[operator]

    def cost(shapes: list, b: int) -> int:
        return sum(packed_bytes(tuple(s), b, group_size, symmetric, zero_point) for s in shapes)

    costs = [[cost(list(sh), b) for b in levels] for sh in frame["shapes"]]
    kls = [
        [float(kl) * 4.0 ** (measured_bits - b) for b in levels] for kl in frame["kl_mean"]
    ]  # predicted KL of each part at each level
    level = [0] * len(frame)
    spent = sum(c[0] for c in costs)
    if spent > budget + 1e-9:
        raise ConfigError(
            f"plan: the budget ({budget / 1e6:.2f} MB, {8 * budget / n_params:.3f} bits per weight) is below "
            f"what {levels[0]} bits alone cost ({spent / 1e6:.2f} MB); raise the budget or add fewer bits "
            "to choices."
        )

    def push(heap: list, i: int) -> None:
        j = level[i]
        if j + 1 < len(levels):
            extra = costs[i][j + 1] - costs[i][j]
            saved = kls[i][j] - kls[i][j + 1]
            heapq.heappush(heap, (-saved / max(extra, 1), i, j + 1))

    heap: list = []
    for i in range(len(frame)):
        push(heap, i)
    while heap:
        _, i, j = heapq.heappop(heap)
        extra = costs[i][j] - costs[i][level[i]]
        if spent + extra <= budget + 1e-9:
            spent += extra
            level[i] = j
            push(heap, i)
    chosen = [levels[j] for j in level]
    counts = {b: chosen.count(b) for b in levels if b in chosen}
    base = max(counts, key=lambda b: counts[b])  # the most common width is the default; the rest are listed
    pairs = tuple((str(p), b) for p, b in zip(frame["pattern"], chosen, strict=True) if b != base)
    return BitsPlan(
        bits=base,
        module_bits=pairs,
        bytes=int(spent),
        n_params=n_params,
        predicted_kl=float(sum(kls[i][level[i]] for i in range(len(frame)))),
        counts=counts,
    )


__all__ = ["BitsPlan", "GridReport", "detect_grid", "layer_sensitivity", "plan_module_bits"]
