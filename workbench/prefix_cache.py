"""Models after a pipeline's prefix, kept so that changing only the last step does not redo the earlier ones.

A stacked pipeline such as distill → prune → quantize spends minutes in its first steps and seconds in its last,
and a slider moves the last one. :class:`PrefixCache` keeps the model after ``pipeline[:-1]`` (with the stage
records of those steps), keyed by what determines it: the base model's fingerprint, the device, the corpus the
calibrated steps read, the seed and the canonical JSON of the prefix. It is an LRU bounded by the bytes of the
cached models' tensors and by the memory left free on the machine (and on the GPU, for models kept there).

Entries are deep copies taken when stored, and every hit hands out a new deep copy, so a run never modifies the
cached model. Steps whose technique opts out (``register_stacking(cls, cacheable=False)``) are never cached.
"""

from __future__ import annotations

import copy
import logging
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from workbench.techniques.base import StageRecord, is_cacheable, pipeline_to_json

log = logging.getLogger(__name__)

# Leave at least this share of the machine's memory free after storing an entry: the run that stores it still
# has its last step and an evaluation to do, and evicting is cheaper than swapping.
MIN_FREE_FRACTION = 0.2
# Without an explicit budget the cache may hold up to this share of physical memory.
DEFAULT_BUDGET_FRACTION = 0.25


@dataclass(frozen=True)
class PrefixKey:
    """What determines the model after a prefix (the prefix's steps are in ``pipeline_json``)."""

    model_fingerprint: str
    device: str
    corpus_key: str
    seed: int
    pipeline_json: str


def tensor_bytes(model: Any) -> int:
    """Bytes of a model's parameters and buffers, each shared storage counted once (tied weights)."""
    seen: dict[tuple[str, int], int] = {}
    tensors = list(model.parameters()) + list(model.buffers())
    for t in tensors:
        try:
            storage = t.untyped_storage()
            seen[(str(t.device), storage.data_ptr())] = storage.nbytes()
        except (RuntimeError, NotImplementedError):  # a tensor subclass without one storage: its own size
            seen[(str(t.device), id(t))] = t.numel() * t.element_size()
    return sum(seen.values())


def _free_bytes(device: str) -> tuple[int, int]:
    """(free, total) bytes of the memory a model on ``device`` occupies."""
    if device.startswith("cuda"):
        import torch

        index = torch.device(device).index
        return torch.cuda.mem_get_info(index if index is not None else torch.cuda.current_device())
    import psutil

    vm = psutil.virtual_memory()
    return int(vm.available), int(vm.total)


class PrefixCache:
    """An LRU of prefix models, bounded by ``max_bytes`` and by free memory; safe to share between threads.

    Args:
        max_bytes: the most bytes of tensors all entries may hold together; None: a quarter of physical memory.
            0 disables the cache.
        min_free_fraction: an entry is stored only if at least this share of its device's memory stays free.
    """

    def __init__(self, max_bytes: int | None = None, *, min_free_fraction: float = MIN_FREE_FRACTION) -> None:
        if max_bytes is None:
            import psutil

            max_bytes = int(psutil.virtual_memory().total * DEFAULT_BUDGET_FRACTION)
        if max_bytes < 0:
            raise ValueError(f"PrefixCache: max_bytes={max_bytes} must be 0 (off) or positive.")
        self.max_bytes = int(max_bytes)
        self.min_free_fraction = float(min_free_fraction)
        self._entries: OrderedDict[PrefixKey, tuple[Any, tuple[StageRecord, ...], int]] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = self.misses = self.stores = 0

    @staticmethod
    def key(loaded: Any, prefix: Sequence[Any], *, device: str, corpus_key: str, seed: int) -> PrefixKey:
        return PrefixKey(loaded.fingerprint, str(device), corpus_key, int(seed), pipeline_to_json(prefix))

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def nbytes(self) -> int:
        with self._lock:
            return sum(size for _, _, size in self._entries.values())

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    def longest(self, pipeline: Sequence[Any], make_key: Any) -> int:
        """The length of the longest proper prefix of ``pipeline`` held here (0: none); ``make_key(prefix)``."""
        for k in range(len(pipeline) - 1, 0, -1):
            with self._lock:
                if make_key(pipeline[:k]) in self._entries:
                    return k
        return 0

    def peek(self, key: PrefixKey) -> Any | None:
        """The cached model itself, for read-only use (checks); never modify it. None when absent."""
        with self._lock:
            entry = self._entries.get(key)
        return None if entry is None else entry[0]

    def take(self, key: PrefixKey) -> tuple[Any, list[StageRecord]] | None:
        """A deep copy of the model after the prefix and its stage records (marked reused), or None."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                self.misses += 1
                return None
            self._entries.move_to_end(key)
            self.hits += 1
        model, records, _ = entry
        # Copied outside the lock: the cached model is never modified, so concurrent copies are safe.
        out = copy.deepcopy(model)
        return out, [
            StageRecord(r.index, r.technique, dict(r.metrics), dict(r.extras), r.seconds, True)
            for r in records
        ]

    def put(
        self, key: PrefixKey, model: Any, records: Sequence[StageRecord], pipeline: Sequence[Any]
    ) -> bool:
        """Keep a deep copy of ``model`` (the result of ``pipeline``) if it fits; returns whether it was kept."""
        if self.max_bytes == 0 or not is_cacheable(pipeline):
            return False
        size = tensor_bytes(model)
        if size > self.max_bytes:
            return False
        device = _device_of(model)
        with self._lock:
            if key in self._entries:
                self._entries.move_to_end(key)
                return True
            while self._entries and self._used() + size > self.max_bytes:
                self._entries.popitem(last=False)
            free, total = _free_bytes(device)
            # Evicting frees memory only once nothing else holds the evicted model; count it as freed anyway,
            # which at worst stores one entry early (the budget above still bounds the total).
            while self._entries and free - size < self.min_free_fraction * total:
                _, _, evicted = self._entries.popitem(last=False)[1]
                free += evicted
            if free - size < self.min_free_fraction * total:
                return False
        try:
            kept = copy.deepcopy(model)
        except Exception as err:  # noqa: BLE001 - a model that cannot be copied is simply not kept
            log.info(
                "Not keeping the prefix model %s: it cannot be copied (%s: %s).",
                key.pipeline_json[:80],
                type(err).__name__,
                err,
            )
            return False
        with self._lock:
            self._entries[key] = (kept, tuple(records), size)
            self.stores += 1
        return True

    def _used(self) -> int:
        return sum(size for _, _, size in self._entries.values())


def _device_of(model: Any) -> str:
    try:
        return str(next(model.parameters()).device)
    except (StopIteration, AttributeError):
        return "cpu"


_DEFAULT: PrefixCache | None = None
_DEFAULT_LOCK = threading.Lock()


def default_prefix_cache() -> PrefixCache:
    """The process's prefix cache (as loaded base models are cached per process), created on first use."""
    global _DEFAULT
    with _DEFAULT_LOCK:
        if _DEFAULT is None:
            _DEFAULT = PrefixCache()
        return _DEFAULT


__all__ = ["PrefixCache", "PrefixKey", "default_prefix_cache", "tensor_bytes"]
