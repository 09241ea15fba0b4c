"""Routing of native Mixture-of-Experts models: set k live, route dynamically, record what the routers pick.

Everything reads the model's :func:`~workbench.anatomy.anatomy` (``MoEBlock.top_k_attrs``, routers, expert
tensors), so no family is named here. Three pieces:

- **Static k** (:func:`set_top_k_`): every int copy of k the anatomy lists is set (transformers routers copy
  ``num_experts_per_tok`` at build time; the config is never read again). The originals are kept on the model
  (``model.wb_routing_saved``, names and values only, so it survives a deep copy) and :func:`restore_routing_`
  puts them back exactly.
- **Dynamic routing** (:func:`set_dynamic_`): top-p (the smallest set of experts whose router probability
  reaches p) and NAEE's skipping (drop a selected expert whose weight is below beta times the top one). A forward
  hook on the router decides each token's count j and answers with what the router itself gives at k=j, so
  renormalisation, biases and group limits stay the family's own. Tokens with fewer experts than the widest one
  are padded with weight 0 (an exact zero contribution). Needs a router that returns
  ``(logits (N, E), weights (N, k), index (N, k))``, the form of every family here but DBRX, JetMoE, Llama4.
- **Recording** (:class:`RoutingRecorder`): hooks each block's router and counts, per expert, the selections
  that carry weight: exact from the router's own output (DeepSeek-style routers add a selection bias and group
  limits, so recomputing from logits would be wrong). :func:`routing_stats` turns counts into loads, imbalance,
  mean active experts, active parameters and FLOPs per token.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Self

import torch
from torch import nn

from workbench.anatomy import ModelAnatomy, MoEBlock, anatomy
from workbench.errors import ConfigError

# The flags a router (or DBRX's block) reads for its renormalisation at the chosen k:
# norm_topk_prob (bool: divide the k weights by their sum), moe_normalize_expert_weights (DBRX: p of a p-norm,
# None for none).
_NORM_FLAGS = ("norm_topk_prob", "moe_normalize_expert_weights")
SAVED_ATTR = "wb_routing_saved"  # {(module name, attribute): original value}
_DYNAMIC_ATTR = "wb_dynamic"  # (top_p or None, skip_beta or None) on a router module


# ---- what one block's router looks like -------------------------------------------------------------------


def _holder(model: nn.Module, block: MoEBlock) -> nn.Module:
    """The module forward reads k from (the router; DBRX: the block)."""
    return model.get_submodule(block.top_k_attrs[0][0])


def probe_router(model: nn.Module, block: MoEBlock, k: int | None = None, n: int = 16) -> Any:
    """The router's output on ``n`` random hidden states (at ``k`` when given; k restored afterwards).

    Routers that take more than the hidden states (AFMoE's ``expert_bias``, MiniMax-M2's
    ``e_score_correction_bias``, kept on the block) get the block's attribute of that name, as the block passes it.
    """
    import inspect

    router = model.get_submodule(block.router.name)
    owner = model.get_submodule(block.name)
    weight = model.get_parameter(block.router.weight)
    gen = torch.Generator().manual_seed(0)
    # (B, T, H): some routers unpack three dimensions
    x = torch.randn(1, n, weight.shape[1], generator=gen).to(device=weight.device, dtype=weight.dtype)
    extra = []
    for param in list(inspect.signature(router.forward).parameters.values())[1:]:
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            continue
        if hasattr(owner, param.name):
            extra.append(getattr(owner, param.name))
        elif param.default is param.empty:
            raise ConfigError(
                f"{block.router.name}: cannot call this router on its own (it needs "
                f"{param.name!r}, which its block does not hold)."
            )
        else:
            break
    holder = _holder(model, block) if block.top_k_attrs else None
    saved = holder.top_k if holder is not None else None
    try:
        if k is not None and holder is not None:
            holder.top_k = k
        with torch.no_grad():
            return router.forward(x, *extra)  # forward, not __call__: our own hooks must not run on a probe
    finally:
        if holder is not None:
            holder.top_k = saved


def output_form(out: Any, n_experts: int) -> str:
    """The form of a router's output (see :func:`router_form`)."""
    if (
        isinstance(out, tuple)
        and len(out) == 3
        and torch.is_tensor(out[2])
        and not out[2].is_floating_point()
    ):
        return "standard"
    if isinstance(out, tuple) and len(out) == 2 and torch.is_tensor(out[0]) and out[0].shape[-1] == n_experts:
        return "scores"
    if isinstance(out, tuple) and len(out) == 5 and isinstance(out[3], list):
        return "grouped"
    return "other"


