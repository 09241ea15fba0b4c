"""Evaluation suites: which text, how many tokens, what context, how it is scored; and the text as chunks.

A :class:`Suite` is data (a frozen dataclass) so that the registry can key runs by it: two runs with the same
model, pipeline and ``Suite.key`` are the same measurement. ``"full"`` scoring predicts every token of a chunk
after the first; ``"second_half"`` scores only the second half of each chunk, as llama.cpp's
``llama-perplexity`` does, so that each scored token has at least half a context of history and numbers can be
compared with llama.cpp's.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import torch

from workbench.errors import ConfigError

_DTYPES = ("float32", "bfloat16", "float16")


@dataclass(frozen=True)
class Suite:
    """What text a run is evaluated on and how it is scored.

    Fields:
        name: shown in tables; part of the key.
        corpus: a corpus name or text-file path (:func:`workbench.corpus.get_corpus`); its evaluation part is read.
        n_tokens: tokens of evaluation text; ``n_tokens // context_length`` whole chunks are scored.
        context_length: tokens per chunk; every chunk is evaluated independently (no state carried over).
        scoring: ``"full"`` (every position after a chunk's first) or ``"second_half"`` (llama-perplexity).
        batch_size: chunks per forward pass; more is faster on big machines, costs activation memory.
        add_bos: replace each chunk's first token by BOS (as llama.cpp does); None = if the tokenizer asks.
        speed: measure prefill and decode tokens per second.
        n_generations: side-by-side greedy continuations of fixed prompts (base vs model).
        new_tokens: tokens generated per continuation.
        speed_prompt: prefill length (tokens of the first chunk) timed for ``prefill_tok_s``.
        speed_tokens: greedy decode steps with the KV cache timed per repeat for ``decode_tok_s``.
        speed_repeats: timed repeats after a short warm-up pass; the median is reported.
        compute_dtype: dtype the model under test computes in (autocast). ``"float32"`` defines the metrics;
            ``"bfloat16"`` is a faster, slightly different measurement (it has its own key).
    """

    name: str
    corpus: str = "python-docs"
    n_tokens: int = 2048
    context_length: int = 512
    scoring: str = "full"
    batch_size: int = 2
    add_bos: bool | None = None
    speed: bool = True
    n_generations: int = 1
    new_tokens: int = 16
    speed_prompt: int = 256
    speed_tokens: int = 8
    speed_repeats: int = 2
    compute_dtype: str = "float32"

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
        if self.n_generations < 0 or self.new_tokens < 1:
            raise ConfigError(f"Suite {self.name}: n_generations must be >= 0 and new_tokens >= 1.")
        if self.speed and (self.speed_prompt < 1 or self.speed_tokens < 1 or self.speed_repeats < 1):
            raise ConfigError(
                f"Suite {self.name}: speed_prompt, speed_tokens and speed_repeats must be >= 1."
            )
        if self.compute_dtype not in _DTYPES:
            raise ConfigError(
                f"Suite {self.name}: compute_dtype {self.compute_dtype!r}; use one of {_DTYPES}."
            )

    @property
    def key(self) -> str:
        """Stable across processes and machines: every field plus the corpus content hash."""
        from workbench.corpus import get_corpus

        fields = dataclasses.asdict(self)
        if fields["compute_dtype"] == "float32":
            del fields["compute_dtype"]  # added later: the default keeps the keys runs were stored under
        fields["corpus_key"] = get_corpus(self.corpus).key
        digest = hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:12]
        return f"{self.name}-{digest}"

    @property
    def base_key(self) -> str:
        """Only what the base model's outputs depend on, so changing speed settings reuses them."""
        from workbench.corpus import get_corpus

        fields = {
            "corpus_key": get_corpus(self.corpus).key,
            "n_tokens": self.n_tokens,
            "context_length": self.context_length,
            "scoring": self.scoring,
            "add_bos": self.add_bos,
            "n_generations": self.n_generations,
            "new_tokens": self.new_tokens,
        }
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:12]

    @property
    def score_start(self) -> int:
        """First logit position scored in a chunk (it predicts token ``score_start + 1``)."""
        return self.context_length // 2 if self.scoring == "second_half" else 0

    @property
    def scored_per_chunk(self) -> int:
        return self.context_length - 1 - self.score_start


SUITES: dict[str, Suite] = {
    # What sliders use: 4 chunks of 512 fully scored. The demo model evaluates it (with KL against the cached
    # base) in ~3-4 s on 2 CPU cores, which leaves room for quantizing in the 10 s a new slider point may take.
    # For sliders: a new point must answer within seconds, so speed is one timed pass after a short warm-up.
    "quick": Suite("quick", n_tokens=2048, context_length=512, scoring="full", speed_repeats=1),
    # For reports: 40 chunks of 512 (20480 tokens) scored like llama-perplexity, so the numbers compare.
    "standard": Suite(
        "standard",
        n_tokens=20480,
        context_length=512,
        scoring="second_half",
        batch_size=2,
        n_generations=3,
        speed_prompt=512,
        speed_tokens=32,
        speed_repeats=3,
    ),
}


