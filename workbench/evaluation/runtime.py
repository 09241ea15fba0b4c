"""Speed, memory and generations: what a model costs to run, and what it writes.

Speed is measured the way a user would feel it: prefill = one forward over a prompt, decode = greedy steps
with the KV cache, both after a warm-up pass (first calls allocate and pick kernels), reported as the median of
a few repeats so one descheduled repeat does not decide the number. Peak memory is the process's resident set
high-water mark during evaluation, sampled from a thread (``ru_maxrss`` alone only ever grows over the
process's life, so it cannot tell one run from the next), plus the CUDA allocator's peak on a GPU.
"""

from __future__ import annotations

import functools
import inspect
import resource
import statistics
import sys
import threading
import time
from typing import Any

import torch
from torch import nn

from workbench.evaluation.scoring import model_device, no_grad_for

GENERATION_PROMPTS = (
    "The Python `with` statement",
    "def fibonacci(n):\n",
    "A list comprehension is",
    "To open a file for reading,",
)


@functools.cache
def _cache_arg(model_cls: type) -> str:
    """The name ``model_cls.forward`` takes the KV cache under (read once per class, not per decode step)."""
    return "cache" if "cache" in inspect.signature(model_cls.forward).parameters else "past_key_values"


def _step(model: nn.Module, ids: torch.Tensor, cache: Any) -> tuple[torch.Tensor, Any]:
    """One forward with the KV cache: (logits, the updated cache).

    transformers 5.23 renamed the cache argument and output from ``past_key_values`` to ``cache`` (the old name
    still works but warns on every call); older 5.x releases know only the old name.
    """
    kwargs = {_cache_arg(type(model)): cache} if cache is not None else {}
    out = model(input_ids=ids, use_cache=True, **kwargs)
    new_cache = getattr(out, "cache", None)
    if new_cache is None:
        new_cache = getattr(out, "past_key_values", None)
    return out.logits, new_cache


def configure_threads() -> int:
    """Apply ``$WORKBENCH_THREADS`` (an integer) to torch's intra-op thread pool; returns the threads in use.

    Without it torch's own default stands: one thread per physical core, which is what matrix products on a CPU
    want (hyper-threads share the same vector units). Set it lower to keep cores free for a notebook's UI or
    for other processes running a sweep.
    """
    import os

    value = os.environ.get("WORKBENCH_THREADS", "").strip()
    if value:
        try:
            n = int(value)
        except ValueError:
            n = 0
        if n < 1:
            from workbench.errors import ConfigError

            raise ConfigError(
                f"WORKBENCH_THREADS={value!r} is not a positive integer; unset it or give e.g. 2."
            )
        if torch.get_num_threads() != n:
            torch.set_num_threads(n)
    return torch.get_num_threads()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_speed(
    model: nn.Module, prompt: torch.Tensor, new_tokens: int = 16, repeats: int = 3, check: Any = None
) -> tuple[float, float]:
    """(prefill tokens/s over ``prompt``, greedy decode tokens/s with the KV cache); warm-up, then medians.

    The warm-up is a short pass of both kinds (16 prompt tokens, 2 cached steps): it pays for first-call
    allocation, thread-pool start and kernel selection without costing a full repeat, which on a slider's quick
    suite is a second of the user's wait.
    """
    device = model_device(model)
    prompt = prompt.to(device)[None]  # (1, T)
    prefill, decode = [], []
    with no_grad_for(model):
        if check is not None:
            check()
        logits, past = _step(model, prompt[:, :16], None)
        for _ in range(2):
            logits, past = _step(model, logits[:, -1:].argmax(-1), past)
        for _ in range(repeats):
            if check is not None:
                check()
            _sync(device)
            t0 = time.perf_counter()
            logits, past = _step(model, prompt, None)
            _sync(device)
            t1 = time.perf_counter()
            token = logits[:, -1:].argmax(-1)
            for _ in range(new_tokens):
                logits, past = _step(model, token, past)
                token = logits[:, -1:].argmax(-1)
            _sync(device)
            t2 = time.perf_counter()
            prefill.append(prompt.shape[1] / (t1 - t0))
            decode.append(new_tokens / (t2 - t1))
    return statistics.median(prefill), statistics.median(decode)


def generate(model: nn.Module, tokenizer: Any, n: int, new_tokens: int = 16) -> list[str]:
    """Greedy continuations of the first ``n`` fixed prompts, with the KV cache and no sampling settings."""
    texts = []
    device = model_device(model)
    eos = getattr(tokenizer, "eos_token_id", None)
    with no_grad_for(model):
        for prompt in GENERATION_PROMPTS[:n]:
            ids = torch.tensor([tokenizer(prompt, add_special_tokens=False)["input_ids"]], device=device)
            step_in, past, new = ids, None, []
            for _ in range(new_tokens):
                logits, past = _step(model, step_in, past)
                step_in = logits[:, -1:].argmax(-1)
                if eos is not None and int(step_in) == eos:
                    break
                new.append(int(step_in))
            texts.append(tokenizer.decode(new, skip_special_tokens=True))
    return texts


class PeakMemory:
    """Resident-memory high-water mark of this process while the ``with`` block runs (bytes).

    ``peak`` is the whole process (a notebook also holds the base model, cached outputs, other variants);
    ``peak - start`` is what the evaluation itself added on top of what was resident when it began
    (activations, the KV cache, temporary logits): the part that differs between variants of one model.
    """

    def __init__(self, period: float = 0.02) -> None:
        self._period = period
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True, name="wb-peak-rss")
        try:
            import psutil

            self._proc: Any = psutil.Process()
        except ImportError:  # psutil is a dependency, but a bare environment still gets a (coarser) number
            self._proc = None
        self.start = self._rss()
        self.peak = self.start

    def _rss(self) -> int:
        if self._proc is not None:
            return int(self._proc.memory_info().rss)
        scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss is bytes on macOS, kB on Linux
        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * scale

    def _loop(self) -> None:
        while not self._stop.wait(self._period):
            self.peak = max(self.peak, self._rss())

    def __enter__(self) -> PeakMemory:  # noqa: PYI034  # typing.Self needs Python 3.11
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=1)
        self.peak = max(self.peak, self._rss())


__all__ = ["GENERATION_PROMPTS", "PeakMemory", "configure_threads", "generate", "measure_speed"]
