"""The torch packed runtime: the variant's decoder linears converted to torchao's packed low-bit kernels.

A deploy step (``torch_packed``, the last step of a pipeline): it converts every decoder linear of the model
the earlier steps produced, in process, and returns that model, so the ordinary evaluation measures quality,
speed and memory of the packed kernels on this machine. Three kinds (torchao 0.18):

    int4          weight-only int4, asymmetric, group-wise (32, 64 or 128): torchao's prototype
                  ``Int4OpaqueTensor`` (CPU tinygemm kernel ``_weight_int4pack_mm_for_cpu``); codes packed two
                  per byte, plus one (scale, zero) pair per group in the compute dtype
    int8          weight-only int8, symmetric, one fp32 scale per output row (or per group): ``Int8Tensor``
    int8_dynamic  int8 weights (per row) and activations quantized per token at run time: int8 x int8 matmul

**What the packed weights are.** torchao does not take the variant's codes: it re-quantizes the variant's float
weights with its own grid (int4: min/max asymmetric over each group, scale and zero in the compute dtype; int8:
absmax per row). A variant already simulated at 4 bits is therefore quantized a second time. Where torchao's
grid contains the variant's (a 4-bit float-minimum variant at the same group size: both put the group's
minimum and maximum on the end codes) the packed weights equal the variant's up to rounding; elsewhere they
differ by up to half a step of the coarser grid. The step measures this, for every converted linear, against
the weights it received: ``packed_max_abs_diff`` (largest absolute difference) and ``packed_rel_error``
(Frobenius norm of the difference over the norm of the variant's weights, all converted linears together) are
stage metrics of the run. The packed weights are read back from the packed tensors (``dequantize()``; the int4
tensor, which has none, is unpacked here, its layout learned from the packing op, and checked in the tests
against the kernel's own product with the identity matrix). These cover the weights only:
``int8_dynamic`` also rounds every activation to int8, which shows in the run's quality metrics, not here.

**Size.** Each converted linear reports ``wb_storage_bytes``, the bytes of the plain tensors inside its packed
weight (codes, scales, zero points; :func:`workbench.models.packed_weight_bytes`), which is also what
``torch.save`` writes for it. Quantized tensors this runtime does not convert (embeddings, fused MoE experts)
run as float here, so their simulated packed sizes are dropped and they count their float bytes.

**Speed** is measured, not assumed: torchao's int4 CPU kernel is tuned for bfloat16 (``dtype="bfloat16"``); in
float32 it prefilled the demo model 38x slower than the float model on the development machine, and int8
weight-only converts its int8 codes to float on every call (docs/deployment.md has the numbers). The run's
speed metrics show what the machine it runs on does.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from workbench.errors import ConfigError
from workbench.models import packed_weight_bytes
from workbench.techniques._quant import decoder_linears
from workbench.techniques.base import ApplyContext, register

KINDS = ("int4", "int8", "int8_dynamic")
DTYPES = ("float32", "bfloat16")
INT4_GROUP_SIZES = (32, 64, 128)  # what Int4OpaqueTensor accepts
INT4_ROW_MULTIPLE = 16  # _convert_weight_to_int4pack_for_cpu: "expect N to be dividable by 16"
INSTALL_HINT = "pip install torchao (or pip install 'efficiency-workbench[deploy]')"
# The group size each kind takes when none is given: int4 at 32, the workbench's default grid (a default 4-bit
# variant then lands on nearly the same grid); int8 per output row, the layout torchao's fast int8 paths use.
DEFAULT_GROUP = {"int4": 32, "int8": -1, "int8_dynamic": -1}
# Rows of the identity matrix per probe when reading back an int4 weight through its kernel.
_PROBE_ROWS = 1024


@dataclass(frozen=True)
class TorchPackedConfig:
    """Run the variant with torchao's packed kernels (int4 / int8 weight-only, int8 dynamic), in process."""

    RUNTIME: ClassVar[str] = "torch packed"

    kind: str = field(
        default="int8",
        metadata={
            "help": "'int4' (weight-only, group-wise, packed two codes per byte), 'int8' (weight-only, int8 codes "
            "with one scale per row or group) or 'int8_dynamic' (int8 weights and per-token int8 activations).",
            "choices": KINDS,
        },
    )
    group_size: int | None = field(
        default=None,
        metadata={
            "help": "Input weights sharing one scale. int4: 32, 64 or 128 (default 32); int8: -1 (per output "
            "row, the default) or a group size dividing every layer's width; int8_dynamic: -1 only."
        },
    )
    dtype: str = field(
        default="float32",
        metadata={
            "help": "Compute dtype of the packed model: 'float32', or 'bfloat16' (torchao's int4 CPU kernel is "
            "tuned for it; the rest of the model is cast too).",
            "choices": DTYPES,
        },
    )

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ConfigError(
                f"torch_packed: kind={self.kind!r} is unknown; choose one of {', '.join(KINDS)}."
            )
        if self.dtype not in DTYPES:
            raise ConfigError(
                f"torch_packed: dtype={self.dtype!r} is unknown; choose one of {', '.join(DTYPES)}."
            )
        g = self.group_size
        if g is None:  # resolved here, so that equal settings are one pipeline in the registry
            object.__setattr__(self, "group_size", DEFAULT_GROUP[self.kind])
            return
        if not isinstance(g, int) or isinstance(g, bool):
            raise ConfigError(f"torch_packed: group_size={g!r} must be a whole number.")
        if self.kind == "int4" and g not in INT4_GROUP_SIZES:
            raise ConfigError(
                f"torch_packed: group_size={g} is not one torchao's int4 kernel takes; choose "
                f"{', '.join(map(str, INT4_GROUP_SIZES))}."
            )
        if self.kind == "int8_dynamic" and g != -1:
            raise ConfigError(
                f"torch_packed: int8_dynamic quantizes weights per output row; group_size={g} is not "
                "supported, use -1 (or kind='int8' for group-wise int8)."
            )
        if self.kind == "int8" and g != -1 and g < 2:
            raise ConfigError(f"torch_packed: group_size={g} must be -1 (per row) or at least 2, e.g. 64.")

    @property
    def bits(self) -> int:
        return 4 if self.kind == "int4" else 8

    def label(self) -> str:
        """``torch int4 g32``, ``torch int8``, ``torch int8 g64``, ``torch int8-dyn bf16``."""
        parts = ["torch", "int8-dyn" if self.kind == "int8_dynamic" else self.kind]
        if self.kind == "int4" or self.group_size != -1:
            parts.append(f"g{self.group_size}")
        if self.dtype != "float32":
            parts.append("bf16")
        return " ".join(parts)


