"""Named corpora and their disjoint calibration / training / evaluation parts.

``"python-docs"`` is the Python reference documentation that ships with every Python (``pydoc_data.topics``):
offline, stable for a given Python version, and prose-plus-code like the text users care about. Its topics are
assigned to parts by a stable hash of the topic name (20% calibration, 20% training, 60% evaluation), so the
parts never share a topic and do not move when topics are added. A local text file is split into contiguous
paragraph ranges in the same proportions. ``"hf:<dataset>[:<config>][:<split>]"`` reads a Hugging Face dataset
(needs the ``datasets`` package and a network), taking its ``text`` column.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from workbench.errors import ConfigError

PARTS = ("calibration", "training", "evaluation")
# Tenths of the corpus per part: calibration needs a few thousand tokens, evaluation ~25k for `standard`.
_SHARES = {"calibration": (0, 2), "training": (2, 4), "evaluation": (4, 10)}
NAMED = ("python-docs",)


@dataclass(frozen=True)
class Corpus:
    """A text corpus split into three disjoint parts."""

    name: str
    parts: dict[str, str] = field(repr=False, hash=False, compare=False)

    def text(self, part: str = "evaluation") -> str:
        if part not in PARTS:
            raise ConfigError(f"Unknown corpus part {part!r}; choose one of {', '.join(PARTS)}.")
        return self.parts[part]

    @property
    def key(self) -> str:
        """Content hash: a suite on a changed text gets a different key, so cached results never mix."""
        h = hashlib.sha256()
        for part in PARTS:
            h.update(part.encode())
            h.update(self.parts[part].encode("utf-8"))
        return h.hexdigest()[:16]


def _bucket(name: str) -> int:
    return int(hashlib.sha1(name.encode("utf-8")).hexdigest(), 16) % 10


def _part_of(tenth: int) -> str:
    for part, (lo, hi) in _SHARES.items():
        if lo <= tenth < hi:
            return part
    raise AssertionError(tenth)


def _python_docs() -> Corpus:
    from pydoc_data.topics import topics

    pieces: dict[str, list[str]] = {p: [] for p in PARTS}
    for name in sorted(topics):
        pieces[_part_of(_bucket(name))].append(topics[name].strip())
    return Corpus("python-docs", {p: "\n\n".join(v) for p, v in pieces.items()})


def _split_paragraphs(name: str, text: str) -> Corpus:
    paragraphs = [p for p in text.replace("\r\n", "\n").split("\n\n") if p.strip()]
    if len(paragraphs) < 10:
        # Too few paragraphs to split by paragraph: split by lines instead.
        paragraphs = [p for p in text.splitlines() if p.strip()]
    if len(paragraphs) < 10:
        raise ConfigError(f"Text {name} is too short to split into calibration, training and evaluation parts; "
                          "give at least 10 paragraphs or lines.")
    n = len(paragraphs)
    parts = {}
    for part, (lo, hi) in _SHARES.items():
        parts[part] = "\n\n".join(paragraphs[n * lo // 10 : n * hi // 10])
    return Corpus(name, parts)


def _hf_dataset(spec: str) -> Corpus:
    fields = spec[3:].split(":")
    dataset, config, split = fields[0], (fields[1] if len(fields) > 1 and fields[1] else None), (
        fields[2] if len(fields) > 2 else "train"
    )
    try:
        import datasets  # type: ignore[import-not-found]
    except ImportError:
        raise ConfigError(f"Corpus {spec!r} needs the 'datasets' package: pip install datasets.") from None
    try:
        ds = datasets.load_dataset(dataset, config, split=split)
    except Exception as err:  # network, unknown dataset, ...: one line for the user
        raise ConfigError(f"Could not load dataset {dataset!r} ({type(err).__name__}: {err}).") from None
    if "text" not in ds.column_names:
        raise ConfigError(f"Dataset {dataset!r} has no 'text' column (columns: {', '.join(ds.column_names)}).")
    return _split_paragraphs(spec, "\n\n".join(t for t in ds["text"] if t and t.strip()))


@lru_cache(maxsize=16)
def get_corpus(name: str) -> Corpus:
    """``"python-docs"``, a path to a UTF-8 text file, or ``"hf:<dataset>[:<config>][:<split>]"``."""
    if name == "python-docs":
        return _python_docs()
    if name.startswith("hf:"):
        return _hf_dataset(name)
    path = Path(name).expanduser()
    if path.is_file():
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise ConfigError(f"{path} is not UTF-8 text.") from None
        return _split_paragraphs(str(path.resolve()), text)
    raise ConfigError(
        f"Unknown corpus {name!r}. Use 'python-docs', a path to a text file, or 'hf:<dataset>[:<config>][:<split>]'."
    )


__all__ = ["Corpus", "PARTS", "get_corpus"]
