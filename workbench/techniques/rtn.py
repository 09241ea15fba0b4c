"""Round-to-nearest weight-only quantization: the fast path behind the bit-width slider.

Every calibrated method has to beat it at equal bits and group size. Weights are quantized group-wise and
dequantized back (simulated), so quality is exactly what a packed kernel would compute; each module reports its
packed size (see :mod:`workbench.techniques._quant` and docs/quantization.md for how bytes are counted).
The work is done in place, in cache-sized pieces: the demo model (30 layers, 576 wide) takes well under a
second, so moving the slider feels immediate.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from workbench.techniques._grid import WeightGridConfig
from workbench.techniques._quant import (
    check_embedding_groups,
    check_group_size,
    decoder_linears,
    fake_quantize_,
    mark_quantized,
    quantize_embeddings_from_config_,
    quantize_fused_experts_,
)
from workbench.techniques.base import ApplyContext, register
from workbench.techniques.space import DEFAULT_GROUP_SIZES, declare_space


@dataclass(frozen=True)
class RTNConfig(WeightGridConfig):
    """Round-to-nearest, group-wise, weight-only.

    Its fields are the shared weight-grid ones (bits, group_size, symmetric, zero_point, include_embeddings,
    include_head, embedding_bits; see :class:`~workbench.techniques._grid.WeightGridConfig` for each one's help).
    """

    technique: ClassVar[str] = "rtn"


def check_rtn(model: Any, config: RTNConfig) -> None:
    """Model-dependent checks, before any weight changes: every group size must divide its layer's width."""
    check_group_size("rtn", model, config.group_size)
    check_embedding_groups("rtn", model, config.group_size, config.include_embeddings, config.include_head)


# What the bit-width slider and `workbench sweep` offer (see workbench/techniques/space.py).
declare_space("rtn", bits=range(2, 9), group_sizes=DEFAULT_GROUP_SIZES, symmetric=True, grid_sensitive=True)


@register("rtn", RTNConfig, kind="quantize", check=check_rtn)
def _apply_rtn(model: Any, config: RTNConfig, ctx: ApplyContext) -> Any:
    linears = list(decoder_linears(model))
    for _, linear in ctx.progress.iter(linears, desc="rtn"):
        fake_quantize_(
            linear.weight.data, config.bits, config.group_size, config.symmetric, config.zero_point
        )
        mark_quantized(linear, config.bits, config.group_size, config.symmetric, config.zero_point, "rtn")
    # MoE experts kept as 3D tensors are decoder weights too.
    quantize_fused_experts_(model, config.bits, config.group_size, config.symmetric, config.zero_point, "rtn")
    quantize_embeddings_from_config_(model, config, "rtn")
    return model


__all__ = ["RTNConfig", "check_rtn"]
