"""Memory checks before loading: what the weights will take, read from file headers or configs, against free RAM."""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
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


# ---- GGUF headers ------------------------------------------------------------------------------------------
# Layout (https://github.com/ggml-org/ggml/blob/master/docs/gguf.md, versions 2 and 3): magic "GGUF", u32
# version, u64 tensor count, u64 key/value count, the key/value pairs, then per tensor its name, u32 n_dims,
# u64 dims, u32 ggml type and u64 offset into the data section, which starts at the next multiple of
# `general.alignment` (default 32). The file must reach the end of the tensor that ends last.

_GGUF_SCALARS = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}  # value type -> bytes
_GGUF_STRING, _GGUF_ARRAY, _GGUF_U32 = 8, 9, 4
_AGAIN = "Download or copy it again."  # how a user gets a whole copy of their own file


class _Cut(Exception):
    """The header ends before what it describes."""


class GGUFFileError(ConfigError):
    """A GGUF file that cannot be read as one (cut short, or not GGUF at all): ``problem`` says what, ``fix``
    how to get a whole copy (a user's own file: download or copy it again; the demo's: reinstall)."""

    def __init__(self, path: Path, problem: str, fix: str = _AGAIN) -> None:
        self.path, self.problem, self.fix = Path(path), problem, fix
        super().__init__(f"{self.path.name} {problem} {fix}")

    def with_fix(self, fix: str) -> GGUFFileError:
        return GGUFFileError(self.path, self.problem, fix)


@dataclass(frozen=True)
class GGUFLayout:
    """What a GGUF file's header says about it (read without touching the tensor data)."""

    file_size: int
    data_offset: int
    expected_size: int | None  # where the last tensor ends; None when a tensor type is unknown here
    n_elements: int  # weights in all tensors

    @property
    def complete(self) -> bool:
        return self.expected_size is None or self.file_size >= self.expected_size


class _Header:
    def __init__(self, buf: Any, size: int) -> None:
        self.buf, self.size, self.pos, self.order = buf, size, 0, "<"

    def take(self, fmt: str) -> Any:
        n = struct.calcsize(self.order + fmt)
        if self.pos + n > self.size:
            raise _Cut
        values = struct.unpack_from(self.order + fmt, self.buf, self.pos)
        self.pos += n
        return values[0] if len(values) == 1 else values

    def skip(self, n: int) -> None:
        if self.pos + n > self.size:
            raise _Cut
        self.pos += n

    def string(self) -> bytes:
        n = self.take("Q")
        if self.pos + n > self.size:
            raise _Cut
        self.pos += n
        return bytes(self.buf[self.pos - n : self.pos])

    def value(self, kind: int) -> Any:
        if kind in _GGUF_SCALARS:
            code = {1: "B", 2: "H", 4: "I", 8: "Q"}[_GGUF_SCALARS[kind]]
            return self.take(code)
        if kind == _GGUF_STRING:
            self.skip(self.take("Q"))
            return None
        if kind == _GGUF_ARRAY:
            item, count = self.take("I"), self.take("Q")
            if item in _GGUF_SCALARS:  # fixed-size items: jump over them
                self.skip(count * _GGUF_SCALARS[item])
            else:
                for _ in range(count):
                    self.value(item)
            return None
        raise ValueError(f"unknown GGUF value type {kind}")


def gguf_layout(path: str | Path) -> GGUFLayout | None:
    """The header of a GGUF file: where its data starts, how large it must be, how many weights it holds.

    None for a file this reader does not know (GGUF version 1, an unknown value type): the loader judges it.

    Raises:
        GGUFFileError: the file does not start with ``GGUF``, or ends inside its own header (a cut download).
    """
    import mmap

    try:
        from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType
    except ImportError:
        return None  # without the gguf package the loader cannot read the file either, and says so

    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as fh:
        magic = fh.read(4)
        if magic != b"GGUF":
            if len(magic) < 4 and b"GGUF".startswith(magic):
                raise _incomplete(path, size, None)
            raise GGUFFileError(path, "is not a GGUF file (it does not start with 'GGUF').")
        buf = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
        try:
            head = _Header(buf, size)
            head.skip(4)
            version = head.take("I")
            if version & 0xFFFF == 0:  # written on a big-endian machine
                head.order, head.pos = ">", 4
                version = head.take("I")
            if version not in (2, 3):
                return None
            n_tensors, n_kv = head.take("Q"), head.take("Q")
            alignment = 32
            for _ in range(n_kv):
                key = head.string()
                kind = head.take("I")
                value = head.value(kind)
                if key == b"general.alignment" and kind == _GGUF_U32 and value:
                    alignment = int(value)
            tensors = []
            for _ in range(n_tensors):
                head.string()
                n_dims = head.take("I")
                dims = [head.take("Q") for _ in range(n_dims)]
                kind, offset = head.take("I"), head.take("Q")
                tensors.append((dims, kind, offset))
            data_offset = -(-head.pos // alignment) * alignment
        except _Cut:
            raise _incomplete(path, size, None) from None
        except (ValueError, OverflowError, struct.error):
            return None
        finally:
            buf.close()
    end, n_elements, known = 0, 0, True
    for dims, kind, offset in tensors:
        count = math.prod(dims)
        n_elements += count
        try:
            block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(kind)]
        except (ValueError, KeyError):
            known = False
            continue
        end = max(end, offset + count // block * type_size)
    return GGUFLayout(size, data_offset, data_offset + end if known else None, n_elements)


def _incomplete(path: Path, size: int, expected: int | None) -> GGUFFileError:
    if expected is None:
        said = f"its {size:,} bytes end inside the GGUF header"
    else:
        said = f"it has {size:,} bytes, but its header promises {expected:,} ({100 * size / expected:.0f}%)"
    return GGUFFileError(path, f"is incomplete: {said}; an interrupted download or copy?")


def check_gguf_complete(path: str | Path) -> GGUFLayout | None:
    """Refuse (ConfigError, one line: the file's name, its size and the size its header promises) a GGUF file
    cut short, before anything tries to read its tensors; returns its layout (None: a format left to the
    loader).

    Raises:
        GGUFFileError: cut short (in its header or its data) or not a GGUF file.
    """
    try:
        layout = gguf_layout(path)
    except OSError as err:
        raise GGUFFileError(Path(path), f"cannot be read: {err.strerror or err}.") from None
    if layout is not None and not layout.complete:
        assert layout.expected_size is not None
        raise _incomplete(Path(path), layout.file_size, layout.expected_size)
    return layout


def _gguf_dense_bytes(path: Path, dtype: torch.dtype) -> int:
    """Bytes a GGUF's tensors take dequantized to ``dtype`` (shapes read from the header; no data read).

    Raises:
        GGUFFileError: the file is cut short or not a GGUF file (:func:`check_gguf_complete`).
    """
    size = torch.finfo(dtype).bits // 8
    layout = check_gguf_complete(path)
    if layout is None:
        return Path(path).stat().st_size * 8 * size // 4  # a format not read here: ~4 bits per stored weight
    return layout.n_elements * size


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