def import_torchao() -> Any:
    """torchao, imported quietly (it logs every optional CUDA/SM90 extension it cannot load on a CPU build)."""
    # torch's own log handler holds the real stderr: its pytree notices about torchao's enums are muted by level.
    pytree = logging.getLogger("torch.utils._pytree")
    level = pytree.level
    try:
        pytree.setLevel(logging.ERROR)
        with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            import torchao
            import torchao.quantization
    except ImportError:
        raise ConfigError(f"torch_packed needs the torchao package: {INSTALL_HINT}.") from None
    finally:
        pytree.setLevel(level)
    return torchao


def torchao_config(config: TorchPackedConfig) -> Any:
    """The torchao config for ``config`` (inductor settings left alone: nothing here is compiled)."""
    import_torchao()
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, Int8WeightOnlyConfig
    from torchao.quantization.granularity import PerGroup, PerRow

    if config.kind == "int4":
        from torchao.prototype.quantization.int4 import PrototypeInt4WeightOnlyConfig

        return PrototypeInt4WeightOnlyConfig(group_size=config.group_size, set_inductor_config=False)
    if config.kind == "int8":
        granularity = PerRow() if config.group_size == -1 else PerGroup(config.group_size)
        return Int8WeightOnlyConfig(granularity=granularity, set_inductor_config=False)
    return Int8DynamicActivationInt8WeightConfig(granularity=PerRow(), set_inductor_config=False)


def check_torch_packed(model: Any, config: TorchPackedConfig) -> None:
    """Refuse, before any work, what the packed kernels cannot take: missing torchao, shapes, devices."""
    import_torchao()
    linears = list(decoder_linears(model))
    if not linears:
        raise ConfigError(
            f"torch_packed: found no decoder linear layers to convert in {type(model).__name__}."
        )
    for name, lin in linears:
        data = lin.weight.data
        if type(data) is not torch.Tensor or not data.is_floating_point():
            raise ConfigError(
                f"torch_packed: '{name}' is already stored packed ({type(data).__name__}, "
                f"{type(lin).__module__}); run torch_packed on a float or simulated variant instead."
            )
        if config.kind == "int4" and data.device.type != "cpu":
            raise ConfigError(
                f"torch_packed: torchao's int4 kernel here runs on the CPU; '{name}' is on {data.device}. "
                "Load the model on the CPU, or choose kind='int8'."
            )
        if config.kind == "int4" and lin.out_features % INT4_ROW_MULTIPLE:
            raise ConfigError(
                f"torch_packed: torchao's int4 CPU packing takes output rows in multiples of "
                f"{INT4_ROW_MULTIPLE}; '{name}' has out_features={lin.out_features}. Choose kind='int8'."
            )
        width = lin.in_features
        if config.group_size != -1 and width % config.group_size:
            ok = [g for g in (INT4_GROUP_SIZES if config.kind == "int4" else (32, 64, 128)) if width % g == 0]
            hint = f"{', '.join(map(str, ok))}" if ok else "none of 32, 64, 128"
            more = "" if config.kind == "int4" else ", or -1 for per-row"
            raise ConfigError(
                f"torch_packed: group_size={config.group_size} does not divide in_features={width} of "
                f"'{name}'. Group sizes that divide it: {hint}{more}."
            )


