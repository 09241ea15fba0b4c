"""One description of a loaded causal LM's structure: decoder layers, linears, routers, experts, embeddings.

Quantizers (which linears and expert tensors they change), calibration (which layers and linears they run and
hook) and size accounting (what counts as a decoder linear) all read :func:`anatomy`, so a model's structure is
decided in one place. Nothing here is keyed on a model family's name alone: the description is read from the
modules and parameter shapes transformers builds, as printed from every MoE family of transformers 5.2x:

- decoder layers: the ``nn.ModuleList`` of ``config.num_hidden_layers`` blocks (``model.layers``,
  ``transformer.blocks`` in DBRX).
- routers: a module named ``gate`` or ``router`` whose ``[E, H]`` weight (its own, or that of its one linear:
  ``gate.wg`` in HunYuan, ``router.layer`` in DBRX and JetMoE, ``router.gate`` in AFMoE) scores E experts, beside
  tensors with E experts. The MoE block is the router's parent.
- fused experts, per expert ``e`` an ordinary ``(out, in)`` matrix:
    ``[E, out, in]``      Qwen-MoE, Mixtral, OLMoE, DeepSeek, ...: ``gate_up_proj [E, 2I, H]``, ``down_proj [E, H, I]``
    ``[E, in, out]``      transposed: Llama4 (``gate_up_proj [E, H, 2I]``), GPT-OSS (also interleaved gate/up
                          columns ``[..., ::2]`` / ``[..., 1::2]`` and biases ``[E, out]``)
    ``[E*F, H]``          flattened: DBRX ``w1``, ``v1`` (``(F, H)[e]`` = (out, in)) and ``w2`` (``(F, H)[e]`` used
                          as ``x @ w2[e]``, so (in, out))
    per-expert modules    older layouts: ``experts`` is an ``nn.ModuleList`` of E MLPs of ``nn.Linear``
- shared experts: dense MLPs named ``shared_expert(s)`` / ``shared_mlp`` in the block or the layer, with an
  optional ``shared_expert_gate [1, H]`` (kept in full precision, like routers).
- top-k: every live copy of k as an int attribute ``top_k`` on the router (what forward reads in every family
  but DBRX), its children, or the block (DBRX reads ``ffn.top_k``; the block copies elsewhere are dead ones).

The description holds names and shapes, never modules, so it stays valid for a deep copy of the model;
``model.get_submodule(name)`` (or :meth:`ModelAnatomy.modules`) reaches the modules.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

ROUTER_NAMES = ("gate", "router")
SHARED_PREFIXES = ("shared_expert", "shared_mlp")
SHARED_GATE = "shared_expert_gate"
# Leaf-path words that put a linear in the attention (or token-mixing attention-like) part of a layer.
ATTENTION_WORDS = ("attn", "attention")
LAYOUTS = ("fused", "fused_transposed", "flattened", "modules")
# Experts modules that store (E, in, out) but carry no ``is_transposed`` flag (not built through transformers'
# ``use_experts_implementation``): Llama4 multiplies ``torch.bmm(x, gate_up_proj)``. Shapes decide otherwise.
_TRANSPOSED_CLASSES = ("Llama4TextExperts",)
# Routers whose forward ignores ``top_k``: PhiMoE's sparsemixer always picks exactly two experts.
_FIXED_TOP_K = {"PhimoeTopKRouter": 2}
_COUNT_ATTRS = ("num_experts", "moe_num_experts", "n_routed_experts", "num_local_experts")


@dataclass(frozen=True)
class LinearInfo:
    """A linear layer inside a decoder layer that weight quantizers change (routers and gates are not)."""

    name: str  # module name in the model, e.g. "model.layers.0.self_attn.q_proj"
    layer: int  # decoder layer index
    role: str  # "attention", "mlp", "shared_expert", "expert" (per-expert modules) or "other" (mamba, conv mixers)
    in_features: int
    out_features: int


@dataclass(frozen=True)
class RouterInfo:
    """The module that scores experts for one MoE block."""

    name: str  # router module, e.g. "model.layers.0.mlp.gate"
    layer: int
    weight: str  # full parameter name of the (E, H) scoring weight
    n_experts: int
    # Other tensors with one entry per expert outside the expert weights (router bias, DeepSeek's
    # e_score_correction_bias, AFMoE's expert_bias): (full name, axis of the experts). Pruning slices them too.
    per_expert: tuple[tuple[str, int], ...] = ()


@dataclass(frozen=True)
class ExpertTensor:
    """One stored tensor of routed experts and how expert ``e``'s (out, in) matrix sits in it."""

    name: str  # full parameter name; for per-expert modules a template with "{e}"
    role: str  # "gate_up", "gate", "up", "down", "input", "output", or one of those + "_bias"
    shape: tuple[int, ...]  # as stored (per expert for layout "modules")
    n_experts: int
    out_features: int  # of one expert's matrix (for a bias: its length)
    in_features: int  # of one expert's matrix (0 for a bias)
    layout: str  # one of LAYOUTS
    transposed: bool = False  # one expert's slice is stored (in, out)
    interleaved: bool = False  # gate_up only: gate and up alternate along out (GPT-OSS), instead of halves

    @property
    def is_bias(self) -> bool:
        return self.role.endswith("_bias")

    def matrices(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` (this one, as stored) viewed as (E, out, in): expert e's matrix is ``[e]``.

        A view, never a copy; transposed layouts give a non-contiguous one. Not for biases or per-expert modules.
        """
        if self.is_bias or self.layout == "modules":
            raise ValueError(
                f"{self.name}: matrices() applies to fused expert weights, not a {self.role} "
                f"in layout {self.layout!r}."
            )
        if self.layout == "flattened":
            rows = tensor.shape[0] // self.n_experts
            view = tensor.view(self.n_experts, rows, tensor.shape[-1])
        else:
            view = tensor
        return view.transpose(1, 2) if self.transposed else view


@dataclass(frozen=True)
class MoEBlock:
    """One sparse MoE block: its router, expert tensors, k and how to reach expert ``e``'s weights."""

    layer: int
    name: str  # the block module (the router's parent), e.g. "model.layers.0.mlp"
    experts: str  # the module holding the expert tensors (their deepest common owner)
    layout: str  # one of LAYOUTS
    n_experts: int
    tensors: tuple[ExpertTensor, ...]
    router: RouterInfo
    top_k: int | None  # as the model is now (None: no k found on the modules and none in the config)
    # (module name, attribute) of every int copy of k in the block; the first is the one forward reads.
    top_k_attrs: tuple[tuple[str, str], ...] = ()
    top_k_settable: bool = True  # False where forward ignores top_k (PhiMoE: always 2)
    # (module name, attribute) of int expert counts to update when experts are removed.
    count_attrs: tuple[tuple[str, str], ...] = ()
    shared: tuple[str, ...] = ()  # shared-expert modules that run beside the routed experts

    def expert_weights(self, model: nn.Module, e: int) -> dict[str, torch.Tensor]:
        """Expert ``e``'s weights by role: (out, in) views of the stored tensors (biases: their row)."""
        if not 0 <= e < self.n_experts:
            raise IndexError(
                f"{self.name}: expert {e} does not exist; it has {self.n_experts} (0..{self.n_experts - 1})."
            )
        out: dict[str, torch.Tensor] = {}
        for t in self.tensors:
            if self.layout == "modules":
                out[t.role] = model.get_parameter(t.name.format(e=e))
            elif t.is_bias:
                out[t.role] = model.get_parameter(t.name)[e]
            else:
                out[t.role] = t.matrices(model.get_parameter(t.name))[e]
        return out


@dataclass(frozen=True)
class SharedExpert:
    """A dense MLP every token goes through beside the routed experts (Qwen2-MoE, DeepSeek, Llama4, ...)."""

    name: str
    layer: int
    linears: tuple[str, ...]
    gate: str | None = None  # a sigmoid gate on its output ([1, H] linear), if the family has one


@dataclass(frozen=True)
class LayerInfo:
    index: int
    name: str  # e.g. "model.layers.3"
    attention: tuple[str, ...]  # linear module names
    mlp: tuple[str, ...]  # the other quantized linears: dense MLP, shared experts, per-expert modules, mixers
    moe: tuple[str, ...] = ()  # MoE block names in this layer (JetMoE has two: attention and MLP)

    @property
    def is_moe(self) -> bool:
        return bool(self.moe)


@dataclass(frozen=True)
class ModelAnatomy:
    """The structure of one model. Build it with :func:`anatomy`."""

    model_type: str
    layers_name: str | None  # the ModuleList of decoder layers, e.g. "model.layers" (None: not found)
    layers: tuple[LayerInfo, ...]
    linears: tuple[LinearInfo, ...]
    routers: tuple[RouterInfo, ...]
    experts: tuple[MoEBlock, ...]
    shared_experts: tuple[SharedExpert, ...]
    embedding: str | None
    lm_head: str | None
    tied_embeddings: bool
    hidden_size: int | None

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    @property
    def is_moe(self) -> bool:
        return bool(self.experts)

    def expert_tensors(self, *, biases: bool = False) -> Iterator[tuple[MoEBlock, ExpertTensor]]:
        """Fused/flattened expert tensors (per-expert module layouts are ordinary ``linears`` instead)."""
        for block in self.experts:
            if block.layout == "modules":
                continue
            for t in block.tensors:
                if biases or not t.is_bias:
                    yield block, t

    def modules(self, model: nn.Module, names: Any = None) -> list[tuple[str, nn.Module]]:
        """(name, module) for ``names`` (default: every linear), resolved in ``model``."""
        names = [lin.name for lin in self.linears] if names is None else list(names)
        return [(n, model.get_submodule(n)) for n in names]


# ---- building the description --------------------------------------------------------------------------------


def anatomy(model: nn.Module) -> ModelAnatomy:
    """Describe ``model`` (a transformers CausalLM, or any module tree with a list of decoder layers)."""
    config = getattr(model, "config", None)
    text_config = _text_config(config)
    names = {id(m): n for n, m in model.named_modules()}
    emb = _call(model, "get_input_embeddings")
    head = _call(model, "get_output_embeddings")
    tied = (
        emb is not None
        and head is not None
        and getattr(head, "weight", None) is not None
        and head.weight is getattr(emb, "weight", None)
    )
    hidden = getattr(text_config, "hidden_size", None) or getattr(text_config, "d_model", None)
    layers_name, layer_list = _find_layers(model, text_config)
    layers: list[LayerInfo] = []
    linears: list[LinearInfo] = []
    blocks: list[MoEBlock] = []
    shared: list[SharedExpert] = []
    skip = {id(emb), id(head)}
    for i, layer in enumerate(layer_list):
        prefix = f"{layers_name}.{i}"
        layer_blocks, layer_shared, layer_linears = _describe_layer(layer, i, prefix, text_config, skip)
        blocks += layer_blocks
        shared += layer_shared
        linears += layer_linears
        layers.append(
            LayerInfo(
                index=i,
                name=prefix,
                attention=tuple(lin.name for lin in layer_linears if lin.role == "attention"),
                mlp=tuple(lin.name for lin in layer_linears if lin.role != "attention"),
                moe=tuple(b.name for b in layer_blocks),
            )
        )
    return ModelAnatomy(
        model_type=str(getattr(text_config, "model_type", "") or type(model).__name__),
        layers_name=layers_name,
        layers=tuple(layers),
        linears=tuple(linears),
        routers=tuple(b.router for b in blocks),
        experts=tuple(blocks),
        shared_experts=tuple(shared),
        embedding=names.get(id(emb)) if emb is not None else None,
        lm_head=names.get(id(head)) if head is not None else None,
        tied_embeddings=bool(tied),
        hidden_size=int(hidden) if isinstance(hidden, int) else None,
    )


def layer_linears(layer: nn.Module) -> list[tuple[str, nn.Module]]:
    """The quantized linears of one decoder layer, named relative to it (routers and gates left out)."""
    _, _, found = _describe_layer(layer, 0, "", None, set())
    return [(lin.name, layer.get_submodule(lin.name)) for lin in found]


def decoder_layer_list(model: nn.Module) -> tuple[str | None, nn.ModuleList | tuple[()]]:
    """(name, ModuleList) of the decoder layers; (None, ()) when the model has none."""
    return _find_layers(model, _text_config(getattr(model, "config", None)))


def _call(model: nn.Module, method: str) -> nn.Module | None:
    fn = getattr(model, method, None)
    if fn is None:
        return None
    try:
        return fn()
    except (NotImplementedError, AttributeError):
        return None


def _text_config(config: Any) -> Any:
    """Multimodal configs keep the decoder's numbers in a text config."""
    if config is None:
        return None
    get = getattr(config, "get_text_config", None)
    try:
        return get() if callable(get) else config
    except (TypeError, ValueError):
        return config


def _find_layers(model: nn.Module, config: Any) -> tuple[str | None, nn.ModuleList | tuple[()]]:
    """The first ModuleList (in module order) of ``num_hidden_layers`` blocks; else the longest one of blocks.

    Module order is pre-order, so the decoder's list comes before any list of experts inside a layer.
    """
    n = getattr(config, "num_hidden_layers", None)
    lists = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m)]
    if isinstance(n, int) and n > 0:
        for name, m in lists:
            if len(m) == n:
                return name, m
    holding = [(name, m) for name, m in lists if all(_has_linear(child) for child in m)]
    if holding:
        return max(holding, key=lambda nm: len(nm[1]))
    return None, ()


def _has_linear(module: nn.Module) -> bool:
    return any(_is_linear(m) for m in module.modules())


def logical_weights(module: nn.Module) -> int | None:
    """in_features × out_features of a linear-like module (also when its weight is stored packed)."""
    inf, outf = getattr(module, "in_features", None), getattr(module, "out_features", None)
    if isinstance(inf, int) and isinstance(outf, int) and inf and outf:
        return inf * outf
    return None


def _is_linear(module: nn.Module) -> bool:
    """nn.Linear and the modules that replace it (bitsandbytes, quanto, HQQ, ...)."""
    return isinstance(module, nn.Linear) or (
        logical_weights(module) is not None and hasattr(module, "weight")
    )


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix and name else (prefix or name)


def _within(name: str, roots: list[str]) -> bool:
    return any(name == r or name.startswith(r + ".") for r in roots)


def _router_weight(router: nn.Module) -> tuple[str, torch.Tensor] | None:
    """The (E, H) scoring weight: the router's own, or that of its single linear child."""
    w = router._parameters.get("weight")
    if isinstance(w, torch.Tensor) and w.dim() == 2:
        return "weight", w
    inner = [(n, m) for n, m in router.named_modules() if n and _is_linear(m)]
    if len(inner) == 1 and isinstance(getattr(inner[0][1], "weight", None), torch.Tensor):
        w = inner[0][1].weight
        if w.dim() == 2:
            return f"{inner[0][0]}.weight", w
    return None


def _own_tensors(module: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    yield from ((n, p) for n, p in module.named_parameters(recurse=False) if p is not None)
    skip = getattr(module, "_non_persistent_buffers_set", set())
    yield from ((n, b) for n, b in module.named_buffers(recurse=False) if b is not None and n not in skip)


def _role(path: str) -> str:
    """Role of an expert tensor from its name (module leaf + parameter), e.g. "experts.gate_up_proj"."""
    leaf = path.lower().replace(".weight", "").rsplit(".", 1)[-1]
    bias = leaf.endswith("_bias") or leaf == "bias"
    leaf = leaf.removesuffix("_bias")
    if "gate_up" in leaf or leaf == "w13":
        role = "gate_up"
    elif "down" in leaf or leaf == "w2":
        role = "down"
    elif leaf in ("input_linear",):
        role = "input"
    elif leaf in ("output_linear",):
        role = "output"
    elif "up" in leaf or leaf in ("v1", "w3"):
        role = "up"
    elif "gate" in leaf or leaf == "w1":
        role = "gate"
    else:
        role = leaf
    return f"{role}_bias" if bias else role


def _transposed(owner: nn.Module, role: str, shape: tuple[int, ...], hidden: int | None) -> bool:
    """Whether one expert's slice of a fused 3-D tensor is stored (in, out)."""
    flag = getattr(owner, "is_transposed", None)
    if isinstance(flag, bool):
        return flag
    if type(owner).__name__ in _TRANSPOSED_CLASSES:
        return True
    if hidden:  # input-side projections read H, "down" writes H
        _, a, b = shape
        if role == "down" or role == "output":
            return b == hidden and a != hidden
        return a == hidden and b != hidden
    return False


def _describe_layer(
    layer: nn.Module, index: int, prefix: str, config: Any, skip: set[int]
) -> tuple[list[MoEBlock], list[SharedExpert], list[LinearInfo]]:
    modules = dict(layer.named_modules())
    # -- routers, and the blocks they sit in
    routers: list[tuple[str, str, nn.Module, str, torch.Tensor]] = []  # block, router name, router, wname, w
    for name, m in modules.items():
        parent, _, leaf = name.rpartition(".")
        if not name or leaf not in ROUTER_NAMES or _within(parent, [r[1] for r in routers]):
            continue
        found = _router_weight(m)
        if found is None:
            continue
        wname, w = found
        if _expert_tensors(modules, parent, name, int(w.shape[0])):
            routers.append((parent, name, m, wname, w))
    router_roots = [r[1] for r in routers]
    # -- shared experts: in a block or directly in the layer
    shared_roots = [
        n
        for n, m in modules.items()
        if n
        and n.rpartition(".")[2].startswith(SHARED_PREFIXES)
        and n.rpartition(".")[2] != SHARED_GATE
        and not _is_linear(m)
        and not _within(n.rpartition(".")[0], router_roots)
    ]
    shared_roots = [n for n in shared_roots if not _within(n.rpartition(".")[0], shared_roots)]
    gates = [n for n, m in modules.items() if n.rpartition(".")[2] == SHARED_GATE and _is_linear(m)]
    hidden = getattr(config, "hidden_size", None)
    blocks: list[MoEBlock] = []
    per_expert_lists: list[str] = []
    for block_name, router_name, router, wname, w in routers:
        n_experts = int(w.shape[0])
        tensors, owner, layout, lists = _expert_tensors(
            modules, block_name, router_name, n_experts, shared_roots, hidden or int(w.shape[1])
        )
        per_expert_lists += lists
        extra = []
        for mod_name in [n for n in modules if _within(n, [router_name])] + [block_name]:
            for tname, t in _own_tensors(modules[mod_name]):
                full = _join(mod_name, tname)
                if full == _join(router_name, wname):
                    continue
                axis = (
                    0
                    if t.dim() and t.shape[0] == n_experts
                    else (t.dim() - 1 if t.dim() and t.shape[-1] == n_experts else None)
                )
                if axis is not None:
                    extra.append((_join(prefix, full), axis))
        k_holders = [
            n
            for n in [*(n for n in modules if _within(n, [router_name])), block_name]
            if isinstance(getattr(modules[n], "top_k", None), int) and not isinstance(modules[n].top_k, bool)
        ]
        top_k_attrs = tuple((_join(prefix, n), "top_k") for n in k_holders)
        top_k = modules[k_holders[0]].top_k if k_holders else _config_top_k(config)
        fixed = _FIXED_TOP_K.get(type(router).__name__)
        counts = tuple(
            (_join(prefix, n), a)
            for n in modules
            if _within(n, [block_name]) and not _within(n, shared_roots)
            for a in _COUNT_ATTRS
            if isinstance(getattr(modules[n], a, None), int) and getattr(modules[n], a) == n_experts
        )
        in_block = [s for s in shared_roots if _within(s, [block_name])]
        # A shared MLP beside the block in the layer (GraniteMoE-Shared) belongs to it too.
        beside = [s for s in shared_roots if s.rpartition(".")[0] == block_name.rpartition(".")[0]]
        blocks.append(
            MoEBlock(
                layer=index,
                name=_join(prefix, block_name),
                experts=_join(prefix, owner),
                layout=layout,
                n_experts=n_experts,
                tensors=tuple(ExpertTensor(**{**t, "name": _join(prefix, t["name"])}) for t in tensors),
                router=RouterInfo(
                    name=_join(prefix, router_name),
                    layer=index,
                    weight=_join(prefix, _join(router_name, wname)),
                    n_experts=n_experts,
                    per_expert=tuple(extra),
                ),
                top_k=int(fixed if fixed is not None else top_k) if top_k is not None else None,
                top_k_attrs=top_k_attrs,
                top_k_settable=fixed is None,
                count_attrs=counts,
                shared=tuple(_join(prefix, s) for s in dict.fromkeys(in_block + beside)),
            )
        )
    shared = [
        SharedExpert(
            name=_join(prefix, s),
            layer=index,
            linears=tuple(_join(prefix, n) for n, m in modules.items() if _within(n, [s]) and _is_linear(m)),
            gate=next(
                (_join(prefix, g) for g in gates if g.rpartition(".")[0] == s.rpartition(".")[0]), None
            ),
        )
        for s in shared_roots
    ]
    # -- the linears quantizers change
    linears: list[LinearInfo] = []
    for name, m in modules.items():
        if not name or not _is_linear(m) or id(m) in skip or _within(name, router_roots) or name in gates:
            continue
        if _within(name, shared_roots):
            role = "shared_expert"
        elif _within(name, per_expert_lists):
            role = "expert"
        elif any(word in part for part in name.lower().split(".") for word in ATTENTION_WORDS):
            role = "attention"
        elif _within(name, [b for b, *_ in routers]) or name.split(".")[0] in (
            "mlp",
            "feed_forward",
            "ffn",
            "block_sparse_moe",
            "moe",
        ):
            role = "mlp"
        else:
            role = "other"
        w = getattr(m, "weight", None)
        inf = getattr(m, "in_features", None) or (
            w.shape[1] if isinstance(w, torch.Tensor) and w.dim() == 2 else 0
        )
        outf = getattr(m, "out_features", None) or (
            w.shape[0] if isinstance(w, torch.Tensor) and w.dim() == 2 else 0
        )
        linears.append(LinearInfo(_join(prefix, name), index, role, int(inf), int(outf)))
    return blocks, shared, linears


def _config_top_k(config: Any) -> int | None:
    for attr in ("num_experts_per_tok", "moe_top_k", "top_k"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    ffn = getattr(config, "ffn_config", None)  # DBRX
    value = getattr(ffn, "moe_top_k", None)
    return value if isinstance(value, int) else None


def _expert_tensors(
    modules: dict[str, nn.Module],
    block: str,
    router: str,
    n_experts: int,
    shared_roots: list[str] | None = None,
    hidden: int | None = None,
) -> Any:
    """The routed-expert tensors of ``block`` (excluding its router and shared experts).

    Returns ``(tensor dicts, owner module name, layout, per-expert ModuleList names)``, or ``()`` (falsy) when the
    block holds no tensors of ``n_experts`` experts, i.e. ``router`` is no MoE router.
    """
    shared_roots = shared_roots or []
    found: list[dict[str, Any]] = []
    owners: list[str] = []
    lists: list[str] = []
    layout = "fused"
    for name, m in modules.items():
        if not _within(name, [block]) or _within(name, [router]) or _within(name, shared_roots):
            continue
        if _within(name, lists):
            continue
        if isinstance(m, nn.ModuleList) and len(m) == n_experts and all(_has_linear(c) for c in m):
            lists.append(name)
            layout = "modules"
            owners.append(name)
            first = m[0]
            for sub, lin in first.named_modules():
                if sub and _is_linear(lin):
                    found.append(
                        {
                            "name": f"{name}.{{e}}.{sub}.weight",
                            "role": _role(sub),
                            "shape": tuple(lin.weight.shape),
                            "n_experts": n_experts,
                            "out_features": int(lin.out_features),
                            "in_features": int(lin.in_features),
                            "layout": "modules",
                        }
                    )
            continue
        if _is_linear(m):
            continue
        for pname, t in m.named_parameters(recurse=False):
            if not t.is_floating_point():
                continue
            path = _join(name, pname)
            role = _role(path)
            if t.dim() == 3 and t.shape[0] == n_experts:
                transposed = _transposed(m, role, tuple(t.shape), hidden)
                out_f, in_f = (t.shape[2], t.shape[1]) if transposed else (t.shape[1], t.shape[2])
                interleaved = role == "gate_up" and getattr(m, "is_concatenated", True) is False
                found.append(
                    {
                        "name": path,
                        "role": role,
                        "shape": tuple(t.shape),
                        "n_experts": n_experts,
                        "out_features": int(out_f),
                        "in_features": int(in_f),
                        "layout": "fused_transposed" if transposed else "fused",
                        "transposed": transposed,
                        "interleaved": interleaved,
                    }
                )
                owners.append(name)
            elif t.dim() == 2 and t.shape[0] == n_experts and role.endswith("_bias"):
                found.append(
                    {
                        "name": path,
                        "role": role,
                        "shape": tuple(t.shape),
                        "n_experts": n_experts,
                        "out_features": int(t.shape[1]),
                        "in_features": 0,
                        "layout": "fused",
                        "interleaved": role == "gate_up_bias"
                        and getattr(m, "is_concatenated", True) is False,
                    }
                )
            elif (
                t.dim() == 2
                and t.shape[0] % n_experts == 0
                and t.shape[0] > n_experts
                and "expert" in type(m).__name__.lower()
            ):
                # DBRX: (E*F, H), expert e = view(E, F, H)[e]; w2 is used as x @ w2[e], so (in, out).
                rows = t.shape[0] // n_experts
                transposed = role == "down"
                found.append(
                    {
                        "name": path,
                        "role": role,
                        "shape": tuple(t.shape),
                        "n_experts": n_experts,
                        "out_features": int(t.shape[1] if transposed else rows),
                        "in_features": int(rows if transposed else t.shape[1]),
                        "layout": "flattened",
                        "transposed": transposed,
                    }
                )
                owners.append(name)
    weights = [t for t in found if not t["role"].endswith("_bias")]
    if not weights:
        return ()
    if layout != "modules":
        kinds = {t["layout"] for t in weights}
        layout = (
            "flattened"
            if "flattened" in kinds
            else ("fused_transposed" if "fused_transposed" in kinds else "fused")
        )
        for t in found:
            t["layout"] = layout if not t["role"].endswith("_bias") else t["layout"]
    owner = _common_prefix(owners) if owners else block
    return found, owner, layout, lists


def _common_prefix(names: list[str]) -> str:
    parts = [n.split(".") for n in names]
    common: list[str] = []
    for level in zip(*parts):
        if len(set(level)) != 1:
            break
        common.append(level[0])
    return ".".join(common)


__all__ = [
    "LAYOUTS",
    "ExpertTensor",
    "LayerInfo",
    "LinearInfo",
    "MoEBlock",
    "ModelAnatomy",
    "RouterInfo",
    "SharedExpert",
    "anatomy",
    "decoder_layer_list",
    "layer_linears",
    "logical_weights",
]
