"""Expert pruning that really shrinks the model: drop the least useful routed experts of every MoE layer.

Each expert is scored on calibration text (``corpus.text("calibration")``), per layer:

    frequency    how many tokens pick it (exact, from the router's own selections)
    router_mass  the routing weight it receives, summed over tokens
    reap         REAP (2025): mean over the tokens routed to it of weight x ||expert output||, the expected size of
                 its contribution; the expert's output comes from the experts module's own forward, so every
                 layout (fused, transposed, interleaved, biases) is computed the family's way
    naee         NAEE (ACL 2024): every subset of ``keep`` experts is tried per layer, pruned for real (and put
                 back), and the one whose block output on the calibration text is closest (squared error) to the
                 unpruned block's wins; C(E, keep) block runs per layer, so for small E only

and the ``keep`` best experts of each layer stay. Every expert tensor (dim 0; DBRX's flattened ``[E*F, H]`` as
``(E, F, H)``), the router's scoring rows and every per-expert tensor of the anatomy (router bias, DeepSeek's
``e_score_correction_bias``, AFMoE's ``expert_bias``) are sliced, and the count attributes and the config's
expert count are updated, so the model runs, ``save_pretrained`` writes the smaller tensors and
``from_pretrained`` builds the same model again. The same number is kept in every layer because a config holds
one expert count.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from workbench.anatomy import MoEBlock, anatomy
from workbench.errors import ConfigError
from workbench.techniques.base import ApplyContext, register, register_stacking

METHODS = ("frequency", "router_mass", "reap", "naee")
# NAEE tries every subset of kept experts per layer; beyond this many subsets per layer it is refused.
NAEE_MAX_SUBSETS = 5000
_CONFIG_COUNTS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")


@dataclass(frozen=True)
class PruneExpertsConfig:
    """Drop routed experts per MoE layer by frequency, router mass or REAP score on calibration text."""

    keep: int = field(
        default=0,
        metadata={
            "help": "Experts kept in every MoE layer, from the model's k to E - 1 (0: use `fraction`)."
        },
    )
    fraction: float = field(
        default=0.75,
        metadata={
            "help": "Share of each layer's experts kept when `keep` is 0, rounded to the nearest count (0 < f < 1)."
        },
    )
    method: str = field(
        default="reap",
        metadata={
            "help": "How experts are scored: 'frequency' (tokens routed), 'router_mass' (routing weight received) or "
            "'reap' (weight x expert output norm) or 'naee' (the subset that best reproduces each layer's output; "
            "E <= 16).",
            "choices": METHODS,
        },
    )
    calibration_tokens: int = field(
        default=512, metadata={"help": "Tokens of the calibration text the experts are scored on."}
    )

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"prune_experts: method={self.method!r}; use one of {', '.join(METHODS)}.")
        if isinstance(self.keep, bool) or not isinstance(self.keep, int) or self.keep < 0:
            raise ConfigError(
                f"prune_experts: keep={self.keep!r} must be a whole number of experts (0: use fraction)."
            )
        if not self.keep and not (isinstance(self.fraction, (int, float)) and 0 < self.fraction < 1):
            raise ConfigError(f"prune_experts: fraction={self.fraction!r} must lie strictly between 0 and 1.")
        if (
            isinstance(self.calibration_tokens, bool)
            or not isinstance(self.calibration_tokens, int)
            or self.calibration_tokens < 1
        ):
            raise ConfigError(f"prune_experts: calibration_tokens={self.calibration_tokens!r} must be >= 1.")

    def kept(self, n_experts: int) -> int:
        return self.keep if self.keep else max(1, round(self.fraction * n_experts))

    def label(self) -> str:
        amount = f"keep {self.keep}" if self.keep else f"keep {self.fraction:.0%}"
        return f"prune_experts {amount} {self.method}"


def _blocks(model: Any) -> list[MoEBlock]:
    from workbench.routing import routed_blocks

    return routed_blocks(anatomy(model))


def check_prune_experts(model: Any, config: PruneExpertsConfig) -> None:
    from workbench.routing import router_form

    blocks = _blocks(model)
    if not blocks:
        raise ConfigError("prune_experts: this model has no experts (no Mixture-of-Experts layers) to prune.")
    counts = {b.n_experts for b in blocks}
    if len(counts) > 1:
        raise ConfigError(
            f"prune_experts: the MoE layers have different expert counts {sorted(counts)}; "
            "pruning keeps one count for the whole model."
        )
    n = counts.pop()
    keep = config.kept(n)
    if keep >= n:
        raise ConfigError(
            f"prune_experts: keeping {keep} of {n} experts prunes nothing; keep at most {n - 1}."
        )
    if config.method == "naee":
        from math import comb

        if comb(n, keep) > NAEE_MAX_SUBSETS:
            raise ConfigError(
                f"prune_experts: method 'naee' would try {comb(n, keep):,} subsets per layer "
                f"(C({n}, {keep})); it is meant for small expert counts (at most "
                f"{NAEE_MAX_SUBSETS:,} subsets). Use 'reap' instead."
            )
    for b in blocks:
        k = int(b.top_k or 1)
        if keep < k:
            raise ConfigError(
                f"prune_experts: keeping {keep} experts is fewer than the {k} each token is routed to in {b.name}; "
                f"keep at least {k}, or lower k first with technique 'route'."
            )
        holder = model.get_submodule(b.top_k_attrs[0][0]) if b.top_k_attrs else None
        n_group = getattr(holder, "n_group", None)
        if isinstance(n_group, int) and n_group > 1 and keep % n_group:
            raise ConfigError(
                f"prune_experts: {b.router.name} routes in {n_group} expert groups; keep a multiple "
                f"of {n_group}, not {keep}."
            )
        if b.layout == "modules" and config.method == "reap":
            raise ConfigError(
                "prune_experts: method 'reap' needs fused experts; use 'frequency' or 'router_mass'."
            )
        if config.method == "reap" and router_form(model, b) != "standard":
            raise ConfigError(
                f"prune_experts: method 'reap' needs a router that returns (logits, weights, index); "
                f"{b.router.name} does not. Use 'frequency' or 'router_mass'."
            )
        if (
            config.method == "reap"
            and len(inspect.signature(model.get_submodule(b.experts).forward).parameters) < 3
        ):
            raise ConfigError(
                f"prune_experts: the experts of {b.name} cannot be called one at a time; use "
                "'frequency' or 'router_mass'."
            )


def expert_scores(model: nn.Module, ids: torch.Tensor, method: str) -> dict[str, torch.Tensor]:
    """Per MoE block name, an (E,) score of every expert on ``ids`` (higher: more useful)."""
    from workbench.routing import RoutingRecorder

    blocks = _blocks(model)
    reap = {b.name: torch.zeros(b.n_experts, dtype=torch.float64) for b in blocks}
    handles = []
    last: dict[str, Any] = {}
    if method == "reap":
        for b in blocks:
            router = model.get_submodule(b.router.name)
            experts = model.get_submodule(b.experts)
            handles.append(router.register_forward_hook(_keep_output(last, b.name)))
            handles.append(experts.register_forward_pre_hook(_reap_hook(last, b, reap[b.name])))
    try:
        with RoutingRecorder(model) as rec, torch.no_grad():
            model(ids.to(next(model.parameters()).device))
    finally:
        for h in handles:
            h.remove()
    out = {}
    for b, counts in zip(anatomy(model).experts, rec.blocks):
        if b.name not in reap:
            continue
        if method == "frequency":
            out[b.name] = counts.counts.clone()
        elif method == "router_mass":
            out[b.name] = counts.mass.clone()
        else:
            out[b.name] = reap[b.name] / counts.counts.clamp_min(
                1
            )  # mean over the tokens routed to each expert
    return out


def _keep_output(last: dict[str, Any], name: str) -> Any:
    def hook(module: nn.Module, args: Any, out: Any) -> None:
        last[name] = out

    return hook


def _reap_hook(last: dict[str, Any], block: MoEBlock, total: torch.Tensor) -> Any:
    """Pre-hook on the experts module: each expert's output norm on the tokens routed to it, times its weight."""

    def hook(module: nn.Module, args: Any) -> None:
        hidden = args[0]
        _, w, idx = last[block.name]
        w, idx = w.reshape(-1, w.shape[-1]), idx.reshape(-1, idx.shape[-1])
        flat = hidden.reshape(-1, hidden.shape[-1])  # (N, H)
        for e in range(block.n_experts):
            tok, slot = torch.where((idx == e) & (w != 0))
            if not tok.numel():
                continue
            one = torch.full((tok.numel(), 1), e, dtype=idx.dtype, device=idx.device)
            y = module.forward(flat[tok], one, torch.ones(tok.numel(), 1, dtype=w.dtype, device=w.device))
            total[e] += float((w[tok, slot].float() * y.float().norm(dim=-1)).sum())

    return hook


