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
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from workbench.anatomy import ExpertTensor, anatomy
from workbench.errors import ConfigError

ZERO_POINTS = ("float", "int")


def validate_common(name: str, bits: int, group_size: int, zero_point: str = "float") -> None:
    if not isinstance(bits, int) or isinstance(bits, bool):
        raise ConfigError(f"{name}: bits={bits!r} is not a whole number; choose 2 to 8.")
    if not 2 <= bits <= 8:
        raise ConfigError(f"{name}: bits={bits} is out of range; choose 2 to 8.")
    if not isinstance(group_size, int) or (group_size != -1 and group_size < 2):
        raise ConfigError(
            f"{name}: group_size={group_size} must be -1 (per-channel) or at least 2, e.g. 32 or 64."
        )
    if zero_point not in ZERO_POINTS:
        raise ConfigError(f"{name}: zero_point={zero_point!r} must be one of {', '.join(ZERO_POINTS)}.")


def decoder_linears(model: nn.Module) -> Iterator[tuple[str, nn.Linear]]:
    """The linear layers inside the decoder blocks: what weight-only quantizers change by default.

    Read from :func:`workbench.anatomy.anatomy`: attention, dense MLP, shared-expert and per-expert linears.
    Embeddings and the output head are left out (they are options of each technique); MoE routers and the
    shared-expert gate stay in full precision, as every MoE quantizer keeps them.
    """
    for name, module in anatomy(model).modules(model):
        if isinstance(module, nn.Linear):
            yield name, module


def fused_expert_tensors(model: nn.Module) -> list[tuple[str, nn.Module, str, nn.Parameter, ExpertTensor]]:
    """Routed-expert weights stored fused (one tensor for all experts), with the anatomy's description of each:
    (name, owning module, parameter name, parameter, :class:`~workbench.anatomy.ExpertTensor`).

    Layouts differ (``[E, out, in]``, transposed ``[E, in, out]``, DBRX's flattened ``[E*F, H]``), but each
    expert's slice is an ordinary (out, in) weight (``spec.matrices(param)[e]``), so quantizers treat the tensor
    as (E·out, in) rows, grouped along each expert's input. Biases are not included.
    """
    found = []
    for _, spec in anatomy(model).expert_tensors():
        owner, _, pname = spec.name.rpartition(".")
        module = model.get_submodule(owner)
        param = getattr(module, pname)
        if isinstance(param, torch.Tensor) and param.is_floating_point():
            found.append((spec.name, module, pname, param, spec))
    return found


def fused_experts(model: nn.Module) -> list[tuple[str, nn.Module, str, nn.Parameter]]:
    """:func:`fused_expert_tensors` without the description: (name, module, parameter name, parameter).

    They are most of an MoE model's weights, so leaving them out would make sizes meaningless.
    """
    return [(label, module, pname, param) for label, module, pname, param, _ in fused_expert_tensors(model)]


def expert_rows(spec: ExpertTensor) -> tuple[int, int]:
    """The (rows, in) shape a fused expert tensor is quantized as: every expert's (out, in) rows stacked."""
    return spec.n_experts * spec.out_features, spec.in_features


def divisors_for_all(widths: list[int]) -> list[int]:
    """Group sizes (≥ 16) that divide every width, for the message that names what works."""
    if not widths:
        return []
    g = math.gcd(*widths)
    return [d for d in range(16, g + 1) if g % d == 0]


def check_group_size(
    name: str, model: nn.Module, group_size: int, modules: list[tuple[str, nn.Module]] | None = None
) -> None:
    """Refuse a group size that does not divide some layer's input width, naming it and what would work."""
    if group_size == -1:
        return
    modules = modules if modules is not None else list(decoder_linears(model))
    if not modules:
        raise ConfigError(f"{name}: found no decoder linear layers to quantize in {type(model).__name__}.")
    named = [(layer, m.weight.shape[1]) for layer, m in modules]
    named += [(label, spec.in_features) for label, _, _, _, spec in fused_expert_tensors(model)]
    widths = [w for _, w in named]
    for layer, width in named:
        if width % group_size:
            ok = ", ".join(str(d) for d in divisors_for_all(widths))
            raise ConfigError(
                f"{name}: group_size={group_size} does not divide in_features={width} of '{layer}'. "
                f"Group sizes that divide every layer: {ok or 'none'}, or -1 for per-channel."
            )


