"""Evaluation suites and metrics: perplexity, KL divergence to the base model, size, speed, memory.

A :class:`Suite` fixes the text (corpus, number of tokens, context length) and the scoring. ``"full"`` scores
every position after the first of each chunk; ``"second_half"`` scores only the second half, as llama.cpp's
``llama-perplexity`` does (each scored token then has at least half a context of history). KL divergence is
KL(base ‖ model) per scored token, summarised as mean, median, 99th percentile and max, with the same-top-token
rate, as ``llama-perplexity --kl-divergence`` reports them.

The base model's outputs are computed once per (base fingerprint, suite) and kept on disk, memory-mapped, never
whole in RAM: as llama.cpp's ``--kl-divergence-base`` file does, each scored token's full-vocabulary
log-probabilities are stored as uint16 codes with a per-token minimum and step (2 bytes per entry instead of 4;
the step is ~0.0005 nats), plus the exact NLL and top token. KL computed from them agrees with the exact
full-vocabulary value to well under 1% (``tests/test_evaluate.py`` checks it, ``bench/eval_throughput.py``
measures it on the demo). A top-k summary would be far smaller but underestimates KL by 3-7% on the demo model
at 2-4 bits, because quantization moves probability mass among tail tokens.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import statistics
import tempfile
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from workbench.errors import ConfigError
from workbench.progress import Progress, ProgressCallback, as_progress

_FORMAT = 2  # bump when the on-disk base-output layout changes
GENERATION_PROMPTS = (
    "The Python `with` statement",
    "def fibonacci(n):\n",
    "A list comprehension is",
)


@dataclass(frozen=True)
class Suite:
    """What text a run is evaluated on and how it is scored."""

    name: str
    corpus: str = "python-docs"
    n_tokens: int = 2048
    context_length: int = 512
    scoring: str = "full"  # "full" | "second_half" (llama.cpp's llama-perplexity)
    batch_size: int = 2
    add_bos: bool | None = None  # None: prepend BOS only if the tokenizer asks for it
    speed: bool = True  # measure prefill / decode tokens per second
    n_generations: int = 1
    new_tokens: int = 16  # per side-by-side generation
    speed_prompt: int = 256  # prefill length for the speed measurement
    speed_tokens: int = 8  # greedy decode steps timed per repeat
    speed_repeats: int = 2  # after one warm-up; the median is reported

    def __post_init__(self) -> None:
        if self.scoring not in ("full", "second_half"):
            raise ConfigError(f"Suite {self.name}: scoring {self.scoring!r} must be 'full' or 'second_half'.")
        if self.context_length < 4 or self.n_tokens < self.context_length:
            raise ConfigError(
                f"Suite {self.name}: n_tokens={self.n_tokens} must be at least context_length="
                f"{self.context_length} (and context_length at least 4)."
            )
        if self.batch_size < 1:
            raise ConfigError(f"Suite {self.name}: batch_size must be at least 1.")

    @property
    def key(self) -> str:
        """Stable across processes: every field plus the corpus content hash."""
        from workbench.corpus import get_corpus

        fields = dataclasses.asdict(self)
        fields["corpus_key"] = get_corpus(self.corpus).key
        digest = hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:12]
        return f"{self.name}-{digest}"

    @property
    def score_start(self) -> int:
        """First logit position scored in a chunk (the token after it is the first predicted one)."""
        return self.context_length // 2 if self.scoring == "second_half" else 0


SUITES: dict[str, Suite] = {
    # What sliders use: 4 chunks, a new point on the demo model evaluates in a few seconds.
    "quick": Suite("quick", n_tokens=2048, context_length=512, scoring="full"),
    # For reports: ~20k tokens in 512-token chunks scored like llama-perplexity, so numbers compare.
    "standard": Suite("standard", n_tokens=20480, context_length=512, scoring="second_half", batch_size=2,
                      n_generations=3, speed_prompt=512, speed_tokens=32, speed_repeats=3),
}


def get_suite(suite: str | Suite) -> Suite:
    if isinstance(suite, Suite):
        return suite
    try:
        return SUITES[suite]
    except (KeyError, TypeError):
        raise ConfigError(f"Unknown evaluation suite {suite!r}. Known: {', '.join(SUITES)}.") from None


@dataclass
class EvalResult:
    metrics: dict[str, float]
    generations: list[dict[str, str]] = field(default_factory=list)


# ---- text -> chunks --------------------------------------------------------------------------------------


def _tokenizer_id(tokenizer: Any) -> str:
    vocab = getattr(tokenizer, "vocab_size", 0)
    name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
    probe = tokenizer("Probe 12 text\n\n  x", add_special_tokens=False)["input_ids"]
    return hashlib.sha1(f"{name}|{vocab}|{len(tokenizer)}|{probe}".encode()).hexdigest()[:12]


_CHUNK_CACHE: OrderedDict[tuple[str, str], torch.Tensor] = OrderedDict()


def suite_chunks(tokenizer: Any, suite: Suite) -> torch.Tensor:
    """The suite's evaluation text as a ``(n_chunks, context_length)`` LongTensor (tokenized once, cached)."""
    from workbench.corpus import get_corpus

    key = (_tokenizer_id(tokenizer), suite.key)
    if key in _CHUNK_CACHE:
        _CHUNK_CACHE.move_to_end(key)
        return _CHUNK_CACHE[key]
    text = get_corpus(suite.corpus).text("evaluation")
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    n_chunks = min(suite.n_tokens, len(ids)) // suite.context_length
    if n_chunks < 1:
        raise ConfigError(
            f"Suite {suite.name}: the evaluation text has {len(ids)} tokens, fewer than one chunk of "
            f"{suite.context_length}. Use a longer text or a shorter context."
        )
    chunks = torch.tensor(ids[: n_chunks * suite.context_length], dtype=torch.long).view(n_chunks, -1).clone()
    add_bos = suite.add_bos
    if add_bos is None:
        add_bos = bool(getattr(tokenizer, "add_bos_token", False)) and tokenizer.bos_token_id is not None
    if add_bos:
        if tokenizer.bos_token_id is None:
            raise ConfigError(f"Suite {suite.name} asks for a BOS token, but this tokenizer has none; use add_bos=None.")
        chunks[:, 0] = tokenizer.bos_token_id  # llama.cpp replaces the chunk's first token with BOS
    _CHUNK_CACHE[key] = chunks
    while len(_CHUNK_CACHE) > 8:
        _CHUNK_CACHE.popitem(last=False)
    return chunks


