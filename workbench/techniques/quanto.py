"""optimum-quanto weight quantization: int8, int4 and int2 weights with real packed storage on the CPU.

Chosen as the maintained low-bit back end with packed storage that installs cleanly beside our torch and
transformers and runs on the CPU (see docs/quantization-backends.md for what was compared and measured):
int4/int2 codes are packed into uint8 (two or four per byte) with a float scale and shift per group, int8 keeps
one byte per weight with a per-row scale. The first int4 forward compiles a small kernel once (~30 s; cached).

Quanto picks its own group size (128 where it divides a layer, else a smaller divisor); the storage each module
reports (``wb_storage_bytes``) is summed from its real tensors, so whatever it picks is counted exactly.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from dataclasses import dataclass
from typing import Any

import torch

from workbench.errors import ConfigError
from workbench.techniques._quant import decoder_linears
from workbench.techniques.base import ApplyContext, register

WEIGHTS = {"int8": 8, "int4": 4, "int2": 2}


@dataclass(frozen=True)
class QuantoConfig:
    """optimum-quanto weight-only quantization of the decoder linears.

    weights: "int8", "int4" or "int2".
    """

    weights: str = "int4"

    def __post_init__(self) -> None:
        if self.weights not in WEIGHTS:
            raise ConfigError(f"quanto: weights={self.weights!r} is not supported; choose int8, int4 or int2.")

    @property
    def bits(self) -> int:
        return WEIGHTS[self.weights]


def import_quanto() -> Any:
    try:
        with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            import optimum.quanto as quanto
    except ImportError:
        raise ConfigError("quanto needs optimum-quanto: pip install 'efficiency-workbench[quant]'.") from None
    return quanto


def check_quanto(model: Any, config: QuantoConfig) -> None:
    import_quanto()
    linears = list(decoder_linears(model))
    if not linears:
        raise ConfigError(f"quanto: found no decoder linear layers in {type(model).__name__}.")
    for name, linear in linears:
        if config.bits < 8 and linear.in_features % 8:
            raise ConfigError(f"quanto: {config.weights} packs groups of input weights and in_features="
                              f"{linear.in_features} of '{name}' is not a multiple of 8; use int8.")


def tensor_bytes(t: Any) -> int:
    """Bytes of a (possibly nested) quanto tensor, from its real inner tensors."""
    if type(t) is torch.Tensor or isinstance(t, torch.nn.Parameter) and type(t.data) is torch.Tensor:
        return t.numel() * t.element_size()
    names, _ = t.__tensor_flatten__()
    return sum(tensor_bytes(getattr(t, n)) for n in names)


@register("quanto", QuantoConfig, kind="quantize", check=check_quanto)
def _apply_quanto(model: Any, config: QuantoConfig, ctx: ApplyContext) -> Any:
    quanto = import_quanto()
    qtype = {"int8": quanto.qint8, "int4": quanto.qint4, "int2": quanto.qint2}[config.weights]
    names = [name for name, _ in decoder_linears(model)]
    ctx.progress.update(0.1, f"quanto: {config.weights}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quanto.quantize(model, weights=qtype, include=names)
        quanto.freeze(model)
    for name, module in model.named_modules():
        if name in names and isinstance(module, quanto.QModuleMixin):
            module.wb_storage_bytes = tensor_bytes(module.weight)
            module.wb_quant = {"method": "quanto", "weights": config.weights, "bits": config.bits}
    ctx.progress.update(1.0, "quanto: done")
    return model


__all__ = ["QuantoConfig"]
