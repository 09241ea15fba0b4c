"""The distillation training loop: a student against a teacher on fixed token windows, stoppable and resumable.

AdamW with linear warm-up then cosine decay to ``min_lr_ratio`` of the peak, gradient accumulation, optional
bf16 autocast (1.3-1.5x faster for training on the 2-core CPU this was sized on), budgets by optimizer steps,
training tokens or wall seconds (whichever is reached first). The data order is a function of the seed and the
window count only, so a hard-label baseline with the same seed sees exactly the same batches.

**Stop and resume.** A cancelled run (``Progress.cancel``) saves a checkpoint (the student as a Hugging Face
folder plus ``trainer_state.pt``: optimizer, schedule, step, curves) and raises :class:`RunInterrupted` naming
it; the student object holds the weights trained so far. Called again with the same checkpoint folder, the loop
continues from it, and the result equals an uninterrupted run with the same seed (the checkpoint carries all
state; the batches follow from the seed and the step).

**Finished students are kept.** When training ends, the checkpoint folder becomes the finished student (a
Hugging Face folder, plus its curves and counts, without the optimizer state), and a later call with the same
folder loads it instead of training again (``TrainResult.reused``): a pipeline that stacks another step on the
same distillation (prune → distill → quantize at a new bit width) does not pay for training twice.
"""

from __future__ import annotations

import math
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from workbench.distill.logit_store import TeacherStore
from workbench.distill.losses import distill_loss, hard_loss, soft_loss
from workbench.errors import RunInterrupted
from workbench.progress import Progress

STATE_FILE = "trainer_state.pt"


@dataclass(frozen=True)
class TrainSettings:
    """What the loop needs (the technique's :class:`~workbench.techniques.distill.DistillConfig` maps onto it)."""

    loss: str = "forward_kl"
    temperature: float = 2.0
    alpha: float = 0.5
    skew: float = 0.1
    steps: int = 0
    tokens: int = 0
    seconds: float = 0.0
    batch_size: int = 4
    grad_accum: int = 1
    lr: float = 3e-4
    weight_decay: float = 0.0
    warmup_steps: int = 5
    min_lr_ratio: float = 0.1
    bf16: bool = False
    eval_every: int = 0  # training tokens between evaluation points; 0: only before and after training
    seed: int = 0


@dataclass
class TrainResult:
    steps: int = 0
    tokens: int = 0
    seconds: float = 0.0
    final_loss: float = float("nan")
    loss_curve: dict[str, list[float]] = field(default_factory=lambda: {"step": [], "tokens": [], "loss": []})
    eval_curve: dict[str, list[float]] = field(
        default_factory=lambda: {"tokens": [], "perplexity": [], "kl": []}
    )
    resumed_from: int = 0
    reused: bool = False  # loaded from a finished student of the same settings, not trained again


def batch_rows(step: int, micro: int, n_windows: int, settings: TrainSettings) -> torch.Tensor:
    """The window indices of micro-batch ``micro`` of optimizer step ``step``: epochs of seeded permutations."""
    b = settings.batch_size
    first = (step * settings.grad_accum + micro) * b
    rows = []
    for g in range(first, first + b):
        epoch, pos = divmod(g, n_windows)
        perm = torch.randperm(
            n_windows, generator=torch.Generator().manual_seed(settings.seed * 100_003 + epoch)
        )
        rows.append(int(perm[pos]))
    return torch.tensor(rows, dtype=torch.long)


def planned_steps(settings: TrainSettings, tokens_per_step: int) -> int | None:
    """Optimizer steps the step and token budgets allow (None: only a time budget, estimated while running)."""
    limits = []
    if settings.steps > 0:
        limits.append(settings.steps)
    if settings.tokens > 0:
        limits.append(max(1, math.ceil(settings.tokens / tokens_per_step)))
    return min(limits) if limits else None


def _lr_factor(step: int, total: int, settings: TrainSettings) -> float:
    if settings.warmup_steps and step < settings.warmup_steps:
        return (step + 1) / (settings.warmup_steps + 1)
    span = max(1, total - settings.warmup_steps)
    progress = min(1.0, (step - settings.warmup_steps) / span)
    return settings.min_lr_ratio + (1 - settings.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def _autocast(settings: TrainSettings, device: torch.device) -> Any:
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=settings.bf16)


@torch.no_grad()
def evaluate_point(
    student: nn.Module, eval_ids: torch.Tensor, teacher_logits: torch.Tensor
) -> tuple[float, float]:
    """(perplexity, mean KL(teacher ‖ student) in nats per token) on held-out windows, at T = 1, in float32."""
    was_training = student.training
    student.eval()
    device = next(student.parameters()).device
    logits = student(input_ids=eval_ids.to(device), use_cache=False).logits.float().cpu()
    student.train(was_training)
    ce = float(hard_loss(logits[:, :-1], eval_ids[:, 1:]))
    kl = float(soft_loss(logits, teacher_logits, "forward_kl"))
    return math.exp(ce), kl


