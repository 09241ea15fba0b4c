"""``prune``: cut a student from the current model, by depth (Block Influence or a list) and by width (Minitron).

The first step of the Minitron recipe (prune → distill → quantize). Depth: drop the ``drop`` decoder layers of
least Block Influence on calibration text (or exactly ``layers``); width: keep the ``ffn_size`` most active FFN
neurons and the ``heads`` most active query heads of every layer. Kept weights are the teacher's (see
:mod:`workbench.distill.students`). Ranking reads the corpus's calibration part, never its evaluation part.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from workbench.distill.students import (
    block_influence,
    check_width,
    drop_layers,
    layers_to_drop,
    n_parameters,
    prune_width,
)
from workbench.errors import ConfigError
from workbench.techniques._calibration import calibration_ids
from workbench.techniques.base import ApplyContext, meta_model, register, register_stacking


@dataclass(frozen=True)
class PruneConfig:
    """Depth and width pruning of the current model into a smaller student initialised from its weights."""

    drop: int = field(
        default=0,
        metadata={
            "help": "Decoder layers to drop, those of least Block Influence "
            "(1 - cos(input, output) on calibration text)."
        },
    )
    layers: tuple[int, ...] = field(
        default=(),
        metadata={
            "help": "Exactly these decoder layers (0-based) to drop instead of ranking them; overrides drop."
        },
    )
    ffn_size: int | None = field(
        default=None,
        metadata={"help": "FFN neurons kept per layer (the most active ones); None keeps the width."},
    )
    heads: int | None = field(
        default=None,
        metadata={
            "help": "Query heads kept per layer (a multiple of the key/value heads); None keeps them all."
        },
    )
    samples: int = field(
        default=8, metadata={"help": "Calibration windows used to rank layers, neurons, heads."}
    )
    seq_len: int = field(default=128, metadata={"help": "Tokens per calibration window."})

    def __post_init__(self) -> None:
        if self.drop < 0:
            raise ConfigError(f"prune: drop={self.drop} must be 0 or more layers.")
        if any(int(i) < 0 for i in self.layers):
            raise ConfigError(f"prune: layers={list(self.layers)} must be 0-based layer indices.")
        if self.samples < 1 or self.seq_len < 2:
            raise ConfigError(f"prune: samples={self.samples}, seq_len={self.seq_len}; use at least 1 and 2.")
        if not self.drop and not self.layers and self.ffn_size is None and self.heads is None:
            raise ConfigError(
                "prune: nothing to prune; set drop (layers by importance), layers, ffn_size or heads."
            )

    def label(self) -> str:
        parts = []
        if self.layers:
            parts.append("-L" + ",".join(str(i) for i in self.layers))
        elif self.drop:
            parts.append(f"-{self.drop}L")
        if self.ffn_size is not None:
            parts.append(f"ffn{self.ffn_size}")
        if self.heads is not None:
            parts.append(f"h{self.heads}")
        if (self.drop and not self.layers) or self.ffn_size is not None or self.heads is not None:
            parts += [
                f"{n}={getattr(self, n)}"
                for n, d in (("samples", 8), ("seq_len", 128))
                if getattr(self, n) != d
            ]
        return "prune " + " ".join(parts)


def _n_layers(model: Any) -> int:
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return int(config.num_hidden_layers)


def check_prune(model: Any, config: PruneConfig) -> None:
    n = _n_layers(model)
    n_drop = len(config.layers) if config.layers else config.drop
    if config.layers and (max(config.layers) >= n or len(set(config.layers)) != len(config.layers)):
        raise ConfigError(
            f"prune: layers={list(config.layers)}; the model has layers 0..{n - 1}, each named once."
        )
    if n_drop >= n:
        raise ConfigError(f"prune: dropping {n_drop} of {n} layers leaves none; drop at most {n - 1}.")
    check_width(model, config.ffn_size, config.heads)


def _preview(model: Any, config: PruneConfig) -> Any:
    changes: dict[str, Any] = {"num_hidden_layers": _n_layers(model) - (len(config.layers) or config.drop)}
    if config.ffn_size is not None:
        changes["intermediate_size"] = config.ffn_size
    if config.heads is not None:
        text = model.config
        changes["head_dim"] = int(
            getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        )
        changes["num_attention_heads"] = config.heads
    return meta_model(model, **changes)


register_stacking(PruneConfig, preview=_preview)


@register("prune", PruneConfig, kind="prune", check=check_prune)
def _apply_prune(model: Any, config: PruneConfig, ctx: ApplyContext) -> Any:
    before = n_parameters(model)
    needs_ids = (config.drop and not config.layers) or config.ffn_size is not None or config.heads is not None
    ids = calibration_ids(ctx, config.samples, config.seq_len, "prune") if needs_ids else None
    ctx.progress.update(0.05, "ranking layers")
    if config.layers:
        dropped = sorted(int(i) for i in config.layers)
    elif config.drop:
        influence = block_influence(model, ids)
        ctx.extras["block_influence"] = [round(v, 6) for v in influence]
        dropped = layers_to_drop(influence, config.drop)
    else:
        dropped = []
    if dropped:
        model = drop_layers(model, dropped)
    ctx.progress.update(0.5, "pruning width")
    if config.ffn_size is not None or config.heads is not None:
        model = prune_width(model, ids, ffn_size=config.ffn_size, heads=config.heads)
    ctx.extras["dropped_layers"] = dropped
    ctx.metrics["layers_dropped"] = len(dropped)
    ctx.metrics["params_before_prune"] = before
    ctx.metrics["params_after_prune"] = n_parameters(model)
    ctx.progress.update(1.0, "pruned")
    return model


__all__ = ["PruneConfig", "check_prune"]
