"""Expert routing on native Mixture-of-Experts models: active experts per token, live, and measured routing.

``route`` sets k for the whole model or per decoder layer through the anatomy's top-k attributes (changing
``config.num_experts_per_tok`` after loading does nothing: each router copies k at build time), decides what
happens to the routing weights at the new k (``renormalize``), can route dynamically (top-p, NAEE's skipping)
and then records what the routers really picked on the evaluation text: expert load per layer, imbalance, the
measured mean active experts, active parameters and FLOPs per token (see :mod:`workbench.routing`).

    apply_(model, RouteConfig(k=1))                                # one expert per token everywhere
    apply_(model, RouteConfig(k_per_layer={0: 1, 3: 2}))           # per layer; other layers keep theirs
    apply_(model, RouteConfig(top_p=0.8))                          # as many as reach 80% of the router mass

Renormalisation at a smaller k (``renormalize``):
    "model"  keep the family's rule as the checkpoint has it (Qwen-MoE/OLMoE default: no renormalisation, so
             a lower k also lowers the routed weight; Mixtral, GPT-OSS, Granite: always renormalised).
    True     the k weights are divided by their sum: flips ``norm_topk_prob`` (Qwen-MoE, OLMoE, DeepSeek-V3,
             ...) or sets DBRX's p-norm to p=1; a family that already renormalises in code needs nothing.
    False    no renormalisation: flips the switch off; refused where the family renormalises in code.
PhiMoE's sparsemixer always picks two experts whatever k says, so any other k, and dynamic routing, is refused.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from workbench.anatomy import MoEBlock, anatomy
from workbench.errors import ConfigError
from workbench.techniques.base import ApplyContext, register, register_stacking

RENORMALIZE = ("model", True, False)
# Tokens of the evaluation text the routing is recorded on after routing is set (0: do not measure).
DEFAULT_MEASURE_TOKENS = 256


def _per_layer(value: Any) -> tuple[tuple[int, int], ...]:
    """``{0: 1, 3: 2}``, ``[(0, 1), (3, 2)]``, ``"0:1, 3:2"`` or JSON's ``{"0": 1}`` / ``[[0, 1]]`` as sorted
    (layer, k) pairs."""
    if value is None:
        return ()
    if isinstance(value, str):  # "0:1, 3:2", as a command line or a text field writes it
        value = [part.split(":", 1) for part in value.replace(";", ",").split(",") if part.strip()]
        if any(len(pair) != 2 for pair in value):
            raise ConfigError("route: k_per_layer entries are layer:k, e.g. '0:1, 3:2'.")
    items = value.items() if isinstance(value, Mapping) else value
    pairs = {}
    try:
        for layer, k in items:
            if isinstance(k, bool) or isinstance(layer, bool):
                raise TypeError
            pairs[int(layer)] = int(k)
    except (TypeError, ValueError):
        raise ConfigError(
            f"route: k_per_layer={value!r} is not a mapping of decoder layer to k; write e.g. {{0: 1, 3: 2}}."
        ) from None
    return tuple(sorted(pairs.items()))


@dataclass(frozen=True)
class RouteConfig:
    """Active experts per token on a native MoE model: k overall or per layer, dynamic routing, measured load."""

    k: int | None = field(
        default=None,
        metadata={"help": "Experts per token in every MoE layer, 1 to E (None: keep the model's k)."},
    )
    k_per_layer: tuple[tuple[int, int], ...] = field(
        default=(),
        metadata={"help": "k for single decoder layers, e.g. {0: 1, 3: 2}; wins over `k` in those layers."},
    )
    renormalize: str | bool = field(
        default="model",
        metadata={
            "help": "Routing weights at the new k: 'model' keeps the family's rule, True divides the k weights by "
            "their sum (flips norm_topk_prob), False does not.",
            "choices": RENORMALIZE,
        },
    )
    top_p: float | None = field(
        default=None,
        metadata={
            "help": "Dynamic top-p: per token the fewest experts whose router probability reaches p (0 < p <= 1)."
        },
    )
    skip_beta: float | None = field(
        default=None,
        metadata={
            "help": "NAEE dynamic skipping: drop a selected expert whose weight is below beta x the top one "
            "(0 < beta <= 1)."
        },
    )
    measure_tokens: int = field(
        default=DEFAULT_MEASURE_TOKENS,
        metadata={
            "help": "Tokens of the evaluation text the routing is recorded on (expert load, active experts); 0: none."
        },
    )
    budget: float | None = field(
        default=None,
        metadata={
            "help": "Share of the active parameters per token to keep (0 < b <= 1); each layer's k is chosen from its "
            "measured sensitivity on calibration text (route_for_budget). Not with k, k_per_layer or dynamic "
            "routing."
        },
    )

    def __post_init__(self) -> None:
        object.__setattr__(self, "k_per_layer", _per_layer(self.k_per_layer))
        for where, k in [("k", self.k), *((f"k_per_layer[{layer}]", k) for layer, k in self.k_per_layer)]:
            if k is None:
                continue
            if isinstance(k, bool) or not isinstance(k, int):
                raise ConfigError(f"route: {where}={k!r} must be a whole number of experts, e.g. 2.")
            if k < 1:
                raise ConfigError(
                    f"route: {where}={k} leaves no routed expert (only the residual and shared experts would "
                    "remain); choose k >= 1."
                )
        if self.renormalize not in RENORMALIZE or (
            isinstance(self.renormalize, int) and not isinstance(self.renormalize, bool)
        ):
            raise ConfigError(f"route: renormalize={self.renormalize!r}; use 'model', True or False.")
        if self.top_p is not None and not (isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1):
            raise ConfigError(f"route: top_p={self.top_p!r} must lie in (0, 1], e.g. 0.8.")
        if self.skip_beta is not None and not (
            isinstance(self.skip_beta, (int, float)) and 0 < self.skip_beta <= 1
        ):
            raise ConfigError(f"route: skip_beta={self.skip_beta!r} must lie in (0, 1], e.g. 0.3.")
        if (
            isinstance(self.measure_tokens, bool)
            or not isinstance(self.measure_tokens, int)
            or self.measure_tokens < 0
        ):
            raise ConfigError(f"route: measure_tokens={self.measure_tokens!r} must be a whole number >= 0.")

        if self.budget is not None:
            if not (
                isinstance(self.budget, (int, float))
                and not isinstance(self.budget, bool)
                and 0 < self.budget <= 1
            ):
                raise ConfigError(f"route: budget={self.budget!r} must lie in (0, 1], e.g. 0.7.")
            if self.k is not None or self.k_per_layer or self.dynamic:
                raise ConfigError(
                    "route: budget chooses each layer's k itself; leave k, k_per_layer, top_p and "
                    "skip_beta unset with it."
                )

    @property
    def dynamic(self) -> bool:
        return self.top_p is not None or self.skip_beta is not None

    def k_for(self, block: MoEBlock) -> int | None:
        """The k this config asks of ``block`` (None: leave it as it is)."""
        return dict(self.k_per_layer).get(block.layer, self.k)

    def label(self) -> str:
        """``route k=2``, ``route k=L0:1,L3:2``, ``route k=2 top-p 0.8 renorm``."""
        parts = ["route"]
        if self.k is not None:
            parts.append(f"k={self.k}")
        if self.k_per_layer:
            parts.append("k=" + ",".join(f"L{layer}:{k}" for layer, k in self.k_per_layer))
        if self.top_p is not None:
            parts.append(f"top-p {self.top_p:g}")
        if self.skip_beta is not None:
            parts.append(f"skip {self.skip_beta:g}")
        if self.budget is not None:
            parts.append(f"budget {self.budget:.0%}")
        if isinstance(self.renormalize, bool):
            parts.append("renorm" if self.renormalize else "no-renorm")
        return " ".join(parts) if len(parts) > 1 else "route (as built)"


def _no_experts_message(model: Any) -> str:
    from workbench.techniques.base import _TECHNIQUES

    hint = (
        " Convert it first with technique 'moefy' (a dense model split into experts), then route."
        if "moefy" in _TECHNIQUES
        else ""
    )
    name = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
    return f"route: this {name} model has no experts (no Mixture-of-Experts layers), so there is nothing to route.{hint}"


def check_route(model: Any, config: RouteConfig) -> None:
    """Every bad setting named before any work: a dense model, k above E, PhiMoE, a layer without experts."""
    from workbench.routing import norm_flag, renormalises_in_code, routed_blocks, router_form

    anat = anatomy(model)
    if not anat.is_moe:
        raise ConfigError(_no_experts_message(model))
    blocks = routed_blocks(anat)
    moe_layers = sorted({b.layer for b in blocks})
    missing = [layer for layer, _ in config.k_per_layer if layer not in moe_layers]
    if missing:
        raise ConfigError(
            f"route: k_per_layer names layer(s) {missing} without experts; the MoE layers are {moe_layers}."
        )
    if config.budget is not None:
        _check_budget(model, config, blocks)
    for block in blocks:
        k = config.k_for(block)
        if not block.top_k_attrs:
            raise ConfigError(
                f"route: {block.name} has no top_k attribute to set; this router cannot be routed."
            )
        if k is not None and k > block.n_experts:
            raise ConfigError(
                f"route: k={k} is more than the {block.n_experts} experts of {block.name}; choose 1 to "
                f"{block.n_experts}."
            )
        if not block.top_k_settable and ((k is not None and k != block.top_k) or config.dynamic):
            raise ConfigError(
                f"route: {anat.model_type}'s router ({block.router.name}) always picks exactly {block.top_k} "
                f"experts (its sparsemixer ignores k), so k={k} or dynamic routing would change nothing; keep "
                f"k={block.top_k} and no top_p/skip_beta."
            )
        holder = model.get_submodule(block.top_k_attrs[0][0])
        n_group, topk_group = getattr(holder, "n_group", None), getattr(holder, "topk_group", None)
        if k is not None and isinstance(n_group, int) and isinstance(topk_group, int) and n_group > 1:
            limit = topk_group * block.n_experts // n_group
            if k > limit:
                raise ConfigError(
                    f"route: k={k} exceeds what {block.router.name}'s group limit allows ({topk_group} of "
                    f"{n_group} groups of {block.n_experts // n_group} experts = {limit}); choose k <= {limit}."
                )
        if config.dynamic and router_form(model, block) != "standard":
            raise ConfigError(
                f"route: dynamic routing (top_p, skip_beta) needs a router that returns (logits, weights, index); "
                f"{block.router.name} ({type(holder).__name__}) does not. Use a fixed k instead."
            )
        if config.renormalize in (True, False) and norm_flag(model, block) is None:
            fixed = renormalises_in_code(model, block)
            if fixed is None or fixed != config.renormalize:
                rule = {True: "always renormalises", False: "never renormalises", None: "has a fixed rule"}[
                    fixed
                ]
                raise ConfigError(
                    f"route: renormalize={config.renormalize} is not available for {anat.model_type}: its router "
                    f"{rule} and has no norm_topk_prob switch; use renormalize='model'."
                )


def _check_budget(model: Any, config: RouteConfig, blocks: list[MoEBlock]) -> None:
    """A budget below k = 1 in every layer is refused from the shapes alone, before any text is run."""
    from workbench.models import size_report
    from workbench.routing import expert_params

    total = size_report(model).n_params
    now = total - sum((b.n_experts - int(b.top_k or 1)) * expert_params(model, b) for b in blocks)
    floor = total - sum((b.n_experts - 1) * expert_params(model, b) for b in blocks if b.top_k_settable)
    if config.budget * now < floor:
        raise ConfigError(
            f"route: budget={config.budget:g} is {config.budget * now:,.0f} active parameters per token, below "
            f"what k=1 in every layer reaches ({floor:,.0f}, {floor / now:.0%} of now); choose budget >= "
            f"{floor / now:.2f}."
        )


@register("route", RouteConfig, kind="route", check=check_route)
def _apply_route(model: Any, config: RouteConfig, ctx: ApplyContext) -> Any:
    from workbench.routing import norm_flag, routed_blocks, set_dynamic_, set_norm_, set_top_k_

    chosen = _budget_k(model, config, ctx) if config.budget is not None else {}
    for block in routed_blocks(anatomy(model)):
        k = chosen.get(block.layer, config.k_for(block))
        if k is not None:
            set_top_k_(model, block, k)
        if config.renormalize in (True, False) and norm_flag(model, block) is not None:
            set_norm_(model, block, bool(config.renormalize))
        if config.dynamic:
            set_dynamic_(model, block, config.top_p, config.skip_beta)
    # CausalLM.num_experts_per_tok is read only for the auxiliary loss; keep it in step with a global k.
    if (
        config.k is not None
        and not config.k_per_layer
        and isinstance(getattr(model, "num_experts_per_tok", None), int)
    ):
        from workbench.routing import _save

        _save(model, "", "num_experts_per_tok")
        model.num_experts_per_tok = config.k
    record_routing(model, config.measure_tokens, ctx)
    return model


def _budget_k(model: Any, config: RouteConfig, ctx: ApplyContext) -> dict[int, int]:
    """Per-layer k for ``config.budget`` from the sensitivity on calibration text (recorded in extras)."""
    from workbench.routing import model_text_ids

    if ctx.tokenizer is None or ctx.corpus is None:
        raise ConfigError(
            "route: budget measures each layer's sensitivity on calibration text; give a tokenizer "
            "and a corpus (run it through run_experiment or the workspace)."
        )
    ids = model_text_ids(model, ctx.tokenizer, ctx.corpus.text("calibration"), DEFAULT_MEASURE_TOKENS)
    sens = layer_k_sensitivity(model, ids)
    chosen = dict(route_for_budget(model, sens, fraction=float(config.budget)).k_per_layer)
    ctx.extras["route_budget"] = {
        "k_per_layer": {str(k): v for k, v in chosen.items()},
        "sensitivity": sens.to_dict("records"),
    }
    return chosen


def record_routing(model: Any, n_tokens: int, ctx: ApplyContext, key: str = "routing") -> Any:
    """Measure the routing on the first ``n_tokens`` of the evaluation text into ``ctx.metrics`` and
    ``ctx.extras[key]``; nothing when the context has no text or tokenizer, or ``n_tokens`` is 0."""
    from workbench.routing import measure_routing, model_text_ids

    if not n_tokens or ctx.tokenizer is None or ctx.corpus is None:
        return None
    ids = model_text_ids(model, ctx.tokenizer, ctx.corpus.text("evaluation"), n_tokens)
    stats = measure_routing(model, ids)
    ctx.metrics.update(stats.metrics())
    ctx.extras[key] = stats.extras()
    return stats


@dataclass(frozen=True)
class RouteSpace:
    """What a k slider offers for one model: ``ks`` (1..E), the model's own k, and what else it can do."""

    ks: tuple[int, ...]
    default_k: int
    n_experts: int
    moe_layers: tuple[int, ...]
    settable: bool  # False: the family ignores k (PhiMoE)
    dynamic: bool  # top-p / skipping available
    renormalize: tuple[Any, ...]  # the renormalize choices this model takes
    reason: str = ""


