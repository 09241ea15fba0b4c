"""Corpora: deterministic, disjoint calibration / training / evaluation parts."""

from __future__ import annotations

import pytest

from workbench.corpus import PARTS, get_corpus
from workbench.errors import ConfigError


def test_python_docs_parts_are_disjoint_and_deterministic():
    from pydoc_data.topics import topics

    corpus = get_corpus("python-docs")
    texts = {p: corpus.text(p) for p in PARTS}
    assert all(texts.values())
    owner = {}
    for name, body in topics.items():
        owner[name] = [p for p in PARTS if body.strip() in texts[p]]
        assert owner[name], name  # every topic lands somewhere
    # Each topic lives in one part; a few short topics are quoted inside longer ones, nothing more.
    unique = [n for n, parts in owner.items() if len(parts) == 1]
    assert len(unique) >= 0.9 * len(topics)
    assert {parts[0] for parts in owner.values() if len(parts) == 1} == set(PARTS)
    get_corpus.cache_clear()
    assert get_corpus("python-docs").key == corpus.key
    assert len(texts["evaluation"]) > 100_000  # enough for the standard suite's ~20k tokens


def test_text_file_is_split_into_contiguous_parts(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("\n\n".join(f"paragraph {i}" for i in range(100)))
    corpus = get_corpus(str(path))
    assert corpus.text("calibration").startswith("paragraph 0")
    assert corpus.text("evaluation").endswith("paragraph 99")
    assert "paragraph 45" in corpus.text("evaluation") and "paragraph 45" not in corpus.text("training")


def test_unknown_corpus_and_part_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="Unknown corpus"):
        get_corpus("pythn-docs")
    with pytest.raises(ConfigError, match="part"):
        get_corpus("python-docs").text("test")
    short = tmp_path / "short.txt"
    short.write_text("one line")
    with pytest.raises(ConfigError, match="too short"):
        get_corpus(str(short))