def quant_params(
    w: torch.Tensor, bits: int, symmetric: bool, zero_point: str = "float", *, stored: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero per group (last dimension of ``w``): the grid :func:`quantize_groups_` rounds onto.

    - symmetric (llama.cpp's Q*_0 rule): the signed value of largest magnitude maps exactly onto the code
      -2^(b-1); the scale may be negative, which puts the grid's extra negative code on the side that needs it.
      ``zero`` is 0.
    - asymmetric, ``zero_point="float"`` (Q4_1-style): ``zero`` is the group minimum as a float, scale =
      (max - min) / (2^b - 1); min and max are both exactly on the grid.
    - asymmetric, ``zero_point="int"`` (the GPTQ/AWQ checkpoint form): the range is widened to include 0, and
      ``zero`` is the integer code z = round(-min / scale) in [0, 2^b - 1], so 0.0 is exactly representable.

    Scales and float minimums are rounded to the fp16 the packed format stores, unless ``stored=False`` (grid
    detection asks whether weights lie on a grid at all, whatever precision its parameters were kept in).
    """
    keep = _as_stored if stored else (lambda t: t)
    if symmetric:
        half = 2 ** (bits - 1)
        idx = w.abs().argmax(-1, keepdim=True)
        scale = keep(w.gather(-1, idx).div_(-half))
        scale = torch.where(scale.abs() < _FP16_TINY, torch.full_like(scale, _FP16_TINY), scale)
        return scale, torch.zeros_like(scale)
    qmax = 2**bits - 1
    wmin = w.amin(-1, keepdim=True)
    wmax = w.amax(-1, keepdim=True)
    if zero_point == "int":
        wmin.clamp_(max=0)
        wmax.clamp_(min=0)
    scale = keep((wmax - wmin).div_(qmax)).clamp_(min=_FP16_TINY)
    if zero_point == "int":
        return scale, torch.round(-wmin / scale).clamp_(0, qmax)
    return scale, keep(wmin)


# The smallest positive fp16 (subnormal): a scale of exactly zero would divide by zero.
_FP16_TINY = 2.0**-24


def _as_stored(t: torch.Tensor) -> torch.Tensor:
    """``t`` rounded to the fp16 that the packed format stores (scales and minimums are counted as fp16 in
    :func:`packed_bytes`), so simulated quality is what a kernel reading the packed weights computes. As in
    llama.cpp, codes are then chosen against the stored values."""
    return t.to(torch.float16).to(t.dtype)


def quantize_groups_(
    w: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    bits: int,
    symmetric: bool,
    zero_point: str = "float",
) -> torch.Tensor:
    """Round ``w`` (…, group) onto the grid of :func:`quantize_params` and dequantize, in place.

    In-place arithmetic matters for speed: a fresh 100 MB temporary per step costs more (page faults) than the
    arithmetic itself, which is what keeps RTN of a 135M model well under a second.
    """
    if symmetric:
        half = 2 ** (bits - 1)
        return w.div_(scale).round_().clamp_(-half, half - 1).mul_(scale)
    qmax = 2**bits - 1
    if zero_point == "int":  # the reference quantizer: q = clamp(round(w / s) + z), w' = s (q - z)
        return w.div_(scale).round_().add_(zero).clamp_(0, qmax).sub_(zero).mul_(scale)
    return w.sub_(zero).div_(scale).round_().clamp_(0, qmax).mul_(scale).add_(zero)


def quantize_groups(
    w: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    bits: int,
    symmetric: bool,
    zero_point: str = "float",
) -> torch.Tensor:
    """Out-of-place :func:`quantize_groups_`."""
    return quantize_groups_(w.clone(), scale, zero, bits, symmetric, zero_point)


# Rows per step of fake_quantize_: about 64k weights (256 KB in float32) stay in cache through all the steps.
_CHUNK = 65536


def fake_quantize_(
    weight: torch.Tensor, bits: int, group_size: int, symmetric: bool = False, zero_point: str = "float"
) -> torch.Tensor:
    """Quantize then dequantize a (out, in) weight group-wise, in place; returns ``weight``."""
    out_f, in_f = weight.shape
    g = in_f if group_size == -1 else group_size
    rows = max(1, _CHUNK // in_f)
    with torch.no_grad():
        for r in range(0, out_f, rows):
            part = weight[r : r + rows]
            w = part if part.dtype == torch.float32 else part.float()
            w3 = w.view(-1, in_f // g, g)
            scale, zero = quant_params(w3, bits, symmetric, zero_point)
            quantize_groups_(w3, scale, zero, bits, symmetric, zero_point)
            if w is not part:
                part.copy_(w)
    return weight


def fake_quantize(
    weight: torch.Tensor, bits: int, group_size: int, symmetric: bool = False, zero_point: str = "float"
) -> torch.Tensor:
    """Out-of-place :func:`fake_quantize_`: a new tensor of the same shape and dtype."""
    return fake_quantize_(weight.detach().clone(), bits, group_size, symmetric, zero_point)


def packed_bytes(
    shape: tuple[int, int], bits: int, group_size: int, symmetric: bool, zero_point: str = "float"
) -> int:
    """Bytes a packed (out, in) weight takes: codes + fp16 scales + zero points (see module docstring)."""
    out_f, in_f = shape
    n = out_f * in_f
    n_groups = out_f * (1 if group_size == -1 else in_f // group_size)
    total = math.ceil(n * bits / 8) + 2 * n_groups
    if not symmetric:
        total += 2 * n_groups if zero_point == "float" else math.ceil(n_groups * bits / 8)
    return total


def mark_quantized(
    module: nn.Module, bits: int, group_size: int, symmetric: bool, zero_point: str, method: str
) -> None:
    """Record what a module's weight now is, for size accounting and for later steps of a pipeline."""
    shape = tuple(module.weight.shape)
    module.wb_storage_bytes = packed_bytes(shape, bits, group_size, symmetric, zero_point)  # type: ignore[assignment]
    module.wb_quant = {
        "method": method,
        "bits": bits,
        "group_size": group_size,
        "symmetric": symmetric,
        "zero_point": zero_point,
    }  # type: ignore[assignment]


def embedding_modules(
    model: nn.Module, include_embeddings: bool, include_head: bool
) -> list[tuple[str, list[nn.Module]]]:
    """The embedding-like weights asked for, one entry per distinct tensor: (label, modules sharing it).

    Small models often tie the output head to the token embedding (SmolLM2, the demo model, does). A tied pair
    is one tensor, so quantizing either quantizes both: it appears once, labelled "embed_tokens = lm_head", and
    both modules are marked so that size accounting (which counts a tied tensor once) sees the packed size.
    """
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    names = {id(m): n for n, m in model.named_modules()}
    tied = emb is not None and head is not None and head.weight is emb.weight
    found: list[tuple[str, list[nn.Module]]] = []
    if tied and (include_embeddings or include_head):
        found.append(
            (f"{names.get(id(emb), 'embed_tokens')} = {names.get(id(head), 'lm_head')}", [emb, head])
        )
        return found
    if include_embeddings and emb is not None:
        found.append((names.get(id(emb), "embed_tokens"), [emb]))
    if include_head and head is not None:
        found.append((names.get(id(head), "lm_head"), [head]))
    return found


def check_embedding_groups(
    name: str, model: nn.Module, group_size: int, include_embeddings: bool, include_head: bool
) -> None:
    """Refuse a group size that does not divide the embedding/head width, before any work."""
    if group_size == -1:
        return
    for label, modules in embedding_modules(model, include_embeddings, include_head):
        width = modules[0].weight.shape[1]
        if width % group_size:
            raise ConfigError(
                f"{name}: group_size={group_size} does not divide the width {width} of '{label}'. "
                f"Pick a group size that divides {width}, or -1 for per-channel."
            )


def quantize_embeddings_from_config_(model: nn.Module, config: Any, method: str) -> None:
    """:func:`quantize_embeddings_` with the embedding options every weight quantizer's config carries."""
    quantize_embeddings_(
        model,
        config.embedding_bits,
        config.group_size,
        config.symmetric,
        config.zero_point,
        config.include_embeddings,
        config.include_head,
        method,
    )


def quantize_embeddings_(
    model: nn.Module,
    bits: int,
    group_size: int,
    symmetric: bool,
    zero_point: str,
    include_embeddings: bool,
    include_head: bool,
    method: str,
) -> None:
    """Round-to-nearest for the embedding and/or head (calibrated methods also use RTN here, as llama.cpp and
    the GPTQ/AWQ references leave these to a plain per-row quantizer)."""
    for _, modules in embedding_modules(model, include_embeddings, include_head):
        fake_quantize_(modules[0].weight.data, bits, group_size, symmetric, zero_point)
        for module in modules:
            mark_quantized(module, bits, group_size, symmetric, zero_point, method)


def quantize_fused_experts_(
    model: nn.Module,
    bits: int,
    group_size: int,
    symmetric: bool,
    zero_point: str,
    method: str,
    bits_for: Callable[[str], int] | None = None,
) -> int:
    """Round-to-nearest for the fused expert tensors of :func:`fused_expert_tensors`, in place; returns how many.

    Their packed sizes go to ``module.wb_param_storage_bytes`` (parameter name → bytes), since one module holds
    several such tensors. ``bits_for(name)`` may choose bits per tensor (mixed precision).
    """
    count = 0
    for label, module, pname, param, spec in fused_expert_tensors(model):
        b = bits_for(label) if bits_for is not None else bits
        # (E, out, in): a view; contiguous for the usual [E, out, in] and flattened w1/v1 layouts, strided for
        # transposed ones ([E, in, out]; DBRX's w2), which are quantized in a copy and written back.
        mats = spec.matrices(param.data)
        rows = mats.view(-1, spec.in_features) if mats.is_contiguous() else mats.reshape(-1, spec.in_features)
        fake_quantize_(rows, b, group_size, symmetric, zero_point)
        if not mats.is_contiguous():  # rows is a copy: write it back
            mats.copy_(rows.view(mats.shape))
        stored = dict(getattr(module, "wb_param_storage_bytes", {}))
        stored[pname] = packed_bytes(expert_rows(spec), b, group_size, symmetric, zero_point)
        module.wb_param_storage_bytes = stored  # type: ignore[assignment]
        module.wb_quant = {
            "method": method,
            "bits": b,
            "group_size": group_size,
            "symmetric": symmetric,
            "zero_point": zero_point,
        }  # type: ignore[assignment]
        count += 1
    return count
