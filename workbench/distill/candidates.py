"""Candidate ranking: several pruned shapes, each distilled with the same short budget, ranked before the long run.

ModelOpt's (and Minitron's) advice: the untrained quality of a pruned student predicts its quality after
distillation poorly, so cut several candidates (drop 2, 4 or 6 layers by Block Influence; FFN width 75% or 50%;
or a list of your own), give each the same short distillation (same steps or tokens, same settings, same seed
and data order), and spend the long budget on the one that recovers best. Every step is a normal recorded run
through the workspace: the teacher's baseline ``[]``, each untrained student ``[prune]`` and each short-trained
student ``[prune, distill]``, so a second ranking with the same settings trains nothing (the registry answers),
and every point shows on the trade-off plot.

Scores (``rank_by``), with ``t`` the teacher's perplexity, ``u`` the untrained student's, ``a`` the student's
after the budget and ``f`` its parameters as a fraction of the teacher's:

- ``quality_per_param`` (default): ``(t / a) / f``, the share of the teacher's quality the student reaches after
  the budget per share of the teacher's parameters kept (above 1: better quality per parameter than the teacher).
- ``recovered_per_param``: ``((u - a) / (u - t)) / f``; ``(u - a) / (u - t)`` is the recovered fraction (0: no
  better than untrained, 1: back at the teacher), reported for every ranking; NaN when ``u <= t``.
- ``ppl``: ``a`` alone, lowest first (candidates of one target size).

    from workbench.distill.candidates import RankConfig, default_candidates, rank_candidates
    config = RankConfig(candidates=default_candidates(ws.load().model), steps=20)
    ranking = rank_candidates(ws, config)
    print(ranking.table("md"))
"""

from __future__ import annotations

import ast
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any

from workbench.distill.preview import StudentPreview, preview_student, require_done
from workbench.errors import ConfigError
from workbench.progress import Progress, ProgressCallback, as_progress
from workbench.techniques.distill import DistillConfig
from workbench.techniques.prune_layers import PruneConfig

RANK_BY = ("quality_per_param", "recovered_per_param", "ppl")
# Field names a candidate may be written with ("ffn=768" for ffn_size=768).
ALIASES = {"ffn": "ffn_size", "width": "ffn_size"}
# Default candidates, as fractions of the teacher (on a 30-layer, 1536-wide model: drop 2, 4, 6; FFN 1152, 768).
DEPTH_FRACTIONS = (2 / 30, 4 / 30, 6 / 30)
WIDTH_FRACTIONS = (0.75, 0.5)


@dataclass(frozen=True)
class RankConfig:
    """Candidate student shapes and the equal distillation budget each gets before they are ranked."""

    candidates: tuple[PruneConfig, ...] = field(
        default=(),
        metadata={
            "help": "The student shapes (prune configs, or text such as 'drop=4' or 'ffn=768'); "
            "default_candidates(model) gives drop 2/4/6 of 30 layers and FFN 75%/50%."
        },
    )
    steps: int = field(default=20, metadata={"help": "Budget of every candidate: optimizer steps."})
    tokens: int = field(
        default=0, metadata={"help": "Budget of every candidate: training tokens (0: steps only)."}
    )
    distill: DistillConfig = field(
        default_factory=DistillConfig,
        metadata={
            "help": "Loss, temperature, alpha, teacher targets, batch and schedule, the same for every "
            "candidate; its own budget is replaced by steps and tokens."
        },
    )
    rank_by: str = field(
        default="quality_per_param",
        metadata={
            "help": "quality_per_param, recovered_per_param or ppl (see the module docstring).",
            "choices": RANK_BY,
        },
    )

    def __post_init__(self) -> None:
        shapes = tuple(parse_candidate(c) if isinstance(c, str) else c for c in self.candidates)
        if not shapes:
            raise ConfigError(
                "rank: no candidates; give at least one student shape, e.g. 'drop=4' or 'ffn=768' "
                "(default_candidates(model) proposes some)."
            )
        for i, shape in enumerate(shapes):
            if not isinstance(shape, PruneConfig):
                raise ConfigError(
                    f"rank: candidate {i + 1} is a {type(shape).__name__}; a candidate is a PruneConfig "
                    "or text such as 'drop=4 ffn=768'."
                )
        # The same shape twice is one candidate (its runs are the same runs).
        unique = tuple(dict.fromkeys(shapes))
        object.__setattr__(self, "candidates", unique)
        check_budget(self.steps, self.tokens)
        if not isinstance(self.distill, DistillConfig):
            raise ConfigError(f"rank: distill must be a DistillConfig, not {type(self.distill).__name__}.")
        if self.distill.student:
            raise ConfigError(
                f"rank: distill.student={self.distill.student!r}; candidates are cut from the teacher, so "
                "leave student empty."
            )
        if self.rank_by not in RANK_BY:
            raise ConfigError(f"rank: rank_by={self.rank_by!r}; choose one of {', '.join(RANK_BY)}.")

    def distill_step(self) -> DistillConfig:
        """The distillation every candidate gets: the settings given, with the equal budget (no time budget:
        a smaller student would take more steps in the same seconds)."""
        return replace(self.distill, steps=self.steps, tokens=self.tokens, seconds=0.0)

    def pipelines(self) -> list[list[Any]]:
        """The trained pipelines, one per candidate: ``[prune, distill]``."""
        step = self.distill_step()
        return [[shape, step] for shape in self.candidates]


