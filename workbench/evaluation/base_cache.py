"""The base model's outputs on a suite: computed once per (base fingerprint, suite), kept on disk, memory-mapped.

What is stored, per scored token: the base's final hidden state (float32, H values: 576 for SmolLM2, so
~2.3 kB), its NLL and its top-1 token, plus the base's generations. The base's full-vocabulary distribution
is rebuilt from the hidden state by the base's own output head when a model is compared with it. That is exact
(the same head on the same numbers gives the same logits), 40x smaller than llama.cpp's ``--kl-divergence-base``
file (uint16 log-probs for every vocabulary entry: ~98 kB per token for a 49152 vocabulary, ~1 GB for the
``standard`` suite), and costs one head matrix product per scored token when KL is computed. A top-k summary
would be smaller still but is not exact: on the demo model at 2-4 bits it underestimates KL by several percent,
because quantization moves probability among tail tokens.

Models whose logits are not ``head(hidden)`` (logit soft-capping, scaled logits) fall back to the llama.cpp
layout: per token, uint16 codes of the full-vocabulary log-probabilities with a per-token minimum and step
(the step is ~1e-3 nats; KL from it agrees with the exact value to well under 1%).

Files are written into a temporary folder and renamed into place, so a concurrent process sees a complete
entry or none; two processes computing the same entry both succeed and one copy is kept. The temporary folder
names its process (:mod:`workbench.tempdirs`): one left by a killed process is removed by the next call here.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import threading
import weakref
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from workbench.evaluation.runtime import generate
from workbench.evaluation.scoring import (
    model_device,
    no_grad_for,
    row_blocks,
    score_block,
    scored_hidden,
    scored_logits,
    split_head,
)
from workbench.evaluation.suites import Suite, suite_chunks, tokenizer_id
from workbench.progress import Progress
from workbench.tempdirs import owned_tempdir, remove_leftovers

FORMAT = 3  # bump when the on-disk layout changes; old entries are then simply not found
_FLOOR = -60.0  # log-probs below this (p < 1e-26) are stored as the floor: they cannot move KL
_LRU_SIZE = 4
_TMP_PREFIX = ".tmp-"  # entries being computed; a finished one is renamed to its entry name


@dataclass
class BaseOutputs:
    """The base model's scored outputs for one suite (arrays are memory-mapped when read from disk)."""

    nll: np.ndarray  # (N,) float32: base negative log-likelihood of each scored token
    top1: np.ndarray  # (N,) int32: the base's most likely token
    generations: list[str]
    hidden: np.ndarray | None = None  # (N, H) float32: final hidden states, when the base has a split head
    codes: np.ndarray | None = None  # (N, V) uint16 fallback: log-prob = low + step * code
    low: np.ndarray | None = None  # (N,) float32
    step: np.ndarray | None = None  # (N,) float32
    folder: Path | None = field(default=None, repr=False)

    @property
    def n_tokens(self) -> int:
        return int(self.nll.shape[0])

    def logits(self, rows: slice, base_model: nn.Module | None, device: torch.device) -> torch.Tensor:
        """Base logits (up to a per-row constant) for ``rows``, as ``(R, V)`` on ``device``."""
        if self.hidden is not None:
            parts = split_head(base_model) if base_model is not None else None
            if parts is None:
                raise ValueError("Stored base hidden states need the base model's output head.")
            head = parts[1]
            weight = head.weight
            hidden = torch.from_numpy(
                np.array(self.hidden[rows], dtype=np.float32)
            )  # a writable copy of the rows
            return head(hidden.to(device=weight.device, dtype=weight.dtype)).to(device)
        assert self.codes is not None and self.low is not None and self.step is not None
        return decode_log_probs(self.codes[rows], self.low[rows], self.step[rows]).to(device)