def naee_search(
    model: nn.Module, ids: torch.Tensor, keep: int
) -> tuple[dict[str, list[int]], dict[str, list[float]]]:
    """NAEE's search: per block, the ``keep``-subset whose pruned block output is closest to the original's.

    The block's inputs on ``ids`` are recorded once; each subset is then pruned for real with
    :func:`prune_experts_` on the model (so the block computes exactly what the pruned model would), run on
    those inputs, and put back. Returns (kept experts per block, squared errors of every subset tried, best
    first).
    """
    from itertools import combinations

    blocks = _blocks(model)
    inputs: dict[str, tuple[Any, Any, torch.Tensor]] = {}

    def recorder(name: str) -> Any:
        def hook(module: nn.Module, args: Any, kwargs: Any, out: Any) -> None:
            inputs[name] = (args, kwargs, _first_tensor(out).detach().clone())

        return hook

    handles = [
        model.get_submodule(b.name).register_forward_hook(recorder(b.name), with_kwargs=True) for b in blocks
    ]
    try:
        with torch.no_grad():
            model(ids.to(next(model.parameters()).device))
    finally:
        for h in handles:
            h.remove()
    kept: dict[str, list[int]] = {}
    errors: dict[str, list[float]] = {}
    for b in blocks:
        args, kwargs, target = inputs[b.name]
        tried = []
        for subset in combinations(range(b.n_experts), keep):
            with _PrunedForNow(model, b, list(subset)), torch.no_grad():
                out = _first_tensor(model.get_submodule(b.name)(*args, **kwargs))
            tried.append((float((out.float() - target.float()).pow(2).sum()), subset))
        tried.sort()
        kept[b.name] = list(tried[0][1])
        errors[b.name] = [err for err, _ in tried]
    return kept, errors