def router_form(model: nn.Module, block: MoEBlock) -> str:
    """How the block's routing can be read: ``"standard"`` (router returns logits, weights (N, k), index (N, k)),
    ``"block"`` (k and the selection live on the block: DBRX), ``"scores"`` ((N, E) scores, 0 where not picked:
    Llama4), ``"grouped"`` (JetMoE: tokens sorted by expert with counts) or ``"other"``."""
    if block.top_k_attrs and block.top_k_attrs[0][0] != block.router.name:
        return "block"
    return output_form(probe_router(model, block), block.n_experts)


def norm_flag(model: nn.Module, block: MoEBlock) -> tuple[str, Any] | None:
    """(attribute, value) of the renormalisation switch forward reads, where the family has one."""
    holder = _holder(model, block) if block.top_k_attrs else None
    for attr in _NORM_FLAGS:
        if holder is not None and hasattr(holder, attr):
            return attr, getattr(holder, attr)
    return None


def renormalises_in_code(model: nn.Module, block: MoEBlock) -> bool | None:
    """Whether the router's fixed rule gives every token the same total weight at k=1 (a renormalising rule:
    Mixtral, GPT-OSS, Granite, JetMoE), measured on random inputs; None when the output form cannot say."""
    form = router_form(model, block)
    if form != "standard" or not block.top_k_settable:
        return True if form == "grouped" else None  # JetMoE: softmax over the k picked logits
    out = probe_router(model, block, k=1)
    total = out[1].float().reshape(-1, out[1].shape[-1]).sum(-1)  # (N,): each token's routed weight
    return bool(torch.allclose(total, total[0].expand_as(total), rtol=1e-5, atol=1e-6))


# ---- static k and renormalisation -------------------------------------------------------------------------


def is_attention_block(block: MoEBlock) -> bool:
    """A mixture of attention heads (JetMoE's MoA), not of feed-forward experts: there k also sets how many
    heads attend (the model is built with ``k x`` key/value heads), so routing leaves its k alone."""
    from workbench.anatomy import ATTENTION_WORDS

    return any(word in part for part in block.name.lower().split(".") for word in ATTENTION_WORDS)


def routed_blocks(anat: ModelAnatomy) -> list[MoEBlock]:
    """The feed-forward MoE blocks whose k routing may change."""
    return [b for b in anat.experts if not is_attention_block(b)]


def _save(model: nn.Module, module: str, attr: str) -> None:
    saved = getattr(model, SAVED_ATTR, None)
    if saved is None:
        saved = {}
        model.__dict__[SAVED_ATTR] = saved  # a plain attribute (not a module or buffer): copied by deepcopy
    if (module, attr) not in saved:
        saved[(module, attr)] = getattr(model.get_submodule(module), attr)


def set_top_k_(model: nn.Module, block: MoEBlock, k: int) -> None:
    """Set every int copy of k in ``block`` (the one forward reads and the dead ones, so they agree)."""
    for module, attr in block.top_k_attrs:
        _save(model, module, attr)
        setattr(model.get_submodule(module), attr, int(k))


def set_norm_(model: nn.Module, block: MoEBlock, renormalize: bool) -> None:
    """Turn the family's renormalisation switch on or off (DBRX: p-norm with p=1, i.e. divide by the sum)."""
    found = norm_flag(model, block)
    if found is None:
        raise ConfigError(
            f"{block.name}: this router has no renormalisation switch; use renormalize='model'."
        )
    attr, _ = found
    module = block.top_k_attrs[0][0]
    _save(model, module, attr)
    if attr == "norm_topk_prob":
        value: Any = bool(renormalize)
    else:
        value = 1.0 if renormalize else None
    setattr(model.get_submodule(module), attr, value)


def set_dynamic_(model: nn.Module, block: MoEBlock, top_p: float | None, skip_beta: float | None) -> None:
    """Route ``block`` dynamically (see the module docstring); both None removes it."""
    router = model.get_submodule(block.router.name)
    for key, hook in list(router._forward_hooks.items()):
        if hook is _dynamic_hook:
            del router._forward_hooks[key]
    if top_p is None and skip_beta is None:
        router.__dict__.pop(_DYNAMIC_ATTR, None)
        return
    router.__dict__[_DYNAMIC_ATTR] = (top_p, skip_beta, block.n_experts)
    router.register_forward_hook(_dynamic_hook)


