"""Teacher logit stores: the teacher's next-token targets on the training windows, computed once and kept on disk.

Running the teacher costs about as much as the student's own forward and backward pass (live-teacher KD is
~1.9x slower per step on the demo model). A store pays that once per (teacher, text, settings) and every later
run on the same windows reads it back (memory-mapped), as the base-output cache does for evaluation.

Two kinds, per scored position:

- ``topk``: the teacher's ``k`` largest logits (float16) and their ids (int32), 6·k bytes a token (384 for
  k=64). At training time ``softmax(values / T)`` over the k ids is the target: *biased*, since the tail's mass
  is moved onto the top k (which hurts calibration; "sparse logit sampling", ACL 2025).
- ``sampled``: ``draws`` ids drawn with replacement from the teacher's distribution at temperature T, kept as
  distinct ids with their frequencies (float32). The empirical distribution's expectation is the teacher's,
  so the target is *unbiased*; ~12 draws match full distillation in that paper.

Entries live in ``demo_home()/teacher_logits/<key>``, written to a temporary folder and renamed into place, so
a concurrent process sees a complete entry or none.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from workbench.progress import Progress

FORMAT = 1  # bump when the layout changes; old entries are then simply not found
STORE_KINDS = ("topk", "sampled")


def weights_digest(model: nn.Module) -> str:
    """A content hash of a model's tensors (names, shapes, dtypes and values): equal weights, equal digest."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        flat = t.detach().reshape(-1)
        # Sums over the whole tensor plus a strided sample of raw values: a change anywhere moves the sums.
        h.update(np.float64(flat.double().sum().item()).tobytes())
        h.update(np.float64(flat.double().abs().sum().item()).tobytes())
        step = max(1, flat.numel() // 64)
        h.update(flat[::step].float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def ids_digest(ids: torch.Tensor) -> str:
    return hashlib.sha256(ids.to(torch.int64).cpu().numpy().tobytes()).hexdigest()[:16]


def store_root() -> Path:
    """``demo_home()/teacher_logits`` (``$WORKBENCH_HOME`` or the user cache folder)."""
    from workbench.models import demo_home

    return Path(demo_home()) / "teacher_logits"


@dataclass
class TeacherStore:
    """Sparse teacher targets for ``(N, S)`` windows: ``ids`` and ``weights`` are ``(N, S, k)``.

    ``topk``: weights are the raw logits (turned into probabilities at the training temperature); ``sampled``:
    weights are the drawn ids' frequencies (0 for a repeated slot), already at the store's temperature.
    """

    kind: str
    ids: np.ndarray
    weights: np.ndarray
    temperature: float
    folder: Path | None = None

    @property
    def k(self) -> int:
        return int(self.ids.shape[-1])

    @property
    def bytes_per_token(self) -> int:
        return int(self.ids.shape[-1] * (self.ids.itemsize + self.weights.itemsize))

    def targets(self, rows: torch.Tensor, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
        """``(ids, probs)`` for windows ``rows``: what :func:`~workbench.distill.losses.sparse_forward_kl` takes."""
        index = rows.cpu().numpy()
        ids = torch.from_numpy(np.asarray(self.ids[index], dtype=np.int64))
        w = torch.from_numpy(np.asarray(self.weights[index], dtype=np.float32))
        if self.kind == "topk":
            return ids, torch.softmax(w / temperature, dim=-1)
        return ids, w


def _sample(
    logits: torch.Tensor, draws: int, temperature: float, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """``draws`` ids from softmax(logits / T) per row of ``(R, V)``, as (ids, frequencies) with repeats at 0."""
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    drawn = torch.multinomial(probs, draws, replacement=True, generator=gen)  # (R, draws)
    drawn = drawn.sort(dim=-1).values
    first = torch.ones_like(drawn, dtype=torch.bool)
    first[:, 1:] = drawn[:, 1:] != drawn[:, :-1]
    group = first.long().cumsum(-1) - 1  # the distinct id each slot belongs to
    counts = torch.zeros_like(drawn, dtype=torch.float32).scatter_add_(
        -1, group, torch.ones_like(drawn, dtype=torch.float32)
    )
    freq = torch.where(first, counts.gather(-1, group), torch.zeros_like(counts)) / draws
    return drawn, freq


def _entry_key(
    teacher_digest: str, windows: torch.Tensor, kind: str, k: int, temperature: float, seed: int
) -> str:
    settings = {
        "teacher": teacher_digest,
        "ids": ids_digest(windows),
        "shape": list(windows.shape),
        "kind": kind,
        "k": k,
        "format": FORMAT,
    }
    if kind == "sampled":  # only the sampled store depends on T and the seed; top-k logits are raw
        settings.update(temperature=float(temperature), seed=int(seed))
    return f"{kind}{k}-" + hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:20]


def write_entry(folder: Path, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
    """Store a cache entry so that it is complete or absent: arrays and ``meta.json`` (written last, the mark of
    a complete entry) go to a temporary folder beside ``folder``, renamed into place; when another process stored
    the same entry first, theirs is kept."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=".tmp-"))
    try:
        for name, array in arrays.items():
            np.save(tmp / name, array)
        (tmp / "meta.json").write_text(json.dumps(meta))
        try:
            os.rename(tmp, folder)
        except OSError:  # another process stored the same entry first: keep theirs
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@torch.no_grad()
def build_store(
    teacher: nn.Module,
    windows: torch.Tensor,
    *,
    kind: str = "topk",
    k: int = 64,
    temperature: float = 1.0,
    seed: int = 0,
    root: Path | None = None,
    batch_size: int = 4,
    progress: Progress | None = None,
    teacher_digest: str | None = None,
) -> TeacherStore:
    """The store of ``kind`` for ``windows`` ``(N, S)``: read from disk when computed before, else computed."""
    if kind not in STORE_KINDS:
        raise ValueError(f"Unknown store kind {kind!r}; choose one of {', '.join(STORE_KINDS)}.")
    progress = progress if progress is not None else Progress.null()
    root = Path(root) if root is not None else store_root()
    digest = teacher_digest or weights_digest(teacher)
    folder = root / _entry_key(digest, windows, kind, k, temperature, seed)
    if (folder / "meta.json").is_file():
        return TeacherStore(
            kind,
            np.load(folder / "ids.npy", mmap_mode="r"),
            np.load(folder / "weights.npy", mmap_mode="r"),
            temperature,
            folder,
        )
    n, s = windows.shape
    ids = np.zeros((n, s, k), dtype=np.int32)
    weights = np.zeros((n, s, k), dtype=np.float16 if kind == "topk" else np.float32)
    gen = torch.Generator().manual_seed(seed)
    device = next(teacher.parameters()).device
    for start in range(0, n, batch_size):
        progress.update(start / n, f"teacher logits {start}/{n} windows")
        batch = windows[start : start + batch_size]
        logits = teacher(input_ids=batch.to(device), use_cache=False).logits.float().cpu()  # (B, S, V)
        if kind == "topk":
            top = torch.topk(logits, k, dim=-1)
            ids[start : start + len(batch)] = top.indices.numpy()
            weights[start : start + len(batch)] = top.values.to(torch.float16).numpy()
        else:
            drawn, freq = _sample(logits.reshape(-1, logits.shape[-1]), k, temperature, gen)
            ids[start : start + len(batch)] = drawn.reshape(len(batch), s, k).numpy()
            weights[start : start + len(batch)] = freq.reshape(len(batch), s, k).numpy()
    progress.update(1.0, "teacher logits stored")
    meta = {
        "kind": kind,
        "k": k,
        "temperature": temperature,
        "seed": seed,
        "windows": [n, s],
        "teacher": digest,
        "format": FORMAT,
    }
    write_entry(folder, {"ids.npy": ids, "weights.npy": weights}, meta)
    return TeacherStore(kind, ids, weights, temperature, folder)


def store_bias(
    store: TeacherStore, teacher_logits: torch.Tensor, rows: torch.Tensor, temperature: float
) -> float:
    """Mean total-variation distance between the store's targets and the full teacher distribution on ``rows``
    (``teacher_logits`` ``(R, S, V)``): 0 for an exact target; top-k's value is the tail mass it drops."""
    ids, probs = store.targets(rows, temperature)
    full = torch.softmax(teacher_logits.float() / temperature, dim=-1)
    sparse = torch.zeros_like(full).scatter_add_(-1, ids, probs)
    return float(0.5 * (full - sparse).abs().sum(-1).mean())


__all__ = [
    "STORE_KINDS",
    "TeacherStore",
    "build_store",
    "ids_digest",
    "store_bias",
    "store_root",
    "weights_digest",
]
