"""Sequence-level distillation data: a training corpus the teacher writes from prompts, generated once, kept on disk.

Sequence-level KD (Kim & Rush; the recipe behind DeepSeek-R1's and Phi's distilled students) trains the student
on the teacher's own outputs instead of on human text: the student learns the teacher's mode of writing, not
only its per-token distribution on someone else's text. The prompts are either the corpus's **training** part
cut into prefixes of ``prompt_tokens`` tokens (evenly spread over the part), or a user's list or file of
prompts (one per line). The teacher continues each with ``new_tokens`` tokens (fewer where it writes its
end-of-sequence token), greedy (``temperature=0``) or sampled at a temperature with optional nucleus (top-p)
filtering.

Generation runs with the KV cache, a batch of prompts at a time (left-padded, with an attention mask and
position ids from it, so a padded row computes what it would alone), the teacher in eval mode under
``torch.no_grad``. Every sequence draws from its own generator, seeded from ``seed`` and its index, so the
sampled text does not depend on which other sequences share its batch.

The result (token ids of every prompt and its continuation) is cached in ``demo_home()/teacher_generations/<key>``,
keyed by the teacher's weights, the prompt token ids and the settings, and a later run with the same key reads
it back instead of generating. An entry is written to a temporary folder and renamed into place only once the
last sequence is done, so a stopped generation leaves nothing that a later run could take for complete.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import json
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from workbench.distill.logit_store import write_entry
from workbench.errors import ConfigError, RunInterrupted
from workbench.progress import Progress

FORMAT = 1  # bump when the layout changes; old entries are then simply not found
PROMPT_SOURCES = ("corpus", "list", "file")


def validate_generation(
    values: dict[str, Any], *, who: str = "generate", prefix: str = "", used: bool = True
) -> None:
    """Refuse bad generation settings with a ConfigError naming the field as the caller spells it.

    ``values`` holds :class:`GenerationConfig`'s field names; ``prefix`` is prepended in messages (the distill
    technique's flat fields are ``gen_<name>``) and ``who`` starts them. With ``used=False`` (settings kept for
    later, e.g. distill on the corpus) only the values themselves are checked, not whether the prompt source
    has its prompts.
    """

    def bad(name: str, text: str) -> ConfigError:
        return ConfigError(f"{who}: {prefix}{name}={values[name]!r} {text}")

    source = values["source"]
    if source not in PROMPT_SOURCES:
        raise bad("source", f"is not a prompt source; choose one of {', '.join(PROMPT_SOURCES)}.")
    for name, least in (("new_tokens", 1), ("sequences", 1), ("batch_size", 1), ("prompt_tokens", 1)):
        value = values[name]
        if not isinstance(value, int) or isinstance(value, bool) or value < least:
            raise bad(name, f"must be a whole number of at least {least}.")
    temperature = values["temperature"]
    if not isinstance(temperature, (int, float)) or not (0 <= temperature < float("inf")):
        raise bad("temperature", "must be >= 0 (0: greedy decoding; 0.7-1 samples).")
    top_p = values["top_p"]
    if not isinstance(top_p, (int, float)) or not 0 < top_p <= 1:
        raise bad("top_p", "must be in (0, 1] (1 keeps the whole distribution).")
    prompts = values["prompts"]
    if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
        raise bad("prompts", "must be a list of prompt strings.")
    if source == "list" and used:
        given = [p for p in prompts if p.strip()]
        if not given:
            raise ConfigError(
                f"{who}: {prefix}source='list' needs at least one prompt that is not blank "
                f"(got {len(prompts)}); give {prefix}prompts, or use {prefix}source='corpus'."
            )
        if temperature == 0 and values["sequences"] > len(given):
            raise ConfigError(
                f"{who}: {prefix}sequences={values['sequences']} exceeds the {len(given)} prompts, and greedy "
                f"decoding ({prefix}temperature=0) writes the same continuation for a repeated prompt; lower "
                f"{prefix}sequences or sample ({prefix}temperature > 0)."
            )
    if source == "file" and used and not str(values["prompt_file"]).strip():
        raise ConfigError(
            f"{who}: {prefix}source='file' needs {prefix}prompt_file (a text file with one prompt a line)."
        )


@dataclass(frozen=True)
class GenerationConfig:
    """What the teacher writes: from which prompts, how much, and how it picks each token."""

    source: str = field(
        default="corpus",
        metadata={
            "help": "corpus (the corpus's training part cut into prompt prefixes), list (prompts) or file "
            "(prompt_file, one prompt a line).",
            "choices": PROMPT_SOURCES,
        },
    )
    prompts: tuple[str, ...] = field(default=(), metadata={"help": "The prompts when source='list'."})
    prompt_file: str = field(
        default="", metadata={"help": "A text file of prompts (one a line), source='file'."}
    )
    prompt_tokens: int = field(
        default=32, metadata={"help": "Tokens per prompt prefix cut from the corpus (source='corpus')."}
    )
    new_tokens: int = field(
        default=224, metadata={"help": "Tokens the teacher writes per prompt (fewer where it ends the text)."}
    )
    sequences: int = field(
        default=32, metadata={"help": "Sequences to generate (prompts are reused in turn when fewer)."}
    )
    temperature: float = field(
        default=1.0, metadata={"help": "Sampling temperature; 0 is greedy decoding (the most likely token)."}
    )
    top_p: float = field(
        default=1.0,
        metadata={"help": "Nucleus sampling: draw from the smallest set of tokens holding top_p."},
    )
    seed: int = field(default=0, metadata={"help": "Seeds every sequence's draws (with its index)."})
    batch_size: int = field(default=8, metadata={"help": "Prompts generated together (one KV cache each)."})
    stop_at_eos: bool = field(
        default=True, metadata={"help": "End a sequence where the teacher writes its end-of-sequence token."}
    )

    def __post_init__(self) -> None:
        if isinstance(self.prompts, list):  # a list from the CLI or JSON: frozen configs hash, keep a tuple
            object.__setattr__(self, "prompts", tuple(self.prompts))
        validate_generation(asdict(self))

    def label(self) -> str:
        how = "greedy" if self.temperature == 0 else f"T{self.temperature:g}"
        if self.top_p < 1:
            how += f" p{self.top_p:g}"
        return f"generate {self.sequences}x{self.new_tokens} {how} from {self.source}"


@dataclass
class GeneratedCorpus:
    """Token ids of every prompt and its continuation, back to back.

    Sequence ``i`` is ``ids[offsets[i]:offsets[i + 1]]``; its first ``prompt_lengths[i]`` tokens are the
    prompt. ``seconds`` and ``new_tokens`` are what generating it cost (kept with the entry, so a reused
    corpus still says what it cost); ``reused`` is True when it was read from the cache.
    """

    ids: np.ndarray
    offsets: np.ndarray
    prompt_lengths: np.ndarray
    seconds: float
    new_tokens: int
    folder: Path | None = None
    reused: bool = False

    @property
    def n_sequences(self) -> int:
        return int(len(self.offsets) - 1)

    def sequence(self, i: int) -> np.ndarray:
        return np.asarray(self.ids[self.offsets[i] : self.offsets[i + 1]])

    def continuation(self, i: int) -> np.ndarray:
        """The tokens the teacher wrote after prompt ``i``."""
        return self.sequence(i)[int(self.prompt_lengths[i]) :]

    def windows(self, seq_len: int) -> torch.Tensor:
        """``(N, seq_len)`` training windows: the sequences packed back to back, the tail shorter than a window
        dropped (as the corpus's own text is cut)."""
        flat = torch.from_numpy(np.asarray(self.ids, dtype=np.int64))
        n = flat.numel() // seq_len
        return flat[: n * seq_len].reshape(n, seq_len)


def generation_root() -> Path:
    """``demo_home()/teacher_generations`` (``$WORKBENCH_HOME`` or the user cache folder)."""
    from workbench.models import demo_home

    return Path(demo_home()) / "teacher_generations"


def read_prompt_file(
    path: str | os.PathLike[str], *, who: str = "generate", name: str = "prompt_file"
) -> list[str]:
    """The non-blank lines of a prompt file; ConfigError for a missing, unreadable or empty file."""
    file = Path(path).expanduser()
    try:
        lines = file.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(
            f"{who}: {name}={str(path)!r} cannot be read ({err.__class__.__name__}); give a UTF-8 text file "
            "with one prompt a line."
        ) from None
    prompts = [line for line in lines if line.strip()]
    if not prompts:
        raise ConfigError(f"{who}: {name}={str(path)!r} holds no prompt; write one prompt a line.")
    return prompts


def prompt_ids(config: GenerationConfig, tokenizer: Any, corpus: Any = None) -> list[list[int]]:
    """The token ids of the ``config.sequences`` prompts, in order (prompts reused in turn when fewer)."""
    if config.source == "corpus":
        if corpus is None:
            raise ConfigError(
                "generate: source='corpus' needs a corpus (its training part is cut into prompts)."
            )
        ids = tokenizer(corpus.text("training"), add_special_tokens=False)["input_ids"]
        n = len(ids) // config.prompt_tokens
        if n == 0:
            raise ConfigError(
                f"generate: the corpus's training part holds {len(ids)} tokens, fewer than "
                f"prompt_tokens={config.prompt_tokens}; lower prompt_tokens or use a longer text."
            )
        chunks = [ids[i * config.prompt_tokens : (i + 1) * config.prompt_tokens] for i in range(n)]
        if config.sequences <= n:
            # Evenly spread over the part, so the prompts cover all of it rather than its first pages.
            return [chunks[(i * n) // config.sequences] for i in range(config.sequences)]
        if config.temperature == 0:
            raise ConfigError(
                f"generate: sequences={config.sequences} exceeds the {n} prompt prefixes of "
                f"{config.prompt_tokens} tokens in the corpus's training part, and greedy decoding writes the "
                "same continuation for a repeated prompt; lower sequences or prompt_tokens, or sample "
                "(temperature > 0)."
            )
        return [chunks[i % n] for i in range(config.sequences)]
    texts = list(config.prompts) if config.source == "list" else read_prompt_file(config.prompt_file)
    texts = [t for t in texts if t.strip()]
    if config.temperature == 0 and config.sequences > len(texts):
        raise ConfigError(
            f"generate: sequences={config.sequences} exceeds the {len(texts)} prompts, and greedy decoding "
            "writes the same continuation for a repeated prompt; lower sequences or sample (temperature > 0)."
        )
    encoded = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    empty = [t for t, e in zip(texts, encoded, strict=True) if not e]
    if empty:
        raise ConfigError(f"generate: the prompt {empty[0]!r} has no tokens; remove it or write some text.")
    return [encoded[i % len(encoded)] for i in range(config.sequences)]


def _entry_key(
    teacher_digest: str, prompts: Sequence[Sequence[int]], config: GenerationConfig, eos: int | None
) -> str:
    h = hashlib.sha256()
    for p in prompts:
        h.update(np.asarray(p, dtype=np.int64).tobytes() + b"|")
    settings = {
        "teacher": teacher_digest,
        "prompts": h.hexdigest()[:20],
        "new_tokens": config.new_tokens,
        "temperature": float(config.temperature),
        "top_p": float(config.top_p),
        "seed": int(config.seed),
        # Padding and batched matrix products can move the last bits of a logit, so the batch is part of it.
        "batch_size": config.batch_size,
        "eos": eos if config.stop_at_eos else None,
        "format": FORMAT,
    }
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:20]
    return f"gen{len(prompts)}x{config.new_tokens}-{digest}"


def _load(folder: Path) -> GeneratedCorpus | None:
    meta_path = folder / "meta.json"
    if not meta_path.is_file():
        return None
    meta = json.loads(meta_path.read_text())
    return GeneratedCorpus(
        np.load(folder / "ids.npy", mmap_mode="r"),
        np.load(folder / "offsets.npy"),
        np.load(folder / "prompt_lengths.npy"),
        float(meta["seconds"]),
        int(meta["new_tokens"]),
        folder,
        reused=True,
    )


@functools.cache
def _forward_args(model_cls: type) -> tuple[str, bool]:
    """(the name ``forward`` takes the KV cache under, whether it takes ``logits_to_keep``), read once per class.

    transformers 5.23 renamed ``past_key_values`` to ``cache``; older 5.x releases know only the old name.
    """
    params = inspect.signature(model_cls.forward).parameters
    return ("cache" if "cache" in params else "past_key_values"), "logits_to_keep" in params


def _forward(
    model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, cache: Any
) -> tuple[torch.Tensor, Any]:
    """One cached forward: (the last position's logits ``(B, V)`` in float32 on the CPU, the updated cache)."""
    cache_arg, keeps = _forward_args(type(model))
    kwargs: dict[str, Any] = {"logits_to_keep": 1} if keeps else {}
    if cache is not None:
        kwargs[cache_arg] = cache
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, **kwargs)
    new_cache = getattr(out, "cache", None)
    if new_cache is None:
        new_cache = getattr(out, "past_key_values", None)
    return out.logits[:, -1].float().cpu(), new_cache


def _pick(logits: torch.Tensor, config: GenerationConfig, generators: list[torch.Generator]) -> torch.Tensor:
    """The next token of each row of ``(B, V)`` logits: argmax when greedy, else a draw at T (top-p filtered)."""
    if config.temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits / config.temperature, dim=-1)
    if config.top_p < 1:
        ordered, order = probs.sort(dim=-1, descending=True)
        # Keep a token while the mass ranked above it is below top_p: the smallest set holding top_p (never empty).
        ordered = torch.where(ordered.cumsum(-1) - ordered < config.top_p, ordered, torch.zeros_like(ordered))
        probs = torch.zeros_like(probs).scatter_(-1, order, ordered)
    return torch.cat([torch.multinomial(probs[i], 1, generator=g) for i, g in enumerate(generators)])


