"""Size accounting: parameters and the bytes the weights really take (packed backends, simulated quantization).

Which tensors are "linear" (what weight quantizers change) comes from :mod:`workbench.anatomy`; the bytes of real
packed backends (bitsandbytes, quanto) are counted here and only here (:func:`packed_weight_bytes`).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from workbench.anatomy import anatomy, logical_weights


@dataclass(frozen=True)
class SizeReport:
    """Weights as really stored: packed quantized modules count their packed bytes (``wb_storage_bytes``)."""

    n_params: int
    n_bytes: int
    bits_per_weight: float
    linear_params: int
    linear_bytes: int
    bits_per_weight_linear: float

    @property
    def size_mb(self) -> float:
        return self.n_bytes / 1e6


def _plain_bytes(t: Any) -> int:
    """Bytes of a tensor, looking inside tensor subclasses (quanto's QTensors) at the plain tensors they hold."""
    data = t.data if isinstance(t, nn.Parameter) else t
    if type(data) is not torch.Tensor and hasattr(data, "__tensor_flatten__"):
        names, _ = data.__tensor_flatten__()
        return sum(_plain_bytes(getattr(data, n)) for n in names)
    return int(data.numel() * data.element_size())


def packed_weight_bytes(module: nn.Module) -> int | None:
    """Bytes of a real packed backend's weight, from its own tensors; None for an ordinary dense weight.

    The one place these bytes are counted (bitsandbytes' technique records this number at load time):

    - bitsandbytes ``Linear4bit`` (nf4/fp4): packed uint8 codes (two 4-bit codes per byte) + one absmax per block
      of 64 weights; with double quantization the absmax are uint8 codes instead, plus the nested fp32 absmax
      (one per 256 of them) and the fp32 offset. The 16- and 256-entry code tables are constants shared by every
      layer (bitsandbytes builds them, they are not the model's information) and are not counted.
    - bitsandbytes ``Linear8bitLt``: int8 codes + SCB (one fp32 scale per output row).
    - quanto ``QLinear``: the QTensor's inner tensors (codes, maybe packed; scales; shifts).
    """
    w = getattr(module, "weight", None)
    if w is None:
        return None
    state = getattr(w, "quant_state", None)
    if state is not None and hasattr(state, "absmax"):
        parts = [w.data, state.absmax]
        total = 0
        if getattr(state, "nested", False) and getattr(state, "state2", None) is not None:
            parts.append(state.state2.absmax)
            offset = state.offset
            total += _plain_bytes(offset) if isinstance(offset, torch.Tensor) else 4  # one fp32 either way
        return total + sum(_plain_bytes(t) for t in parts)
    if w.dtype == torch.int8 and type(module).__name__.startswith("Linear8bit"):
        scb = getattr(w, "SCB", None)
        if scb is None:
            scb = getattr(
                getattr(module, "state", None), "SCB", None
            )  # moved to the state on the first forward
        return _plain_bytes(w) + (_plain_bytes(scb) if isinstance(scb, torch.Tensor) else 0)
    data = w.data if isinstance(w, nn.Parameter) else w
    if type(data) is not torch.Tensor and hasattr(data, "__tensor_flatten__"):
        return _plain_bytes(data)
    return None


def _module_tensors(module: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """A module's own parameters and persistent buffers: what its state dict saves (rotary tables are not)."""
    yield from module.named_parameters(recurse=False)
    skip = getattr(module, "_non_persistent_buffers_set", set())
    for name, buf in module.named_buffers(recurse=False):
        if name not in skip and buf is not None:
            yield name, buf


def _storage_key(t: torch.Tensor) -> int:
    try:
        ptr = t.data_ptr()
    except (RuntimeError, AttributeError, NotImplementedError):  # meta tensors, some subclasses
        ptr = 0
    return ptr or id(t)


def size_report(model: nn.Module) -> SizeReport:
    """Parameters and the bytes they really take. Tied tensors count once; ``wb_storage_bytes`` wins.

    "Linear" means what :func:`workbench.anatomy.anatomy` lists as the decoder's linears and fused routed-expert
    weights, the ones weight quantizers change; embeddings, the output head, norms, MoE routers, shared-expert
    gates and expert biases are not in it. A model with a ``wb_size_report()`` method (a variant running in a
    runtime) reports its own.
    """
    # A variant running in a runtime (workbench.runtimes) knows its own bytes: those of the exported file.
    own = getattr(model, "wb_size_report", None)
    if callable(own):
        return own()
    anat = anatomy(model)
    linear_names = {lin.name for lin in anat.linears}
    expert_names = {spec.name for _, spec in anat.expert_tensors()}
    # storage key -> [count, bytes, linear, from_wb_storage]
    entries: dict[int, list[Any]] = {}
    for name, module in model.named_modules():
        linear_module = name in linear_names
        stored = getattr(module, "wb_storage_bytes", None)
        stored = int(stored) if isinstance(stored, (int, float)) and not isinstance(stored, bool) else None
        # Modules holding several quantized tensors (fused MoE experts) give packed bytes per parameter name.
        per_param = getattr(module, "wb_param_storage_bytes", None) or {}
        for pname, tensor in _module_tensors(module):
            is_weight = pname == "weight"
            if pname in per_param:
                count, size = tensor.numel(), int(per_param[pname])
            elif is_weight and stored is not None:
                count, size = logical_weights(module) or tensor.numel(), stored
            elif is_weight and (packed := packed_weight_bytes(module)) is not None:
                count, size = logical_weights(module) or tensor.numel(), packed
            else:
                count, size = tensor.numel(), _plain_bytes(tensor)
            linear = (linear_module and is_weight) or f"{name}.{pname}" in expert_names
            key = _storage_key(tensor)
            if key in entries:  # tied: one tensor, counted once; a packed size given by any owner wins
                entry = entries[key]
                if is_weight and stored is not None and not entry[3]:
                    entries[key] = [count, size, entry[2] or linear, True]
                continue
            entries[key] = [count, size, linear, is_weight and stored is not None]
    n_params = sum(e[0] for e in entries.values())
    n_bytes = sum(e[1] for e in entries.values())
    lin_params = sum(e[0] for e in entries.values() if e[2])
    lin_bytes = sum(e[1] for e in entries.values() if e[2])
    return SizeReport(
        n_params=n_params,
        n_bytes=n_bytes,
        bits_per_weight=8 * n_bytes / max(n_params, 1),
        linear_params=lin_params,
        linear_bytes=lin_bytes,
        bits_per_weight_linear=8 * lin_bytes / max(lin_params, 1),
    )