# ---- forward passes --------------------------------------------------------------------------------------


def _model_device(model: torch.nn.Module) -> torch.device:
    try:
        return next(p.device for p in model.parameters() if p.device.type != "meta")
    except StopIteration:
        return torch.device("cpu")


def scored_log_probs(model: torch.nn.Module, ids: torch.Tensor, start: int) -> torch.Tensor:
    """fp32 log-probabilities at logit positions ``start .. T-2`` (they predict tokens ``start+1 .. T-1``).

    Only those positions go through the output head: the decoder body runs once, then the head on the slice.
    Models without a separable body/head (or with logit soft-capping) fall back to full logits.
    """
    ids = ids.to(_model_device(model))
    body = getattr(model, "model", None)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    softcap = getattr(getattr(model, "config", None), "final_logit_softcapping", None)
    if body is not None and head is not None and softcap is None:
        hidden = body(input_ids=ids, use_cache=False).last_hidden_state[:, start:-1]  # (B, T', H)
        logits = head(hidden)
    else:
        logits = model(input_ids=ids, use_cache=False).logits[:, start:-1]
    return torch.log_softmax(logits.float(), dim=-1)  # (B, T', V)


@dataclass
class BaseOutputs:
    """The base model's scored outputs for one suite, compact and memory-mapped."""

    codes: np.ndarray  # (N, V) uint16: log-prob = low + step * code
    low: np.ndarray  # (N,) float32
    step: np.ndarray  # (N,) float32
    top1: np.ndarray  # (N,) int32: the base's most likely token
    nll: np.ndarray  # (N,) float32: base negative log-likelihood of each scored token
    generations: list[str]

    def log_probs(self, rows: slice) -> torch.Tensor:
        """Decoded, renormalised base log-probabilities for ``rows`` (fp32)."""
        codes = torch.from_numpy(np.asarray(self.codes[rows]).astype(np.float32))
        low = torch.from_numpy(np.array(self.low[rows]))[:, None]
        step = torch.from_numpy(np.array(self.step[rows]))[:, None]
        logp = low + step * codes
        return logp - torch.logsumexp(logp, dim=-1, keepdim=True)