def _generate_batch(
    teacher: nn.Module,
    prompts: list[list[int]],
    first_index: int,
    config: GenerationConfig,
    eos: int | None,
    pad: int,
    on_token: Any,
) -> list[list[int]]:
    """The continuations of one batch of prompts (each at most ``new_tokens``, ending at EOS when it stops)."""
    device = next(teacher.parameters()).device
    b, width = len(prompts), max(len(p) for p in prompts)
    ids = torch.full((b, width), pad, dtype=torch.long)
    mask = torch.zeros((b, width), dtype=torch.long)
    for row, p in enumerate(prompts):  # left padding: every row's last prompt token is the last column
        ids[row, width - len(p) :] = torch.tensor(p, dtype=torch.long)
        mask[row, width - len(p) :] = 1
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    generators = [
        torch.Generator().manual_seed(config.seed * 1_000_003 + first_index + row) for row in range(b)
    ]
    logits, cache = _forward(teacher, ids.to(device), mask.to(device), positions.to(device), None)
    out: list[list[int]] = [[] for _ in range(b)]
    done = torch.zeros(b, dtype=torch.bool)
    last = positions[:, -1:]
    for step in range(config.new_tokens):
        on_token(step)  # reports progress and honours a stop between tokens
        token = _pick(logits, config, generators)
        for row in range(b):
            if not done[row]:
                out[row].append(int(token[row]))
        if config.stop_at_eos and eos is not None:
            done |= token == eos
        if bool(done.all()) or step == config.new_tokens - 1:
            break
        token = torch.where(done, torch.full_like(token, pad), token)
        mask = torch.cat([mask, torch.ones((b, 1), dtype=torch.long)], dim=1)
        last = last + 1
        logits, cache = _forward(teacher, token[:, None].to(device), mask.to(device), last.to(device), cache)
    return out


