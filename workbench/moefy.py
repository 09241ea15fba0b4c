"""Dense feed-forward blocks made into Mixture-of-Experts blocks, without training.

Two conversions of a Llama-style MLP (``down(act(gate(x)) * up(x))``, intermediate width I):

- **carve** (after CMoE, 2025): the I neurons are split, by their activations on calibration text, into
  ``n_shared`` always-on neurons (those that are among a token's strongest for the most tokens: a shared
  expert) and E balanced routed experts of ``m = (I - n_shared) / E`` neurons each, grouped by co-activation
  (balanced k-means over per-token activation markers). A router built from the same statistics (no gradient
  training) picks k experts per token. Each neuron sits in exactly one expert and the experts' outputs are added
  with weight 1, so at k = E the block computes exactly the dense sum (up to float summation order).
- **upcycle** (Mixtral-style "sparse upcycling"): E identical copies of the whole MLP and a new softmax router
  whose top-k weights are renormalised to sum to 1. With a uniform router (the default, zero weights) every
  selection mixes identical copies with weights summing to 1: the dense block again, at any k. Meant as a start
  for further training.

The converted block, :class:`MoEfiedMLP`, is laid out like transformers' own MoE blocks so that
:mod:`workbench.anatomy` (and through it quantizers, size accounting and the expert-routing technique) reads it
as one: a router child ``gate`` with an ``[E, H]`` weight and an int ``top_k`` (settable live), fused experts in
``experts.gate_up_proj [E, 2m, H]`` / ``experts.down_proj [E, H, m]``, and a dense ``shared_expert``. Its forward
computes only the selected experts (per expert, the rows of its tokens), so work falls with k.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from workbench.anatomy import decoder_layer_list
from workbench.errors import ConfigError

MODES = ("carve", "upcycle")
ROUTERS = ("regression", "representative")
# A neuron counts as firing for a token when it is among the token's strongest this fraction of neurons (by
# |act(gate) * up|); activation rates and co-activation markers are read from these flags, as CMoE does.
MARKER_FRACTION = 0.25
# Ridge term of the regression router, relative to the mean diagonal of X^T X: enough to keep the solve
# well-posed on a few thousand tokens of 576-wide inputs, small enough not to flatten the scores.
RIDGE = 1e-3
KMEANS_ITERATIONS = 12


# ---- the converted block -------------------------------------------------------------------------------------


class MoEfyRouter(nn.Module):
    """Scores E experts per token and selects ``top_k`` of them.

    ``scoring``: ``"regression"`` (``x @ weight.T + bias``: a least-squares fit of each expert's share of the
    block's output), ``"representative"`` (``|act(x @ weight.T) * (x @ up_weight.T)|``: the activation of each
    expert's most central neuron, CMoE's router) or ``"softmax"`` (upcycling: softmax over ``x @ weight.T``, top-k,
    renormalised). Returns ``(logits (N, E), weights (N, k), indices (N, k))`` like transformers' routers, so load
    can be counted from a forward hook and dynamic routing (top-p, skipping) can read the weights. For carved
    experts the weights are each pick's predicted share of the output; the block still adds carved experts with
    weight 1, since they are parts of one sum.
    """

    def __init__(
        self, hidden: int, n_experts: int, top_k: int, scoring: str, act_fn: nn.Module | None = None
    ):
        super().__init__()
        self.scoring = scoring
        self.top_k = int(top_k)
        self.num_experts = int(n_experts)
        self.weight = nn.Parameter(torch.zeros(n_experts, hidden))
        if scoring == "regression":
            self.bias = nn.Parameter(torch.zeros(n_experts))
        if scoring == "representative":
            self.up_weight = nn.Parameter(torch.zeros(n_experts, hidden))
            self.act_fn = act_fn

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        logits = x @ self.weight.T  # (N, E)
        if self.scoring == "regression":
            logits = logits + self.bias
        elif self.scoring == "representative":
            logits = (self.act_fn(logits) * (x @ self.up_weight.T)).abs()
        k = min(int(self.top_k), logits.shape[-1])
        if self.scoring == "softmax":
            probs = torch.softmax(logits.float(), dim=-1)
            weights, indices = probs.topk(k, dim=-1)
            weights = (weights / weights.sum(-1, keepdim=True).clamp_min(1e-20)).to(x.dtype)
        else:
            indices = logits.topk(k, dim=-1).indices
            # Each expert's predicted share of the output (scores clipped at 0, normalised): what top-p and
            # skipping rules compare. The block mixes carved experts with weight 1 whatever this says; only an
            # exact 0 (a rule dropping the pick) matters to it, so selected picks are kept above 0.
            share = logits.clamp_min(0)
            share = share / share.sum(-1, keepdim=True).clamp_min(1e-20)
            weights = share.gather(-1, indices).clamp_min(1e-6).to(x.dtype)
        return logits, weights, indices


class CarvedExperts(nn.Module):
    """E experts of m neurons each, fused: ``gate_up_proj [E, 2m, H]`` (gate rows first), ``down_proj [E, H, m]``."""

    is_transposed = False  # expert e's slices are (out, in), as anatomy reads fused layouts

    def __init__(self, hidden: int, n_experts: int, width: int, act_fn: nn.Module):
        super().__init__()
        self.num_experts = int(n_experts)
        self.gate_up_proj = nn.Parameter(torch.zeros(n_experts, 2 * width, hidden))
        self.down_proj = nn.Parameter(torch.zeros(n_experts, hidden, width))
        self.act_fn = act_fn

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Expert ``e`` on rows ``x (n, H)`` -> ``(n, H)``."""
        gate, up = (x @ self.gate_up_proj[e].T).chunk(2, dim=-1)  # (n, m) each
        return (self.act_fn(gate) * up) @ self.down_proj[e].T