def route_space(model: Any) -> RouteSpace:
    """The routing settings ``model`` takes (raises :class:`ConfigError` on a dense model)."""
    from workbench.routing import routed_blocks, router_form

    anat = anatomy(model)
    if not anat.is_moe:
        raise ConfigError(_no_experts_message(model))
    blocks = routed_blocks(anat)
    n = min(b.n_experts for b in blocks)
    first = blocks[0]
    settable = all(b.top_k_settable for b in blocks)
    dynamic = settable and all(router_form(model, b) == "standard" for b in blocks)
    choices: list[Any] = ["model"]
    for value in (True, False):
        try:
            check_route(model, RouteConfig(renormalize=value, measure_tokens=0))
            choices.append(value)
        except ConfigError:
            pass
    k0 = int(first.top_k or 1)
    return RouteSpace(
        ks=tuple(range(1, n + 1)) if settable else (k0,),
        default_k=k0,
        n_experts=n,
        moe_layers=tuple(sorted({b.layer for b in blocks})),
        settable=settable,
        dynamic=dynamic,
        renormalize=tuple(choices),
        reason="" if settable else f"{anat.model_type} always routes to {k0} experts; k is fixed.",
    )


# ---- per-layer k under an active-parameter budget ---------------------------------------------------------


def _mean_kl(base_logits: Any, logits: Any) -> float:
    import torch

    p = torch.log_softmax(base_logits.float(), -1)
    q = torch.log_softmax(logits.float(), -1)
    return float((p.exp() * (p - q)).sum(-1).mean())