_INT4_LAYOUTS: dict[tuple[int, int], torch.Tensor] = {}


def _int4_layout(n: int, k: int) -> torch.Tensor:
    """Where each weight's 4-bit code sits in a CPU int4-packed (n, k) weight: for weight (row r, column c), at
    flat position r·k + c, the index of its nibble (low then high nibble of each packed byte).

    The packing (``_convert_weight_to_int4pack_for_cpu``) interleaves rows and columns in blocks; rather than
    restate that layout, it is read from the op itself: codes that spell each weight's row and column base 16,
    digit by digit, are packed and read back. Learned once per shape.
    """
    key = (n, k)
    if key not in _INT4_LAYOUTS:

        def origin(values: torch.Tensor) -> torch.Tensor:  # per packed nibble: the value its weight had
            out, place, rest = torch.zeros(n * k, dtype=torch.int64), 1, values.clone()
            while True:
                digit = (rest % 16).to(torch.int32).contiguous()
                packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(digit, 1)
                out += torch.stack([packed & 0xF, packed >> 4], -1).flatten().to(torch.int64) * place
                rest, place = rest // 16, place * 16
                if not bool(rest.any()):
                    return out

        rows = torch.arange(n).view(n, 1).expand(n, k)
        cols = torch.arange(k).view(1, k).expand(n, k)
        source = origin(rows) * k + origin(cols)  # the flat (row, column) of every packed nibble
        layout = torch.empty(n * k, dtype=torch.int64)
        layout[source] = torch.arange(n * k)
        _INT4_LAYOUTS[key] = layout
    return _INT4_LAYOUTS[key]