def _first_tensor(out: Any) -> torch.Tensor:
    return out if torch.is_tensor(out) else next(t for t in out if torch.is_tensor(t))


class _PrunedForNow:
    """Prune ``block`` to ``subset`` in place, and put every tensor, count and config value back on exit."""

    def __init__(self, model: nn.Module, block: MoEBlock, subset: list[int]) -> None:
        self.model, self.block, self.subset = model, block, subset

    def __enter__(self) -> None:
        m, b = self.model, self.block
        names = [t.name for t in b.tensors if b.layout != "modules"] + [b.router.weight]
        names += [n for n, _ in b.router.per_expert]
        self.saved = {n: _owner_entry(m, n) for n in names}
        lin = m.get_submodule(b.router.weight.rpartition(".")[0])
        self.out_features = (lin, getattr(lin, "out_features", None))
        self.counts = [(mod, attr, getattr(m.get_submodule(mod), attr)) for mod, attr in b.count_attrs]
        cfg = getattr(m, "config", None)
        self.config = [
            (target, a, getattr(target, a))
            for target in (cfg, getattr(cfg, "ffn_config", None))
            if target is not None
            for a in _CONFIG_COUNTS
            if hasattr(target, a)
        ]
        if b.layout == "modules":
            owner = b.tensors[0].name.split(".{e}.")[0]
            parent, _, leaf = owner.rpartition(".")
            self.modules = (m.get_submodule(parent), leaf, m.get_submodule(owner))
        prune_experts_(m, {b.name: self.subset})

    def __exit__(self, *exc: object) -> None:
        for owner, kind, attr, value in self.saved.values():
            getattr(owner, kind)[attr] = value
        lin, out_features = self.out_features
        if out_features is not None:
            lin.out_features = out_features
        for mod, attr, value in self.counts:
            setattr(self.model.get_submodule(mod), attr, value)
        for target, attr, value in self.config:
            setattr(target, attr, value)
        if self.block.layout == "modules":
            parent, leaf, original = self.modules
            setattr(parent, leaf, original)


def _owner_entry(model: nn.Module, full_name: str) -> tuple[nn.Module, str, str, torch.Tensor]:
    owner_name, _, attr = full_name.rpartition(".")
    owner = model.get_submodule(owner_name)
    kind = "_parameters" if attr in owner._parameters else "_buffers"
    return owner, kind, attr, getattr(owner, kind)[attr]


def _replace(model: nn.Module, full_name: str, tensor: torch.Tensor) -> None:
    owner_name, _, attr = full_name.rpartition(".")
    owner = model.get_submodule(owner_name)
    if attr in owner._parameters:
        old = owner._parameters[attr]
        owner._parameters[attr] = nn.Parameter(tensor.contiguous(), requires_grad=old.requires_grad)
    else:
        owner._buffers[attr] = tensor.contiguous()


