"""Distillation: students cut from the teacher, distillation losses, the training loop and teacher logit stores.

The technique files (``workbench/techniques/prune_layers.py`` and ``distill.py``) are thin over this package.
"""

from __future__ import annotations

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

__all__ = [
    "PROBE_TEXT",
    "block_influence",
    "check_same_tokenizer",
    "check_width",
    "drop_layers",
    "layers_to_drop",
    "n_parameters",
    "prune_width",
    "width_importance",
]
