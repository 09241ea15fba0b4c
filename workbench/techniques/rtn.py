"""Round-to-nearest weight-only quantization: the fast path behind the bit-width slider.

Every calibrated method has to beat it at equal bits and group size. Weights are quantized group-wise and
dequantized back (simulated), so quality is exactly what a packed kernel would compute; each module reports its
packed size (see :mod:`workbench.techniques._quant` and docs/quantization.md for how bytes are counted).
The work is done in place, in cache-sized pieces: the demo model (30 layers, 576 wide) takes well under a
second, so moving the slider feels immediate.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from workbench.errors import ConfigError
from workbench.techniques._quant import (
    check_embedding_groups,
    check_group_size,
    decoder_linears,
    fake_quantize_,
    mark_quantized,
    quantize_embeddings_from_config_,
    quantize_fused_experts_,
    validate_common,
)
from workbench.techniques.base import ApplyContext, register


@dataclass(frozen=True)
class RTNConfig:
    """Round-to-nearest, group-wise, weight-only.

    bits: 2 to 8.
    group_size: input weights sharing one scale (32 matches the demo model's native Q4_1 grid; -1 per-channel).
    symmetric: no zero point (codes centred on 0, llama.cpp's Q*_0 rule), or asymmetric with a zero point.
    zero_point: asymmetric form: "float" (an fp16 minimum per group, as llama.cpp's Q4_1) or "int" (an integer
        zero point of `bits` bits, as GPTQ/AWQ checkpoints store it).
    include_embeddings: also quantize the token embedding at `embedding_bits`, group-wise with the same group
        size. When the head is tied to the embedding (SmolLM2, the demo model) the head shares it and is
        quantized with it.
    include_head: also quantize the output head at `embedding_bits` (when tied: the embedding with it).
    embedding_bits: bits for the embedding and head (8 keeps their error small; they are a large share of a
        small model's weights).
    """

    bits: int = 4
    group_size: int = 32
    symmetric: bool = False
    zero_point: str = "float"
    include_embeddings: bool = False
    include_head: bool = False
    embedding_bits: int = 8

    def __post_init__(self) -> None:
        validate_common("rtn", self.bits, self.group_size, self.zero_point)
        if not isinstance(self.embedding_bits, int) or not 2 <= self.embedding_bits <= 8:
            raise ConfigError(f"rtn: embedding_bits={self.embedding_bits} is out of range; choose 2 to 8.")


def check_rtn(model: Any, config: RTNConfig) -> None:
    """Model-dependent checks, before any weight changes: every group size must divide its layer's width."""
    check_group_size("rtn", model, config.group_size)
    check_embedding_groups("rtn", model, config.group_size, config.include_embeddings, config.include_head)


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