def _save_checkpoint(
    folder: Path,
    student: nn.Module,
    tokenizer: Any,
    opt: torch.optim.Optimizer,
    result: TrainResult,
    total: int | None,
    step_time: float,
) -> None:
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    from workbench.distill.export import save_student

    save_student(student, tokenizer, tmp)
    torch.save(
        {
            "optimizer": opt.state_dict(),
            "steps": result.steps,
            "tokens": result.tokens,
            "seconds": result.seconds,
            "loss_curve": result.loss_curve,
            "eval_curve": result.eval_curve,
            "total": total,
            "step_time": step_time,
            "student": {k: v.detach().cpu().clone() for k, v in student.state_dict().items()},
        },
        tmp / STATE_FILE,
    )
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)


def _save_finished(folder: Path, student: nn.Module, tokenizer: Any, result: TrainResult) -> None:
    """The finished student as a model folder plus its curves (no optimizer: nothing will continue it)."""
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    from workbench.distill.export import save_student

    save_student(student, tokenizer, tmp)
    torch.save(
        {
            "done": True,
            "steps": result.steps,
            "tokens": result.tokens,
            "seconds": result.seconds,
            "final_loss": result.final_loss,
            "loss_curve": result.loss_curve,
            "eval_curve": result.eval_curve,
            "student": {k: v.detach().cpu().clone() for k, v in student.state_dict().items()},
        },
        tmp / STATE_FILE,
    )
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)


def _load_finished(folder: Path, student: nn.Module) -> TrainResult | None:
    path = folder / STATE_FILE
    if not path.is_file():
        return None
    state = torch.load(path, weights_only=True)
    if not state.get("done"):
        return None
    student.load_state_dict(state["student"])
    student.eval()
    for p in student.parameters():
        p.requires_grad_(False)
    return TrainResult(
        steps=state["steps"],
        tokens=state["tokens"],
        seconds=state["seconds"],
        final_loss=state["final_loss"],
        loss_curve=state["loss_curve"],
        eval_curve=state["eval_curve"],
        reused=True,
    )