def check_budget(steps: int, tokens: int) -> None:
    """Refuse a zero or negative budget (ConfigError): every candidate must train a little."""
    if steps < 0 or tokens < 0 or not (steps or tokens):
        raise ConfigError(
            f"rank: the budget (steps={steps}, tokens={tokens}) is zero; give every candidate at least 1 step "
            "or some tokens of distillation (20 steps is a quick first look)."
        )


def parse_candidate(text: str) -> PruneConfig:
    """``'drop=4'``, ``'ffn=768'``, ``'drop=2 ffn=1152 heads=6'``, ``'layers=13,14'`` as a PruneConfig (fields
    separated by spaces; ``ffn`` stands for ``ffn_size``)."""
    names = {f.name for f in fields(PruneConfig)}
    params: dict[str, Any] = {}
    for part in text.replace(",", " , ").split():
        if part == ",":
            continue
        if "=" not in part:
            if params and part.lstrip("-").isdigit():  # the next index of "layers=13,14"
                last = next(reversed(params))
                params[last] = (*_as_tuple(params[last]), int(part))
                continue
            raise ConfigError(
                f"rank: candidate {text!r}: {part!r} must look like name=value, e.g. 'drop=4' or 'ffn=768'."
            )
        name, value = part.split("=", 1)
        name = ALIASES.get(name.strip(), name.strip())
        if name not in names:
            raise ConfigError(
                f"rank: candidate {text!r}: unknown field {name!r}; use drop, layers, ffn (ffn_size) or heads."
            )
        try:
            parsed = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            raise ConfigError(f"rank: candidate {text!r}: {name}={value!r} is not a number.") from None
        params[name] = _as_tuple(parsed) if name == "layers" else parsed
    if not params:
        raise ConfigError(f"rank: candidate {text!r} is empty; write e.g. 'drop=4' or 'ffn=768'.")
    try:
        return PruneConfig(**params)
    except TypeError as err:
        raise ConfigError(f"rank: candidate {text!r}: {err}") from None


def _as_tuple(value: Any) -> tuple[int, ...]:
    return tuple(int(v) for v in value) if isinstance(value, (tuple, list)) else (int(value),)


def parse_candidates(text: str) -> tuple[PruneConfig, ...]:
    """Several candidates, separated by ``;`` or new lines: ``'drop=2; drop=4; ffn=768'``."""
    parts = [p.strip() for chunk in text.splitlines() for p in chunk.split(";")]
    return tuple(parse_candidate(p) for p in parts if p)


def candidate_text(shape: PruneConfig) -> str:
    """The text :func:`parse_candidate` reads back into ``shape`` (the fields that differ from the defaults)."""
    out = []
    for f in fields(PruneConfig):
        value = getattr(shape, f.name)
        if value == f.default:
            continue
        if f.name == "layers":
            out.append("layers=" + ",".join(str(i) for i in value))
        else:
            out.append(f"{'ffn' if f.name == 'ffn_size' else f.name}={value}")
    return " ".join(out)


def _text_config(model: Any) -> Any:
    config = model.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def default_candidates(model: Any) -> tuple[PruneConfig, ...]:
    """Depth and width candidates scaled to ``model``: drop 2/30, 4/30 and 6/30 of its layers (at least one,
    at most all but one) and keep 75% and 50% of its FFN width (a multiple of 32 when that is at least 32, so
    a quantizer stacked later keeps its group sizes)."""
    text = _text_config(model)
    n, width = int(text.num_hidden_layers), int(text.intermediate_size)
    out: list[PruneConfig] = []
    if n > 1:
        for f in DEPTH_FRACTIONS:
            out.append(PruneConfig(drop=min(n - 1, max(1, round(n * f)))))
    for f in WIDTH_FRACTIONS:
        kept = round(width * f / 32) * 32 if width * f >= 32 else round(width * f)
        if 1 <= kept < width:
            out.append(PruneConfig(ffn_size=int(kept)))
    return tuple(dict.fromkeys(out))