class SharedMLP(nn.Module):
    """The always-on neurons: a dense gate/up/down MLP of ``n_shared`` neurons."""

    def __init__(self, hidden: int, width: int, act_fn: nn.Module):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, width, bias=False)
        self.up_proj = nn.Linear(hidden, width, bias=False)
        self.down_proj = nn.Linear(width, hidden, bias=False)
        self.act_fn = act_fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class MoEfiedMLP(nn.Module):
    """A dense MLP converted into shared + routed experts; drop-in for the block it replaces.

    Forward (x: (..., H)): the shared expert on every token; the router's top-k per token; then for each expert
    that any token selected, that expert on those tokens' rows only, added with its weight (1 for carved experts,
    the renormalised router probability for upcycled copies). Decoding one
    token therefore runs ``n_shared + k * m`` of the I neurons. A weight of exactly 0 (a routing rule that drops
    an expert) skips the pair.
    """

    def __init__(
        self,
        hidden: int,
        n_experts: int,
        width: int,
        n_shared: int,
        top_k: int,
        scoring: str,
        act_fn: nn.Module,
        source: str = "carve",
    ):
        super().__init__()
        self.source = source  # "carve" or "upcycle": how it was made (for descriptions)
        self.gate = MoEfyRouter(hidden, n_experts, top_k, scoring, copy.deepcopy(act_fn))
        self.experts = CarvedExperts(hidden, n_experts, width, copy.deepcopy(act_fn))
        self.shared_expert = SharedMLP(hidden, n_shared, copy.deepcopy(act_fn)) if n_shared else None

    # The router's k, readable and settable on the block too (tools that set every int ``top_k`` they find, or
    # only the block's, change the same number).
    @property
    def top_k(self) -> int:
        return int(self.gate.top_k)

    @top_k.setter
    def top_k(self, k: int) -> None:
        self.gate.top_k = int(k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])  # (N, H)
        out = self.shared_expert(flat) if self.shared_expert is not None else torch.zeros_like(flat)
        _, weights, indices = self.gate(flat)  # (N, k), (N, k)
        if self.gate.scoring != "softmax":  # carved: every kept pick counts in full
            weights = (weights != 0).to(flat.dtype)
        if indices.numel() == 0:
            return out.view(shape)
        if flat.shape[0] == 1:  # decoding: no gathers, just the k selected experts
            for w, e in zip(weights[0].tolist(), indices[0].tolist(), strict=True):
                if w != 0.0:
                    y = self.experts.expert(e, flat)
                    out = out + (y if w == 1.0 else y * w)
            return out.view(shape)
        for e in torch.unique(indices).tolist():
            tok, slot = torch.where(indices == e)  # the tokens that chose e, and in which of their k slots
            w = weights[tok, slot]
            keep = w != 0
            if not bool(keep.all()):
                tok, w = tok[keep], w[keep]
                if tok.numel() == 0:
                    continue
            out.index_add_(0, tok, self.experts.expert(e, flat[tok]) * w[:, None])
        return out.view(shape)


