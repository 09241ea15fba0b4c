"""optimum-quanto weight-only quantization: int8, int4 and int2 codes stored packed, in place.

quanto swaps each decoder ``nn.Linear`` for its ``QLinear`` and, once frozen, keeps the weight as a
``WeightQBytesTensor`` (int8: one int8 code per weight, one scale per output row) or a ``WeightQBitsTensor``
(int4/int2: codes packed two or four per uint8, plus a scale and a float shift per group of input weights).
The matmul dequantizes those codes on the fly, so the memory saving is real. It works on the model as it is in
memory (no save and reload as for bitsandbytes), on the CPU and on CUDA, in fp32 and bf16. The output head and
the embeddings stay in full precision, as in the other weight quantizers of this workbench.

Each quantized module reports ``wb_storage_bytes``: the sum of the plain tensors inside its quantized weight
(codes, scales, shifts), read from the tensors themselves::

    int8   n_weights bytes                       + n_rows scales (weight dtype)
    int4   n_weights / 2 bytes                   + n_groups scales + n_groups shifts (weight dtype)
    int2   n_weights / 4 bytes                   + n_groups scales + n_groups shifts (weight dtype)

quanto also gives every ``QLinear`` two scalar activation scales (``input_scale``/``output_scale``, unused for
weight-only quantization); they are ordinary buffers, counted as such and not in ``wb_storage_bytes``.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from workbench.errors import ConfigError
from workbench.techniques._quant import check_group_size, decoder_linears
from workbench.techniques.base import ApplyContext, register
from workbench.techniques.space import declare_space

WEIGHTS = ("int8", "int4", "int2")
INSTALL_HINT = "pip install 'efficiency-workbench[quant]'"
DEVICES = ("cpu", "cuda")


@dataclass(frozen=True)
class QuantoConfig:
    """optimum-quanto weight-only quantization of the decoder's linear layers (real packed storage)."""

    weights: str = field(
        default="int4",
        metadata={
            "help": "'int8' (one scale per output row), 'int4' or 'int2' (group-wise, asymmetric: a scale and a "
            "shift per group).",
            "choices": WEIGHTS,
        },
    )
    group_size: int | None = field(
        default=None,
        metadata={
            "help": "int4/int2 only: input weights sharing one scale and shift. None keeps quanto's own choice "
            "(128, reduced by 32 until it divides the layer; per row for layers of 128 inputs or fewer); -1 is "
            "one group per output row; any other value, at least 8, must divide every layer's input width."
        },
    )

    def __post_init__(self) -> None:
        if self.weights not in WEIGHTS:
            raise ConfigError(
                f"quanto: weights={self.weights!r} is not supported; choose one of {', '.join(WEIGHTS)}."
            )
        if self.group_size is None:
            return
        if (
            isinstance(self.group_size, bool)
            or not isinstance(self.group_size, int)
            or (self.group_size != -1 and self.group_size < 8)
        ):
            raise ConfigError(
                f"quanto: group_size={self.group_size!r} must be None (quanto's choice), -1 (per row) or at least 8, "
                "e.g. 32, 64 or 128."
            )
        if self.weights == "int8":
            raise ConfigError(
                "quanto: int8 weights have one scale per output row; leave group_size=None for int8."
            )

    @property
    def bits(self) -> int:
        return int(self.weights[3:])

    def label(self) -> str:
        """``quanto int4``, ``quanto int4 g64``, ``quanto int2 per-row``."""
        if self.group_size is None:
            return f"quanto {self.weights}"
        return f"quanto {self.weights} " + ("per-row" if self.group_size == -1 else f"g{self.group_size}")


def import_quanto() -> Any:
    """optimum.quanto, imported lazily (it is an optional dependency)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import optimum.quanto as quanto  # noqa: PLR0402 (a plain import keeps the missing-package path testable)
    except ImportError:
        raise ConfigError(f"quanto needs the optimum-quanto package: {INSTALL_HINT}.") from None
    return quanto


def check_quanto(model: Any, config: QuantoConfig) -> None:
    """Refuse, before any work, a missing package, an unsupported device or a group size that does not fit."""
    import_quanto()
    params = list(model.parameters())
    if not params:
        raise ConfigError("quanto: the model has no parameters to quantize.")
    device = params[0].device
    if device.type not in DEVICES:
        raise ConfigError(
            f"quanto: no quanto kernels for device {device.type!r} in this workbench; move the model to "
            f"{' or '.join(DEVICES)}."
        )
    dtype = params[0].dtype
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ConfigError(f"quanto: the model's weights are {dtype}; load it as float32 or bfloat16 first.")
    linears = list(decoder_linears(model))
    if not linears:
        raise ConfigError(f"quanto: found no decoder linear layers to quantize in {type(model).__name__}.")
    for name, module in linears:
        if type(module) is not torch.nn.Linear or type(module.weight.data) is not torch.Tensor:
            raise ConfigError(
                f"quanto: '{name}' is already quantized ({type(module).__name__}); apply quanto to a "
                "float model."
            )
    if config.group_size is not None:
        check_group_size("quanto", model, config.group_size, linears)


def _plain_tensors(t: torch.Tensor) -> Iterator[torch.Tensor]:
    """The plain tensors that actually hold a (possibly nested) tensor subclass such as quanto's QTensors."""
    data = t.data if isinstance(t, torch.nn.Parameter) else t
    if type(data) is torch.Tensor:
        yield data
        return
    names, _ = data.__tensor_flatten__()
    for name in names:
        yield from _plain_tensors(getattr(data, name))


def storage_bytes(module: Any) -> int:
    """Bytes of a frozen quanto module's weight: codes plus scales (and shifts), from the tensors themselves."""
    return int(sum(t.numel() * t.element_size() for t in _plain_tensors(module.weight)))


# What the bit-width slider and `workbench sweep` offer (see workbench/techniques/space.py).
declare_space("quanto", formats={int(w[3:]): {"weights": w} for w in WEIGHTS})


@register("quanto", QuantoConfig, kind="quantize", check=check_quanto)
def _apply_quanto(model: Any, config: QuantoConfig, ctx: ApplyContext) -> Any:
    """Quantize the decoder linears in place, then freeze them so only the packed codes stay in memory."""
    quanto = import_quanto()
    names = [name for name, _ in decoder_linears(model)]
    qtype = {"int8": quanto.qint8, "int4": quanto.qint4, "int2": quanto.qint2}[config.weights]
    ctx.progress.update(0.05, f"quanto: quantizing to {config.weights}")
    quanto.quantize(model, weights=qtype, include=names)
    modules = dict(model.named_modules())
    qlinears = [(name, modules[name]) for name in names]
    for name, module in qlinears:
        if not isinstance(module, quanto.QModuleMixin):
            raise ConfigError(f"quanto: '{name}' ({type(module).__name__}) was not converted by quanto.")
        if config.group_size is not None and config.weights != "int8":
            # quanto picks the group size in QLinear's constructor; freezing reads it from this attribute.
            module.weight_group_size = None if config.group_size == -1 else config.group_size
    with torch.no_grad():
        for i, (_, module) in enumerate(ctx.progress.iter(qlinears, desc="quanto")):
            with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
                warnings.simplefilter("ignore")
                module.freeze()
            module.wb_storage_bytes = storage_bytes(module)
            module.wb_quant = {
                "method": "quanto",
                "bits": config.bits,
                "group_size": module.weight_group_size or -1,
            }
    ctx.progress.update(1.0, "quanto: done")
    return model


__all__ = ["QuantoConfig", "storage_bytes"]
