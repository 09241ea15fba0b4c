"""bitsandbytes through transformers' ``BitsAndBytesConfig``: LLM.int8, NF4 and FP4, with real packed storage.

transformers quantizes while it loads a checkpoint, and a pipeline step receives a model already in memory, so
the step writes the current weights to a temporary safetensors folder and loads them back with the
quantization config: any earlier step of the pipeline (distillation, pruning) is kept, and the modules are the
ones bitsandbytes itself creates (``Linear4bit``, ``Linear8bitLt``), with its own kernels. The output head stays
in full precision, as transformers keeps it. Works on the CPU (bitsandbytes ≥ 0.45) and on CUDA.

Each quantized module reports ``wb_storage_bytes``: the bytes of its packed weight plus its quantization state
(NF4/FP4: 4-bit codes packed two per byte, one fp32 absmax per 64 weights — 8-bit with double quantization,
plus one fp32 absmax per 256 of those;
int8: one byte per weight plus one fp32 scale per output row).
"""

from __future__ import annotations

import contextlib
import io
import logging
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from typing import Any

import torch

from workbench.errors import ConfigError
from workbench.techniques.base import ApplyContext, register

MODES = ("nf4", "fp4", "int8")
COMPUTE_DTYPES = ("float32", "bfloat16", "float16")


@dataclass(frozen=True)
class BnbConfig:
    """bitsandbytes weight quantization.

    mode: "nf4" or "fp4" (4 bits, blocks of 64) or "int8" (LLM.int8 with outlier decomposition).
    double_quant: also quantize the 4-bit absmax constants (saves ~0.37 bits per weight).
    compute_dtype: dtype of the matmuls for 4-bit modes.
    int8_threshold: outlier threshold of LLM.int8 (6.0 as in the paper).
    """

    mode: str = "nf4"
    double_quant: bool = False
    compute_dtype: str = "float32"
    int8_threshold: float = 6.0

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ConfigError(f"bnb: mode={self.mode!r} is unknown; choose one of {', '.join(MODES)}.")
        if self.compute_dtype not in COMPUTE_DTYPES:
            raise ConfigError(f"bnb: compute_dtype={self.compute_dtype!r}; choose one of {', '.join(COMPUTE_DTYPES)}.")
        if self.double_quant and self.mode == "int8":
            raise ConfigError("bnb: double_quant applies to nf4 and fp4 only.")

    @property
    def bits(self) -> int:
        return 8 if self.mode == "int8" else 4


def import_bnb() -> Any:
    """bitsandbytes, imported quietly (it warns about an optional 'kernels' package on import)."""
    try:
        with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
            import bitsandbytes
    except ImportError:
        raise ConfigError(
            "bnb needs the bitsandbytes package: pip install 'efficiency-workbench[quant]'."
        ) from None
    return bitsandbytes


def _device_map(model: Any) -> str:
    """Where the quantized model goes: the model's own device (bitsandbytes has CPU and CUDA back ends)."""
    device = next(model.parameters()).device
    return "cuda:0" if device.type == "cuda" else "cpu"


def check_bnb(model: Any, config: BnbConfig) -> None:
    import_bnb()
    if not hasattr(model, "save_pretrained") or getattr(model, "config", None) is None:
        raise ConfigError("bnb works on Hugging Face transformers models (save_pretrained / from_pretrained).")
    device = next(model.parameters()).device
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"bnb: bitsandbytes has no kernels for device {device.type!r} here; use cpu or cuda.")
    if getattr(model, "is_quantized", False) and getattr(model, "hf_quantizer", None) is not None:
        quant = type(model.hf_quantizer).__name__
        if "Gguf" not in quant:
            raise ConfigError(f"bnb: the model is already quantized ({quant}); apply bnb to a float model.")


def _storage_bytes(module: Any) -> int | None:
    weight = getattr(module, "weight", None)
    state = getattr(weight, "quant_state", None)
    if state is not None:  # Params4bit
        total = weight.data.numel() * weight.data.element_size()
        total += state.absmax.numel() * state.absmax.element_size()
        if getattr(state, "state2", None) is not None:  # double quantization: absmax is 8-bit, plus its own
            total += state.state2.absmax.numel() * state.state2.absmax.element_size()
            total += 4  # the fp32 offset; the 256-entry code table is one constant shared by every layer
        return int(total)
    if weight is not None and weight.dtype == torch.int8:  # Int8Params with its row scales
        total = weight.numel()
        scb = getattr(weight, "SCB", None) if getattr(weight, "SCB", None) is not None else getattr(module.state, "SCB", None)
        if scb is not None:
            total += scb.numel() * scb.element_size()
        return int(total)
    return None


@register("bnb", BnbConfig, kind="quantize", check=check_bnb)
def _apply_bnb(model: Any, config: BnbConfig, ctx: ApplyContext) -> Any:
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    bnb = import_bnb()
    dtype = getattr(torch, config.compute_dtype)
    if config.mode == "int8":
        qconfig = BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=config.int8_threshold)
    else:
        qconfig = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=config.mode,
            bnb_4bit_use_double_quant=config.double_quant,
            bnb_4bit_compute_dtype=dtype,
        )
    ctx.progress.update(0.05, "bnb: writing weights")
    folder = tempfile.mkdtemp(prefix="wb-bnb-")
    try:
        model.config.quantization_config = None
        if hasattr(model, "hf_quantizer"):
            model.hf_quantizer = None
        with contextlib.redirect_stderr(io.StringIO()):  # no "writing shards" bar in a panel or a log
            model.save_pretrained(folder, safe_serialization=True)
        ctx.progress.update(0.4, f"bnb: loading as {config.mode}")
        with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")  # int8 on the CPU warns once per layer about fp16 inputs
            quantized = AutoModelForCausalLM.from_pretrained(
                folder,
                quantization_config=qconfig,
                device_map=_device_map(model),
                dtype=torch.float32 if config.compute_dtype == "float32" else dtype,
                use_safetensors=True,
            )
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    quantized.eval()
    for module in quantized.modules():
        if isinstance(module, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)):
            size = _storage_bytes(module)
            if size is not None:
                module.wb_storage_bytes = size
                module.wb_quant = {"method": "bnb", "mode": config.mode, "bits": config.bits}
    ctx.progress.update(1.0, "bnb: done")
    return quantized


__all__ = ["BnbConfig"]
