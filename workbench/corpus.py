"""Named corpora and their disjoint calibration / training / evaluation parts.

Why three parts: quantizers calibrate on text, distillation trains on text, and a score measured on either of
those would flatter the method. Every corpus is therefore split once, deterministically, into parts that never
share a document, and evaluation only ever reads ``"evaluation"``.

- ``"python-docs"``: the Python reference documentation that ships with every Python
  (``pydoc_data.topics.topics``, a dict of topic name -> text): offline, stable for a given Python version, and
  prose-plus-code like the text users care about. Each topic goes to one part by a stable hash of its *name*
  (sha1 modulo 10: 2 tenths calibration, 2 tenths training, 6 tenths evaluation), so parts never share a topic and
  adding a topic in a later Python moves no other topic. On Python 3.11 that is about 11k / 9k / 93k SmolLM2
  tokens: calibration has the few thousand tokens quantizers need, evaluation comfortably holds the ~20k tokens
  of the ``standard`` suite.
- A local UTF-8 text file: its paragraphs (blank-line separated; lines when there are too few paragraphs) are
  cut into contiguous ranges in the same 20/20/60 proportions, in file order, so no paragraph is in two parts.
- ``"hf:<dataset>[:<config>][:<split>]"``: a Hugging Face dataset's ``text`` column (needs the ``datasets``
  package and a network), split like a text file. ``split`` defaults to ``train``.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from functools import cached_property, lru_cache
from pathlib import Path
from typing import Any

from workbench.errors import ConfigError

PARTS = ("calibration", "training", "evaluation")
# Tenths of the corpus per part: calibration needs a few thousand tokens, evaluation ~25k for `standard`.
_SHARES = {"calibration": (0, 2), "training": (2, 4), "evaluation": (4, 10)}
NAMED = ("python-docs",)
_USAGE = "Use 'python-docs', a path to a UTF-8 text file, or 'hf:<dataset>[:<config>][:<split>]'."


@dataclass(frozen=True)
class Corpus:
    """A text corpus split into three disjoint parts (see the module docstring for how each kind is split)."""

    name: str
    parts: dict[str, str] = field(repr=False, hash=False, compare=False)

    def text(self, part: str = "evaluation") -> str:
        """The text of one part: ``"calibration"``, ``"training"`` or ``"evaluation"``."""
        if part not in PARTS:
            raise ConfigError(f"Unknown corpus part {part!r}; choose one of {', '.join(PARTS)}.")
        return self.parts[part]

    @cached_property
    def key(self) -> str:
        """Content hash: a suite on a changed text gets a different key, so cached results never mix."""
        h = hashlib.sha256()
        for part in PARTS:
            h.update(part.encode())
            h.update(len(self.parts[part]).to_bytes(8, "little"))
            h.update(self.parts[part].encode("utf-8"))
        return h.hexdigest()[:16]


def _bucket(name: str) -> int:
    # sha1, not hash(): Python salts str hashes per process, and the split must not move between runs.
    return int(hashlib.sha1(name.encode("utf-8")).hexdigest(), 16) % 10


def _part_of(tenth: int) -> str:
    for part, (lo, hi) in _SHARES.items():
        if lo <= tenth < hi:
            return part
    raise AssertionError(tenth)


@lru_cache(maxsize=1)
def _python_docs() -> Corpus:
    from pydoc_data.topics import topics

    pieces: dict[str, list[str]] = {p: [] for p in PARTS}
    for name in sorted(topics):
        body = topics[name].strip()
        if body:
            pieces[_part_of(_bucket(name))].append(body)
    return Corpus("python-docs", {p: "\n\n".join(v) for p, v in pieces.items()})


def split_paragraphs(name: str, text: str) -> Corpus:
    """Split ``text`` into contiguous paragraph ranges (20% calibration, 20% training, 60% evaluation)."""
    paragraphs = [p.strip("\n") for p in text.replace("\r\n", "\n").split("\n\n") if p.strip()]
    if len(paragraphs) < 10:
        # Too few paragraphs to split by paragraph: split by lines instead.
        paragraphs = [p for p in text.splitlines() if p.strip()]
    if len(paragraphs) < 10:
        raise ConfigError(
            f"Text {name} is too short to split into calibration, training and evaluation parts; "
            "give at least 10 paragraphs or lines."
        )
    n = len(paragraphs)
    parts = {part: "\n\n".join(paragraphs[n * lo // 10 : n * hi // 10]) for part, (lo, hi) in _SHARES.items()}
    return Corpus(name, parts)


def describe_part(corpus: Corpus, part: str) -> str:
    """Where ``part`` of ``corpus`` comes from, for messages: "the calibration part of notes.txt (the first 20%
    of its paragraphs)"."""
    lo, hi = _SHARES[part]
    if corpus.name == "python-docs":
        return f"the {part} part of python-docs ({(hi - lo) * 10}% of its topics)"
    where = "first" if lo == 0 else "last" if hi == 10 else "next"
    return f"the {part} part of {corpus.name} (the {where} {(hi - lo) * 10}% of its paragraphs)"


