"""Memory checks before loading: what the weights will take, read from file headers or configs, against free RAM."""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path
from typing import Any

import torch

from workbench.errors import ConfigError


def check_fits_in_memory(n_bytes: int, what: str = "", *, factor: float = 1.2) -> None:
    """Refuse, before loading, a model whose weights (plus working room) exceed the free memory.

    Checking first turns an out-of-memory kill of the whole kernel into a message the user can act on.
    """
    import psutil

    free = int(psutil.virtual_memory().available)
    need = int(n_bytes * factor)
    if need > free:
        name = f"model {what}" if what else "the model"
        raise ConfigError(
            f"{name[0].upper()}{name[1:]} needs ~{need / 2**30:.1f} GiB but {free / 2**30:.1f} GiB is free. "
            "Pick a smaller model, load it in bfloat16 (dtype='bfloat16'), or close other work to free memory."
        )


def _safetensors_dense_bytes(files: list[Path], dtype: torch.dtype) -> int:
    """Bytes the weights take once loaded in ``dtype``, read from the safetensors headers (no tensor is read)."""
    size = torch.finfo(dtype).bits // 8
    total = 0
    for file in files:
        try:
            with open(file, "rb") as fh:
                (length,) = struct.unpack("<Q", fh.read(8))
                header = json.loads(fh.read(length))
        except (OSError, ValueError, struct.error):
            total += file.stat().st_size  # unreadable header: the file size is the best guess left
            continue
        for name, info in header.items():
            if name == "__metadata__":
                continue
            n = math.prod(info.get("shape", [])) if info.get("shape") else 1
            floating = str(info.get("dtype", "")).startswith(("F", "BF"))
            total += n * size if floating else n * _ST_SIZES.get(info.get("dtype"), 1)
    return total


_ST_SIZES = {"I64": 8, "U64": 8, "I32": 4, "U32": 4, "I16": 2, "U16": 2, "I8": 1, "U8": 1, "BOOL": 1}


def _gguf_dense_bytes(path: Path, dtype: torch.dtype) -> int:
    """Bytes a GGUF's tensors take dequantized to ``dtype`` (shapes read from the file; no data read)."""
    size = torch.finfo(dtype).bits // 8
    try:
        from gguf import GGUFReader

        reader = GGUFReader(str(path))
        return int(sum(int(t.n_elements) for t in reader.tensors) * size)
    except Exception:  # noqa: BLE001 - an unreadable GGUF fails clearly at load; this is only an estimate
        return path.stat().st_size * 8 * size // 4  # ~4 bits per stored weight


def _estimate_params(config: Any, trust_remote_code: bool) -> int:
    """Parameters of a model built from ``config`` on the meta device (no memory used), or a formula."""
    try:
        from transformers import AutoModelForCausalLM

        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
        return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    except Exception:  # noqa: BLE001, S110 - an unknown architecture: fall back to the usual decoder formula
        pass
    try:
        h = config.hidden_size
        layers = config.num_hidden_layers
        inter = getattr(config, "intermediate_size", 4 * h)
        experts = getattr(config, "num_local_experts", None) or getattr(config, "num_experts", None) or 1
        return int(layers * (4 * h * h + 3 * h * inter * experts) + 2 * config.vocab_size * h)
    except (AttributeError, TypeError):
        return 0
