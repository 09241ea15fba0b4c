"""Candidate ranking and the untrained-student preview on tiny-llama: every run recorded, reused, bad input refused."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest

from workbench.cli import main
from workbench.distill.candidates import (
    RankConfig,
    candidate_text,
    default_candidates,
    parse_candidate,
    parse_candidates,
    rank_candidates,
    scores,
)
from workbench.distill.preview import preview_student, recorded_preview
from workbench.errors import ConfigError
from workbench.evaluate import Suite
from workbench.registry import Registry
from workbench.techniques.distill import DistillConfig
from workbench.techniques.prune_layers import PruneConfig
from workbench.workspace import Workspace

SUITE = Suite(
    "rank-test",
    n_tokens=256,
    context_length=64,
    n_generations=0,
    speed_prompt=16,
    speed_tokens=2,
    speed_repeats=1,
)
TINY = DistillConfig(batch_size=2, seq_len=32, warmup_steps=1, lr=1e-3)
SHAPES = (PruneConfig(drop=1, samples=2, seq_len=32), PruneConfig(ffn_size=64, samples=2, seq_len=32))


@pytest.fixture()
def ws(registry_url, tmp_path, monkeypatch):
    monkeypatch.setenv("WORKBENCH_HOME", str(tmp_path / "home"))
    with Workspace(registry_url, model="tiny-llama", suite=SUITE) as workspace:
        yield workspace


def _runs(url: str):
    with Registry.open(url) as reg:
        return reg.runs_frame(status=None)


def _counting(ws) -> list[bool]:
    """Wrap the workspace's runner: one entry per run it returned, True when the run came from the registry."""
    calls: list[bool] = []
    runner = ws.runner

    def counted(*args, **kwargs):
        result = runner(*args, **kwargs)
        calls.append(bool(result.reused))
        return result

    ws.runner = counted
    return calls


def test_the_ranking_has_every_candidate_in_score_order_and_a_second_ranking_trains_nothing(ws, registry_url):
    config = RankConfig(candidates=SHAPES, steps=2, distill=TINY)
    calls = _counting(ws)
    seen = []
    ranking = rank_candidates(ws, config, on_candidate=seen.append)
    assert len(ranking.rows) == 2 and {r.shape for r in ranking.rows} == set(SHAPES)
    assert [r.shape for r in seen] == list(SHAPES)  # heard in the order given, ranked afterwards
    assert calls.count(False) == 5  # the teacher, two untrained students, two trained students
    teacher_n = ranking.teacher_params
    for row in ranking.rows:
        assert 0 < row.n_params < teacher_n and row.param_fraction == pytest.approx(row.n_params / teacher_n)
        assert math.isfinite(row.untrained_ppl) and math.isfinite(row.ppl) and row.ppl != row.untrained_ppl
        assert row.untrained_kl > 0 and row.kl_mean > 0 and row.size_mb > 0
        assert row.quality == pytest.approx(ranking.teacher_ppl / row.ppl)
        assert row.score == pytest.approx(row.quality / row.param_fraction)
        assert not row.reused and row.label.startswith("prune") and "distill" in row.label
    assert ranking.rows[0].score >= ranking.rows[1].score and ranking.best is ranking.rows[0]

    runs = _runs(registry_url)
    assert len(runs) == 5 and set(runs["status"]) == {"done"}
    ids = {r.run_id for r in ranking.rows} | {r.untrained_run_id for r in ranking.rows}
    assert ids | {ranking.teacher_run_id} == set(runs["run_id"])
    frame = ranking.frame()
    assert list(frame["rank"]) == [1, 2] and list(frame["candidate"]) == [
        candidate_text(r.shape) for r in ranking.rows
    ]
    table = ranking.table("md")
    assert "untrained_ppl" in table and "recovered" in table and candidate_text(SHAPES[0]) in table

    calls.clear()
    again = rank_candidates(ws, config)
    assert again.reused and calls and not any(c is False for c in calls)  # every run found in the registry
    assert len(_runs(registry_url)) == 5
    assert [r.run_id for r in again.rows] == [r.run_id for r in ranking.rows]

    by_ppl = rank_candidates(ws, RankConfig(candidates=SHAPES, steps=2, distill=TINY, rank_by="ppl"))
    assert by_ppl.reused and [r.ppl for r in by_ppl.rows] == sorted(r.ppl for r in ranking.rows)


def test_scores_follow_their_documented_formulas():
    s = scores(t=10.0, u=30.0, a=15.0, fraction=0.5)
    assert s["recovered"] == pytest.approx(0.75)  # (30 - 15) / (30 - 10)
    assert s["quality"] == pytest.approx(10 / 15) and s["quality_per_param"] == pytest.approx(4 / 3)
    assert s["recovered_per_param"] == pytest.approx(1.5) and s["ppl"] == 15.0
    assert math.isnan(scores(t=10.0, u=9.0, a=8.0, fraction=0.5)["recovered"])  # no gap to recover