# ---- what a conversion needs from the dense model --------------------------------------------------------------


@dataclass(frozen=True)
class DenseFFN:
    """One Llama-style feed-forward block found in a decoder layer."""

    layer: int
    name: str  # e.g. "model.layers.3.mlp"
    hidden: int
    intermediate: int


def dense_ffns(model: nn.Module, what: str = "moefy") -> list[DenseFFN]:
    """Every decoder layer's gate/up/down MLP; a :class:`ConfigError` naming the first layer without one."""
    layers_name, layers = decoder_layer_list(model)
    if not layers_name or not len(layers):
        raise ConfigError(
            f"{what}: {type(model).__name__} has no list of decoder layers, so it has no feed-forward "
            "blocks to convert. Use a Llama-style decoder (Llama, Mistral, Qwen2, SmolLM, ...)."
        )
    found = []
    for i, layer in enumerate(layers):
        mlp = getattr(layer, "mlp", None)
        if isinstance(mlp, MoEfiedMLP):
            raise ConfigError(
                f"{what}: layer {i} is already a Mixture-of-Experts block (converted before). Change "
                "its active experts with the 'route' technique instead of converting again."
            )
        parts = [getattr(mlp, p, None) for p in ("gate_proj", "up_proj", "down_proj")]
        if (
            mlp is None
            or not all(isinstance(p, nn.Linear) for p in parts)
            or not callable(getattr(mlp, "act_fn", None))
        ):
            kind = type(mlp).__name__ if mlp is not None else "no 'mlp'"
            raise ConfigError(
                f"{what}: layer {i} of {type(model).__name__} has {kind}, not a Llama-style MLP (nn.Linear "
                "gate_proj, up_proj, down_proj and an act_fn). Only dense gate/up/down feed-forward blocks can be "
                "made into experts; MoE models already have experts (use 'route')."
            )
        gate, up, down = parts
        if any(p.bias is not None for p in parts):
            raise ConfigError(
                f"{what}: layer {i}'s MLP has biases (mlp_bias=True); only bias-free gate/up/down "
                "MLPs are supported."
            )
        if gate.weight.shape != up.weight.shape or down.weight.shape != gate.weight.shape[::-1]:
            raise ConfigError(
                f"{what}: layer {i}'s MLP shapes do not match (gate {tuple(gate.weight.shape)}, up "
                f"{tuple(up.weight.shape)}, down {tuple(down.weight.shape)})."
            )
        found.append(DenseFFN(i, f"{layers_name}.{i}.mlp", int(gate.in_features), int(gate.out_features)))
    return found


def shared_count(
    intermediate: int, n_experts: int, n_shared: int | None, shared_fraction: float, what: str = "moefy"
) -> int:
    """The number of always-on neurons: ``n_shared`` as given (the rest must split evenly into the experts), or
    ``shared_fraction`` of the neurons, rounded up so that the rest splits evenly."""
    if n_shared is None:
        n_shared = math.ceil(shared_fraction * intermediate - 1e-9)
        n_shared += (intermediate - n_shared) % n_experts
    routed = intermediate - n_shared
    if routed < n_experts:
        raise ConfigError(
            f"{what}: with {n_shared} shared neurons, only {routed} of the {intermediate} neurons are "
            f"left for {n_experts} experts. Use fewer shared neurons or fewer experts."
        )
    if routed % n_experts:
        lower = n_shared + routed % n_experts
        raise ConfigError(
            f"{what}: {routed} routed neurons ({intermediate} - n_shared={n_shared}) do not split into "
            f"n_experts={n_experts} equal experts. Use n_shared={lower} (or {max(0, lower - n_experts)}), or an "
            f"n_experts that divides {routed}."
        )
    return n_shared