def check_candidates(model: Any, config: RankConfig) -> int:
    """Refuse, before any work, a candidate the teacher cannot take or one that is not smaller than it;
    returns the teacher's parameter count."""
    from workbench.distill.students import n_parameters
    from workbench.techniques.base import check_pipeline, stacking_for

    teacher_n = n_parameters(model)
    for i, steps in enumerate(config.pipelines()):
        shape = steps[0]
        where = f"rank: candidate {i + 1} ({candidate_text(shape)})"
        try:
            check_pipeline(model, steps[:1])  # the shape alone first: its message without a step number
            check_pipeline(model, steps)
        except ConfigError as err:
            raise ConfigError(f"{where}: {err}") from None
        student_n = n_parameters(stacking_for(shape).preview(model, shape))
        if student_n >= teacher_n:
            raise ConfigError(
                f"{where} keeps {student_n:,} of the teacher's {teacher_n:,} parameters; a candidate must be "
                "smaller: drop layers or narrow the FFN."
            )
    return teacher_n


@dataclass(frozen=True)
class CandidateResult:
    """One candidate's numbers: its untrained run, its run after the budget, and the scores."""

    shape: PruneConfig
    label: str  # the trained run's pipeline label
    n_params: int
    param_fraction: float
    size_mb: float
    untrained_ppl: float
    untrained_kl: float
    ppl: float  # after the budget
    kl_mean: float
    recovered: float  # (u - a) / (u - t)
    quality: float  # t / a
    score: float
    untrained_run_id: int | None
    run_id: int | None
    reused: bool  # both runs came from the registry: nothing was trained or evaluated


def scores(t: float, u: float, a: float, fraction: float) -> dict[str, float]:
    """The recovered fraction, the quality and each ``rank_by`` score of one candidate (see the module
    docstring): ``t`` teacher, ``u`` untrained, ``a`` after-budget perplexity, ``fraction`` parameters kept."""
    recovered = (u - a) / (u - t) if u - t > 0 else math.nan
    quality = t / a
    return {
        "recovered": recovered,
        "quality": quality,
        "quality_per_param": quality / fraction,
        "recovered_per_param": recovered / fraction,
        "ppl": a,
    }


@dataclass(frozen=True)
class Ranking:
    """The candidates best first by ``config.rank_by`` (a NaN score last), and the teacher they are
    measured against."""

    config: RankConfig
    teacher_ppl: float
    teacher_params: int
    teacher_run_id: int | None
    rows: tuple[CandidateResult, ...]

    @property
    def best(self) -> CandidateResult:
        return self.rows[0]

    @property
    def reused(self) -> bool:
        """Whether every run came from the registry (a ranking already made: nothing was trained)."""
        return all(r.reused for r in self.rows)

    def frame(self) -> Any:
        """One row per candidate, ranked, as a DataFrame (parameters in millions)."""
        import pandas as pd

        return pd.DataFrame(
            [
                {
                    "rank": i + 1,
                    "candidate": candidate_text(r.shape),
                    "params_m": r.n_params / 1e6,
                    "params_pct": 100 * r.param_fraction,
                    "size_mb": r.size_mb,
                    "untrained_ppl": r.untrained_ppl,
                    "untrained_kl": r.untrained_kl,
                    "ppl": r.ppl,
                    "kl_mean": r.kl_mean,
                    "recovered": r.recovered,
                    "quality": r.quality,
                    "score": r.score,
                    "untrained_run": r.untrained_run_id,
                    "run": r.run_id,
                }
                for i, r in enumerate(self.rows)
            ]
        )

    def table(self, fmt: str = "md") -> str:
        """The ranked table as text (``md``, ``csv``, ``html``, ``tex``, ``json``), four significant digits."""
        from workbench.export import export_frame

        digits = {
            c: 4
            for c in ("params_m", "params_pct", "size_mb", "untrained_ppl", "untrained_kl", "ppl", "kl_mean")
        }
        digits.update(recovered=3, quality=3, score=3)
        return export_frame(self.frame(), fmt, digits=digits)

    def summary(self) -> str:
        """One line: the winner, by which score, against the teacher."""
        best = self.best
        return (
            f"Best of {len(self.rows)} candidates by {self.config.rank_by} after "
            f"{self._budget()}: {candidate_text(best.shape)} (perplexity {best.ppl:.4g}, teacher "
            f"{self.teacher_ppl:.4g}, untrained {best.untrained_ppl:.4g}; {100 * best.param_fraction:.0f}% of "
            "the teacher's parameters)."
        )

    def _budget(self) -> str:
        parts = [f"{self.config.steps} steps"] if self.config.steps else []
        if self.config.tokens:
            parts.append(f"{self.config.tokens} tokens")
        return " / ".join(parts)


