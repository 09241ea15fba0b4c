"""bitsandbytes through transformers' ``BitsAndBytesConfig``: LLM.int8, NF4 and FP4, with real packed storage.

transformers quantizes while it loads a checkpoint, and a pipeline step receives a model already in memory, so
the step writes the current weights to a temporary safetensors folder and loads them back with the
quantization config (the temporary folder is removed afterwards). This keeps any earlier step of the pipeline
(distillation, pruning), works for every architecture transformers can load, and leaves exactly the modules
bitsandbytes itself creates (``Linear4bit``, ``Linear8bitLt``) running its own kernels. The modules transformers
leaves in full precision stay so (the output head and any weight tied to it). On the demo model the round trip
costs about a second on the CPU. Works on the CPU (bitsandbytes >= 0.45) and on CUDA.

Each quantized module reports ``wb_storage_bytes``, the bytes of its quantized weight as bitsandbytes holds and
saves it, summed from the actual tensors right after loading:

    nf4 / fp4      packed codes (two 4-bit codes per byte) + absmax (one fp32 per block of 64 weights)
    + double_quant absmax stored as uint8 codes instead, + one fp32 absmax per 256 of them + the fp32 offset
    int8           int8 codes (one byte per weight) + SCB (one fp32 scale per output row)

The 256-entry code tables are constants shared by every layer and are not counted. On a CPU with AVX512-BF16,
bitsandbytes repacks a 4-bit weight for its CPU kernel on the first forward pass (same packed bytes; the absmax
becomes bf16 and double quantization is expanded); saving converts it back, so the count above is the stored size.
"""

from __future__ import annotations

import contextlib
import io
import logging
import shutil
import tempfile
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch

from workbench.errors import ConfigError
from workbench.models import packed_weight_bytes
from workbench.techniques.base import ApplyContext, register
from workbench.techniques.space import declare_space

MODES = ("nf4", "fp4", "int8")
COMPUTE_DTYPES = ("float32", "bfloat16", "float16")
INSTALL_HINT = "pip install 'efficiency-workbench[quant]'"


@dataclass(frozen=True)
class BnbConfig:
    """bitsandbytes weight quantization of the decoder's linear layers (real packed storage)."""

    mode: str = field(
        default="nf4",
        metadata={
            "help": "'nf4' or 'fp4' (4 bits, blocks of 64 weights, one absmax each) or 'int8' (LLM.int8: int8 "
            "weights with one scale per row, activation outliers above `int8_threshold` multiplied in fp16).",
            "choices": MODES,
        },
    )
    double_quant: bool = field(
        default=False,
        metadata={
            "help": "nf4/fp4 only: also quantize the absmax constants to 8 bits (saves ~0.37 bits per "
            "weight)."
        },
    )
    compute_dtype: str = field(
        default="float32",
        metadata={
            "help": "dtype of the matmuls. bitsandbytes computes in the input's dtype when that is fp32 or bf16, "
            "so the unquantized parts (embeddings, norms, head) are kept in this dtype too; that is what makes "
            "'bfloat16' take effect.",
            "choices": COMPUTE_DTYPES,
        },
    )
    int8_threshold: float = field(
        default=6.0,
        metadata={
            "help": "int8 only: outlier threshold of LLM.int8 (6.0 as in the paper; 0 turns the "
            "decomposition off)."
        },
    )

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ConfigError(f"bnb: mode={self.mode!r} is unknown; choose one of {', '.join(MODES)}.")
        if self.compute_dtype not in COMPUTE_DTYPES:
            raise ConfigError(
                f"bnb: compute_dtype={self.compute_dtype!r} is unknown; choose one of {', '.join(COMPUTE_DTYPES)}."
            )
        if self.double_quant and self.mode == "int8":
            raise ConfigError(
                "bnb: double_quant applies to nf4 and fp4 only; set double_quant=False for int8."
            )
        if (
            isinstance(self.int8_threshold, bool)
            or not isinstance(self.int8_threshold, (int, float))
            or not (self.int8_threshold >= 0)
        ):
            raise ConfigError(
                f"bnb: int8_threshold={self.int8_threshold!r} must be a number >= 0 (6.0 is usual)."
            )
        if self.mode != "int8" and self.int8_threshold != 6.0:
            raise ConfigError(
                f"bnb: int8_threshold applies to mode='int8' only, not {self.mode!r}; leave it at 6.0."
            )

    @property
    def bits(self) -> int:
        """Bits per stored weight code (scales come on top: see ``wb_storage_bytes``)."""
        return 8 if self.mode == "int8" else 4

    def label(self) -> str:
        """``bnb nf4``, ``bnb nf4 dq bf16``, ``bnb int8 t=0.0``: the format, then what differs from the defaults."""
        parts = ["bnb", self.mode]
        if self.double_quant:
            parts.append("dq")
        if self.compute_dtype != "float32":
            parts.append({"bfloat16": "bf16", "float16": "fp16"}.get(self.compute_dtype, self.compute_dtype))
        if self.int8_threshold != 6.0:
            parts.append(f"t={self.int8_threshold}")
        return " ".join(parts)