def train_student(
    student: nn.Module,
    teacher: nn.Module | None,
    windows: torch.Tensor,
    settings: TrainSettings,
    *,
    store: TeacherStore | None = None,
    eval_ids: torch.Tensor | None = None,
    progress: Progress | None = None,
    checkpoint: Path | None = None,
    tokenizer: Any = None,
    trainable: Callable[[str], bool] | None = None,
) -> TrainResult:
    """Train ``student`` in place on ``windows`` ``(N, S)`` against ``teacher`` (live) or ``store``.

    ``eval_ids`` ``(M, S)``: held-out windows for the evaluation points (perplexity and KL against the teacher).
    ``checkpoint``: the folder a stop saves to and a later call resumes from; once training finishes it holds the
    finished student, which a later call with the same folder loads instead of training.
    ``trainable``: ``trainable(name)`` says which parameters train (None: all of them); the rest stay frozen.
    Progress partials carry ``distill_step``, ``distill_tokens``, ``train_loss`` and, at evaluation points,
    ``eval_perplexity`` and ``eval_kl``, so a panel can draw live curves.
    """
    progress = progress if progress is not None else Progress.null()
    if checkpoint is not None:
        finished = _load_finished(checkpoint, student)
        if finished is not None:
            progress.update(1.0, "distilled student found (same settings): not trained again")
            return finished
    device = next(student.parameters()).device
    n_windows, seq_len = windows.shape
    tokens_per_step = settings.batch_size * settings.grad_accum * (seq_len - 1)
    total = planned_steps(settings, tokens_per_step)
    # trainable(name): the parameters to train (None: all); the others are frozen, so their gradients are not
    # computed (e.g. only the experts of a carved MoE).
    named = [(n, p) for n, p in student.named_parameters() if trainable is None or trainable(n)]
    if not named:
        raise ValueError("train_student: trainable() selects no parameter of the student")
    decay = [p for n, p in named if p.ndim >= 2]
    rest = [p for n, p in named if p.ndim < 2]
    for p in student.parameters():
        p.requires_grad_(False)
    for _, p in named:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": settings.weight_decay}, {"params": rest, "weight_decay": 0.0}],
        lr=settings.lr,
        betas=(0.9, 0.95),
    )
    result = TrainResult()
    step_time = 0.0
    if checkpoint is not None and (checkpoint / STATE_FILE).is_file():
        state = torch.load(checkpoint / STATE_FILE, weights_only=True)
        student.load_state_dict(state["student"])
        opt.load_state_dict(state["optimizer"])
        result.steps, result.tokens, result.seconds = state["steps"], state["tokens"], state["seconds"]
        result.loss_curve, result.eval_curve = state["loss_curve"], state["eval_curve"]
        total = state["total"] if total is None else total
        step_time = state["step_time"]
        result.resumed_from = result.steps

    teacher_eval = None
    if eval_ids is not None and teacher is not None:
        with torch.no_grad():
            teacher_eval = (
                teacher(input_ids=eval_ids.to(next(teacher.parameters()).device), use_cache=False)
                .logits.float()
                .cpu()
            )

    def eval_point() -> None:
        if teacher_eval is None or eval_ids is None:
            return
        ppl, kl = evaluate_point(student, eval_ids, teacher_eval)
        result.eval_curve["tokens"].append(result.tokens)
        result.eval_curve["perplexity"].append(ppl)
        result.eval_curve["kl"].append(kl)
        progress.partial(
            {
                "distill_step": result.steps,
                "distill_tokens": result.tokens,
                "eval_perplexity": ppl,
                "eval_kl": kl,
            }
        )

    if not result.eval_curve["tokens"]:
        eval_point()  # the untrained student: where the recovery curve starts
    next_eval = (
        (result.tokens // settings.eval_every + 1) * settings.eval_every if settings.eval_every else None
    )
    student.train()
    started = time.perf_counter() - result.seconds
    try:
        while True:
            elapsed = time.perf_counter() - started
            if total is not None and result.steps >= total:
                break
            if settings.tokens and result.tokens >= settings.tokens:
                break
            if settings.seconds and elapsed >= settings.seconds:
                break
            progress.check()
            t0 = time.perf_counter()
            schedule_total = (
                total
                if total is not None
                else max(result.steps + 1, int(settings.seconds / max(step_time, 1e-6)))
            )
            factor = _lr_factor(result.steps, schedule_total, settings)
            for group in opt.param_groups:
                group["lr"] = settings.lr * factor
            opt.zero_grad(set_to_none=True)
            step_loss = 0.0
            for micro in range(settings.grad_accum):
                rows = batch_rows(result.steps, micro, n_windows, settings)
                ids = windows[rows].to(device)  # (B, S)
                with _autocast(settings, device):
                    logits = student(input_ids=ids, use_cache=False).logits[:, :-1]  # (B, S-1, V)
                    teacher_logits, sparse = None, None
                    if settings.loss != "hard" and settings.alpha > 0:
                        if store is not None:
                            s_ids, s_probs = store.targets(rows, settings.temperature)
                            sparse = (s_ids[:, :-1].to(device), s_probs[:, :-1].to(device))
                        else:
                            assert teacher is not None
                            with torch.no_grad():
                                teacher_logits = teacher(input_ids=ids, use_cache=False).logits[:, :-1]
                loss = distill_loss(
                    logits,
                    ids[:, 1:],
                    loss=settings.loss,
                    teacher_logits=teacher_logits,
                    sparse=sparse,
                    temperature=settings.temperature,
                    alpha=settings.alpha,
                    skew=settings.skew,
                )
                (loss / settings.grad_accum).backward()
                step_loss += float(loss.detach()) / settings.grad_accum
            torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
            opt.step()
            result.steps += 1
            result.tokens += tokens_per_step
            step_time = (
                time.perf_counter() - t0
                if not step_time
                else 0.8 * step_time + 0.2 * (time.perf_counter() - t0)
            )
            result.seconds = time.perf_counter() - started
            result.loss_curve["step"].append(result.steps)
            result.loss_curve["tokens"].append(result.tokens)
            result.loss_curve["loss"].append(step_loss)
            result.final_loss = step_loss
            fraction = _fraction(result, settings, total)
            eta = result.seconds / fraction * (1 - fraction) if fraction > 0 else float("nan")
            progress.partial(
                {
                    "distill_step": result.steps,
                    "distill_tokens": result.tokens,
                    "train_loss": step_loss,
                    "lr": settings.lr * factor,
                    "eta_s": eta,
                    "fraction": fraction,
                }
            )
            if next_eval is not None and result.tokens >= next_eval:
                eval_point()
                next_eval += settings.eval_every
            # update() also honours a stop: the step just taken is kept and checkpointed
            progress.update(fraction, f"step {result.steps} loss {step_loss:.3f} ETA {eta:.0f} s")
    except RunInterrupted:
        student.eval()
        if checkpoint is not None:
            _save_checkpoint(checkpoint, student, tokenizer, opt, result, total, step_time)
            raise RunInterrupted(
                f"Distillation stopped at step {result.steps} ({result.tokens} training tokens); the student trained "
                f"so far is saved in {checkpoint} (a model folder that loads as a model spec). Run the same "
                "pipeline again to resume from it."
            ) from None
        raise
    student.eval()
    for p in student.parameters():
        p.requires_grad_(False)
    if not result.eval_curve["tokens"] or result.eval_curve["tokens"][-1] != result.tokens:
        eval_point()
    if result.steps and math.isnan(result.final_loss):
        result.final_loss = result.loss_curve["loss"][-1]
    if checkpoint is not None:
        _save_finished(checkpoint, student, tokenizer, result)
    return result


def _fraction(result: TrainResult, settings: TrainSettings, total: int | None) -> float:
    used = []
    if total is not None:
        used.append(result.steps / total)
    if settings.seconds:
        used.append(result.seconds / settings.seconds)
    return min(1.0, max(used)) if used else 0.0


__all__ = [
    "STATE_FILE",
    "TrainResult",
    "TrainSettings",
    "batch_rows",
    "evaluate_point",
    "planned_steps",
    "train_student",
]
