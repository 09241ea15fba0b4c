"""``distill``: train the current model (the student) against the loaded base model (the teacher).

The student is whatever the pipeline holds at this step (the teacher itself, or the output of a ``prune``
step: the Minitron recipe prune → distill → quantize), or any model that shares the teacher's tokenizer
(``student="<model spec>"``). Training reads only the corpus's training part; the evaluation points
(perplexity and KL against the teacher every ``eval_every`` tokens) read held-out windows of its calibration
part, so the run's own evaluation text stays unseen. See :mod:`workbench.distill.train` for the loop, stop and
resume, and :mod:`workbench.distill.logit_store` for the cached teacher targets (``teacher="topk"`` or
``"sampled"``).

``data="teacher-generated"`` trains on sequences the teacher writes first from prompts (sequence-level KD, the
``gen_*`` settings; :mod:`workbench.distill.generate`, generated once per teacher, prompts and settings and kept
on disk) instead of the corpus's training part; the evaluation text is the same either way.

A stopped run keeps the student trained so far in a checkpoint folder under ``demo_home()`` (the run is
recorded ``interrupted`` with that path); running the same pipeline again resumes from it. A finished run
leaves the trained student there (``extras["student_folder"]``, a model folder ``load_model`` reads), and a
later pipeline with the same distillation (same settings, seed, data, student and teacher) loads it instead of
training again (``training_reused`` = 1), so stacking a new quantization on a student costs no training.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch

from workbench.distill.generate import (
    PROMPT_SOURCES,
    GenerationConfig,
    generate_corpus,
    read_prompt_file,
    validate_generation,
)
from workbench.distill.logit_store import build_store, ids_digest, weights_digest
from workbench.distill.losses import LOSSES, SPARSE_LOSSES
from workbench.distill.students import check_same_tokenizer, n_parameters
from workbench.distill.train import TrainSettings, train_student
from workbench.errors import ConfigError
from workbench.techniques.base import ApplyContext, register, register_stacking

TEACHERS = ("live", "topk", "sampled")
DATA = ("corpus", "teacher-generated")
_GEN_FIELDS = (
    "gen_source",
    "gen_prompts",
    "gen_prompt_file",
    "gen_prompt_tokens",
    "gen_new_tokens",
    "gen_sequences",
    "gen_temperature",
    "gen_top_p",
    "gen_batch_size",
)


@dataclass(frozen=True)
class DistillConfig:
    """Knowledge distillation of the current model from the teacher (the loaded base model)."""

    # Stored only when set (see config_to_dict): runs recorded before these existed still match their pipelines.
    ADDED_FIELDS: ClassVar[tuple[str, ...]] = ("data", *_GEN_FIELDS)

    loss: str = field(
        default="forward_kl",
        metadata={
            "help": "forward_kl (mass-covering), reverse_kl (MiniLLM), skew_kl (DistiLLM), jsd (generalised JSD), "
            "or hard (labels only: the baseline with the same data and budget).",
            "choices": LOSSES,
        },
    )
    temperature: float = field(
        default=2.0,
        metadata={
            "help": "Softens both distributions; the soft term is scaled by T² so its weight does not shrink."
        },
    )
    alpha: float = field(
        default=0.5, metadata={"help": "Weight of the soft term: alpha·T²·KD + (1-alpha)·CE."}
    )
    skew: float = field(default=0.1, metadata={"help": "Skew KL's λ / JSD's β (DistiLLM uses 0.1)."})
    teacher: str = field(
        default="live",
        metadata={
            "help": "live (run the teacher every step), topk (cached top-k logits: biased) or sampled (cached draws "
            "from the teacher distribution: unbiased); the stores are computed once and reused.",
            "choices": TEACHERS,
        },
    )
    top_k: int = field(
        default=64,
        metadata={"help": "Logits kept per token by the topk store, draws per token by the sampled store."},
    )
    steps: int = field(default=50, metadata={"help": "Budget: optimizer steps (0: no step limit)."})
    tokens: int = field(default=0, metadata={"help": "Budget: training tokens (0: no token limit)."})
    seconds: float = field(
        default=0.0, metadata={"help": "Budget: wall seconds of training (0: no time limit)."}
    )
    batch_size: int = field(default=4, metadata={"help": "Windows per micro-batch."})
    seq_len: int = field(default=256, metadata={"help": "Tokens per training window."})
    grad_accum: int = field(default=1, metadata={"help": "Micro-batches per optimizer step."})
    lr: float = field(
        default=3e-4, metadata={"help": "Peak AdamW learning rate (after warm-up, cosine decay)."}
    )
    warmup_steps: int = field(default=5, metadata={"help": "Linear warm-up steps."})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay on matrices."})
    bf16: bool = field(
        default=False,
        metadata={
            "help": "bf16 autocast for student and teacher (1.3-1.5x faster training on the reference CPU)."
        },
    )
    eval_every: int = field(
        default=0,
        metadata={
            "help": "Training tokens between evaluation points "
            "(perplexity, KL vs teacher); 0: before and after only."
        },
    )
    eval_windows: int = field(
        default=2, metadata={"help": "Held-out windows scored at each evaluation point."}
    )
    student: str = field(
        default="",
        metadata={
            "help": "A model spec to use as the student instead of the current "
            "model (must share the teacher's tokenizer)."
        },
    )
    resume: bool = field(
        default=True,
        metadata={
            "help": "Continue from the checkpoint a stopped run with the same "
            "settings left, and reuse a finished student of the same "
            "settings; False trains afresh."
        },
    )
    data: str = field(
        default="corpus",
        metadata={
            "help": "What the student trains on: corpus (the corpus's training part) or teacher-generated "
            "(sequences the teacher writes from prompts, generated once and kept: sequence-level KD). The "
            "evaluation stays on the corpus's evaluation part either way.",
            "choices": DATA,
        },
    )
    gen_source: str = field(
        default="corpus",
        metadata={
            "help": "Prompts for teacher-generated data: corpus (the training part cut into gen_prompt_tokens "
            "prefixes), list (gen_prompts) or file (gen_prompt_file, one prompt a line).",
            "choices": PROMPT_SOURCES,
        },
    )
    gen_prompts: tuple[str, ...] = field(default=(), metadata={"help": "The prompts when gen_source='list'."})
    gen_prompt_file: str = field(
        default="", metadata={"help": "A text file of prompts (one a line) when gen_source='file'."}
    )
    gen_prompt_tokens: int = field(
        default=32, metadata={"help": "Tokens per prompt prefix cut from the corpus (gen_source='corpus')."}
    )
    gen_new_tokens: int = field(
        default=224, metadata={"help": "Tokens the teacher writes per prompt (fewer where it ends its text)."}
    )
    gen_sequences: int = field(default=32, metadata={"help": "Sequences the teacher generates."})
    gen_temperature: float = field(
        default=1.0, metadata={"help": "The teacher's sampling temperature; 0 is greedy decoding."}
    )
    gen_top_p: float = field(
        default=1.0,
        metadata={"help": "Nucleus sampling: draw from the smallest set of tokens holding gen_top_p."},
    )
    gen_batch_size: int = field(default=8, metadata={"help": "Prompts the teacher continues together."})

    def __post_init__(self) -> None:
        if self.data not in DATA:
            raise ConfigError(f"distill: data={self.data!r}; choose one of {', '.join(DATA)}.")
        if isinstance(self.gen_prompts, list):  # from the CLI or JSON; frozen configs hash, so keep a tuple
            object.__setattr__(self, "gen_prompts", tuple(self.gen_prompts))
        validate_generation(
            {f[len("gen_") :]: getattr(self, f) for f in _GEN_FIELDS} | {"seed": 0, "stop_at_eos": True},
            who="distill",
            prefix="gen_",
            used=self.data == "teacher-generated",  # on the corpus the prompt source need not be complete
        )
        if self.loss not in LOSSES:
            raise ConfigError(f"distill: loss={self.loss!r}; choose one of {', '.join(LOSSES)}.")
        if not (
            isinstance(self.temperature, (int, float))
            and self.temperature > 0
            and math.isfinite(self.temperature)
        ):
            raise ConfigError(
                f"distill: temperature={self.temperature} must be > 0 (1 leaves the teacher as it is, "
                "2-4 is usual)."
            )
        if not 0 <= self.alpha <= 1:
            raise ConfigError(
                f"distill: alpha={self.alpha} must be in [0, 1] (0: hard labels only, 1: soft only)."
            )
        if not 0 < self.skew < 1:
            raise ConfigError(f"distill: skew={self.skew} must be in (0, 1); DistiLLM uses 0.1, JSD 0.5.")
        if self.teacher not in TEACHERS:
            raise ConfigError(f"distill: teacher={self.teacher!r}; choose one of {', '.join(TEACHERS)}.")
        if self.teacher != "live" and self.loss not in SPARSE_LOSSES:
            raise ConfigError(
                f"distill: loss={self.loss!r} needs the full teacher distribution; use teacher='live', "
                f"or loss='forward_kl' with a {self.teacher} store."
            )
        if self.top_k < 1:
            raise ConfigError(f"distill: top_k={self.top_k} must be at least 1.")
        if min(self.steps, self.tokens, self.seconds) < 0 or not (self.steps or self.tokens or self.seconds):
            raise ConfigError(
                f"distill: the budget (steps={self.steps}, tokens={self.tokens}, seconds={self.seconds}) "
                "is zero; set at least one of steps, tokens or seconds above 0."
            )
        for name in ("batch_size", "grad_accum", "eval_windows"):
            if getattr(self, name) < 1:
                raise ConfigError(f"distill: {name}={getattr(self, name)} must be at least 1.")
        if self.seq_len < 2:
            raise ConfigError(f"distill: seq_len={self.seq_len} must be at least 2 tokens.")
        if self.lr <= 0 or self.warmup_steps < 0 or self.weight_decay < 0 or self.eval_every < 0:
            raise ConfigError(
                "distill: lr must be > 0 and warmup_steps, weight_decay, eval_every >= 0 "
                f"(got {self.lr}, {self.warmup_steps}, {self.weight_decay}, {self.eval_every})."
            )

    def label(self) -> str:
        budget = (
            f"{self.steps} steps"
            if self.steps
            else f"{self.tokens} tok"
            if self.tokens
            else f"{self.seconds:g} s"
        )
        if self.loss == "hard":
            return f"distill hard {budget}" + self._data_label()
        store = "" if self.teacher == "live" else f" {self.teacher}{self.top_k}"
        skew = f" skew{self.skew:g}" if self.loss in ("skew_kl", "jsd") else ""
        return (
            f"distill {self.loss} T{self.temperature:g} a{self.alpha:g}{skew}{store} {budget}"
            + self._data_label()
            + self._changed()
        )

    def _data_label(self) -> str:
        """' teacher-gen 32x224 temp1' and the other generation settings that differ ('' for the corpus)."""
        if self.data == "corpus":
            return ""
        how = "greedy" if self.gen_temperature == 0 else f"temp{self.gen_temperature:g}"
        if self.gen_top_p < 1:
            how += f" top-p{self.gen_top_p:g}"
        text = f" teacher-gen {self.gen_sequences}x{self.gen_new_tokens} {how}"
        if self.gen_source == "list":
            text += f" prompts={list(self.gen_prompts)!r}"
        elif self.gen_source == "file":
            text += f" prompts={self.gen_prompt_file}"
        elif self.gen_prompt_tokens != 32:
            text += f" prefix{self.gen_prompt_tokens}"
        return text + (f" gen_batch_size={self.gen_batch_size}" if self.gen_batch_size != 8 else "")

    def _changed(self) -> str:
        """The other settings that differ from their defaults, so different runs never share a label."""
        from dataclasses import fields

        shown = {
            "loss",
            "temperature",
            "alpha",
            "skew",
            "teacher",
            "top_k",
            "steps",
            "tokens",
            "seconds",
            "resume",
        }
        if self.data != "corpus":  # _data_label shows them
            shown |= {"data", *_GEN_FIELDS}
        extra = [
            f"{f.name}={getattr(self, f.name)}"
            for f in fields(self)
            if f.name not in shown and getattr(self, f.name) != f.default
        ]
        if self.steps and (self.tokens or self.seconds):  # a second budget
            extra += [f"{n}={getattr(self, n):g}" for n in ("tokens", "seconds") if getattr(self, n)]
        return (" " + " ".join(extra)) if extra else ""

    def settings(self, seed: int) -> TrainSettings:
        keys = set(TrainSettings.__dataclass_fields__) - {"seed"}
        return TrainSettings(seed=seed, **{k: v for k, v in asdict(self).items() if k in keys})

    def generation(self, seed: int) -> GenerationConfig:
        """The teacher-generated data's settings (``gen_<name>`` → ``name``), seeded by the run's seed."""
        return GenerationConfig(seed=seed, **{f[len("gen_") :]: getattr(self, f) for f in _GEN_FIELDS})


def _student_model(config: DistillConfig) -> Any:
    from workbench.models import load_model

    return load_model(config.student)


def check_distill(model: Any, config: DistillConfig) -> None:
    """A named student must not be larger than the current model and must share its vocabulary size; a prompt
    file for teacher-generated data must hold prompts."""
    if config.data == "teacher-generated" and config.gen_source == "file":
        read_prompt_file(config.gen_prompt_file, who="distill", name="gen_prompt_file")
    if not config.student:
        return
    loaded = _student_model(config)
    teacher_n, student_n = n_parameters(model), n_parameters(loaded.model)
    if student_n > teacher_n:
        raise ConfigError(
            f"distill: the student {config.student!r} has {student_n:,} parameters, more than the "
            f"teacher's {teacher_n:,}; pick a smaller student (or prune one from the teacher)."
        )
    t_vocab, s_vocab = (
        model.get_output_embeddings().weight.shape[0],
        loaded.model.get_output_embeddings().weight.shape[0],
    )
    if t_vocab != s_vocab:
        raise ConfigError(
            f"distill: the student {config.student!r} has {s_vocab} output logits, the teacher "
            f"{t_vocab}; their tokenizers differ, so pick a student sharing the teacher's tokenizer."
        )


register_stacking(DistillConfig, same_shapes=True)


def _windows(tokenizer: Any, text: str, seq_len: int) -> torch.Tensor:
    ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)
    n = ids.numel() // seq_len
    return ids[: n * seq_len].reshape(n, seq_len)


def checkpoint_root() -> Path:
    from workbench.models import demo_home

    return Path(demo_home()) / "distill_checkpoints"


def _generated_windows(
    teacher: Any, config: DistillConfig, ctx: ApplyContext, teacher_digest: str, progress: Any
) -> torch.Tensor:
    """Training windows ``(N, seq_len)`` cut from the sequences the teacher writes (generated once, then read
    from the cache), with the generation's cost in the step's metrics and a sample in its extras."""
    generated = generate_corpus(
        teacher,
        ctx.tokenizer,
        config.generation(ctx.seed),
        corpus=ctx.corpus,
        progress=progress,
        teacher_digest=teacher_digest,
    )
    # The cost of making the corpus, kept with it: a run that reuses it reports what it cost and reused = 1.
    ctx.metrics["generation_seconds"] = generated.seconds
    ctx.metrics["generation_tokens"] = generated.new_tokens
    ctx.metrics["generation_sequences"] = generated.n_sequences
    ctx.metrics["generation_tokens_per_s"] = generated.new_tokens / max(generated.seconds, 1e-9)
    ctx.metrics["generation_reused"] = int(generated.reused)
    ctx.extras["generation"] = {
        "folder": str(generated.folder),
        "prompt_tokens": int(sum(generated.prompt_lengths)),
        "sample_prompt": ctx.tokenizer.decode(generated.sequence(0)[: generated.prompt_lengths[0]].tolist()),
        "sample": ctx.tokenizer.decode(generated.continuation(0).tolist())[:500],
    }
    return generated.windows(config.seq_len)


@register("distill", DistillConfig, kind="distill", check=check_distill)
def _apply_distill(model: Any, config: DistillConfig, ctx: ApplyContext) -> Any:
    teacher = ctx.base
    if teacher is None or ctx.tokenizer is None or ctx.corpus is None:
        raise ConfigError(
            "distill needs the teacher, its tokenizer and a corpus: run it through run_experiment, "
            "or pass base=, tokenizer= and corpus= in the ApplyContext."
        )
    if config.student:
        loaded = _student_model(config)
        check_same_tokenizer(ctx.tokenizer, loaded.tokenizer)
        import copy

        model = copy.deepcopy(loaded.model)
    # A dense model carved into experts (moefy) holds a little more than the teacher (its routers) but a token
    # uses fewer: what is compared there is the parameters per token at the k it runs (recovery after moefy).
    from workbench.moefy import active_counts, moe_blocks

    student_n = int(active_counts(model)["active_params"]) if moe_blocks(model) else n_parameters(model)
    if student_n > n_parameters(teacher):
        raise ConfigError(
            f"distill: the student has {student_n:,} parameters (per token), more than the teacher's "
            f"{n_parameters(teacher):,}; distil into a smaller model (after moefy: route to a lower k first)."
        )
    teacher_digest = weights_digest(teacher)
    progress = ctx.progress
    ctx.extras["training_data"] = config.data
    if config.data == "teacher-generated":
        windows = _generated_windows(teacher, config, ctx, teacher_digest, ctx.progress.span(0.0, 0.4))
        progress = ctx.progress.span(0.4, 1.0)
        if windows.shape[0] < config.batch_size:
            raise ConfigError(
                f"distill: the teacher-generated corpus holds {windows.shape[0]} windows of {config.seq_len} "
                f"tokens, fewer than batch_size={config.batch_size}; raise gen_sequences or gen_new_tokens, "
                "or lower seq_len or batch_size."
            )
    else:
        windows = _windows(ctx.tokenizer, ctx.corpus.text("training"), config.seq_len)
    if windows.shape[0] < config.batch_size:
        raise ConfigError(
            f"distill: the corpus's training part holds {windows.shape[0]} windows of {config.seq_len} "
            f"tokens, fewer than batch_size={config.batch_size}; lower seq_len or batch_size."
        )
    held_out = _windows(ctx.tokenizer, ctx.corpus.text("calibration"), config.seq_len)[: config.eval_windows]
    settings = {k: v for k, v in asdict(config).items() if k != "resume"}
    key = hashlib.sha256(
        json.dumps(
            {
                "config": settings,
                "seed": ctx.seed,
                "ids": ids_digest(windows),
                "student": weights_digest(model),
                "teacher": teacher_digest,
            },
            sort_keys=True,
        ).encode()
    ).hexdigest()[:20]
    checkpoint = checkpoint_root() / key
    if not config.resume:
        shutil.rmtree(checkpoint, ignore_errors=True)
    store = None
    train_progress = progress
    if config.teacher != "live" and config.loss != "hard" and config.alpha > 0:
        store = build_store(
            teacher,
            windows,
            kind=config.teacher,
            k=config.top_k,
            temperature=config.temperature,
            seed=ctx.seed,
            progress=progress.span(0.0, 0.2),
            teacher_digest=teacher_digest,
        )
        train_progress = progress.span(0.2, 1.0)
        ctx.metrics["store_bytes_per_token"] = store.bytes_per_token
    result = train_student(
        model,
        teacher,
        windows,
        config.settings(ctx.seed),
        store=store,
        eval_ids=held_out if held_out.shape[0] else None,
        progress=train_progress,
        checkpoint=checkpoint,
        tokenizer=ctx.tokenizer,
    )
    ctx.metrics["training_tokens"] = result.tokens
    ctx.metrics["training_steps"] = result.steps
    ctx.metrics["training_seconds"] = result.seconds
    ctx.metrics["final_loss"] = result.final_loss
    if result.resumed_from:
        ctx.metrics["resumed_from_step"] = result.resumed_from
    ctx.metrics["training_reused"] = int(result.reused)
    ctx.extras["student_folder"] = str(checkpoint)
    ctx.extras["loss_curve"] = result.loss_curve
    ctx.extras["eval_curve"] = result.eval_curve
    return model


__all__ = ["TEACHERS", "DistillConfig", "check_distill", "checkpoint_root"]