def restore_routing_(model: nn.Module) -> nn.Module:
    """Undo :func:`set_top_k_`, :func:`set_norm_` and :func:`set_dynamic_`: the model computes as it did."""
    for (module, attr), value in (getattr(model, SAVED_ATTR, None) or {}).items():
        setattr(model.get_submodule(module), attr, value)
    model.__dict__.pop(SAVED_ATTR, None)
    for block in anatomy(model).experts:
        set_dynamic_(model, block, None, None)
    return model


def _dynamic_hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
    """Forward hook on a router: per token, the count of experts top-p / skipping keeps, routed at that k.

    A module-level function reading its settings from the module, so a deep copy of the model keeps working.
    """
    spec = module.__dict__.get(_DYNAMIC_ATTR)
    if spec is None or not (isinstance(output, tuple) and len(output) == 3):
        return None
    top_p, beta, n_experts = spec
    logits, weights, index = output
    lead = index.shape[:-1]  # routers answer (N, k) or (B, T, k)
    k_now = int(index.shape[-1])
    saved = module.top_k

    def flat(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(-1, t.shape[-1])

    try:
        if top_p is not None:
            module.top_k = n_experts
            w_all = flat(module.forward(*args)[1]).float()  # (N, E): every expert's weight, the family's rule
            probs = w_all / w_all.sum(-1, keepdim=True).clamp_min(1e-30)
            ranked = probs.sort(-1, descending=True).values  # (N, E)
            # smallest j with cumulative probability >= p: the number of prefixes still below p, plus one
            need = ((ranked.cumsum(-1) < top_p).sum(-1) + 1).clamp(1, n_experts)
        else:
            ranked = flat(weights).float().abs().sort(-1, descending=True).values  # (N, k) at the current k
            need = torch.full(ranked.shape[:1], k_now, dtype=torch.long, device=ranked.device)
        if beta is not None:
            # keep the experts whose weight reaches beta x the top one, within the ones selected so far
            cols = torch.arange(ranked.shape[-1], device=ranked.device)
            keep = (ranked >= beta * ranked[:, :1]) & (cols < need[:, None])
            need = keep.sum(-1).clamp_min(1)
        counts = sorted(int(j) for j in need.unique())
        outs = {}
        for j in counts:
            module.top_k = j
            out_j = module.forward(*args)
            outs[j] = (flat(out_j[1]), flat(out_j[2]))
    finally:
        module.top_k = saved
    widest = counts[-1]
    if len(counts) == 1:
        new_w, new_idx = outs[widest]
    else:
        n = need.shape[0]
        new_w = torch.zeros(n, widest, dtype=weights.dtype, device=weights.device)
        # padding repeats each token's first expert with weight 0: an exact zero contribution in every kernel
        new_idx = outs[widest][1][:, :1].expand(-1, widest).clone()
        for j in counts:
            rows = need == j
            w, idx = outs[j]
            new_w[rows, :j] = w[rows].to(new_w.dtype)
            new_idx[rows, :j] = idx[rows]
    return logits, new_w.reshape(*lead, widest), new_idx.reshape(*lead, widest)


# ---- recording what the routers pick ------------------------------------------------------------------------


@dataclass
class BlockCounts:
    """Selections of one MoE block: per-expert counts of (token, expert) picks that carry weight."""

    name: str
    layer: int
    n_experts: int
    counts: torch.Tensor  # (E,) float64
    tokens: int = 0
    mass: torch.Tensor | None = None  # (E,) float64: summed routing weight per expert (router mass)

    def __post_init__(self) -> None:
        if self.mass is None:
            self.mass = torch.zeros_like(self.counts)


class RoutingRecorder:
    """Context manager: count every MoE block's selections while the model runs.

    ``with RoutingRecorder(model) as rec: model(ids)``; then ``rec.blocks`` holds per-block counts. Padding
    positions count too, so feed unpadded text (the evaluation text is one unpadded sequence per chunk).
    """

    def __init__(self, model: nn.Module, anat: ModelAnatomy | None = None) -> None:
        self.model = model
        self.anatomy = anat or anatomy(model)
        self.blocks = [
            BlockCounts(b.name, b.layer, b.n_experts, torch.zeros(b.n_experts, dtype=torch.float64))
            for b in self.anatomy.experts
        ]
        self._handles: list[Any] = []

    def __enter__(self) -> Self:
        for block, rec in zip(self.anatomy.experts, self.blocks):
            # the form is read from each real output (no probe: some routers take their block's tensors too)
            form = "block" if block.top_k_attrs and block.top_k_attrs[0][0] != block.router.name else None
            router = self.model.get_submodule(block.router.name)
            owner = self.model.get_submodule(block.name)
            self._handles.append(router.register_forward_hook(_make_counter(form, owner, rec)))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


def _make_counter(form: str | None, owner: nn.Module, rec: BlockCounts) -> Any:
    def hook(module: nn.Module, args: tuple[Any, ...], out: Any) -> None:
        with torch.no_grad():
            kind = form or output_form(out, rec.n_experts)
            if kind == "standard":
                _, w, idx = out
            elif kind == "block":  # DBRX: the router gives logits; the block's own function picks (exact)
                w, idx = owner.route_tokens_to_experts(out if torch.is_tensor(out) else out[0])
            elif kind == "scores":  # Llama4: sigmoid of -inf = 0 where not picked
                scores = out[0].reshape(-1, rec.n_experts)
                rec.counts += (scores > 0).sum(0).to(torch.float64).cpu()
                rec.mass += scores.sum(0).to(torch.float64).cpu()
                rec.tokens += int(scores.shape[0])
                return
            elif kind == "grouped":  # JetMoE: expert_size list, logits last
                rec.counts += torch.tensor(out[3], dtype=torch.float64)
                rec.tokens += int(out[4].shape[0])
                return
            else:
                raise ConfigError(f"{rec.name}: cannot read this router's selections (unknown output form).")
            w, idx = w.reshape(-1, w.shape[-1]), idx.reshape(-1, idx.shape[-1])  # (N, k)
            on = w != 0  # dynamic routing pads with weight-0 picks: not routed
            picked = idx[on].long().cpu()
            rec.counts += torch.bincount(picked, minlength=rec.n_experts).to(torch.float64)
            rec.mass += torch.zeros(rec.n_experts, dtype=torch.float64).index_add_(
                0, picked, w[on].detach().to(torch.float64).cpu()
            )
            rec.tokens += int(idx.shape[0])

    return hook


@dataclass
class RoutingStats:
    """What the routing did on some text (see :func:`routing_stats`)."""

    layers: list[int]  # decoder layer of each MoE block
    blocks: list[str]
    load: list[list[float]]  # per block, per expert: share of the block's routed (token, expert) picks
    active_experts: list[float]  # per block: mean experts per token
    max_over_mean: list[float]
    cv: list[float]
    entropy: list[float]  # normalised to [0, 1] (1: perfectly even)
    tokens: int
    active_params: float  # per token, shared experts and everything outside the routed experts included
    total_params: int
    flops_per_token: float
    extra: dict[str, Any] = field(default_factory=dict)

    def metrics(self) -> dict[str, float]:
        """The flat numbers a run records (metric columns)."""
        mean = lambda xs: float(sum(xs) / len(xs)) if xs else 0.0
        return {
            "active_experts": mean(self.active_experts),
            "active_params": float(self.active_params),
            "active_params_fraction": float(self.active_params / self.total_params)
            if self.total_params
            else 0.0,
            "flops_per_token": float(self.flops_per_token),
            "load_max_over_mean": mean(self.max_over_mean),
            "load_cv": mean(self.cv),
            "load_entropy": mean(self.entropy),
            "routing_tokens": float(self.tokens),
        }

    def extras(self) -> dict[str, Any]:
        """The load matrix and per-block numbers, for ``ctx.extras`` (JSON)."""
        return {
            "layers": self.layers,
            "blocks": self.blocks,
            "load": self.load,
            "active_experts": self.active_experts,
            "max_over_mean": self.max_over_mean,
            "cv": self.cv,
            "entropy": self.entropy,
            "tokens": self.tokens,
        }


def expert_params(model: nn.Module, block: MoEBlock, *, matrices_only: bool = False) -> int:
    """Parameters of one routed expert of ``block`` (its slice of every expert tensor; biases unless
    ``matrices_only``)."""
    total = 0
    for t in block.tensors:
        if matrices_only and t.is_bias:
            continue
        if block.layout == "modules":
            total += model.get_parameter(t.name.format(e=0)).numel()
        else:
            total += model.get_parameter(t.name).numel() // block.n_experts
    return int(total)


def load_imbalance(share: torch.Tensor) -> tuple[float, float, float]:
    """(max/mean, coefficient of variation, normalised entropy) of one block's load shares (sum 1)."""
    n = share.numel()
    mean = 1.0 / n
    cv = float(share.std(unbiased=False) / mean) if n > 1 else 0.0
    nz = share[share > 0]
    entropy = float(-(nz * nz.log()).sum() / math.log(n)) if n > 1 else 1.0
    return float(share.max() / mean), cv, entropy


def routing_stats(
    model: nn.Module, blocks: Sequence[BlockCounts], anat: ModelAnatomy | None = None
) -> RoutingStats:
    """Loads and imbalance per block, mean active experts, active parameters and FLOPs per token.

    Active parameters per token = all parameters − Σ_blocks (E − a_b) · P_b, with a_b the measured mean experts
    per token of block b and P_b one expert's parameters: what a token touches (shared experts, attention,
    embeddings and head included). FLOPs per token ≈ 2 × (decoder linear weights outside the routed experts +
    Σ_b a_b · P_b (matrices) + router weights + head weights): one multiply-add per weight used; attention's
    score/value products (which grow with the context) and element-wise work are left out.
    """
    from workbench.models import size_report

    anat = anat or anatomy(model)
    by_name = {b.name: b for b in anat.experts}
    total = size_report(model).n_params
    load, active, mom, cvs, ents = [], [], [], [], []
    inactive = 0.0
    flops_experts = 0.0
    for rec in blocks:
        block = by_name[rec.name]
        picks = float(rec.counts.sum())
        share = rec.counts / picks if picks else torch.full_like(rec.counts, 1.0 / rec.n_experts)
        a = picks / rec.tokens if rec.tokens else float(block.top_k or 0)
        m, c, h = load_imbalance(share)
        load.append([float(s) for s in share])
        active.append(a)
        mom.append(m)
        cvs.append(c)
        ents.append(h)
        inactive += (block.n_experts - a) * expert_params(model, block)
        flops_experts += a * expert_params(model, block, matrices_only=True)
    dense_linears = sum(lin.in_features * lin.out_features for lin in anat.linears if lin.role != "expert")
    routers = sum(model.get_parameter(r.weight).numel() for r in anat.routers)
    head = 0
    if anat.lm_head:
        w = getattr(model.get_submodule(anat.lm_head), "weight", None)
        head = int(w.numel()) if w is not None else 0
    tokens = max((rec.tokens for rec in blocks), default=0)
    return RoutingStats(
        layers=[by_name[r.name].layer for r in blocks],
        blocks=[r.name for r in blocks],
        load=load,
        active_experts=active,
        max_over_mean=mom,
        cv=cvs,
        entropy=ents,
        tokens=tokens,
        active_params=float(total - inactive),
        total_params=int(total),
        flops_per_token=2.0 * (dense_linears + flops_experts + routers + head),
    )


def text_ids(tokenizer: Any, text: str, n_tokens: int, max_length: int | None = None) -> torch.Tensor:
    """The first ``n_tokens`` tokens of ``text`` as chunks (rows) of at most ``max_length``: (rows, length)."""
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"][0][:n_tokens]
    if ids.numel() == 0:
        raise ConfigError("The text to measure routing on is empty; give a corpus with an evaluation part.")
    length = min(ids.numel(), max_length or ids.numel())
    rows = ids.numel() // length
    return ids[: rows * length].view(rows, length)


def model_text_ids(model: Any, tokenizer: Any, text: str, n_tokens: int) -> torch.Tensor:
    """:func:`text_ids` in rows no longer than the model's context (``max_position_embeddings``)."""
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None) or n_tokens
    return text_ids(tokenizer, text, n_tokens, max_length=min(n_tokens, limit))


def measure_routing(model: nn.Module, ids: torch.Tensor | Iterable[torch.Tensor]) -> RoutingStats:
    """Run ``model`` on ``ids`` (one (B, T) tensor or several) and return what its routers picked."""
    anat = anatomy(model)
    if not anat.is_moe:
        raise ConfigError("This model has no experts, so there is no routing to measure.")
    batches = [ids] if torch.is_tensor(ids) else list(ids)
    device = next(model.parameters()).device
    with RoutingRecorder(model, anat) as rec, torch.no_grad():
        for batch in batches:
            model(batch.to(device))
    return routing_stats(model, rec.blocks, anat)


__all__ = [
    "BlockCounts",
    "RoutingRecorder",
    "RoutingStats",
    "expert_params",
    "is_attention_block",
    "load_imbalance",
    "measure_routing",
    "norm_flag",
    "output_form",
    "probe_router",
    "renormalises_in_code",
    "restore_routing_",
    "routed_blocks",
    "router_form",
    "routing_stats",
    "set_dynamic_",
    "set_norm_",
    "set_top_k_",
    "text_ids",
]