def prune_experts_(model: nn.Module, keep: dict[str, list[int]]) -> nn.Module:
    """Keep only the listed experts (block name → expert indices) in place; every tensor of an expert is sliced."""
    blocks = {b.name: b for b in _blocks(model)}
    new_counts = set()
    for name, kept in keep.items():
        b = blocks[name]
        index = torch.tensor(sorted(kept), dtype=torch.long)
        n_new = int(index.numel())
        new_counts.add(n_new)
        for t in b.tensors:
            if b.layout == "modules":
                continue
            p = model.get_parameter(t.name)
            if t.layout == "flattened":
                rows = p.shape[0] // b.n_experts
                sliced = (
                    p.detach()
                    .view(b.n_experts, rows, p.shape[-1])[index.to(p.device)]
                    .reshape(-1, p.shape[-1])
                )
            else:
                sliced = p.detach()[index.to(p.device)]
            _replace(model, t.name, sliced)
        if b.layout == "modules":
            owner_name = b.tensors[0].name.split(".{e}.")[0]
            experts = model.get_submodule(owner_name)
            parent_name, _, leaf = owner_name.rpartition(".")
            setattr(model.get_submodule(parent_name), leaf, nn.ModuleList(experts[i] for i in index.tolist()))
        w = model.get_parameter(b.router.weight)
        _replace(model, b.router.weight, w.detach()[index.to(w.device)])
        lin = model.get_submodule(b.router.weight.rpartition(".")[0])
        if isinstance(getattr(lin, "out_features", None), int):
            lin.out_features = n_new
        for tname, axis in b.router.per_expert:
            try:
                t = model.get_parameter(tname)
            except AttributeError:
                t = model.get_buffer(tname)
            _replace(model, tname, t.detach().index_select(axis, index.to(t.device)))
        for module, attr in b.count_attrs:
            setattr(model.get_submodule(module), attr, n_new)
    config = getattr(model, "config", None)
    if config is not None and len(new_counts) == 1:
        n_new = new_counts.pop()
        old = {b.n_experts for b in blocks.values()}
        for target in (config, getattr(config, "ffn_config", None)):
            for attr in _CONFIG_COUNTS:
                if target is not None and getattr(target, attr, None) in old:
                    setattr(target, attr, n_new)
    return model


@register("prune_experts", PruneExpertsConfig, kind="prune", check=check_prune_experts)
def _apply_prune_experts(model: Any, config: PruneExpertsConfig, ctx: ApplyContext) -> Any:
    from workbench.models import size_report
    from workbench.routing import measure_routing, model_text_ids

    if ctx.tokenizer is None or ctx.corpus is None:
        raise ConfigError("prune_experts scores experts on calibration text; give a tokenizer and a corpus.")
    ids = model_text_ids(model, ctx.tokenizer, ctx.corpus.text("calibration"), config.calibration_tokens)
    before = size_report(model).n_params
    loads = measure_routing(model, ids)  # the load before pruning, for a before/after heatmap
    record: dict[str, Any] = {"method": config.method, "layers": loads.layers, "load_before": loads.load}
    if config.method == "naee":
        keep, errors = naee_search(model, ids, config.kept(_blocks(model)[0].n_experts))
        record["subset_errors"] = errors  # per block, every subset's squared error, best first
    else:
        scores = expert_scores(model, ids, config.method)
        keep = {}
        for name, s in scores.items():
            # stable: ties keep the lower index, so equal scores give the same choice every time
            order = sorted(range(s.numel()), key=lambda e: (-float(s[e]), e))
            keep[name] = sorted(order[: config.kept(s.numel())])
        record["scores"] = {n: [float(v) for v in s] for n, s in scores.items()}
    prune_experts_(model, keep)
    after = size_report(model).n_params
    ctx.metrics.update(
        {"experts_kept": float(len(next(iter(keep.values())))), "params_removed": float(before - after)}
    )
    ctx.extras["prune_experts"] = {**record, "kept": keep}
    return model


def _preview(model: Any, config: PruneExpertsConfig) -> Any:
    """The pruned shapes on the meta device (no memory), so later steps are checked before any scoring; None
    (checked just before they run) when the config's expert count is not a top-level field (DBRX)."""
    from workbench.techniques.base import meta_model

    blocks = _blocks(model)
    cfg = getattr(model, "config", None)
    if not blocks or cfg is None:
        return None
    n = blocks[0].n_experts
    changes = {a: config.kept(n) for a in _CONFIG_COUNTS if getattr(cfg, a, None) == n}
    if not changes:
        return None
    try:
        return meta_model(model, **changes)
    except Exception:  # noqa: BLE001 - a model class that cannot be rebuilt from its config: check later
        return None


register_stacking(PruneExpertsConfig, preview=_preview)

__all__ = [
    "METHODS",
    "PruneExpertsConfig",
    "check_prune_experts",
    "expert_scores",
    "naee_search",
    "prune_experts_",
]