def layer_k_sensitivity(model: Any, ids: Any) -> Any:
    """Mean KL divergence against the model as it is when one MoE layer alone runs at a lower k.

    One row per (layer, k) with k from 1 to the layer's current k - 1: ``layer, k, kl_mean, params_saved``
    (``params_saved``: the active parameters per token that layer gives up at that k). The model is left as it
    was. This is the routing counterpart of :func:`workbench.quant_analysis.layer_sensitivity`.
    """
    import pandas as pd
    import torch

    from workbench.routing import expert_params, restore_routing_, routed_blocks, set_top_k_

    anat = anatomy(model)
    if not anat.is_moe:
        raise ConfigError(_no_experts_message(model))
    with torch.no_grad():
        base = model(ids).logits
    rows = []
    by_layer: dict[int, list[MoEBlock]] = {}
    for b in routed_blocks(anat):
        by_layer.setdefault(b.layer, []).append(b)
    for layer, blocks in sorted(by_layer.items()):
        k0 = min(int(b.top_k or 1) for b in blocks)
        if not all(b.top_k_settable for b in blocks):
            continue
        per_k = sum(expert_params(model, b) for b in blocks)
        for k in range(1, k0):
            try:
                for b in blocks:
                    set_top_k_(model, b, k)
                with torch.no_grad():
                    kl = _mean_kl(base, model(ids).logits)
            finally:
                restore_routing_(model)
            rows.append({"layer": layer, "k": k, "kl_mean": kl, "params_saved": float((k0 - k) * per_k)})
    return pd.DataFrame(rows, columns=["layer", "k", "kl_mean", "params_saved"])