def get_suite(suite: str | Suite) -> Suite:
    """A named suite (``"quick"``, ``"standard"``) or a :class:`Suite` given as it is."""
    if isinstance(suite, Suite):
        return suite
    try:
        return SUITES[suite]
    except (KeyError, TypeError):
        raise ConfigError(
            f"Unknown evaluation suite {suite!r}. Known: {', '.join(SUITES)} (or pass a Suite(...))."
        ) from None


# ---- text -> chunks --------------------------------------------------------------------------------------------


def tokenizer_id(tokenizer: Any) -> str:
    """What identifies a tokenizer for caching: its name, sizes and how it splits a probe text.

    Two tokenizers that agree on all of that are treated as the same; the probe holds digits, spaces and a
    blank line because those are where tokenizer variants differ (e.g. the demo GGUF's digit pre-tokenizer).
    """
    vocab = getattr(tokenizer, "vocab_size", 0)
    name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
    probe = tokenizer("Probe 12 text 2024\n\n  x = [1, 22]", add_special_tokens=False)["input_ids"]
    bos = (getattr(tokenizer, "bos_token_id", None), getattr(tokenizer, "add_bos_token", None))
    return hashlib.sha1(f"{name}|{vocab}|{len(tokenizer)}|{probe}|{bos}".encode()).hexdigest()[:12]


def _wants_bos(tokenizer: Any, suite: Suite) -> bool:
    if suite.add_bos is None:
        return (
            bool(getattr(tokenizer, "add_bos_token", False))
            and getattr(tokenizer, "bos_token_id", None) is not None
        )
    if suite.add_bos and getattr(tokenizer, "bos_token_id", None) is None:
        raise ConfigError(
            f"Suite {suite.name} asks for a BOS token, but this tokenizer has none; use add_bos=None."
        )
    return suite.add_bos


_CHUNK_CACHE: OrderedDict[tuple[str, str], torch.Tensor] = OrderedDict()
_CHUNK_LOCK = threading.Lock()


def check_suite_text(tokenizer: Any, suite: Suite | str) -> None:
    """Refuse (ConfigError) a suite whose evaluation text holds less than one chunk for ``tokenizer``: what a
    run checks before it is recorded (the chunks are kept, so the evaluation does not cut them again)."""
    suite_chunks(tokenizer, suite)


def suite_chunks(tokenizer: Any, suite: Suite | str) -> torch.Tensor:
    """The suite's evaluation text as a ``(n_chunks, context_length)`` LongTensor, cached per tokenizer.

    The evaluation part is tokenized once as one text (``add_special_tokens=False``) and cut into
    ``n_tokens // context_length`` consecutive chunks. When the tokenizer asks for BOS (or ``add_bos=True``),
    each chunk's first token is *replaced* by BOS, as llama.cpp's perplexity does, so chunks keep their length.
    """
    from workbench.corpus import describe_part, get_corpus, leading_token_ids, part_share

    suite = get_suite(suite)
    key = (tokenizer_id(tokenizer), suite.base_key)
    with _CHUNK_LOCK:
        if key in _CHUNK_CACHE:
            _CHUNK_CACHE.move_to_end(key)
            return _CHUNK_CACHE[key]
    add_bos = _wants_bos(tokenizer, suite)
    corpus = get_corpus(suite.corpus)
    ids = leading_token_ids(tokenizer, corpus.text("evaluation"), suite.n_tokens)
    n_chunks = min(suite.n_tokens, len(ids)) // suite.context_length
    if n_chunks < 1:
        whole = math.ceil(suite.context_length / part_share("evaluation"))
        raise ConfigError(
            f"Suite {suite.name}: {describe_part(corpus, 'evaluation')} has {len(ids)} tokens, fewer than one "
            f"chunk of context_length={suite.context_length}. Use a longer text (about {whole} tokens or "
            "more in all) or a suite with a shorter context_length."
        )
    chunks = torch.tensor(ids[: n_chunks * suite.context_length], dtype=torch.long).view(n_chunks, -1).clone()
    if add_bos:
        chunks[:, 0] = tokenizer.bos_token_id
    with _CHUNK_LOCK:
        _CHUNK_CACHE[key] = chunks
        while len(_CHUNK_CACHE) > 8:
            _CHUNK_CACHE.popitem(last=False)
    return chunks


__all__ = ["SUITES", "Suite", "check_suite_text", "get_suite", "suite_chunks", "tokenizer_id"]
