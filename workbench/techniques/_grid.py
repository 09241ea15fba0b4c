"""The fields every weight-grid quantizer shares (rtn, gptq, awq, mixed), validated in one place.

These four store the same packed format (group-wise codes, an fp16 scale per group, a zero point unless
symmetric; see :mod:`workbench.techniques._quant`) and offer the same embedding/head options, so they take the
same parameters and must refuse the same bad values with the same words: before this base class each config
validated on its own, and ``gptq`` accepted ``embedding_bits=12`` that ``rtn`` refused. A config subclasses
:class:`WeightGridConfig`, names itself in ``technique`` (for messages), adds its own fields after the shared
ones and, when it has more to check, calls ``super().__post_init__()`` first.

Field names and defaults are those the configs always had: stored pipelines (JSON in the registry) name them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar

from workbench.errors import ConfigError
from workbench.techniques._quant import ZERO_POINTS

BITS_MIN, BITS_MAX = 2, 8  # below 2 bits a group has one level; above 8 the packed format saves nothing


def _help(text: str, **extra: Any) -> dict[str, Any]:
    return {"help": text, **extra}


@dataclass(frozen=True)
class WeightGridConfig:
    """Group-wise weight-only quantization onto a uniform grid (the fields rtn, gptq, awq and mixed share)."""

    technique: ClassVar[str] = "grid"  # the registered name, used in every message

    bits: int = field(default=4, metadata=_help(f"Bits per weight code, {BITS_MIN} to {BITS_MAX}."))
    group_size: int = field(
        default=32,
        metadata=_help(
            "Input weights sharing one scale (and zero point); -1 is one group per output row (per-channel). "
            "32 matches the demo model's native Q4_1 grid; it must divide every quantized layer's width."
        ),
    )
    symmetric: bool = field(
        default=False,
        metadata=_help(
            "No zero point: codes centred on 0 (llama.cpp's Q*_0 rule). False stores a zero point per group "
            "in the form `zero_point` names."
        ),
    )
    zero_point: str = field(
        default="float",
        metadata=_help(
            "Asymmetric form: 'float' (an fp16 minimum per group, as llama.cpp's Q4_1) or 'int' (an integer "
            "zero point of `bits` bits, as GPTQ/AWQ checkpoints store it). Ignored when symmetric.",
            choices=ZERO_POINTS,
        ),
    )
    include_embeddings: bool = field(
        default=False,
        metadata=_help(
            "Also quantize the token embedding (round to nearest, same group size, at `embedding_bits`); a "
            "head tied to it (the demo model's) is quantized with it."
        ),
    )
    include_head: bool = field(
        default=False,
        metadata=_help(
            "Also quantize the output head at `embedding_bits` (when tied to the embedding: the embedding "
            "with it)."
        ),
    )
    embedding_bits: int = field(
        default=8,
        metadata=_help(
            f"Bits for the embedding and head, {BITS_MIN} to {BITS_MAX} (8 keeps their error small; they are "
            "a large share of a small model's weights)."
        ),
    )

    def __post_init__(self) -> None:
        validate_grid(self)

    def grid_label(self) -> str:
        """``4b g32``, ``3b per-channel sym``, ``4b g64 int-zero +emb8``: the grid and what it covers."""
        parts = [f"{self.bits}b", "per-channel" if self.group_size == -1 else f"g{self.group_size}"]
        if self.symmetric:
            parts.append("sym")
        elif self.zero_point != "float":
            parts.append(f"{self.zero_point}-zero")  # the asymmetric form other than the default fp16 minimum
        covered = [n for n, on in (("emb", self.include_embeddings), ("head", self.include_head)) if on]
        if covered:
            parts.append("+" + "+".join(covered) + str(self.embedding_bits))
        return " ".join(parts)

    def label(self) -> str:
        """``rtn 4b g64 sym``; a method's own settings follow as ``name=value`` when changed from the default
        (``gptq 3b g64 act_order=False``), so two different runs never share a label."""
        shared = {f.name for f in dataclasses.fields(WeightGridConfig)}
        extras = [
            f"{f.name}={getattr(self, f.name)}"
            for f in dataclasses.fields(self)
            if f.name not in shared
            and f.default is not dataclasses.MISSING
            and getattr(self, f.name) != f.default
        ]
        return " ".join([self.technique, self.grid_label(), *extras])


def check_bits(name: str, field_name: str, value: Any) -> None:
    """A bit width: a whole number from 2 to 8 (the range every grid quantizer here packs)."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise ConfigError(
            f"{name}: {field_name}={value!r} is not a whole number; choose {BITS_MIN} to {BITS_MAX}."
        )
    if not BITS_MIN <= value <= BITS_MAX:
        raise ConfigError(f"{name}: {field_name}={value} is out of range; choose {BITS_MIN} to {BITS_MAX}.")


def _check_flag(name: str, field_name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ConfigError(f"{name}: {field_name}={value!r} must be True or False.")


def check_at_least(name: str, field_name: str, value: Any, low: int, usual: str) -> None:
    """A whole-number setting of a method (calibration windows, grid points) that must be at least ``low``."""
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ConfigError(
            f"{name}: {field_name}={value!r} must be a whole number of at least {low} ({usual})."
        )


def validate_grid(config: WeightGridConfig) -> None:
    """Refuse a bad shared field of a weight-grid config, naming the value and the fix (the one place this is
    decided; model-dependent checks such as a group size that does not divide a layer come later, in ``check``)."""
    name = config.technique
    check_bits(name, "bits", config.bits)
    gs = config.group_size
    if not isinstance(gs, int) or isinstance(gs, bool) or (gs != -1 and gs < 2):
        raise ConfigError(f"{name}: group_size={gs!r} must be -1 (per-channel) or at least 2, e.g. 32 or 64.")
    _check_flag(name, "symmetric", config.symmetric)
    if config.zero_point not in ZERO_POINTS:
        raise ConfigError(
            f"{name}: zero_point={config.zero_point!r} must be one of {', '.join(map(repr, ZERO_POINTS))}."
        )
    _check_flag(name, "include_embeddings", config.include_embeddings)
    _check_flag(name, "include_head", config.include_head)
    check_bits(name, "embedding_bits", config.embedding_bits)


__all__ = ["BITS_MAX", "BITS_MIN", "WeightGridConfig", "check_at_least", "check_bits", "validate_grid"]