class _DropFp16CastNotice(logging.Filter):
    """LLM.int8 on the CPU logs "inputs will be cast ... to float16" on every call of every layer: drop that."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "will be cast from" not in str(record.msg)


_CAST_FILTER = _DropFp16CastNotice()


def import_bnb() -> Any:
    """bitsandbytes, imported lazily and quietly.

    On import it logs that the optional ``kernels`` package is missing (a faster CPU kernel it would fetch from
    the Hub); the fallback kernels work, so that notice is not shown to users.
    """
    try:
        with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            import bitsandbytes
    except ImportError:
        raise ConfigError(f"bnb needs the bitsandbytes package: {INSTALL_HINT}.") from None
    logger = logging.getLogger("bitsandbytes.autograd._functions")
    if _CAST_FILTER not in logger.filters:
        logger.addFilter(_CAST_FILTER)
    return bitsandbytes


def device_map_for(model: Any) -> str | dict[str, Any]:
    """Where transformers should put the quantized model: where the model lives now.

    A model already spread over devices by accelerate (``hf_device_map`` naming more than one) goes back through
    ``"auto"``; a model on one CUDA device goes to that device; anything on the CPU stays on the CPU.
    """
    spread = getattr(model, "hf_device_map", None)
    if isinstance(spread, dict) and len({str(v) for v in spread.values()}) > 1:
        return "auto"
    device = next(model.parameters()).device
    if device.type == "cuda":
        return {"": f"cuda:{device.index or 0}"}
    return "cpu"


def check_bnb(model: Any, config: BnbConfig) -> None:
    """Refuse, before any work, what bitsandbytes cannot do with this model here."""
    import_bnb()
    if not hasattr(model, "save_pretrained") or getattr(model, "config", None) is None:
        raise ConfigError(
            "bnb works on Hugging Face transformers models (save_pretrained / from_pretrained)."
        )
    device = next(model.parameters()).device
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(
            f"bnb: bitsandbytes has no kernels for device {device.type!r} in this workbench; move the model to "
            "'cpu' or 'cuda'."
        )
    quantizer = getattr(model, "hf_quantizer", None)
    if (
        quantizer is not None and "Gguf" not in type(quantizer).__name__
    ):  # GGUF weights are already dequantized
        raise ConfigError(
            f"bnb: the model is already quantized ({type(quantizer).__name__}); apply bnb to a float model."
        )
    for name, module in model.named_modules():
        if getattr(module, "wb_quant", None) is not None and module.__class__.__module__.startswith(
            ("bitsandbytes", "optimum")
        ):
            raise ConfigError(f"bnb: '{name}' is already stored packed by another backend; apply bnb first.")


def storage_bytes(module: Any) -> int | None:
    """Bytes of a bitsandbytes module's quantized weight with its quantization state (None: not quantized).

    Counted by :func:`workbench.models.packed_weight_bytes`, the one rule size accounting also applies.
    """
    return packed_weight_bytes(module)


def _save_plain(model: Any, folder: str) -> None:
    """save_pretrained without a leftover quantizer (a GGUF-loaded model refuses to save while it has one)."""
    config = model.config
    had_qconfig = hasattr(config, "quantization_config")
    saved = (getattr(model, "hf_quantizer", None), getattr(config, "quantization_config", None))
    try:
        if had_qconfig:
            delattr(config, "quantization_config")
        if hasattr(model, "hf_quantizer"):
            model.hf_quantizer = None
        with contextlib.redirect_stderr(io.StringIO()):  # no "writing shards" bar in a panel or a log
            model.save_pretrained(folder, safe_serialization=True)
    finally:
        if hasattr(model, "hf_quantizer"):
            model.hf_quantizer = saved[0]
        if had_qconfig:
            config.quantization_config = saved[1]


def bnb_quantization_config(config: BnbConfig) -> Any:
    """The transformers ``BitsAndBytesConfig`` for ``config``."""
    from transformers import BitsAndBytesConfig

    if config.mode == "int8":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=float(config.int8_threshold))
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=config.mode,
        bnb_4bit_use_double_quant=config.double_quant,
        bnb_4bit_compute_dtype=getattr(torch, config.compute_dtype),
    )


# What the bit-width slider and `workbench sweep` offer (see workbench/techniques/space.py).
# nf4 rather than fp4 at 4 bits: it is the 4-bit format bitsandbytes recommends (lower error on normal weights).
declare_space("bnb", formats={8: {"mode": "int8"}, 4: {"mode": "nf4"}})


@register("bnb", BnbConfig, kind="quantize", check=check_bnb)
def _apply_bnb(model: Any, config: BnbConfig, ctx: ApplyContext) -> Any:
    """Save, reload quantized, return the new model (the input model is left as it was)."""
    from transformers import AutoModelForCausalLM

    bnb = import_bnb()
    qconfig = bnb_quantization_config(config)
    device_map = device_map_for(model)
    ctx.progress.update(0.05, "bnb: writing weights")
    folder = tempfile.mkdtemp(prefix="wb-bnb-")
    try:
        _save_plain(model, folder)
        ctx.progress.check()
        ctx.progress.update(0.4, f"bnb: loading as {config.mode}")
        with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            quantized = AutoModelForCausalLM.from_pretrained(
                folder,
                quantization_config=qconfig,
                device_map=device_map,
                dtype=getattr(torch, config.compute_dtype),
                use_safetensors=True,
            )
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    quantized.eval()
    for module in quantized.modules():
        if isinstance(module, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)):
            size = storage_bytes(module)
            if size is not None:
                module.wb_storage_bytes = size
                module.wb_quant = {
                    "method": "bnb",
                    "mode": config.mode,
                    "bits": config.bits,
                    "double_quant": config.double_quant,
                }
    ctx.progress.update(1.0, "bnb: done")
    return quantized


__all__ = ["BnbConfig", "bnb_quantization_config", "device_map_for", "storage_bytes"]