def rank(rows: Sequence[CandidateResult], rank_by: str) -> tuple[CandidateResult, ...]:
    """``rows`` best first by their score (highest first; for ``ppl`` lowest first), NaN scores last."""
    sign = 1.0 if rank_by == "ppl" else -1.0

    def key(row: CandidateResult) -> tuple[bool, float]:
        return (math.isnan(row.score), 0.0 if math.isnan(row.score) else sign * row.score)

    return tuple(sorted(rows, key=key))


def rank_candidates(
    workspace: Any,
    config: RankConfig,
    *,
    progress: Progress | ProgressCallback | None = None,
    on_candidate: Callable[[CandidateResult], None] | None = None,
    tags: Sequence[str] = (),
    reuse: bool = True,
) -> Ranking:
    """Distil every candidate of ``config`` with the same budget and rank them (see the module docstring).

    Each candidate is two runs through ``workspace.run_now`` (on the calling thread, recorded in the
    workspace's registry, found there again when they were made before): ``[prune]``, the untrained student
    (:func:`~workbench.distill.preview.preview_student`), and ``[prune, distill]`` with
    ``config.distill_step()``; the teacher's baseline run is the reference. ``on_candidate(result)`` hears each
    candidate as it is measured. ``reuse=False`` recomputes the candidates' runs (the teacher's is reused).

    Raises:
        ConfigError: a candidate the loaded model cannot take, or one not smaller than the teacher, before any
            run is made or recorded.
        RunInterrupted: ``progress`` was cancelled (the runs finished so far stay recorded).
        WorkbenchError: a candidate's run failed (its message; the failed run is recorded).
    """
    progress = as_progress(progress)
    loaded = workspace.load(progress.span(0.0, 0.02))
    teacher_n = check_candidates(loaded.model, config)
    step = config.distill_step()
    n = len(config.candidates)
    rows: list[CandidateResult] = []
    teacher_ppl, teacher_run = math.nan, None
    for i, shape in enumerate(config.candidates):
        part = progress.span(0.02 + 0.98 * i / n, 0.02 + 0.98 * (i + 1) / n)
        part.check()
        part.update(0.0, f"candidate {i + 1}/{n}: {candidate_text(shape)}")
        before: StudentPreview = preview_student(
            workspace, shape, progress=part.span(0.0, 0.2), tags=tuple(tags), reuse=reuse
        )
        trained = require_done(
            workspace.run_now([shape, step], progress=part.span(0.2, 1.0), tags=tuple(tags), reuse=reuse),
            f"candidate {i + 1} ({candidate_text(shape)})",
        )
        teacher_ppl, teacher_run = before.teacher_ppl, before.teacher_run_id
        m = trained.metrics
        teacher_n = before.teacher_params  # the evaluation's count, as the student's
        fraction = float(m["n_params"]) / teacher_n
        s = scores(before.teacher_ppl, before.ppl, float(m["ppl"]), fraction)
        row = CandidateResult(
            shape=shape,
            label=trained.label,
            n_params=int(m["n_params"]),
            param_fraction=fraction,
            size_mb=float(m["size_mb"]),
            untrained_ppl=before.ppl,
            untrained_kl=before.kl_mean,
            ppl=float(m["ppl"]),
            kl_mean=float(m.get("kl_mean", math.nan)),
            recovered=s["recovered"],
            quality=s["quality"],
            score=s[config.rank_by],
            untrained_run_id=before.run_id,
            run_id=trained.run_id,
            reused=bool(before.reused and trained.reused),
        )
        rows.append(row)
        if on_candidate is not None:
            on_candidate(row)
    progress.update(1.0, "ranked")
    return Ranking(config, teacher_ppl, teacher_n, teacher_run, rank(rows, config.rank_by))


__all__ = [
    "RANK_BY",
    "CandidateResult",
    "RankConfig",
    "Ranking",
    "candidate_text",
    "check_budget",
    "check_candidates",
    "default_candidates",
    "parse_candidate",
    "parse_candidates",
    "rank",
    "rank_candidates",
    "scores",
]
