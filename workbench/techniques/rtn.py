"""Round-to-nearest weight-only quantization: the fast path behind the bit-width slider.

Every calibrated method has to beat it at equal bits and group size. Weights are quantized group-wise and
dequantized back (simulated), so quality is exactly what a packed kernel would compute; each module reports its
packed size (see :mod:`workbench.techniques._quant` for how bytes are counted).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from workbench.errors import ConfigError
from workbench.techniques._quant import (
    check_group_size,
    decoder_linears,
    embedding_modules,
    fake_quantize,
    mark_quantized,
    validate_common,
)
from workbench.techniques.base import ApplyContext, register


@dataclass(frozen=True)
class RTNConfig:
    """Round-to-nearest, group-wise, weight-only.

    bits: 2 to 8.
    group_size: input weights sharing one scale (32 matches the demo model's native Q4_1 grid; -1 per-channel).
    symmetric: no zero point (codes centred on 0), or asymmetric with a zero point.
    zero_point: asymmetric form: "float" (an fp16 minimum per group, as llama.cpp's Q4_1) or "int" (an integer
        zero point of `bits` bits, as GPTQ/AWQ checkpoints store it).
    include_embeddings: also quantize the token embedding (tied to the output head in many small models, which
        then shares it) at `embedding_bits`, group-wise with the same group size.
    include_head: also quantize an untied output head at `embedding_bits`.
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
        if not 2 <= self.embedding_bits <= 8:
            raise ConfigError(f"rtn: embedding_bits={self.embedding_bits} is out of range; choose 2 to 8.")


def check_rtn(model: Any, config: RTNConfig) -> None:
    check_group_size("rtn", model, config.group_size)
    if config.include_embeddings or config.include_head:
        for name, module in embedding_modules(model, config.include_head):
            width = module.weight.shape[1]
            if config.group_size != -1 and width % config.group_size:
                raise ConfigError(f"rtn: group_size={config.group_size} does not divide the width {width} of "
                                  f"'{name}'. Pick a group size that divides {width}, or -1.")


def quantize_embeddings_(model: Any, bits: int, group_size: int, symmetric: bool, zero_point: str,
                         include_head: bool, method: str) -> None:
    for _, module in embedding_modules(model, include_head):
        with torch.no_grad():
            module.weight.data = fake_quantize(module.weight.data, bits, group_size, symmetric, zero_point)
        mark_quantized(module, bits, group_size, symmetric, zero_point, method)


@register("rtn", RTNConfig, kind="quantize", check=check_rtn)
def _apply_rtn(model: Any, config: RTNConfig, ctx: ApplyContext) -> Any:
    linears = list(decoder_linears(model))
    with torch.no_grad():
        for _, linear in ctx.progress.iter(linears, desc="rtn"):
            linear.weight.data = fake_quantize(linear.weight.data, config.bits, config.group_size,
                                               config.symmetric, config.zero_point)
            mark_quantized(linear, config.bits, config.group_size, config.symmetric, config.zero_point, "rtn")
    if config.include_embeddings or config.include_head:
        quantize_embeddings_(model, config.embedding_bits, config.group_size, config.symmetric, config.zero_point,
                             config.include_head, "rtn")
    return model


__all__ = ["RTNConfig"]
