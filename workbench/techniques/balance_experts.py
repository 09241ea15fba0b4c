"""Post-hoc load balancing after DeepSeek-V3's auxiliary-loss-free method, fitted on calibration text.

DeepSeek-V3 (arXiv 2408.15664) adds a per-expert bias ``b`` to the *selection* scores only: a token goes to the
top-k of ``score + b``, but is mixed with the unbiased weights. During training ``b_e`` is nudged by
``gamma * sign(mean load - load_e)`` after every step. Here the same update runs after training, on calibration
text (``corpus.text("calibration")``), for ``iterations`` rounds, gamma shrinking linearly from ``step`` to a
tenth of it (a fixed step oscillates around the balance point); the bias of the round with the lowest mean
coefficient of variation of the load is kept. No published result exists for applying it to a trained model;
the run records load imbalance before and after, and the evaluation says what it costs in quality.

Where the router already selects with such a bias (DeepSeek-V3, GLM-4-MoE, dots1, ... ``e_score_correction_bias``;
AFMoE ``expert_bias``), that tensor is fitted, so the result saves with the model. Elsewhere (softmax routers:
Qwen-MoE, Mixtral, OLMoE, ...) a forward hook on the router re-selects the top-k of ``weights + b`` (the weights
every expert would get at k = E, which rank experts as the router's own scores do) and mixes them by the family's
rule: unchanged where it does not renormalise, renormalised to the router's constant total where it does.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from workbench.anatomy import MoEBlock, anatomy
from workbench.errors import ConfigError
from workbench.techniques.base import ApplyContext, register, register_stacking

BIAS_ATTR = "wb_selection_bias"  # (E,) tensor on a router module (hook path)
_TOTAL_ATTR = (
    "wb_selection_total"  # the router's constant routed weight per token, or None (no renormalising)
)
NATIVE_BIAS = ("e_score_correction_bias", "expert_bias")


@dataclass(frozen=True)
class BalanceExpertsConfig:
    """Even out expert load with a per-expert selection bias (DeepSeek-V3's aux-loss-free rule), fitted post hoc."""

    iterations: int = field(
        default=30, metadata={"help": "Rounds of the bias update on the calibration text."}
    )
    step: float = field(
        default=0.02,
        metadata={
            "help": "gamma: how far each round moves a bias, in units of the router's selection score."
        },
    )
    calibration_tokens: int = field(default=512, metadata={"help": "Tokens of calibration text per round."})

    def __post_init__(self) -> None:
        if isinstance(self.iterations, bool) or not isinstance(self.iterations, int) or self.iterations < 1:
            raise ConfigError(f"balance_experts: iterations={self.iterations!r} must be a whole number >= 1.")
        if not isinstance(self.step, (int, float)) or not self.step > 0:
            raise ConfigError(f"balance_experts: step={self.step!r} must be > 0, e.g. 0.02.")
        if (
            isinstance(self.calibration_tokens, bool)
            or not isinstance(self.calibration_tokens, int)
            or self.calibration_tokens < 1
        ):
            raise ConfigError(
                f"balance_experts: calibration_tokens={self.calibration_tokens!r} must be >= 1."
            )

    def label(self) -> str:
        return f"balance_experts {self.iterations}x{self.step:g}"


def native_bias(model: nn.Module, block: MoEBlock) -> str | None:
    """The full name of the router's own selection bias, where it has one."""
    for name, _axis in block.router.per_expert:
        if name.rpartition(".")[2] in NATIVE_BIAS:
            return name
    return None


def check_balance_experts(model: Any, config: BalanceExpertsConfig) -> None:
    from workbench.routing import routed_blocks, router_form

    blocks = routed_blocks(anatomy(model))
    if not blocks:
        raise ConfigError(
            "balance_experts: this model has no experts (no Mixture-of-Experts layers) to balance."
        )
    for b in blocks:
        if native_bias(model, b) is None and (router_form(model, b) != "standard" or not b.top_k_settable):
            raise ConfigError(
                f"balance_experts: {b.router.name} neither selects with a bias nor returns (logits, "
                "weights, index), so a selection bias cannot be added to it."
            )


def _get_tensor(model: nn.Module, name: str) -> torch.Tensor:
    try:
        return model.get_parameter(name)
    except AttributeError:
        return model.get_buffer(name)


def add_selection_bias_(model: nn.Module, block: MoEBlock) -> torch.Tensor:
    """The (E,) selection bias of ``block`` to fit in place: the router's own, or a new one behind a hook."""
    from workbench.routing import probe_router

    name = native_bias(model, block)
    if name is not None:
        return _get_tensor(model, name).data
    router = model.get_submodule(block.router.name)
    if BIAS_ATTR not in router.__dict__:
        out = probe_router(model, block, k=1)
        total = out[1].float().reshape(-1, out[1].shape[-1]).sum(-1)
        constant = torch.allclose(total, total[0].expand_as(total), rtol=1e-5, atol=1e-6)
        router.__dict__[_TOTAL_ATTR] = float(total[0]) if constant else None
        weight = model.get_parameter(block.router.weight)
        router.__dict__[BIAS_ATTR] = torch.zeros(block.n_experts, dtype=torch.float32, device=weight.device)
        router.register_forward_hook(_balance_hook)
    return router.__dict__[BIAS_ATTR]


def _balance_hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
    """Select the top-k of (weights at k = E) + bias; mix with the unbiased weights by the family's rule."""
    bias = module.__dict__.get(BIAS_ATTR)
    if bias is None or not (isinstance(output, tuple) and len(output) == 3):
        return None
    logits, weights, index = output
    lead, k = index.shape[:-1], int(index.shape[-1])
    saved = module.top_k
    try:
        module.top_k = bias.numel()
        _, w_all, idx_all = module.forward(*args)
    finally:
        module.top_k = saved
    w_all, idx_all = w_all.reshape(-1, w_all.shape[-1]).float(), idx_all.reshape(-1, idx_all.shape[-1])
    full = torch.zeros_like(w_all).scatter_(1, idx_all, w_all)  # (N, E) in expert order
    chosen = (full + bias.to(full.device)).topk(k, dim=-1).indices  # (N, k): selection with the bias
    mixed = full.gather(1, chosen)  # the unbiased weights of the chosen experts
    total = module.__dict__.get(_TOTAL_ATTR)
    if total is not None:
        mixed = mixed / mixed.sum(-1, keepdim=True).clamp_min(1e-30) * total
    return logits, mixed.to(weights.dtype).reshape(*lead, k), chosen.to(index.dtype).reshape(*lead, k)


def fit_balance_(model: nn.Module, ids: torch.Tensor, config: BalanceExpertsConfig) -> dict[str, Any]:
    """Fit every block's selection bias on ``ids``; returns the load CV per round and the kept round."""
    from workbench.routing import RoutingRecorder, load_imbalance, routed_blocks

    anat = anatomy(model)
    blocks = routed_blocks(anat)
    biases = {b.name: add_selection_bias_(model, b) for b in blocks}
    best = (float("inf"), -1, {n: t.clone() for n, t in biases.items()})
    history: list[float] = []
    device = next(model.parameters()).device
    for round_ in range(config.iterations + 1):
        with RoutingRecorder(model, anat) as rec, torch.no_grad():
            model(ids.to(device))
        counts = {r.name: r.counts for r in rec.blocks if r.name in biases}
        cv = sum(load_imbalance(c / c.sum().clamp_min(1))[1] for c in counts.values()) / len(counts)
        history.append(cv)
        if cv < best[0]:
            best = (cv, round_, {n: t.clone() for n, t in biases.items()})
        if round_ == config.iterations:
            break
        # a fixed step makes the sign rule oscillate around the balance point: shrink it to 10% over the rounds
        gamma = config.step * (1.0 - 0.9 * round_ / config.iterations)
        for name, c in counts.items():
            t = biases[name]
            # DeepSeek-V3's rule: raise the bias of under-loaded experts, lower it for over-loaded ones
            t += gamma * torch.sign(c.mean() - c).to(device=t.device, dtype=t.dtype)
    for name, t in biases.items():
        t.copy_(best[2][name])
    return {"cv_per_round": history, "kept_round": best[1]}


@register("balance_experts", BalanceExpertsConfig, kind="route", check=check_balance_experts)
def _apply_balance(model: Any, config: BalanceExpertsConfig, ctx: ApplyContext) -> Any:
    from workbench.routing import measure_routing, model_text_ids

    if ctx.tokenizer is None or ctx.corpus is None:
        raise ConfigError("balance_experts fits on calibration text; give a tokenizer and a corpus.")
    ids = model_text_ids(model, ctx.tokenizer, ctx.corpus.text("calibration"), config.calibration_tokens)
    first = measure_routing(model, ids)
    fit = fit_balance_(model, ids, config)
    last = measure_routing(model, ids)
    before, after = first.metrics(), last.metrics()
    ctx.metrics.update(
        {
            "load_cv_before": before["load_cv"],
            "load_cv_after": after["load_cv"],
            "load_max_over_mean_before": before["load_max_over_mean"],
            "load_max_over_mean_after": after["load_max_over_mean"],
        }
    )
    # the load per layer on the calibration text before and after, for a before/after heatmap
    ctx.extras["balance_experts"] = {
        **fit,
        "layers": first.layers,
        "load_before": first.load,
        "load_after": last.load,
    }
    return model


register_stacking(BalanceExpertsConfig, same_shapes=True)

__all__ = [
    "BalanceExpertsConfig",
    "add_selection_bias_",
    "check_balance_experts",
    "fit_balance_",
    "native_bias",
]