# ---- statistics and clustering ------------------------------------------------------------------------------


def _mlp_inputs(
    model: nn.Module, ids: torch.Tensor, ffns: list[DenseFFN], batch_size: int = 8, progress: Any = None
) -> list[torch.Tensor]:
    """The input rows ``(N, H)`` of every converted MLP on ``ids`` (one pass of the dense model)."""
    store: list[list[torch.Tensor]] = [[] for _ in ffns]
    handles = []
    for j, ffn in enumerate(ffns):

        def grab(_m: nn.Module, args: tuple, j: int = j) -> None:
            store[j].append(args[0].detach().reshape(-1, args[0].shape[-1]))

        handles.append(model.get_submodule(ffn.name).register_forward_pre_hook(grab))
    device = next(model.parameters()).device
    try:
        with torch.no_grad():
            for start in range(0, ids.shape[0], batch_size):
                if progress is not None:
                    progress.check()
                model(input_ids=ids[start : start + batch_size].to(device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return [torch.cat(rows) for rows in store]


def _balanced_kmeans(features: torch.Tensor, n_clusters: int, gen: torch.Generator) -> torch.Tensor:
    """Cluster rows of ``features (n, d)`` into ``n_clusters`` groups of exactly ``n / n_clusters`` rows.

    k-means whose assignment step is a greedy balanced matching: (row, cluster) pairs in order of distance, each
    row to its nearest cluster that still has room. Seeded k-means++ start. Returns ``labels (n,)``.
    """
    n = features.shape[0]
    size = n // n_clusters
    sq = (features * features).sum(1)  # (n,)
    # k-means++ seeding
    first = int(torch.randint(n, (1,), generator=gen))
    centers = [features[first]]
    dist = (sq - 2 * features @ centers[0] + centers[0] @ centers[0]).clamp_min(0)
    for _ in range(1, n_clusters):
        total = float(dist.sum())
        pick = (
            int(torch.multinomial(dist / total, 1, generator=gen))
            if total > 0
            else int(torch.randint(n, (1,), generator=gen))
        )
        centers.append(features[pick])
        dist = torch.minimum(
            dist, (sq - 2 * features @ features[pick] + features[pick] @ features[pick]).clamp_min(0)
        )
    c = torch.stack(centers)  # (E, d)
    labels = torch.full((n,), -1, dtype=torch.long)
    for _ in range(KMEANS_ITERATIONS):
        d = sq[:, None] - 2 * features @ c.T + (c * c).sum(1)[None, :]  # (n, E)
        order = torch.argsort(d.flatten()).tolist()
        new = [-1] * n
        room = [size] * n_clusters
        left = n
        for flat in order:
            row, cl = divmod(flat, n_clusters)
            if new[row] < 0 and room[cl]:
                new[row] = cl
                room[cl] -= 1
                left -= 1
                if not left:
                    break
        new_t = torch.tensor(new, dtype=torch.long)
        if torch.equal(new_t, labels):
            break
        labels = new_t
        c = torch.stack([features[labels == k].mean(0) for k in range(n_clusters)])
    return labels


@dataclass
class Carving:
    """How one block's neurons were split: ``shared`` indices, ``experts[e]`` indices, router tensors."""

    shared: torch.Tensor  # (n_shared,) neuron indices
    experts: torch.Tensor  # (E, m) neuron indices
    router: dict[str, torch.Tensor]


def carve_block(
    mlp: nn.Module, x: torch.Tensor, n_experts: int, n_shared: int, router: str, gen: torch.Generator
) -> Carving:
    """Split one dense MLP's neurons by their activations on ``x (N, H)`` and build its router."""
    with torch.no_grad():
        wg, wu, wd = mlp.gate_proj.weight.float(), mlp.up_proj.weight.float(), mlp.down_proj.weight.float()
        xf = x.float()
        act = mlp.act_fn(xf @ wg.T) * (xf @ wu.T)  # (N, I)
        n_tok, inter = act.shape
        top = max(1, round(MARKER_FRACTION * inter))
        marks = torch.zeros_like(act, dtype=torch.bool)
        marks.scatter_(1, act.abs().topk(top, dim=1).indices, True)  # (N, I): neuron i fires for token t
        rate = marks.float().mean(0)  # (I,)
        # Ties (neurons that never fire) go by mean |activation|, so the order is total and seeded runs agree.
        order = torch.argsort(rate * 1e3 + act.abs().mean(0) / (act.abs().mean() + 1e-12), descending=True)
        shared = order[:n_shared].sort().values
        rest = order[n_shared:].sort().values
        features = marks[:, rest].T.float()  # (n_routed, N): each neuron's firing pattern over the tokens
        labels = _balanced_kmeans(features, n_experts, gen)
        experts = torch.stack([rest[labels == e] for e in range(n_experts)])  # (E, m)
        tensors: dict[str, torch.Tensor] = {}
        if router == "representative":
            reps = []
            for e in range(n_experts):
                members = features[labels == e]
                centre = members.mean(0)
                reps.append(int(rest[labels == e][((members - centre) ** 2).sum(1).argmin()]))
            tensors["weight"] = wg[reps].clone()
            tensors["up_weight"] = wu[reps].clone()
        elif router == "regression":
            # Target: each expert's share of the block's routed output norm per token, fitted linearly on x.
            target = torch.stack(
                [(act[:, experts[e]] @ wd[:, experts[e]].T).norm(dim=1) for e in range(n_experts)], dim=1
            )  # (N, E)
            target = target / target.sum(1, keepdim=True).clamp_min(1e-12)
            design = torch.cat([xf, torch.ones(n_tok, 1)], dim=1)  # (N, H + 1)
            gram = design.T @ design
            ridge = RIDGE * gram.diagonal().mean()
            sol = torch.linalg.solve(gram + ridge * torch.eye(gram.shape[0]), design.T @ target)  # (H + 1, E)
            tensors["weight"] = sol[:-1].T.contiguous()
            tensors["bias"] = sol[-1].contiguous()
        return Carving(shared, experts, tensors)


def carved_block(mlp: nn.Module, carving: Carving, top_k: int, router: str) -> MoEfiedMLP:
    """The :class:`MoEfiedMLP` holding ``mlp``'s own weights, regrouped as ``carving`` says."""
    wg, wu, wd = mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight
    n_experts, width = carving.experts.shape
    hidden = wg.shape[1]
    block = MoEfiedMLP(hidden, n_experts, width, carving.shared.numel(), top_k, router, mlp.act_fn)
    block.to(dtype=wg.dtype, device=wg.device)
    with torch.no_grad():
        idx = carving.experts  # (E, m)
        block.experts.gate_up_proj.copy_(torch.cat([wg[idx], wu[idx]], dim=1))  # (E, 2m, H)
        block.experts.down_proj.copy_(wd[:, idx].permute(1, 0, 2))  # (H, E, m) -> (E, H, m)
        if block.shared_expert is not None:
            block.shared_expert.gate_proj.weight.copy_(wg[carving.shared])
            block.shared_expert.up_proj.weight.copy_(wu[carving.shared])
            block.shared_expert.down_proj.weight.copy_(wd[:, carving.shared])
        for name, t in carving.router.items():
            getattr(block.gate, name).copy_(t)
    return block


def upcycled_block(
    mlp: nn.Module, n_experts: int, top_k: int, router_std: float, gen: torch.Generator
) -> MoEfiedMLP:
    """E copies of ``mlp`` and a softmax router (zero weights: uniform; else N(0, router_std))."""
    wg, wu, wd = mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight
    inter, hidden = wg.shape
    block = MoEfiedMLP(hidden, n_experts, inter, 0, top_k, "softmax", mlp.act_fn, source="upcycle")
    block.to(dtype=wg.dtype, device=wg.device)
    with torch.no_grad():
        block.experts.gate_up_proj.copy_(torch.cat([wg, wu], dim=0).expand(n_experts, -1, -1))
        block.experts.down_proj.copy_(wd.expand(n_experts, -1, -1))
        if router_std > 0:
            block.gate.weight.copy_(torch.randn(n_experts, hidden, generator=gen) * router_std)
    return block


# ---- whole-model conversion ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    """What a conversion does to every block (also the recipe to rebuild the structure before loading weights)."""

    mode: str
    n_experts: int
    top_k: int
    router: str  # scoring of the routers ("softmax" for upcycling)
    n_shared: tuple[int, ...]  # per block
    width: tuple[int, ...]  # neurons per expert, per block

    def to_dict(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "n_experts": self.n_experts,
            "top_k": self.top_k,
            "router": self.router,
            "n_shared": list(self.n_shared),
            "width": list(self.width),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Plan:
        return cls(
            str(data["mode"]),
            int(data["n_experts"]),
            int(data["top_k"]),
            str(data["router"]),
            tuple(int(v) for v in data["n_shared"]),
            tuple(int(v) for v in data["width"]),
        )


def plan(
    model: nn.Module,
    *,
    mode: str,
    n_experts: int,
    top_k: int,
    router: str,
    n_shared: int | None,
    shared_fraction: float,
    what: str = "moefy",
) -> Plan:
    """Check that ``model`` can be converted so and say how (no weights touched)."""
    ffns = dense_ffns(model, what)
    if mode == "upcycle":
        return Plan(
            mode, n_experts, top_k, "softmax", tuple(0 for _ in ffns), tuple(f.intermediate for f in ffns)
        )
    shared = [shared_count(f.intermediate, n_experts, n_shared, shared_fraction, what) for f in ffns]
    widths = [(f.intermediate - s) // n_experts for f, s in zip(ffns, shared, strict=True)]
    return Plan(mode, n_experts, top_k, router, tuple(shared), tuple(widths))


def build_structure_(model: nn.Module, recipe: Plan) -> nn.Module:
    """Replace every dense MLP by an empty :class:`MoEfiedMLP` of ``recipe``'s shapes (weights to load next).

    Works on a meta-device model too (a preview of the shapes for later pipeline steps).
    """
    ffns = dense_ffns(model)
    for ffn, shared, width in zip(ffns, recipe.n_shared, recipe.width, strict=True):
        parent_name, _, leaf = ffn.name.rpartition(".")
        mlp = model.get_submodule(ffn.name)
        w = mlp.gate_proj.weight
        scoring = recipe.router if recipe.mode == "carve" else "softmax"
        with torch.device(w.device):
            block = MoEfiedMLP(
                ffn.hidden,
                recipe.n_experts,
                width,
                shared,
                recipe.top_k,
                scoring,
                mlp.act_fn,
                source=recipe.mode,
            )
        block.to(dtype=w.dtype)
        setattr(model.get_submodule(parent_name), leaf, block)
    return model


def convert_(
    model: nn.Module,
    recipe: Plan,
    ids: torch.Tensor | None,
    *,
    seed: int = 0,
    router_std: float = 0.0,
    progress: Any = None,
    report: Callable[[float, str], None] | None = None,
) -> nn.Module:
    """Convert every dense MLP of ``model`` in place as ``recipe`` says; ``ids`` is calibration text (carve)."""
    ffns = dense_ffns(model)
    gen = torch.Generator().manual_seed(seed)
    inputs: list[torch.Tensor] = []
    if recipe.mode == "carve":
        if ids is None:
            raise ConfigError("moefy: carving needs calibration text (token ids).")
        if report:
            report(0.0, "collecting feed-forward activations")
        inputs = _mlp_inputs(model, ids, ffns, progress=progress)
    for j, ffn in enumerate(ffns):
        if progress is not None:
            progress.check()
        if report:
            report(0.1 + 0.9 * j / len(ffns), f"converting layer {ffn.layer + 1} of {len(ffns)}")
        parent_name, _, leaf = ffn.name.rpartition(".")
        mlp = model.get_submodule(ffn.name)
        if recipe.mode == "upcycle":
            block = upcycled_block(mlp, recipe.n_experts, recipe.top_k, router_std, gen)
        else:
            carving = carve_block(mlp, inputs[j], recipe.n_experts, recipe.n_shared[j], recipe.router, gen)
            block = carved_block(mlp, carving, recipe.top_k, recipe.router)
            inputs[j] = torch.empty(0)  # free as we go
        setattr(model.get_submodule(parent_name), leaf, block)
    if report:
        report(1.0, "converted")
    return model


# ---- accounting ---------------------------------------------------------------------------------------------


def moe_blocks(model: nn.Module) -> list[tuple[str, MoEfiedMLP]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, MoEfiedMLP)]


def active_counts(model: nn.Module) -> dict[str, float]:
    """Per-token work at each block's current ``top_k``.

    ``active_ffn_fraction``: FFN neurons computed per token over the dense model's (shared + k x m, over I;
    upcycled blocks run k whole copies, so it is k there); ``active_params``: every parameter the model holds
    minus the routed experts a token does not use (routers and shared experts included; embeddings counted
    once); ``total_params``: all of them.
    """
    blocks = moe_blocks(model)
    total = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    idle = 0
    active_neurons = dense_neurons = 0
    for _, b in blocks:
        n_exp, two_m, hidden = b.experts.gate_up_proj.shape
        width = two_m // 2
        k = min(b.top_k, n_exp)
        idle += (n_exp - k) * 3 * width * hidden
        shared = b.shared_expert.gate_proj.out_features if b.shared_expert is not None else 0
        dense = width if b.source == "upcycle" else shared + n_exp * width
        active_neurons += shared + k * width
        dense_neurons += dense
    return {
        "active_ffn_fraction": active_neurons / dense_neurons if dense_neurons else 1.0,
        "active_params": float(total - idle),
        "total_params": float(total),
    }


def conversion_recipe(model: nn.Module) -> dict[str, Any] | None:
    """How a converted model's blocks are laid out, read from the blocks themselves (None: no converted block).

    ``mode`` (carve | upcycle), ``blocks``, ``n_experts``, ``width`` (neurons per expert) and ``n_shared`` (always-on
    neurons), each a sorted list of the values the blocks hold, ``router`` (its scoring) and ``top_k`` (the ks the
    blocks run now). Calibration text and seed are not in the weights; a model's ``moefy.json`` has them.
    """
    blocks = [b for _, b in moe_blocks(model)]
    if not blocks:
        return None

    def values(get: Callable[[MoEfiedMLP], int]) -> list[int]:
        return sorted({int(get(b)) for b in blocks})

    return {
        "mode": blocks[0].source,
        "blocks": len(blocks),
        "n_experts": values(lambda b: b.experts.gate_up_proj.shape[0]),
        "width": values(lambda b: b.experts.down_proj.shape[-1]),
        "n_shared": values(
            lambda b: b.shared_expert.gate_proj.out_features if b.shared_expert is not None else 0
        ),
        "router": blocks[0].gate.scoring,
        "top_k": values(lambda b: b.top_k),
    }


def ffn_fraction_at(recipe: dict[str, Any], k: int) -> float:
    """FFN neurons a token runs at k over the dense FFN's, for a :func:`conversion_recipe` (first block's shape):
    ``(n_shared + k * m) / (n_shared + E * m)``; k for upcycled blocks (k whole copies)."""
    if recipe["mode"] == "upcycle":
        return float(k)
    shared, width, n_exp = recipe["n_shared"][0], recipe["width"][0], recipe["n_experts"][0]
    return (shared + k * width) / (shared + n_exp * width)


def set_top_k_(model: nn.Module, k: int) -> None:
    """Every converted block's k (what the expert slider does on a converted model)."""
    for name, b in moe_blocks(model):
        n_exp = b.experts.gate_up_proj.shape[0]
        if not 1 <= k <= n_exp:
            raise ConfigError(
                f"top_k={k} is out of range for {name}: it has {n_exp} experts; choose 1..{n_exp}."
            )
        b.gate.top_k = int(k)


__all__ = [
    "MODES",
    "ROUTERS",
    "CarvedExperts",
    "Carving",
    "DenseFFN",
    "MoEfiedMLP",
    "MoEfyRouter",
    "Plan",
    "SharedMLP",
    "active_counts",
    "build_structure_",
    "carve_block",
    "carved_block",
    "conversion_recipe",
    "convert_",
    "dense_ffns",
    "ffn_fraction_at",
    "moe_blocks",
    "plan",
    "set_top_k_",
    "shared_count",
    "upcycled_block",
]