_ARRAYS = ("codes", "low", "step", "top1", "nll")
_FLOOR = -60.0  # log-probs below this (p < 1e-26) are stored as the floor: they cannot move KL


def encode_log_probs(logp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """uint16 codes, per-row minimum and step for (N, V) log-probs, as llama.cpp stores its KL base."""
    logp = logp.float().clamp_min(_FLOOR)
    low = logp.amin(-1)
    step = ((logp.amax(-1) - low) / 65535).clamp_min(1e-12)
    codes = torch.round((logp - low[:, None]) / step[:, None]).clamp(0, 65535).to(torch.int32)
    return codes.to(torch.uint16), low, step


_BASE_LRU: OrderedDict[str, BaseOutputs] = OrderedDict()
_BASE_LOCK = threading.Lock()


def _cache_root() -> Path:
    try:
        from workbench.models import demo_home

        return Path(demo_home()) / "base_outputs"
    except ImportError:
        return Path(os.environ.get("WORKBENCH_HOME", tempfile.gettempdir())) / "base_outputs"


def _compute_base(model: torch.nn.Module, tokenizer: Any, suite: Suite, chunks: torch.Tensor,
                  progress: Progress) -> BaseOutputs:
    start = suite.score_start
    codes, lows, steps, top1s, nlls = [], [], [], [], []
    n = chunks.shape[0]
    with torch.inference_mode():
        for b in range(0, n, suite.batch_size):
            progress.update(b / n, f"base outputs {b}/{n} chunks")
            batch = chunks[b : b + suite.batch_size]
            logp = scored_log_probs(model, batch, start).flatten(0, 1)  # (B*T', V)
            targets = batch[:, start + 1 :].reshape(-1).to(logp.device)
            c, lo, st = encode_log_probs(logp)
            codes.append(c.cpu())
            lows.append(lo.cpu())
            steps.append(st.cpu())
            top1s.append(logp.argmax(-1).int().cpu())
            nlls.append(-logp.gather(-1, targets[:, None])[:, 0].cpu())
            del logp
    gens = _generate(model, tokenizer, suite) if suite.n_generations else []
    return BaseOutputs(
        torch.cat(codes).numpy(), torch.cat(lows).numpy(), torch.cat(steps).numpy(), torch.cat(top1s).numpy(),
        torch.cat(nlls).numpy(), gens,
    )


def _save_base(path: Path, out: BaseOutputs) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=".tmp-"))
    for name in _ARRAYS:
        np.save(tmp / f"{name}.npy", getattr(out, name))
    (tmp / "generations.json").write_text(json.dumps(out.generations))
    try:
        os.replace(tmp, path)  # atomic: another process sees the whole folder or none of it
    except OSError:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)  # another process got there first; its copy is equivalent


def _load_base(path: Path) -> BaseOutputs | None:
    try:
        arrays = {n: np.load(path / f"{n}.npy", mmap_mode="r") for n in _ARRAYS}
        gens = json.loads((path / "generations.json").read_text())
    except (OSError, ValueError):
        return None
    return BaseOutputs(generations=gens, **arrays)


def base_outputs(base_model: torch.nn.Module, tokenizer: Any, suite: Suite, *, base_fingerprint: str | None = None,
                 progress: Progress | None = None) -> BaseOutputs:
    """The base model's outputs on ``suite``: from memory, from disk, or computed once and stored."""
    progress = progress or Progress.null()
    chunks = suite_chunks(tokenizer, suite)
    ident = base_fingerprint or f"unfingerprinted-{id(base_model)}"
    key = f"{ident}-{suite.key}-{_tokenizer_id(tokenizer)}-v{_FORMAT}"
    with _BASE_LOCK:
        if key in _BASE_LRU:
            _BASE_LRU.move_to_end(key)
            return _BASE_LRU[key]
    path = _cache_root() / key
    out = _load_base(path) if base_fingerprint else None
    if out is None or out.nll.shape[0] != chunks.shape[0] * (suite.context_length - suite.score_start - 1):
        out = _compute_base(base_model, tokenizer, suite, chunks, progress)
        if base_fingerprint:  # only weights we can identify are worth keeping across processes
            _save_base(path, out)
    with _BASE_LOCK:
        _BASE_LRU[key] = out
        while len(_BASE_LRU) > 4:
            _BASE_LRU.popitem(last=False)
    return out


