"""Corpora: deterministic, disjoint calibration / training / evaluation parts."""

from __future__ import annotations

import sys

import pytest

from workbench.corpus import PARTS, get_corpus, split_paragraphs
from workbench.errors import ConfigError


def test_python_docs_parts_are_disjoint_deterministic_and_big_enough():
    from pydoc_data.topics import topics

    corpus = get_corpus("python-docs")
    texts = {p: corpus.text(p) for p in PARTS}
    owner = {}
    for name, body in topics.items():
        if body.strip():
            owner[name] = [p for p in PARTS if body.strip() in texts[p]]
            assert owner[name], name  # every topic lands somewhere
    # Each topic lives in one part; a few short topics are quoted inside longer ones, nothing more.
    unique = [n for n, parts in owner.items() if len(parts) == 1]
    assert len(unique) >= 0.9 * len(owner)
    assert {parts[0] for parts in owner.values() if len(parts) == 1} == set(PARTS)
    get_corpus.cache_clear()
    again = get_corpus("python-docs")
    assert again is not corpus and again.key == corpus.key and again.parts == corpus.parts
    # ~4 characters per SmolLM2 token: evaluation holds the standard suite's ~20k tokens with room to spare,
    # calibration the few thousand tokens quantizers need.
    assert len(texts["evaluation"]) > 250_000
    assert len(texts["calibration"]) > 20_000
    assert len(texts["evaluation"]) > 2 * len(texts["calibration"])


def test_text_file_is_split_into_contiguous_parts_and_reread_when_edited(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("\n\n".join(f"paragraph {i}" for i in range(100)))
    corpus = get_corpus(str(path))
    assert corpus.text("calibration").startswith("paragraph 0\n")
    assert corpus.text("calibration").endswith("paragraph 19")
    assert corpus.text("training").startswith("paragraph 20\n")
    assert corpus.text("evaluation").startswith("paragraph 40\n")
    assert corpus.text("evaluation").endswith("paragraph 99")
    assert "paragraph 45" in corpus.text("evaluation") and "paragraph 45" not in corpus.text("training")
    path.write_text("\n\n".join(f"changed paragraph {i}" for i in range(100)))
    edited = get_corpus(str(path))
    assert edited.key != corpus.key and "changed" in edited.text("evaluation")


def test_few_paragraphs_split_by_lines():
    corpus = split_paragraphs("lines", "\n".join(f"line {i}" for i in range(20)))
    assert corpus.text("calibration") == "line 0\n\nline 1\n\nline 2\n\nline 3"
    assert corpus.text("evaluation").endswith("line 19")


def test_unknown_corpus_and_part_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="Unknown corpus 'pythn-docs'.*python-docs.*hf:"):
        get_corpus("pythn-docs")
    with pytest.raises(ConfigError, match="part"):
        get_corpus("python-docs").text("test")
    short = tmp_path / "short.txt"
    short.write_text("one line")
    with pytest.raises(ConfigError, match="too short"):
        get_corpus(str(short))


def test_hf_corpus_without_datasets_package_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import fails as if the package were missing
    get_corpus.cache_clear()
    with pytest.raises(ConfigError, match="needs the .datasets. package"):
        get_corpus("hf:wikitext:wikitext-2-raw-v1:test")
    with pytest.raises(ConfigError, match="hf:<dataset>"):
        get_corpus("hf:")
