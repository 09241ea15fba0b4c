"""Mixed precision: round-to-nearest at a base bit width, with the most sensitive modules kept at higher bits.

Which modules deserve more bits comes from a sensitivity scan (:func:`workbench.quant_analysis.layer_sensitivity`)
via :func:`mixed_from_sensitivity` (the top N parts, or as many as fit a bits-per-weight budget), or from name
patterns given by hand (``"*.down_proj"``, ``"model.layers.0.*"``). What it costs is counted like every other
quantizer, through each module's packed size (``wb_storage_bytes``); :func:`mixed_bits_per_weight` gives the
decoder linears' bits per weight before anything is applied, and the run records it in ``ctx.extras["mixed"]``.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from typing import Any, ClassVar

import pandas as pd

from workbench.errors import ConfigError
from workbench.techniques._grid import WeightGridConfig, check_bits
from workbench.techniques._quant import (
    check_embedding_groups,
    check_group_size,
    decoder_linears,
    expert_rows,
    fake_quantize_,
    fused_expert_tensors,
    fused_experts,
    mark_quantized,
    packed_bytes,
    quantize_embeddings_from_config_,
    quantize_fused_experts_,
)
from workbench.techniques.base import ApplyContext, register
from workbench.techniques.space import DEFAULT_GROUP_SIZES, declare_space


@dataclass(frozen=True)
class MixedPrecisionConfig(WeightGridConfig):
    """RTN at ``bits``, with the decoder linears matching ``high_precision`` patterns at ``high_bits``.

    The shared weight-grid fields give the base quantization (as for RTN; embeddings and head at
    ``embedding_bits``, tied in the demo model: one tensor, quantized once). Build ``high_precision`` from a
    sensitivity scan with :func:`mixed_from_sensitivity`.
    """

    technique: ClassVar[str] = "mixed"

    # 3 rather than RTN's 4: mixed precision pays off where plain RTN starts to hurt.
    bits: int = field(default=3, metadata={"help": "Bits per weight code of the base quantization, 2 to 8."})
    high_bits: int = field(
        default=8,
        metadata={
            "help": "Bits for the modules kept at higher precision, from `bits` to 8 (8: close to lossless)."
        },
    )
    high_precision: tuple[str, ...] = field(
        default=(),
        metadata={
            "help": "Glob patterns of decoder linear names kept at `high_bits` (e.g. 'model.layers.0.*', "
            "'*.down_proj'); each must match something. Build it from a sensitivity scan with "
            "mixed_from_sensitivity."
        },
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        check_bits("mixed", "high_bits", self.high_bits)
        if self.high_bits < self.bits:
            raise ConfigError(
                f"mixed: high_bits={self.high_bits} is below bits={self.bits}; the kept modules "
                "should get more bits, not fewer."
            )
        if isinstance(self.high_precision, str):
            raise ConfigError("mixed: high_precision must be a list of name patterns, e.g. ['*.down_proj'].")
        if isinstance(self.high_precision, list):  # lists are not hashable; a frozen config stores a tuple
            object.__setattr__(self, "high_precision", tuple(self.high_precision))

    def label(self) -> str:
        """``mixed 3b g32 8b:*.down_proj``; more than two patterns (a sensitivity pick) show as a count."""
        if not self.high_precision:
            return f"mixed {self.grid_label()}"
        kept = " ".join(self.high_precision)
        if len(self.high_precision) > 2 or len(kept) > 40:
            kept = f"{len(self.high_precision)} patterns"
        return f"mixed {self.grid_label()} {self.high_bits}b:{kept}"


def _is_high(name: str, config: MixedPrecisionConfig) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in config.high_precision)


def check_mixed(model: Any, config: MixedPrecisionConfig) -> None:
    """Every pattern must select something: a typo would otherwise silently keep nothing at high bits."""
    check_group_size("mixed", model, config.group_size)
    check_embedding_groups("mixed", model, config.group_size, config.include_embeddings, config.include_head)
    names = [n for n, _ in decoder_linears(model)] + [label for label, _, _, _ in fused_experts(model)]
    for pattern in config.high_precision:
        if not any(fnmatch.fnmatchcase(n, pattern) for n in names):
            raise ConfigError(
                f"mixed: pattern {pattern!r} matches no decoder linear (names look like "
                f"{names[0]!r}; use e.g. '*.down_proj' or '{names[0].rsplit('.', 2)[0]}.*')."
            )


def mixed_bits_per_weight(model: Any, config: MixedPrecisionConfig) -> float:
    """Bits per weight of the decoder linears under ``config`` (packed codes, scales and zero points)."""
    n_weights = n_bytes = 0
    for name, linear in decoder_linears(model):
        bits = config.high_bits if _is_high(name, config) else config.bits
        n_weights += linear.weight.numel()
        n_bytes += packed_bytes(
            tuple(linear.weight.shape), bits, config.group_size, config.symmetric, config.zero_point
        )
    for label, _, _, param, spec in fused_expert_tensors(model):
        bits = config.high_bits if _is_high(label, config) else config.bits
        n_weights += param.numel()
        n_bytes += packed_bytes(
            expert_rows(spec),  # (E·out, in) whatever the stored layout
            bits,
            config.group_size,
            config.symmetric,
            config.zero_point,
        )
    return 8 * n_bytes / max(n_weights, 1)


# What the bit-width slider and `workbench sweep` offer (see workbench/techniques/space.py).
declare_space("mixed", bits=range(2, 9), group_sizes=DEFAULT_GROUP_SIZES, symmetric=True, grid_sensitive=True)


@register("mixed", MixedPrecisionConfig, kind="quantize", check=check_mixed)
def _apply_mixed(model: Any, config: MixedPrecisionConfig, ctx: ApplyContext) -> Any:
    n_high = 0
    for name, linear in ctx.progress.iter(list(decoder_linears(model)), desc="mixed"):
        high = _is_high(name, config)
        n_high += high
        bits = config.high_bits if high else config.bits
        fake_quantize_(linear.weight.data, bits, config.group_size, config.symmetric, config.zero_point)
        mark_quantized(linear, bits, config.group_size, config.symmetric, config.zero_point, "mixed")
    n_high += sum(_is_high(label, config) for label, _, _, _ in fused_experts(model))
    quantize_fused_experts_(
        model,
        config.bits,
        config.group_size,
        config.symmetric,
        config.zero_point,
        "mixed",
        bits_for=lambda label: config.high_bits if _is_high(label, config) else config.bits,
    )
    quantize_embeddings_from_config_(model, config, "mixed")
    ctx.extras["mixed"] = {
        "high_modules": n_high,
        "bits_per_weight_linear": mixed_bits_per_weight(model, config),
    }
    return model


def _part_bits_per_weight(
    bits: int, group_size: int, symmetric: bool, zero_point: str, n_params: int, rows: int | None
) -> float:
    """Packed bits per weight of a part (codes + fp16 scale + zero point per group), as :func:`packed_bytes`."""
    if group_size == -1:
        per_group = n_params / rows if rows else float("inf")  # per-channel: one group per row
    else:
        per_group = group_size
    overhead = 16.0 if symmetric else (32.0 if zero_point == "float" else 16.0 + bits)
    return bits + overhead / per_group


def mixed_from_sensitivity(
    frame: pd.DataFrame,
    base_bits: int,
    high_bits: int = 8,
    *,
    top_n: int | None = None,
    budget_bpw: float | None = None,
    group_size: int = 32,
    symmetric: bool = False,
    zero_point: str = "float",
    **params: Any,
) -> MixedPrecisionConfig:
    """A :class:`MixedPrecisionConfig` keeping the most sensitive parts of a :func:`layer_sensitivity` frame high.

    Give exactly one of ``top_n`` (the N parts with the largest KL) or ``budget_bpw`` (bits per weight of the
    decoder linears not to exceed: parts are raised greedily by KL per extra bit, i.e. ``kl_mean / n_params``,
    the usual knapsack heuristic, while they fit). Other parameters go to the config.
    """
    if (top_n is None) == (budget_bpw is None):
        raise ConfigError(
            "mixed: give exactly one of top_n (how many parts to keep high) or budget_bpw "
            "(bits per weight to spend)."
        )
    missing = {"kl_mean", "n_params", "pattern"} - set(frame.columns)
    if missing:
        raise ConfigError(
            f"mixed: the sensitivity frame lacks {', '.join(sorted(missing))}; build it with "
            "workbench.quant_analysis.layer_sensitivity."
        )
    if top_n is not None:
        if top_n < 0:
            raise ConfigError(f"mixed: top_n={top_n} must be 0 or more.")
        chosen = list(frame.sort_values("kl_mean", ascending=False, kind="stable").head(top_n)["pattern"])
    else:
        total = float(frame["n_params"].sum())
        rows = frame["rows"] if "rows" in frame.columns else [None] * len(frame)
        low = [
            _part_bits_per_weight(base_bits, group_size, symmetric, zero_point, int(n), r)
            for n, r in zip(frame["n_params"], rows, strict=True)
        ]
        high = [
            _part_bits_per_weight(high_bits, group_size, symmetric, zero_point, int(n), r)
            for n, r in zip(frame["n_params"], rows, strict=True)
        ]
        spent = sum(b * n for b, n in zip(low, frame["n_params"], strict=True))
        if spent / total > budget_bpw + 1e-9:  # type: ignore[operator]
            raise ConfigError(
                f"mixed: budget_bpw={budget_bpw} is below what {base_bits}-bit alone costs "
                f"({spent / total:.3f} bits per weight); raise the budget or lower base_bits."
            )
        order = sorted(
            range(len(frame)),
            key=lambda i: -float(frame["kl_mean"].iloc[i]) / float(frame["n_params"].iloc[i]),
        )
        chosen = []
        for i in order:
            extra = (high[i] - low[i]) * float(frame["n_params"].iloc[i])
            if (spent + extra) / total <= budget_bpw + 1e-9:  # type: ignore[operator]
                spent += extra
                chosen.append(frame["pattern"].iloc[i])
    return MixedPrecisionConfig(
        bits=base_bits,
        high_bits=high_bits,
        high_precision=tuple(chosen),
        group_size=group_size,
        symmetric=symmetric,
        zero_point=zero_point,
        **params,
    )


__all__ = ["MixedPrecisionConfig", "check_mixed", "mixed_bits_per_weight", "mixed_from_sensitivity"]
