"""Mixed precision: round-to-nearest at a base bit width, with the most sensitive modules kept at higher bits.

Which modules deserve more bits comes from a sensitivity scan (:func:`workbench.quant_analysis.layer_sensitivity`)
via :func:`mixed_from_sensitivity`, or from name patterns given by hand (``"*.down_proj"``,
``"model.layers.0.*"``). The bits per weight it costs follow from each module's packed size.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Any

import pandas as pd
import torch

from workbench.errors import ConfigError
from workbench.techniques._quant import (
    check_group_size,
    decoder_linears,
    fake_quantize,
    mark_quantized,
    validate_common,
)
from workbench.techniques.base import ApplyContext, register
from workbench.techniques.rtn import quantize_embeddings_


@dataclass(frozen=True)
class MixedPrecisionConfig:
    """RTN at ``bits``, modules matching ``high_precision`` patterns at ``high_bits``.

    bits, group_size, symmetric, zero_point: the base quantization (as for RTN).
    high_bits: bits for the modules kept at higher precision (8 by default).
    high_precision: glob patterns of module names (e.g. "*.layers.0.*", "*.down_proj").
    include_embeddings, embedding_bits: quantize the token embedding too (8 bits by default).
    """

    bits: int = 3
    group_size: int = 32
    symmetric: bool = False
    zero_point: str = "float"
    high_bits: int = 8
    high_precision: tuple[str, ...] = ()
    include_embeddings: bool = False
    embedding_bits: int = 8

    def __post_init__(self) -> None:
        validate_common("mixed", self.bits, self.group_size, self.zero_point)
        validate_common("mixed", self.high_bits, self.group_size, self.zero_point)
        if isinstance(self.high_precision, str):
            raise ConfigError("mixed: high_precision must be a list of name patterns, e.g. ['*.down_proj'].")


def check_mixed(model: Any, config: MixedPrecisionConfig) -> None:
    check_group_size("mixed", model, config.group_size)
    names = [n for n, _ in decoder_linears(model)]
    for pattern in config.high_precision:
        if not any(fnmatch.fnmatchcase(n, pattern) for n in names):
            raise ConfigError(f"mixed: pattern {pattern!r} matches no decoder linear (e.g. {names[0]!r}).")


@register("mixed", MixedPrecisionConfig, kind="quantize", check=check_mixed)
def _apply_mixed(model: Any, config: MixedPrecisionConfig, ctx: ApplyContext) -> Any:
    with torch.no_grad():
        for name, linear in ctx.progress.iter(list(decoder_linears(model)), desc="mixed"):
            high = any(fnmatch.fnmatchcase(name, p) for p in config.high_precision)
            bits = config.high_bits if high else config.bits
            linear.weight.data = fake_quantize(linear.weight.data, bits, config.group_size, config.symmetric,
                                               config.zero_point)
            mark_quantized(linear, bits, config.group_size, config.symmetric, config.zero_point, "mixed")
    if config.include_embeddings:
        quantize_embeddings_(model, config.embedding_bits, config.group_size, config.symmetric, config.zero_point,
                             False, "mixed")
    return model


def mixed_from_sensitivity(frame: pd.DataFrame, bits: int, *, high_bits: int = 8, top_n: int = 2,
                           **params: Any) -> MixedPrecisionConfig:
    """Keep the ``top_n`` most sensitive parts of a sensitivity frame at ``high_bits``."""
    from workbench.quant_analysis import sensitivity_patterns

    return MixedPrecisionConfig(bits=bits, high_bits=high_bits, high_precision=sensitivity_patterns(frame, top_n),
                                **params)


__all__ = ["MixedPrecisionConfig", "mixed_from_sensitivity"]
