"""Distillation: students cut from the teacher, distillation losses, the training loop and teacher logit stores.

- :mod:`~workbench.distill.students`: depth pruning by Block Influence, Minitron width pruning, tokenizer check.
- :mod:`~workbench.distill.losses`: forward / reverse / skew KL, generalised JSD, T² scaling, alpha mixing.
- :mod:`~workbench.distill.train`: the training loop (budgets, schedule, stop and resume, evaluation points).
- :mod:`~workbench.distill.logit_store`: top-k and sampled teacher stores, cached on disk.
- :mod:`~workbench.distill.generate`: a corpus the teacher writes from prompts (sequence-level KD), cached.
- :mod:`~workbench.distill.export`: a student as a Hugging Face folder and back as a model spec.
- :mod:`~workbench.distill.preview`: a shape's untrained student (size, perplexity, KL) as its recorded run.
- :mod:`~workbench.distill.candidates`: several shapes, the same short distillation each, ranked.
  (Neither is imported here: both build on ``workbench.techniques``, which imports this package.)

The technique files (``workbench/techniques/prune_layers.py`` and ``distill.py``) are thin over this package.
"""

from __future__ import annotations

from workbench.distill.export import save_student, student_spec
from workbench.distill.generate import GeneratedCorpus, GenerationConfig, generate_corpus
from workbench.distill.logit_store import STORE_KINDS, TeacherStore, build_store, store_bias, weights_digest
from workbench.distill.losses import LOSSES, distill_loss, hard_loss, soft_loss, sparse_forward_kl
from workbench.distill.students import (
    PROBE_TEXT,
    block_influence,
    check_same_tokenizer,
    check_width,
    drop_layers,
    layers_to_drop,
    n_parameters,
    prune_width,
    width_importance,
)
from workbench.distill.train import TrainResult, TrainSettings, train_student

__all__ = [
    "LOSSES",
    "PROBE_TEXT",
    "STORE_KINDS",
    "GeneratedCorpus",
    "GenerationConfig",
    "TeacherStore",
    "TrainResult",
    "TrainSettings",
    "block_influence",
    "build_store",
    "check_same_tokenizer",
    "check_width",
    "distill_loss",
    "drop_layers",
    "generate_corpus",
    "hard_loss",
    "layers_to_drop",
    "n_parameters",
    "prune_width",
    "save_student",
    "soft_loss",
    "sparse_forward_kl",
    "store_bias",
    "student_spec",
    "train_student",
    "weights_digest",
    "width_importance",
]