def _int4_weight(w: Any) -> torch.Tensor | None:
    """An int4 weight-only ``Int4OpaqueTensor`` unpacked from its own tensors: codes q (0..15) and per group a
    scale s and zero z (``scale_and_zero``, (K/g, N, 2)), w = (q - 8) · s + z in the tensor's dtype, as torchao's
    tinygemm dequantization computes it. None for any other tensor."""
    if type(w).__name__ != "Int4OpaqueTensor" or getattr(w, "act_mapping_type", None) is not None:
        return None
    n, k = w.shape
    g = int(w.block_size[-1])
    nibbles = torch.stack([w.qdata & 0xF, w.qdata >> 4], -1).flatten().to(torch.int64)
    q = nibbles[_int4_layout(n, k)].view(n, k // g, g)
    sz = w.scale_and_zero
    scale, zero = sz[..., 0].t()[..., None], sz[..., 1].t()[..., None]  # (N, K/g, 1)
    return ((q.to(sz.dtype) - 8) * scale + zero).view(n, k).float()


def _probe_weight(linear: nn.Linear) -> torch.Tensor:
    """The (out, in) weight a linear's kernel computes with, read through the kernel: its product with the
    identity matrix (in blocks of rows), in float32."""
    w = linear.weight
    out_f, in_f = linear.out_features, linear.in_features
    rows = []
    with torch.no_grad():
        for start in range(0, in_f, _PROBE_ROWS):
            n = min(_PROBE_ROWS, in_f - start)
            eye = torch.zeros(n, in_f, dtype=w.dtype, device=w.device)
            eye[torch.arange(n), torch.arange(start, start + n)] = 1
            rows.append(nn.functional.linear(eye, w).float())  # (n, out): columns start.. of W, transposed
    return torch.cat(rows, 0).t().reshape(out_f, in_f)


def _kernel_weight(linear: nn.Linear) -> torch.Tensor:
    """The (out, in) weight the packed kernel computes with, in float32: the tensor's own ``dequantize()``, the
    int4 tensor unpacked (it has none), else read through the kernel (:func:`_probe_weight`)."""
    w = linear.weight
    unpacked = _int4_weight(w.data)
    if unpacked is not None:
        return unpacked
    dequantize = getattr(w, "dequantize", None)
    if callable(dequantize):
        try:
            return dequantize().float()
        except (NotImplementedError, RuntimeError, TypeError):
            pass
    return _probe_weight(linear)


def _cast_rest_(model: nn.Module, converted: set[int], dtype: torch.dtype) -> None:
    """Cast every floating parameter and buffer outside the converted linears to ``dtype`` (``model.to`` would
    also reach the packed tensors, which do not all implement a dtype change)."""
    for module in model.modules():
        if id(module) in converted:
            continue
        for name, param in list(module.named_parameters(recurse=False)):
            if param.is_floating_point() and param.dtype != dtype:
                param.data = param.data.to(dtype)
        for name, buf in list(module.named_buffers(recurse=False)):
            if buf is not None and buf.is_floating_point() and buf.dtype != dtype:
                module._buffers[name] = buf.to(dtype)
    if getattr(model, "config", None) is not None:
        model.config.dtype = dtype


def _drop_simulated_sizes_(model: nn.Module, converted: set[int]) -> list[str]:
    """Quantized tensors left unconverted run as float here: drop their simulated packed sizes; their names."""
    left = []
    for name, module in model.named_modules():
        if id(module) in converted:
            continue
        had = False
        for attr in ("wb_storage_bytes", "wb_param_storage_bytes"):
            if attr in module.__dict__:
                delattr(module, attr)
                had = True
        if had:
            left.append(name)
    return left


# No stacking preview is needed: a deploy step is always the pipeline's last.
@register("torch_packed", TorchPackedConfig, kind="deploy", check=check_torch_packed)
def _apply_torch_packed(model: Any, config: TorchPackedConfig, ctx: ApplyContext) -> Any:
    """Convert each decoder linear in place and measure how far the packed weights are from the variant's."""
    aoconfig = torchao_config(config)  # imports torchao quietly first
    from torchao.quantization import quantize_

    dtype = getattr(torch, config.dtype)
    linears = list(decoder_linears(model))
    parents = {name: model.get_submodule(name.rpartition(".")[0]) for name, _ in linears}
    converted: set[int] = set()
    max_diff, diff_sq, ref_sq, exact, packed_total = 0.0, 0.0, 0.0, 0, 0
    simulated_bits = {}
    t0 = time.perf_counter()
    for name, lin in ctx.progress.iter(linears, desc=f"torch_packed {config.kind}"):
        ref = lin.weight.detach().float().clone()  # the variant's weight, as the earlier steps left it
        quant = getattr(lin, "wb_quant", None)
        if isinstance(quant, dict) and "bits" in quant:
            simulated_bits[name] = quant["bits"]
        with torch.no_grad():
            if lin.weight.dtype != dtype:
                lin.to(dtype)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                quantize_(parents[name], aoconfig, filter_fn=lambda m, _fqn, target=lin: m is target)
        packed = parents[name].get_submodule(name.rpartition(".")[2])  # the same module: converted in place
        if type(packed.weight.data) is torch.Tensor:
            raise ConfigError(
                f"torch_packed: torchao left '{name}' ({tuple(ref.shape)}) unconverted at {config.label()}; "
                "its shape is not one the kernel takes."
            )
        diff = _kernel_weight(packed) - ref
        max_diff = max(max_diff, float(diff.abs().max()))
        diff_sq += float(diff.double().pow(2).sum())
        ref_sq += float(ref.double().pow(2).sum())
        exact += int(bool((diff == 0).all()))
        size = packed_weight_bytes(packed)
        packed.wb_storage_bytes = int(size if size is not None else 0)
        packed.wb_quant = {
            "method": "torch_packed",
            "kind": config.kind,
            "bits": config.bits,
            "group_size": config.group_size,
            "symmetric": config.kind != "int4",
            "zero_point": "float" if config.kind == "int4" else "none",
            "dtype": config.dtype,
        }
        packed_total += packed.wb_storage_bytes
        converted.add(id(packed))
        del ref, diff
    if dtype != torch.float32:
        _cast_rest_(model, converted, dtype)
    left_float = _drop_simulated_sizes_(model, converted)
    ctx.metrics["packed_linears"] = len(converted)
    ctx.metrics["packed_exact_linears"] = exact
    ctx.metrics["packed_max_abs_diff"] = max_diff
    ctx.metrics["packed_rel_error"] = math.sqrt(diff_sq / ref_sq) if ref_sq > 0 else 0.0
    ctx.metrics["packed_weight_bytes"] = packed_total
    ctx.metrics["convert_seconds"] = time.perf_counter() - t0
    ctx.extras["torch_packed"] = {
        "runtime": TorchPackedConfig.RUNTIME,
        "kind": config.kind,
        "group_size": config.group_size,
        "dtype": config.dtype,
        "torchao": getattr(import_torchao(), "__version__", "?"),
        # Requantized from weights an earlier step had simulated at these bits (empty: a float variant).
        "simulated_bits": sorted(set(simulated_bits.values())),
        # Quantized by an earlier step but not by this runtime (embeddings, fused experts): float here.
        "float_here": left_float,
    }
    model.eval()
    return model


__all__ = ["DTYPES", "KINDS", "TorchPackedConfig", "check_torch_packed", "import_torchao", "torchao_config"]
