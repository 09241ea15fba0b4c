"""Shared pieces of the weight quantizers: group-wise fake quantization, packed-size accounting, validation.

Simulated quantization (quantize, then dequantize back to float) gives the exact numbers a packed kernel would
compute, while the size each module reports is what a packed format really takes. A quantized module carries
``wb_storage_bytes``, which :func:`workbench.models.size_report` uses instead of its dense weight's bytes:

    ceil(n_weights * bits / 8)                       the codes, packed
    + n_groups * 2                                   one fp16 scale per group
    + n_groups * 2          (zero_point="float")     one fp16 minimum per group (Q4_1-style), or
    + ceil(n_groups * bits / 8)  (zero_point="int")  one integer zero point of `bits` bits per group
                                                     (symmetric quantization stores no zero point)

A group is ``group_size`` consecutive input weights of one output row (``-1``: the whole row, per-channel).
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch import nn

from workbench.errors import ConfigError

ZERO_POINTS = ("float", "int")


def validate_common(name: str, bits: int, group_size: int, zero_point: str = "float") -> None:
    if not isinstance(bits, int) or not 2 <= bits <= 8:
        raise ConfigError(f"{name}: bits={bits} is out of range; choose 2 to 8.")
    if not isinstance(group_size, int) or (group_size != -1 and group_size < 2):
        raise ConfigError(f"{name}: group_size={group_size} must be -1 (per-channel) or at least 2, e.g. 32 or 64.")
    if zero_point not in ZERO_POINTS:
        raise ConfigError(f"{name}: zero_point={zero_point!r} must be one of {', '.join(ZERO_POINTS)}.")


def decoder_linears(model: nn.Module) -> Iterator[tuple[str, nn.Linear]]:
    """The linear layers inside the decoder blocks: what weight-only quantizers change by default.

    Embeddings and the output head are left out (they are options of each technique); MoE routers (``gate``
    producing expert scores) stay in full precision, as every MoE quantizer keeps them.
    """
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        if ".layers." not in f".{name}" and not name.startswith("layers."):
            continue
        leaf = name.rsplit(".", 1)[-1]
        if leaf in ("gate", "router", "shared_expert_gate") or name.endswith("mlp.gate"):
            continue
        yield name, module


def divisors_for_all(widths: list[int]) -> list[int]:
    """Group sizes (≥ 16) that divide every width, for the message that names what works."""
    if not widths:
        return []
    g = math.gcd(*widths)
    return [d for d in range(16, g + 1) if g % d == 0]


def check_group_size(name: str, model: nn.Module, group_size: int, modules: list[tuple[str, nn.Module]] | None = None) -> None:
    """Refuse a group size that does not divide some layer's input width, naming it and what would work."""
    if group_size == -1:
        return
    modules = modules if modules is not None else list(decoder_linears(model))
    if not modules:
        raise ConfigError(f"{name}: found no decoder linear layers to quantize in {type(model).__name__}.")
    widths = [m.weight.shape[1] for _, m in modules]
    for (layer, module), width in zip(modules, widths, strict=True):
        if width % group_size:
            ok = ", ".join(str(d) for d in divisors_for_all(widths))
            raise ConfigError(
                f"{name}: group_size={group_size} does not divide in_features={width} of '{layer}'. "
                f"Group sizes that divide every layer: {ok or 'none'}, or -1 for per-channel."
            )


def quant_params(w: torch.Tensor, bits: int, symmetric: bool, zero_point: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and offset per row of ``w`` (…, group): dequantized value = code * scale + offset.

    Symmetric: codes in [-2^(b-1), 2^(b-1)-1], offset 0, the value of largest magnitude maps onto -2^(b-1). Asymmetric with a float zero point (Q4_1-style): offset = min,
    scale = (max - min) / (2^b - 1). With an integer zero point: offset = -z * scale, z rounded to an integer.
    """
    qmax = 2**bits - 1
    if symmetric:
        # llama.cpp's Q*_0 rule: the signed value of largest magnitude maps exactly onto the code -2^(b-1);
        # the scale may be negative, which uses the grid's extra negative code on the side that needs it.
        half = 2 ** (bits - 1)
        idx = w.abs().argmax(-1, keepdim=True)
        extreme = w.gather(-1, idx)
        scale = extreme / -half
        scale = torch.where(scale.abs() < 1e-10, torch.full_like(scale, 1e-10), scale)
        return scale, torch.zeros_like(scale)
    wmin = w.amin(-1, keepdim=True).clamp_max(0) if zero_point == "int" else w.amin(-1, keepdim=True)
    wmax = w.amax(-1, keepdim=True).clamp_min(0) if zero_point == "int" else w.amax(-1, keepdim=True)
    scale = ((wmax - wmin) / qmax).clamp_min(1e-10)
    if zero_point == "int":
        z = torch.round(-wmin / scale).clamp(0, qmax)
        return scale, -z * scale
    return scale, wmin


def quantize_groups(w: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, bits: int, symmetric: bool) -> torch.Tensor:
    """Round ``w`` (…, group) onto the grid given by scale/offset and return the dequantized values."""
    if symmetric:
        half = 2 ** (bits - 1)
        q = torch.clamp(torch.round(w / scale), -half, half - 1)
        return q * scale
    q = torch.clamp(torch.round((w - offset) / scale), 0, 2**bits - 1)
    return q * scale + offset


def fake_quantize(weight: torch.Tensor, bits: int, group_size: int, symmetric: bool = False,
                  zero_point: str = "float") -> torch.Tensor:
    """Quantize then dequantize a (out, in) weight group-wise; returns a tensor of the same shape and dtype."""
    out_f, in_f = weight.shape
    g = in_f if group_size == -1 else group_size
    w = weight.detach().float().reshape(out_f, in_f // g, g)
    scale, offset = quant_params(w, bits, symmetric, zero_point)
    return quantize_groups(w, scale, offset, bits, symmetric).reshape(out_f, in_f).to(weight.dtype)


def packed_bytes(shape: tuple[int, int], bits: int, group_size: int, symmetric: bool, zero_point: str = "float") -> int:
    """Bytes a packed (out, in) weight takes: codes + fp16 scales + zero points (see module docstring)."""
    out_f, in_f = shape
    n = out_f * in_f
    n_groups = out_f * (1 if group_size == -1 else in_f // group_size)
    total = math.ceil(n * bits / 8) + 2 * n_groups
    if not symmetric:
        total += 2 * n_groups if zero_point == "float" else math.ceil(n_groups * bits / 8)
    return total


def mark_quantized(module: nn.Module, bits: int, group_size: int, symmetric: bool, zero_point: str,
                   method: str) -> None:
    """Record what a module's weight now is, for size accounting and for later steps of a pipeline."""
    shape = tuple(module.weight.shape)
    module.wb_storage_bytes = packed_bytes(shape, bits, group_size, symmetric, zero_point)  # type: ignore[assignment]
    module.wb_quant = {"method": method, "bits": bits, "group_size": group_size, "symmetric": symmetric,
                       "zero_point": zero_point}  # type: ignore[assignment]


def embedding_modules(model: nn.Module, include_head: bool) -> list[tuple[str, nn.Module]]:
    """The input embedding and, when untied and asked for, the output head."""
    found: list[tuple[str, nn.Module]] = []
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    names = {id(m): n for n, m in model.named_modules()}
    if emb is not None:
        found.append((names.get(id(emb), "embed_tokens"), emb))
    if include_head and head is not None and emb is not None and head.weight.data_ptr() != emb.weight.data_ptr():
        found.append((names.get(id(head), "lm_head"), head))
    return found