def kl_divergence(base_logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """Per-token KL(base ‖ model) from full log-probs (N, V), computed in fp32."""
    return (base_logp.exp() * (base_logp - logq)).sum(-1).clamp_min(0.0)


# ---- speed, memory, generations ---------------------------------------------------------------------------


class _PeakRSS:
    """Samples the process's resident memory from a thread; the maximum seen is the run's peak."""

    def __init__(self, period: float = 0.02) -> None:
        import psutil

        self._proc = psutil.Process()
        self.peak = self._proc.memory_info().rss
        self._stop = threading.Event()
        self._period = period
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.wait(self._period):
            self.peak = max(self.peak, self._proc.memory_info().rss)

    def __enter__(self) -> _PeakRSS:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=1)
        self.peak = max(self.peak, self._proc.memory_info().rss)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_speed(model: torch.nn.Module, prompt: torch.Tensor, new_tokens: int = 16,
                  repeats: int = 3) -> tuple[float, float]:
    """(prefill tokens/s over ``prompt``, greedy decode tokens/s with the KV cache); warm-up, then medians."""
    device = _model_device(model)
    prompt = prompt.to(device)[None]  # (1, T)
    prefill, decode = [], []
    with torch.inference_mode():
        for i in range(repeats + 1):
            _sync(device)
            t0 = time.perf_counter()
            out = model(input_ids=prompt, use_cache=True)
            _sync(device)
            t1 = time.perf_counter()
            past, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
            for _ in range(new_tokens):
                out = model(input_ids=token, past_key_values=past, use_cache=True)
                past, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
            _sync(device)
            t2 = time.perf_counter()
            if i:  # the first pass warms up kernels and allocators
                prefill.append(prompt.shape[1] / (t1 - t0))
                decode.append(new_tokens / (t2 - t1))
    return statistics.median(prefill), statistics.median(decode)


def _generate(model: torch.nn.Module, tokenizer: Any, suite: Suite) -> list[str]:
    texts = []
    device = _model_device(model)
    with torch.inference_mode():
        for prompt in GENERATION_PROMPTS[: suite.n_generations]:
            ids = torch.tensor([tokenizer(prompt, add_special_tokens=False)["input_ids"]], device=device)
            out = ids
            past = None
            step_in = ids
            for _ in range(suite.new_tokens):  # greedy, with the KV cache, no sampling configuration involved
                res = model(input_ids=step_in, past_key_values=past, use_cache=True)
                past = res.past_key_values
                step_in = res.logits[:, -1:].argmax(-1)
                out = torch.cat([out, step_in], dim=1)
                if tokenizer.eos_token_id is not None and int(step_in) == tokenizer.eos_token_id:
                    break
            texts.append(tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True))
    return texts


# ---- the entry point --------------------------------------------------------------------------------------