def part_share(part: str) -> float:
    """The fraction of a corpus's paragraphs (or topics) that ``part`` holds."""
    lo, hi = _SHARES[part]
    return (hi - lo) / 10


def leading_token_ids(tokenizer: Any, text: str, need: int) -> list[int]:
    """The first tokens of ``tokenizer(text)``, at least ``need`` when the text has them (up to ``need + 64``),
    tokenizing only as much text as that takes.

    Tokenization is local (pre-tokenizers split on whitespace and punctuation), so a prefix cut at a blank line
    well beyond the tokens kept gives the same leading tokens as the whole text; the margin of 64 tokens covers
    the few tokens near the cut that can differ. Saves a second per suite on the 380 kB python-docs text, and
    lets a check count "are there ``need`` tokens" without tokenizing a long file whole.
    """
    chars = max(4 * need, 4096)
    while True:
        if chars >= len(text):
            return tokenizer(text, add_special_tokens=False)["input_ids"]
        cut = text.find("\n\n", chars)
        if cut < 0:
            return tokenizer(text, add_special_tokens=False)["input_ids"]
        ids = tokenizer(text[:cut], add_special_tokens=False)["input_ids"]
        if len(ids) >= need + 64:
            return ids[: need + 64]
        chars = 2 * cut


def _parse_hf(spec: str) -> tuple[str, str | None, str]:
    fields = spec[len("hf:") :].split(":")
    if not fields[0] or len(fields) > 3:
        raise ConfigError(
            f"Corpus {spec!r}: write it as 'hf:<dataset>[:<config>][:<split>]', e.g. "
            "'hf:wikitext:wikitext-2-raw-v1:test'."
        )
    config = fields[1] if len(fields) > 1 and fields[1] else None
    split = fields[2] if len(fields) > 2 and fields[2] else "train"
    return fields[0], config, split


@lru_cache(maxsize=4)
def _hf_dataset(spec: str) -> Corpus:
    dataset, config, split = _parse_hf(spec)
    try:
        import datasets  # type: ignore[import-not-found]  # optional: only this corpus kind needs it
    except ImportError:
        raise ConfigError(
            f"Corpus {spec!r} needs the 'datasets' package: pip install 'efficiency-workbench[hf]' "
            "(or pip install datasets)."
        ) from None
    try:
        ds = datasets.load_dataset(dataset, config, split=split)
    except Exception as err:  # noqa: BLE001  # network, unknown dataset or split, ...: one line for the user
        raise ConfigError(
            f"Could not load dataset {dataset!r} (config {config}, split {split}): {type(err).__name__}: {err}. "
            "Check the name and the network, or use 'python-docs' or a local text file."
        ) from None
    if "text" not in ds.column_names:
        raise ConfigError(
            f"Dataset {dataset!r} has no 'text' column (columns: {', '.join(ds.column_names)})."
        )
    return split_paragraphs(spec, "\n\n".join(t for t in ds["text"] if t and t.strip()))


@lru_cache(maxsize=16)
def _text_file(path: str, _mtime_ns: int, _size: int) -> Corpus:
    # Cached by modification time and size too, so an edited file is read again.
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{path} is not UTF-8 text; convert it or pick another corpus.") from None
    return split_paragraphs(path, text)


def get_corpus(name: str | Corpus) -> Corpus:
    """``"python-docs"``, a path to a UTF-8 text file, ``"hf:<dataset>[:<config>][:<split>]"`` or a Corpus."""
    if isinstance(name, Corpus):
        return name
    if not isinstance(name, str) or not name:
        raise ConfigError(f"Unknown corpus {name!r}. {_USAGE}")
    if name == "python-docs":
        return _python_docs()
    if name.startswith("hf:"):
        return _hf_dataset(name)
    path = Path(name).expanduser()
    if path.is_file():
        stat = path.stat()
        return _text_file(str(path.resolve()), stat.st_mtime_ns, stat.st_size)
    raise ConfigError(f"Unknown corpus {name!r} (not a named corpus, not an existing file). {_USAGE}")


def _clear_caches() -> None:
    """Forget loaded corpora (tests use it to check that a fresh load gives the same parts)."""
    _python_docs.cache_clear()
    _hf_dataset.cache_clear()
    _text_file.cache_clear()


get_corpus.cache_clear = _clear_caches  # type: ignore[attr-defined]  # kept from the lru_cache era

__all__ = [
    "NAMED",
    "PARTS",
    "Corpus",
    "describe_part",
    "get_corpus",
    "leading_token_ids",
    "part_share",
    "split_paragraphs",
]