def encode_log_probs(logp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """uint16 codes, per-row minimum and step for ``(N, V)`` log-probs, as llama.cpp stores its KL base."""
    logp = logp.float().clamp_min(_FLOOR)
    low = logp.amin(-1)
    step = ((logp.amax(-1) - low) / 65535).clamp_min(1e-12)
    codes = torch.round((logp - low[:, None]) / step[:, None]).clamp(0, 65535).to(torch.int32)
    return codes.to(torch.uint16), low, step


def decode_log_probs(codes: np.ndarray, low: np.ndarray, step: np.ndarray) -> torch.Tensor:
    """Inverse of :func:`encode_log_probs`, renormalised (rounding leaves the sum slightly off 1)."""
    logp = torch.from_numpy(np.asarray(codes).astype(np.float32))
    logp.mul_(torch.from_numpy(np.array(step, dtype=np.float32))[:, None])
    logp.add_(torch.from_numpy(np.array(low, dtype=np.float32))[:, None])
    return logp - torch.logsumexp(logp, dim=-1, keepdim=True)


# ---- where entries live ----------------------------------------------------------------------------------------


def cache_root() -> Path:
    """``demo_home()/base_outputs`` (``$WORKBENCH_HOME`` or the user cache folder)."""
    try:
        from workbench.models import demo_home

        return Path(demo_home()) / "base_outputs"
    except ImportError:
        return Path(os.environ.get("WORKBENCH_HOME") or tempfile.gettempdir()) / "base_outputs"


def _entry_name(fingerprint: str, suite: Suite, tokenizer: Any) -> str:
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in fingerprint)[:64]
    return f"{safe}-{suite.name}-{suite.base_key}-{tokenizer_id(tokenizer)}-v{FORMAT}"


_ARRAYS = ("nll", "top1", "hidden", "codes", "low", "step")


def _load(folder: Path, expected_rows: int) -> BaseOutputs | None:
    try:
        meta = json.loads((folder / "meta.json").read_text())
        if meta.get("format") != FORMAT or meta.get("rows") != expected_rows:
            return None
        arrays = {
            n: np.load(folder / f"{n}.npy", mmap_mode="r") for n in _ARRAYS if (folder / f"{n}.npy").exists()
        }
        return BaseOutputs(generations=list(meta.get("generations", [])), folder=folder, **arrays)
    except (OSError, ValueError, KeyError, TypeError):
        return None  # missing or half-deleted entry: compute it again


def _publish(tmp: Path, final: Path) -> Path:
    """Rename the finished temporary folder into place; if another process won the race, keep theirs."""
    try:
        os.replace(tmp, final)  # atomic for a folder onto a missing or empty one
        return final
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        return final


# ---- computing ------------------------------------------------------------------------------------------------


def _compute(
    base_model: nn.Module,
    tokenizer: Any,
    suite: Suite,
    chunks: torch.Tensor,
    folder: Path,
    progress: Progress,
) -> BaseOutputs:
    """Run the base over the suite once, writing memory-mapped arrays into ``folder`` as it goes."""
    start, per_chunk = suite.score_start, suite.scored_per_chunk
    n_chunks = chunks.shape[0]
    rows = n_chunks * per_chunk
    parts = split_head(base_model)
    head = parts[1] if parts is not None else None
    open_mm = np.lib.format.open_memmap
    nll = open_mm(folder / "nll.npy", mode="w+", dtype=np.float32, shape=(rows,))
    top1 = open_mm(folder / "top1.npy", mode="w+", dtype=np.int32, shape=(rows,))
    hidden = codes = low = step = None
    if head is not None:
        hidden = open_mm(folder / "hidden.npy", mode="w+", dtype=np.float32, shape=(rows, head.in_features))
    device = model_device(base_model)
    offset = 0
    with no_grad_for(base_model):
        for b in range(0, n_chunks, suite.batch_size):
            progress.update(b / n_chunks, f"base model: chunk {b + 1}/{n_chunks}")
            batch = chunks[b : b + suite.batch_size]
            targets = batch[:, start + 1 :].reshape(-1)
            h = scored_hidden(base_model, batch, start) if head is not None else None
            full = scored_logits(base_model, batch, start) if h is None else None
            n = targets.shape[0]
            if hidden is not None and h is not None:
                hidden[offset : offset + n] = h.float().cpu().numpy()
            vocab = head.out_features if head is not None else full.shape[-1]  # type: ignore[union-attr]
            for r in row_blocks(n, vocab):
                logits = head(h[r]) if h is not None else full[r]  # type: ignore[index,misc]
                res = score_block(logits, targets[r])
                nll[offset + r.start : offset + r.stop] = res.nll.numpy()
                top1[offset + r.start : offset + r.stop] = res.top1.int().numpy()
                if full is not None:
                    if codes is None:  # (rows, V) uint16 can be ~1 GB: on disk from the start
                        codes = open_mm(folder / "codes.npy", mode="w+", dtype=np.uint16, shape=(rows, vocab))
                        low = open_mm(folder / "low.npy", mode="w+", dtype=np.float32, shape=(rows,))
                        step = open_mm(folder / "step.npy", mode="w+", dtype=np.float32, shape=(rows,))
                    c, lo, st = encode_log_probs(torch.log_softmax(logits.float(), -1))
                    sl = slice(offset + r.start, offset + r.stop)
                    codes[sl], low[sl], step[sl] = c.cpu().numpy(), lo.cpu().numpy(), st.cpu().numpy()  # type: ignore[index]
            offset += n
            del h, full
    progress.update(1.0, "base model: generations")
    gens = (
        generate(base_model, tokenizer, suite.n_generations, suite.new_tokens) if suite.n_generations else []
    )
    for arr in (nll, top1, hidden, codes, low, step):
        if arr is not None:
            arr.flush()
    (folder / "meta.json").write_text(
        json.dumps(
            {
                "format": FORMAT,
                "rows": rows,
                "suite": suite.name,
                "suite_base_key": suite.base_key,
                "device": str(device),
                "generations": gens,
            }
        )
    )
    return BaseOutputs(
        nll=nll, top1=top1, generations=gens, hidden=hidden, codes=codes, low=low, step=step, folder=folder
    )


