"""Technique ``moefy``: a dense model's feed-forward blocks made into Mixture-of-Experts blocks, without training.

``mode="carve"`` (default, after CMoE 2025) splits each Llama-style MLP's neurons into always-on shared neurons
and ``n_experts`` balanced routed experts clustered by co-activation on calibration text, with a router built
from the same statistics; ``mode="upcycle"`` copies the MLP into ``n_experts`` experts behind a new (uniform)
softmax router, Mixtral-style, as a start for training. The conversion is :mod:`workbench.moefy`; the converted
blocks look like native MoE blocks to :mod:`workbench.anatomy`, so ``top_k`` can be changed afterwards (the
expert slider, the ``route`` technique) and quantizers stack on top.

Reported metrics: ``active_ffn_fraction`` (FFN neurons a token runs over the dense model's), ``active_params``
(parameters a token uses), ``moe_total_params`` and ``conversion_seconds``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from workbench import moefy
from workbench.errors import ConfigError
from workbench.techniques.base import ApplyContext, register, register_stacking

CALIBRATION_SEQ_LEN = 256  # tokens per calibration window: short windows give more distinct text per token


@dataclass(frozen=True)
class MoefyConfig:
    """Turn every dense feed-forward block into shared + routed experts (CMoE-style), or upcycle it (Mixtral-style)."""

    mode: str = field(
        default="carve",
        metadata={
            "help": "carve: split the neurons into shared + routed experts from calibration activations (no "
            "training); upcycle: copy the whole MLP into every expert behind a new uniform router.",
            "choices": moefy.MODES,
        },
    )
    n_experts: int = field(default=8, metadata={"help": "Routed experts per block (E)."})
    top_k: int = field(
        default=4, metadata={"help": "Experts each token runs (1..E); can be changed afterwards."}
    )
    shared_fraction: float = field(
        default=0.125,
        metadata={
            "help": "carve: fraction of neurons kept always on (a shared expert), rounded up so the rest splits into "
            "E equal experts; ignored when n_shared is set."
        },
    )
    n_shared: int | None = field(
        default=None,
        metadata={
            "help": "carve: exact number of always-on neurons per block; the rest must divide by n_experts."
        },
    )
    router: str = field(
        default="regression",
        metadata={
            "help": "carve: regression (least-squares fit of each expert's share of the output on the block input) "
            "or representative (the activation of each expert's most central neuron, as in CMoE).",
            "choices": moefy.ROUTERS,
        },
    )
    calibration_tokens: int = field(
        default=4096,
        metadata={"help": "carve: tokens of the corpus's calibration part the statistics are read from."},
    )
    router_std: float = field(
        default=0.0,
        metadata={
            "help": "upcycle: std of the new router's random weights; 0 gives a uniform router, which reproduces "
            "the dense model exactly."
        },
    )
    seed: int = field(default=0, metadata={"help": "Seed of the calibration windows and the clustering."})

    def __post_init__(self) -> None:
        if self.mode not in moefy.MODES:
            raise ConfigError(f"moefy: mode={self.mode!r} is not one of {', '.join(moefy.MODES)}.")
        if not isinstance(self.n_experts, int) or self.n_experts < 2:
            raise ConfigError(f"moefy: n_experts={self.n_experts!r}; use at least 2 experts.")
        if not isinstance(self.top_k, int) or not 1 <= self.top_k <= self.n_experts:
            raise ConfigError(
                f"moefy: top_k={self.top_k!r} is out of range for n_experts={self.n_experts}; "
                f"choose 1..{self.n_experts}."
            )
        if not 0.0 <= self.shared_fraction < 1.0:
            raise ConfigError(f"moefy: shared_fraction={self.shared_fraction!r}; use a fraction in [0, 1).")
        if self.n_shared is not None and (not isinstance(self.n_shared, int) or self.n_shared < 0):
            raise ConfigError(
                f"moefy: n_shared={self.n_shared!r}; use a neuron count >= 0, or None to use shared_fraction."
            )
        if self.router not in moefy.ROUTERS:
            raise ConfigError(f"moefy: router={self.router!r} is not one of {', '.join(moefy.ROUTERS)}.")
        if not isinstance(self.calibration_tokens, int) or self.calibration_tokens < CALIBRATION_SEQ_LEN:
            raise ConfigError(
                f"moefy: calibration_tokens={self.calibration_tokens!r}; use at least "
                f"{CALIBRATION_SEQ_LEN} (a few thousand give stable clusters)."
            )
        if self.router_std < 0:
            raise ConfigError(f"moefy: router_std={self.router_std!r}; use 0 (uniform) or a positive std.")

    def label(self) -> str:
        if self.mode == "upcycle":
            return f"moefy upcycle E{self.n_experts} k{self.top_k}"
        shared = f"s{self.n_shared}" if self.n_shared is not None else f"s{self.shared_fraction:g}"
        return f"moefy E{self.n_experts} k{self.top_k} {shared}" + (
            "" if self.router == "regression" else " rep"
        )


def _plan(model: Any, config: MoefyConfig) -> moefy.Plan:
    return moefy.plan(
        model,
        mode=config.mode,
        n_experts=config.n_experts,
        top_k=config.top_k,
        router=config.router,
        n_shared=config.n_shared,
        shared_fraction=config.shared_fraction,
    )


def check_moefy(model: Any, config: MoefyConfig) -> None:
    """Before any work: a Llama-style MLP in every layer, experts that split the neurons evenly, memory for
    upcycling (E copies of every MLP)."""
    _plan(model, config)  # raises ConfigError for a model or split that does not fit
    if config.mode == "upcycle":
        from workbench.models.memory import check_fits_in_memory

        ffns = moefy.dense_ffns(model)
        per_elem = next(model.parameters()).element_size()
        extra = sum(3 * f.hidden * f.intermediate for f in ffns) * (config.n_experts - 1) * per_elem
        check_fits_in_memory(extra, f"upcycled to {config.n_experts} experts")


def _preview(model: Any, config: MoefyConfig) -> Any:
    """The converted structure on the meta device (no weights), for the checks of later pipeline steps."""
    import copy

    recipe = _plan(model, config)
    view = copy.deepcopy(model).to("meta")
    return moefy.build_structure_(view, recipe)


register_stacking(MoefyConfig, preview=_preview)


@register("moefy", MoefyConfig, kind="route", check=check_moefy)
def _apply_moefy(model: Any, config: MoefyConfig, ctx: ApplyContext) -> Any:
    t0 = time.perf_counter()
    recipe = _plan(model, config)
    ids = None
    if config.mode == "carve":
        from workbench.techniques._calibration import calibration_ids

        n_windows = -(-config.calibration_tokens // CALIBRATION_SEQ_LEN)
        ids = calibration_ids(ctx, n_windows, CALIBRATION_SEQ_LEN, "moefy")
    moefy.convert_(
        model,
        recipe,
        ids,
        seed=config.seed,
        router_std=config.router_std,
        progress=ctx.progress,
        report=lambda f, msg: ctx.progress.update(f, msg),
    )
    counts = moefy.active_counts(model)
    ctx.metrics.update(
        {
            "active_ffn_fraction": counts["active_ffn_fraction"],
            "active_params": counts["active_params"],
            "moe_total_params": counts["total_params"],
            "conversion_seconds": time.perf_counter() - t0,
        }
    )
    ctx.extras["moefy"] = {"plan": recipe.to_dict()}
    return model


# Recovery of a carved model: knowledge distillation from the base model at the k it will run (pure KL at
# T = 1: the labels of the text are not the target). Measured on demo-moe (docs/moe.md, "Recovery"): training
# every parameter recovers most per minute, lr 1e-4 lowers KL at both k = 6 and k = 4 where 3e-4 overfits k = 6.
RECOVERY_SETTINGS: dict[str, Any] = {
    "seq_len": 128,
    "batch_size": 2,
    "lr": 1e-4,
    "warmup_steps": 2,
    "alpha": 1.0,
    "temperature": 1.0,
}


def recovery_pipeline(k: int, steps: int = 12) -> list[Any]:
    """``route k → distill``: the steps that recover a converted model at k against the run's base model (the
    dense original, or the converted model stored at k = E, which computes the same)."""
    from workbench.techniques import make_config

    if not isinstance(steps, int) or steps < 1:
        raise ConfigError(
            f"moefy recovery: steps={steps!r}; use at least 1 distillation step (12 is measured)."
        )
    return [make_config("route", k=int(k)), make_config("distill", steps=steps, **RECOVERY_SETTINGS)]


__all__ = ["CALIBRATION_SEQ_LEN", "RECOVERY_SETTINGS", "MoefyConfig", "check_moefy", "recovery_pipeline"]
