"""Fingerprints: what the weights are (names, shapes, dtypes, values), not where they came from."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from torch import nn

from workbench.models.demo import demo_home


def fingerprint(model: nn.Module) -> str:
    """Identifies the weights (names, shapes, dtypes, values), not where they came from: 16 hex digits."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        if not isinstance(tensor, torch.Tensor):
            continue
        t = tensor.detach()
        if type(t) is not torch.Tensor and hasattr(
            t, "__tensor_flatten__"
        ):  # quanto & co: hash the inner parts
            inner, _ = t.__tensor_flatten__()
            parts = [(f"{name}.{n}", getattr(t, n)) for n in inner]
        else:
            parts = [(name, t)]
        for part_name, part in parts:
            # Same bytes whatever the shape; flattening only lets 0-d tensors be viewed as bytes too.
            p = part.detach().cpu().contiguous().reshape(-1)
            h.update(f"{part_name}|{tuple(part.shape)}|{part.dtype}".encode())
            h.update(p.view(torch.uint8).numpy().tobytes() if p.dtype != torch.bool else p.numpy().tobytes())
    return h.hexdigest()[:16]


def _cached_fingerprint(model: nn.Module, files: list[Path], dtype: str) -> str:
    """Hashing 0.5 GB takes a second or two: for weights read from files, remember it by the files' size+mtime.

    The record lives beside the files when that folder is writable (the demo copy), else under demo_home().
    """
    files = [f for f in files if f.is_file()]
    if not files:
        return fingerprint(model)
    stats = [f.stat() for f in files]
    key = "|".join(f"{f.name}:{s.st_size}:{s.st_mtime_ns}" for f, s in zip(files, stats)) + f"|{dtype}"
    folder = files[0].parent
    records = [folder / "wb-fingerprint.json", demo_home() / "fingerprints.json"]
    record_key = f"{folder.resolve()}|{key}"
    for record in records:
        try:
            known = json.loads(record.read_text())
        except (OSError, ValueError):
            continue
        if record_key in known:
            return str(known[record_key])
    fp = fingerprint(model)
    for record in records:
        try:
            known = json.loads(record.read_text()) if record.is_file() else {}
        except (OSError, ValueError):
            known = {}
        known[record_key] = fp
        try:
            record.parent.mkdir(parents=True, exist_ok=True)
            tmp = record.with_name(f".{record.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(known, indent=1))
            os.replace(tmp, record)
            break
        except OSError:
            continue  # a read-only model folder: try the cache folder; failing both only costs the hash again
    return fp