def evaluate(
    model: torch.nn.Module,
    tokenizer: Any,
    suite: str | Suite = "quick",
    *,
    base_model: torch.nn.Module | None = None,
    base_fingerprint: str | None = None,
    progress: Progress | ProgressCallback | None = None,
) -> EvalResult:
    """Evaluate ``model`` on ``suite``; with ``base_model``, also its divergence from the base.

    Metric names: ppl, nll, kl_mean, kl_median, kl_p99, kl_max, top1_agree, tokens, size_bytes, size_mb,
    bits_per_weight, bits_per_weight_linear, n_params, prefill_tok_s, decode_tok_s, peak_mem_mb,
    eval_seconds, eval_tok_s. KL metrics are present only when a base is given.
    """
    suite = get_suite(suite)
    progress = as_progress(progress)
    t_start = time.perf_counter()
    chunks = suite_chunks(tokenizer, suite)
    start = suite.score_start
    metrics: dict[str, float] = {}
    generations: list[dict[str, str]] = []
    model_is_base = base_model is not None and model is base_model
    with _PeakRSS() as rss:
        base = None
        t_base = time.perf_counter()
        if base_model is not None:
            base = base_outputs(base_model, tokenizer, suite, base_fingerprint=base_fingerprint,
                                progress=progress.span(0.0, 0.5 if not model_is_base else 0.85))
        t_eval = t_base if model_is_base else time.perf_counter()
        if model_is_base:
            assert base is not None
            nll = torch.from_numpy(np.array(base.nll))
            kl = torch.zeros_like(nll)
            agree = torch.ones_like(nll)
        else:
            span = progress.span(0.5 if base is not None else 0.0, 0.85)
            nll_parts, kl_parts, agree_parts = [], [], []
            n, offset = chunks.shape[0], 0
            with torch.inference_mode():
                for b in range(0, n, suite.batch_size):
                    span.update(b / n, f"evaluating {b}/{n} chunks")
                    batch = chunks[b : b + suite.batch_size]
                    logq = scored_log_probs(model, batch, start).flatten(0, 1).cpu()  # (N_b, V)
                    targets = batch[:, start + 1 :].reshape(-1)
                    nll_parts.append(-logq.gather(-1, targets[:, None])[:, 0])
                    if base is not None:
                        sl = slice(offset, offset + logq.shape[0])
                        kl_parts.append(kl_divergence(base.log_probs(sl), logq))
                        top1 = torch.from_numpy(np.array(base.top1[sl])).long()
                        agree_parts.append((logq.argmax(-1) == top1).float())
                    offset += logq.shape[0]
                    del logq
            nll = torch.cat(nll_parts)
            kl = torch.cat(kl_parts) if kl_parts else None
            agree = torch.cat(agree_parts) if agree_parts else None
        eval_s = time.perf_counter() - t_eval
        metrics["nll"] = float(nll.double().mean())
        metrics["ppl"] = float(np.exp(metrics["nll"]))
        metrics["tokens"] = float(nll.numel())
        if kl is not None and agree is not None:
            kd = kl.double()
            metrics.update(
                kl_mean=float(kd.mean()),
                kl_median=float(kd.median()),
                kl_p99=float(torch.quantile(kd, 0.99)),
                kl_max=float(kd.max()),
                top1_agree=float(agree.double().mean()),
            )
        progress.update(0.85, "measuring speed")
        if suite.speed:
            metrics["prefill_tok_s"], metrics["decode_tok_s"] = measure_speed(
                model, chunks[0, : suite.speed_prompt], new_tokens=suite.speed_tokens, repeats=suite.speed_repeats
            )
        progress.update(0.95, "generating samples")
        if suite.n_generations:
            texts = _generate(model, tokenizer, suite) if not model_is_base or base is None else base.generations
            base_texts = base.generations if base is not None else [""] * len(texts)
            generations = [
                {"prompt": p, "base": bt, "model": mt}
                for p, bt, mt in zip(GENERATION_PROMPTS, base_texts, texts, strict=False)
            ]
    metrics.update(_size_metrics(model))
    metrics["peak_mem_mb"] = rss.peak / 2**20
    if torch.cuda.is_available() and _model_device(model).type == "cuda":
        metrics["peak_gpu_mem_mb"] = torch.cuda.max_memory_allocated() / 2**20
    metrics["eval_seconds"] = time.perf_counter() - t_start
    metrics["eval_tok_s"] = chunks.numel() / max(eval_s, 1e-9)  # for the baseline: the base pass (or cache read)
    progress.update(1.0, "done")
    return EvalResult(metrics, generations)


def _size_metrics(model: torch.nn.Module) -> dict[str, float]:
    from workbench.models import size_report

    rep = size_report(model)
    return {
        "n_params": float(rep.n_params),
        "size_bytes": float(rep.n_bytes),
        "size_mb": float(rep.size_mb),
        "bits_per_weight": float(rep.bits_per_weight),
        "bits_per_weight_linear": float(rep.bits_per_weight_linear),
    }


__all__ = [
    "EvalResult",
    "SUITES",
    "Suite",
    "base_outputs",
    "evaluate",
    "get_suite",
    "encode_log_probs",
    "kl_divergence",
    "measure_speed",
    "scored_log_probs",
    "suite_chunks",
]