def test_the_untrained_preview_is_the_recorded_prune_run(ws, registry_url):
    shape = SHAPES[0]
    ws.load()
    assert recorded_preview(ws, shape) is None  # nothing recorded yet, nothing computed
    assert len(_runs(registry_url)) == 0
    preview = preview_student(ws, shape)
    assert preview.n_params < preview.teacher_params and preview.size_mb > 0
    assert math.isfinite(preview.ppl) and preview.kl_mean > 0 and not preview.reused
    assert "untrained" in preview.summary() and f"run {preview.run_id}" in preview.summary()
    runs = _runs(registry_url)
    assert set(runs["pipeline"]) == {"baseline", preview.label}
    again = recorded_preview(ws, shape)
    assert again is not None and again.reused and again.run_id == preview.run_id and again.ppl == preview.ppl


def test_candidates_parse_from_text_and_scale_to_the_model():
    assert parse_candidate("drop=4") == PruneConfig(drop=4)
    assert parse_candidate("ffn=768 drop=2") == PruneConfig(drop=2, ffn_size=768)
    assert parse_candidate("layers=13,14") == PruneConfig(layers=(13, 14))
    assert parse_candidates("drop=2; ffn=768\nheads=6") == (
        PruneConfig(drop=2),
        PruneConfig(ffn_size=768),
        PruneConfig(heads=6),
    )
    for shape in (PruneConfig(drop=2, ffn_size=1152), PruneConfig(layers=(3, 5)), PruneConfig(heads=3)):
        assert parse_candidate(candidate_text(shape)) == shape
    demo_like = SimpleNamespace(config=SimpleNamespace(num_hidden_layers=30, intermediate_size=1536))
    assert [candidate_text(c) for c in default_candidates(demo_like)] == [
        "drop=2",
        "drop=4",
        "drop=6",
        "ffn=1152",
        "ffn=768",
    ]
    two = SimpleNamespace(config=SimpleNamespace(num_hidden_layers=2, intermediate_size=128))
    assert [candidate_text(c) for c in default_candidates(two)] == ["drop=1", "ffn=96", "ffn=64"]


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: RankConfig(candidates=()), "no candidates"),
        (lambda: RankConfig(candidates=SHAPES, steps=0), "budget"),
        (lambda: RankConfig(candidates=SHAPES, steps=-1, tokens=100), "budget"),
        (lambda: RankConfig(candidates=SHAPES, rank_by="speed"), "rank_by='speed'"),
        (lambda: RankConfig(candidates=SHAPES, distill=DistillConfig(student="demo")), "leave student empty"),
        (lambda: RankConfig(candidates=("drop=2", 3)), "candidate 2 is a int"),
        (lambda: parse_candidate("depth=2"), "unknown field 'depth'"),
        (lambda: parse_candidate("drop"), "name=value"),
        (lambda: parse_candidate("drop=two"), "not a number"),
        (lambda: parse_candidate("drop=-1"), "drop=-1"),
    ],
)
def test_bad_settings_are_refused_with_what_to_do(build, message):
    with pytest.raises(ConfigError, match=message):
        build()


@pytest.mark.parametrize(
    ("shape", "message"),
    [
        (PruneConfig(ffn_size=500), r"candidate 2 \(ffn=500\).*FFN width is 128"),
        (PruneConfig(drop=2), r"candidate 2 \(drop=2\).*leaves none"),
        (PruneConfig(ffn_size=128), r"candidate 2 \(ffn=128\) keeps .* must be smaller"),
    ],
)
def test_a_candidate_the_teacher_cannot_take_is_refused_before_any_run(ws, registry_url, shape, message):
    config = RankConfig(candidates=(SHAPES[0], shape), steps=2, distill=TINY)
    with pytest.raises(ConfigError, match=message):
        rank_candidates(ws, config)
    assert len(_runs(registry_url)) == 0  # nothing ran, nothing was recorded


def test_the_cli_prints_the_ranked_table(registry_url, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WORKBENCH_HOME", str(tmp_path / "home"))
    params = ["--param", "batch_size=2", "--param", "seq_len=32", "--param", "warmup_steps=1"]
    argv = ["distill-rank", "--model", "tiny-llama", "--registry", registry_url, "--steps", "1", *params]
    assert main([*argv, "--candidate", "drop=1 samples=2 seq_len=32"]) == 0
    out = capsys.readouterr()
    assert "| rank |" in out.out and "drop=1" in out.out and "Best of 1 candidates" in out.err
    assert len(_runs(registry_url)) == 3
    assert main([*argv, "--candidate", "ffn=500"]) == 2
    assert "candidate 1 (ffn=500)" in capsys.readouterr().err
    assert main(["distill-rank", "--model", "tiny-llama", "--registry", registry_url, "--steps", "0"]) == 2
    assert "budget" in capsys.readouterr().err