def generate_corpus(
    teacher: nn.Module,
    tokenizer: Any,
    config: GenerationConfig,
    *,
    corpus: Any = None,
    progress: Progress | None = None,
    root: Path | None = None,
    teacher_digest: str | None = None,
) -> GeneratedCorpus:
    """The teacher's continuations of ``config``'s prompts: read from the cache when generated before, else
    generated (progress through ``progress``; a stop raises :class:`RunInterrupted` and keeps nothing)."""
    from workbench.distill.logit_store import weights_digest

    progress = progress if progress is not None else Progress.null()
    prompts = prompt_ids(config, tokenizer, corpus)  # bad prompts refused before any generation
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        eos = getattr(getattr(teacher, "config", None), "eos_token_id", None)
    if isinstance(eos, (list, tuple)):
        eos = eos[0] if eos else None
    pad = getattr(tokenizer, "pad_token_id", None)
    pad = pad if pad is not None else (eos if eos is not None else 0)
    root = Path(root) if root is not None else generation_root()
    digest = teacher_digest or weights_digest(teacher)
    folder = root / _entry_key(digest, prompts, config, eos)
    cached = _load(folder)
    if cached is not None:
        progress.update(
            1.0, f"teacher-generated corpus found ({cached.n_sequences} sequences): not generated again"
        )
        return cached

    n = len(prompts)
    total = n * config.new_tokens
    made = 0  # tokens the teacher wrote (a row ended at EOS writes fewer than new_tokens)
    started = time.perf_counter()
    continuations: list[list[int]] = []
    was_training = teacher.training
    teacher.eval()
    try:
        with torch.no_grad():
            for start in range(0, n, config.batch_size):
                batch = prompts[start : start + config.batch_size]

                def on_token(step: int, start: int = start, batch: list[list[int]] = batch) -> None:
                    done_tokens = start * config.new_tokens + step * len(batch)
                    elapsed = time.perf_counter() - started
                    rate = done_tokens / elapsed if elapsed > 0 and done_tokens else 0.0
                    pace = f" · {rate:.0f} tok/s" if rate else ""
                    progress.update(
                        done_tokens / total,
                        f"teacher writing sequences {start + 1}-{start + len(batch)} of {n}: "
                        f"{done_tokens}/{total} tokens{pace}",
                    )
                    if step == 0:
                        progress.partial({"generation_sequences": start, "generation_of": n})

                written = _generate_batch(teacher, batch, start, config, eos, pad, on_token)
                continuations.extend(written)
                made += sum(len(w) for w in written)
    except RunInterrupted:
        raise RunInterrupted(
            f"Teacher generation stopped after {len(continuations)} of {n} sequences; nothing was kept, so the "
            "next run generates them again."
        ) from None
    finally:
        teacher.train(was_training)
    seconds = time.perf_counter() - started
    progress.update(1.0, f"teacher wrote {made} tokens in {seconds:.1f} s")

    lengths = [len(p) + len(c) for p, c in zip(prompts, continuations, strict=True)]
    offsets = np.zeros(n + 1, dtype=np.int64)
    offsets[1:] = np.cumsum(lengths)
    ids = np.fromiter(
        (t for p, c in zip(prompts, continuations, strict=True) for t in (*p, *c)), dtype=np.int32
    )
    prompt_lengths = np.array([len(p) for p in prompts], dtype=np.int64)
    result = GeneratedCorpus(ids, offsets, prompt_lengths, seconds, made, folder)
    meta = {
        "config": asdict(config),
        "teacher": digest,
        "sequences": n,
        "new_tokens": made,
        "seconds": seconds,
        "format": FORMAT,
    }
    write_entry(folder, {"ids.npy": ids, "offsets.npy": offsets, "prompt_lengths.npy": prompt_lengths}, meta)
    return result


__all__ = [
    "PROMPT_SOURCES",
    "GeneratedCorpus",
    "GenerationConfig",
    "generate_corpus",
    "generation_root",
    "prompt_ids",
    "read_prompt_file",
    "validate_generation",
]