def route_for_budget(
    model: Any,
    sensitivity: Any,
    *,
    active_params: float | None = None,
    fraction: float | None = None,
    measure_tokens: int = DEFAULT_MEASURE_TOKENS,
) -> RouteConfig:
    """Per-layer k whose active parameters per token fit a budget, lowering the least sensitive layers first.

    The budget is ``active_params`` (per token) or ``fraction`` of what the model now activates. Greedy, as
    mixed precision spends bits: from every layer at its current k, repeatedly take the next lower k of the
    layer whose step costs the least KL per active parameter saved (KL of single layers taken as additive),
    until the budget is met. Raises :class:`ConfigError` when even k = 1 everywhere does not fit.
    """
    from workbench.routing import expert_params, routed_blocks

    if (active_params is None) == (fraction is None):
        raise ConfigError("route_for_budget: give active_params=... or fraction=..., one of them.")
    from workbench.models import size_report

    anat = anatomy(model)
    blocks = routed_blocks(anat)
    total = size_report(model).n_params
    current = {}
    per_k = {}
    for b in blocks:
        current[b.layer] = min(current.get(b.layer, 1 << 30), int(b.top_k or 1))
        per_k[b.layer] = per_k.get(b.layer, 0) + expert_params(model, b)
    now = total - sum((b.n_experts - int(b.top_k or 1)) * expert_params(model, b) for b in blocks)
    budget = float(active_params) if active_params is not None else float(fraction) * now
    kl = {(int(r.layer), int(r.k)): float(r.kl_mean) for r in sensitivity.itertuples()}
    k = dict(current)
    active = now
    while active > budget:
        options = []
        for layer, kk in k.items():
            if kk > 1 and (layer, kk - 1) in kl:
                cost = kl[(layer, kk - 1)] - kl.get((layer, kk), 0.0)
                options.append((max(cost, 0.0) / per_k[layer], layer))
        if not options:
            floor = now - sum((current[layer] - 1) * per_k[layer] for layer in current)
            raise ConfigError(
                f"route_for_budget: {budget:,.0f} active parameters per token is below what k=1 in "
                f"every layer reaches ({floor:,.0f}); raise the budget."
            )
        _, layer = min(options)
        k[layer] -= 1
        active -= per_k[layer]
    changed = {layer: kk for layer, kk in k.items() if kk != current[layer]}
    return RouteConfig(k_per_layer=changed, measure_tokens=measure_tokens)


register_stacking(RouteConfig, same_shapes=True)

__all__ = [
    "RouteConfig",
    "RouteSpace",
    "check_route",
    "layer_k_sensitivity",
    "record_routing",
    "route_for_budget",
    "route_space",
]