# ---- the cache ------------------------------------------------------------------------------------------------

_LRU: OrderedDict[str, tuple[BaseOutputs, Any]] = OrderedDict()
_LOCK = threading.Lock()
COMPUTED: list[str] = []  # entry names computed in this process, in order (tests read it)


def clear_memory_cache() -> None:
    """Forget the in-memory entries (the next call reads the disk copy, as a new process would)."""
    with _LOCK:
        _LRU.clear()


def base_outputs(
    base_model: nn.Module,
    tokenizer: Any,
    suite: Suite,
    *,
    base_fingerprint: str | None = None,
    progress: Progress | None = None,
) -> BaseOutputs:
    """The base model's outputs on ``suite``: from memory, from disk, or computed once and stored.

    Without a fingerprint the outputs cannot be recognised in another process, so they are kept for this
    base model object only, in a private temporary folder removed when they are forgotten.
    """
    progress = progress or Progress.null()
    chunks = suite_chunks(tokenizer, suite)
    rows = chunks.shape[0] * suite.scored_per_chunk
    if base_fingerprint:
        name = _entry_name(base_fingerprint, suite, tokenizer)
    else:
        name = f"object-{id(base_model)}-{suite.base_key}-{tokenizer_id(tokenizer)}"
    with _LOCK:
        hit = _LRU.get(name)
        if hit is not None and (base_fingerprint or hit[1]() is base_model):
            _LRU.move_to_end(name)
            return hit[0]
    root = cache_root()
    remove_leftovers(root, _TMP_PREFIX)  # what killed processes left half-written (their owner is gone)
    out = _load(root / name, rows) if base_fingerprint else None
    if out is None:
        root.mkdir(parents=True, exist_ok=True)
        tmp = owned_tempdir(root, _TMP_PREFIX)
        try:
            out = _compute(base_model, tokenizer, suite, chunks, tmp, progress)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        COMPUTED.append(name)
        if base_fingerprint:
            final = _publish(tmp, root / name)
            out = _load(final, rows) or out  # re-open from the published place (the temp paths are gone)
        else:
            weakref.finalize(out, shutil.rmtree, tmp, True)
    ref: Any = weakref.ref(base_model) if not base_fingerprint else (lambda: None)
    with _LOCK:
        _LRU[name] = (out, ref)
        while len(_LRU) > _LRU_SIZE:
            _LRU.popitem(last=False)
    return out


__all__ = [
    "BaseOutputs",
    "base_outputs",
    "cache_root",
    "clear_memory_cache",
    "decode_log_probs",
    "encode_log_probs",
]
