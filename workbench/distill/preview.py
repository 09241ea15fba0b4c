"""The untrained student: a pruned shape's size and quality before any training, as a recorded run.

The student cut from the teacher by a ``prune`` step, evaluated as it is, is exactly the run of the one-step
pipeline ``[prune]``: its perplexity on the suite's evaluation part, its KL against the teacher (the run's
base model), its parameters and bytes. So the preview is that run, recorded like any other (the registry keeps
it, a shape measured before answers at once, and the point shows on the trade-off plot), next to the teacher's
own baseline run (the empty pipeline) for reference.

    from workbench.distill.preview import preview_student, recorded_preview
    preview = recorded_preview(ws, PruneConfig(drop=4))      # from the registry only, or None
    preview = preview_student(ws, PruneConfig(drop=4))       # runs what is missing, on this thread
    print(preview.summary())
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from workbench.errors import ConfigError, RunInterrupted, WorkbenchError
from workbench.progress import Progress, ProgressCallback, as_progress


@dataclass(frozen=True)
class StudentPreview:
    """A student shape before training, from its recorded ``[prune]`` run and the teacher's baseline run."""

    shape: Any  # the PruneConfig
    label: str  # the run's pipeline label ("prune -4L")
    n_params: int
    teacher_params: int
    size_mb: float
    ppl: float  # perplexity on the suite's evaluation part
    kl_mean: float  # mean KL(teacher || student) per scored token
    teacher_ppl: float
    run_id: int | None
    teacher_run_id: int | None
    reused: bool  # both runs came from the registry (no work was done)

    @property
    def param_fraction(self) -> float:
        return self.n_params / self.teacher_params if self.teacher_params else math.nan

    def summary(self) -> str:
        """One line for a status bar: the untrained quality next to the teacher's, and the size."""
        return (
            f"untrained: perplexity {self.ppl:.4g} (teacher {self.teacher_ppl:.4g}), mean KL {self.kl_mean:.3g}; "
            f"{self.n_params / 1e6:.2f}M parameters ({100 * self.param_fraction:.0f}% of the teacher), "
            f"{self.size_mb:.1f} MB (run {self.run_id})"
        )


def untrained_pipeline(shape: Any) -> list[Any]:
    """The pipeline whose run is the untrained student of ``shape`` (a ``PruneConfig``): the prune step alone."""
    from workbench.techniques.prune_layers import PruneConfig

    if not isinstance(shape, PruneConfig):
        raise ConfigError(
            f"A student shape is a PruneConfig (drop=, layers=, ffn_size=, heads=), not {type(shape).__name__}."
        )
    return [shape]


def _preview(shape: Any, student: Any, teacher: Any) -> StudentPreview:
    m, t = student.metrics, teacher.metrics
    return StudentPreview(
        shape=shape,
        label=student.label,
        n_params=int(m["n_params"]),
        teacher_params=int(t["n_params"]),
        size_mb=float(m["size_mb"]),
        ppl=float(m["ppl"]),
        kl_mean=float(m.get("kl_mean", math.nan)),
        teacher_ppl=float(t["ppl"]),
        run_id=student.run_id,
        teacher_run_id=teacher.run_id,
        reused=bool(student.reused and teacher.reused),
    )


def recorded_preview(workspace: Any, shape: Any) -> StudentPreview | None:
    """The preview of ``shape`` from the registry alone (both runs recorded for the loaded model and suite), or
    None; nothing is computed. ConfigError for a shape the loaded model cannot take."""
    steps = untrained_pipeline(shape)
    if workspace.loaded_model() is None:
        return None
    student = workspace.answer_now(steps)
    if student is None:
        return None
    teacher = workspace.answer_now([])
    return None if teacher is None else _preview(shape, student, teacher)


def require_done(result: Any, what: str) -> Any:
    """``result`` when its run is done; RunInterrupted when it was stopped, WorkbenchError when it failed."""
    if result.status == "interrupted":
        raise RunInterrupted(result.error or f"The {what} run was stopped.")
    if result.status != "done":
        first = (result.error or "").strip().splitlines()
        raise WorkbenchError(f"The {what} run {result.run_id} {result.status}: {first[0] if first else '?'}")
    return result


def preview_student(
    workspace: Any,
    shape: Any,
    *,
    progress: Progress | ProgressCallback | None = None,
    tags: tuple[str, ...] = (),
    reuse: bool = True,
) -> StudentPreview:
    """Size and untrained quality of ``shape``: the teacher's baseline run and the ``[prune]`` run, each found in
    the workspace's registry or run now (on the calling thread) and recorded.

    Raises:
        ConfigError: the loaded model cannot take the shape (checked before anything runs or is recorded).
        RunInterrupted: ``progress`` was cancelled.
        WorkbenchError: a run failed (its message).
    """
    progress = as_progress(progress)
    steps = untrained_pipeline(shape)
    workspace.load(progress.span(0.0, 0.05))
    workspace.check(steps)
    # The teacher's baseline is only a reference: ``reuse=False`` recomputes the student, not the teacher.
    teacher = require_done(
        workspace.run_now([], progress=progress.span(0.05, 0.3), tags=tags), "teacher's baseline"
    )
    student = require_done(
        workspace.run_now(steps, progress=progress.span(0.3, 1.0), tags=tags, reuse=reuse),
        "untrained student",
    )
    return _preview(shape, student, teacher)


__all__ = ["StudentPreview", "preview_student", "recorded_preview", "require_done", "untrained_pipeline"]
