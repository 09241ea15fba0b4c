"""Students cut from the teacher: depth pruning by Block Influence, width pruning by activation importance.

- **Depth** (ShortGPT's Block Influence): a decoder layer whose output hidden state points the same way as its
  input changes little, so ``BI = 1 - mean cos(input, output)`` over calibration tokens ranks layers from least
  to most important; dropping the lowest keeps most of the model's behaviour.
- **Width** (Minitron): FFN neurons ranked by the mean absolute value of their activation (the input of
  ``down_proj``), attention heads by the mean L2 norm of their output (their slice of ``o_proj``'s input), both
  over calibration tokens. The kept neurons and heads keep their order and their teacher weights.

Every student is a new model of the teacher's class built from the changed config, filled with the kept
tensors of the teacher (``load_state_dict(strict=True)``, so a tensor left out is an error, never a silently
random weight). The teacher is never modified. A student may also be any model that shares the teacher's
tokenizer (:func:`check_same_tokenizer` says what differs otherwise).
"""

from __future__ import annotations

import copy
import re
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from workbench.anatomy import decoder_layer_list
from workbench.errors import ConfigError

# A probe text with prose, code, digits and non-ASCII: two tokenizers that give the same ids on it (and have
# the same vocabulary size) are treated as the same tokenizer.
PROBE_TEXT = "def f(x):\n    return x ** 2  # 12345 café — naïve Ünïcode, tabs\tand  spaces."


def _layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    prefix, layers = decoder_layer_list(model)
    if prefix is None or not isinstance(layers, nn.ModuleList) or not len(layers):
        raise ConfigError(
            f"{type(model).__name__} has no list of decoder layers; pruning supports Llama-, "
            "Mistral-, Qwen- and similar decoder models."
        )
    return prefix, layers


def _hidden(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _out(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


@torch.no_grad()
def block_influence(model: nn.Module, ids: torch.Tensor, *, batch_size: int = 4) -> list[float]:
    """ShortGPT's Block Influence of every decoder layer on ``ids`` ``(N, S)``: ``1 - mean cos(in, out)``.

    Near 0: the layer barely turns the hidden state (a candidate to drop); larger: the layer matters.
    """
    _, layers = _layers(model)
    sums = [0.0] * len(layers)
    count = 0
    handles = []
    for i, layer in enumerate(layers):

        def hook(_m: nn.Module, args: tuple, kwargs: dict, output: Any, i: int = i) -> None:
            x, y = _hidden(args, kwargs).float(), _out(output).float()  # (B, S, H) each
            sums[i] += float((1 - torch.nn.functional.cosine_similarity(x, y, dim=-1)).sum())

        handles.append(layer.register_forward_hook(hook, with_kwargs=True))
    device = next(model.parameters()).device
    try:
        for start in range(0, ids.shape[0], batch_size):
            batch = ids[start : start + batch_size].to(device)
            model(input_ids=batch, use_cache=False)
            count += batch.numel()
    finally:
        for h in handles:
            h.remove()
    return [s / max(count, 1) for s in sums]


def layers_to_drop(influence: Sequence[float], n: int) -> list[int]:
    """The ``n`` layers of least influence (ties: the later layer first, as later layers are more redundant)."""
    if not 0 <= n < len(influence):
        raise ConfigError(
            f"Cannot drop {n} of {len(influence)} layers; drop between 0 and {len(influence) - 1}."
        )
    order = sorted(range(len(influence)), key=lambda i: (influence[i], -i))
    return sorted(order[:n])


def _text_config(config: Any) -> Any:
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def _rebuild(model: nn.Module, config: Any, state: dict[str, torch.Tensor]) -> nn.Module:
    """A new model of ``model``'s class from ``config``, holding exactly ``state`` (strict)."""
    dtype = next(model.parameters()).dtype
    device = next(model.parameters()).device
    student = type(model)(config).to(dtype=dtype, device=device)
    missing, unexpected = student.load_state_dict(state, strict=False)
    # Tied heads are not in a tied model's state dict twice; anything else missing is a bug to report.
    tied = {
        k for k in missing if k.endswith("lm_head.weight") and getattr(config, "tie_word_embeddings", False)
    }
    if set(missing) - tied or unexpected:
        raise RuntimeError(
            f"Pruned state does not fit the student: missing {sorted(set(missing) - tied)}, "
            f"unexpected {sorted(unexpected)}."
        )
    return student.eval()


def drop_layers(model: nn.Module, drop: Sequence[int]) -> nn.Module:
    """A copy of ``model`` without the decoder layers ``drop`` (0-based); the kept ones keep their weights."""
    prefix, layers = _layers(model)
    n = len(layers)
    bad = [i for i in drop if not 0 <= int(i) < n]
    if bad or len(set(drop)) != len(drop):
        raise ConfigError(f"Layers to drop {list(drop)}: each must be a distinct index in 0..{n - 1}.")
    if len(drop) >= n:
        raise ConfigError(f"Dropping {len(drop)} of {n} layers leaves none; keep at least one.")
    keep = [i for i in range(n) if i not in set(drop)]
    new_index = {old: new for new, old in enumerate(keep)}
    pattern = re.compile(rf"^{re.escape(prefix)}\.(\d+)\.(.*)$")
    state = {}
    for key, value in model.state_dict().items():
        m = pattern.match(key)
        if m is None:
            state[key] = value
        elif int(m.group(1)) in new_index:
            state[f"{prefix}.{new_index[int(m.group(1))]}.{m.group(2)}"] = value
    config = copy.deepcopy(model.config)
    text = _text_config(config)
    text.num_hidden_layers = len(keep)
    for name in ("layer_types", "mlp_layer_types"):  # per-layer lists (sliding / full attention, ...) follow
        value = getattr(text, name, None)
        if isinstance(value, (list, tuple)) and len(value) == n:
            setattr(text, name, [value[i] for i in keep])
    return _rebuild(model, config, state)


@torch.no_grad()
def width_importance(
    model: nn.Module, ids: torch.Tensor, *, batch_size: int = 4
) -> dict[str, list[torch.Tensor]]:
    """Minitron's activation importance per layer: ``{"ffn": [(I,)...], "heads": [(n_heads,)...]}``.

    FFN neuron j: mean ``|a_j|`` of ``down_proj``'s input; head h: mean L2 norm of its ``head_dim`` slice of
    ``o_proj``'s input (the head's attention output), both over every calibration token.
    """
    _, layers = _layers(model)
    text = _text_config(model.config)
    n_heads = text.num_attention_heads
    ffn = [torch.zeros(0) for _ in layers]
    heads = [torch.zeros(0) for _ in layers]
    count = [0]
    handles = []
    for i, layer in enumerate(layers):
        mlp, attn = _mlp(layer), _attn(layer)

        def ffn_hook(_m: nn.Module, args: tuple, i: int = i) -> None:
            a = args[0].float().reshape(-1, args[0].shape[-1])  # (tokens, I)
            s = a.abs().sum(0).cpu()
            ffn[i] = s if not ffn[i].numel() else ffn[i] + s

        def head_hook(_m: nn.Module, args: tuple, i: int = i) -> None:
            a = (
                args[0].float().reshape(-1, n_heads, args[0].shape[-1] // n_heads)
            )  # (tokens, heads, head_dim)
            s = a.norm(dim=-1).sum(0).cpu()
            heads[i] = s if not heads[i].numel() else heads[i] + s

        handles.append(mlp.down_proj.register_forward_pre_hook(ffn_hook))
        handles.append(attn.o_proj.register_forward_pre_hook(head_hook))
    device = next(model.parameters()).device
    try:
        for start in range(0, ids.shape[0], batch_size):
            batch = ids[start : start + batch_size].to(device)
            model(input_ids=batch, use_cache=False)
            count[0] += batch.numel()
    finally:
        for h in handles:
            h.remove()
    return {"ffn": [f / count[0] for f in ffn], "heads": [h / count[0] for h in heads]}


def _mlp(layer: nn.Module) -> nn.Module:
    mlp = getattr(layer, "mlp", None)
    if mlp is None or not all(hasattr(mlp, p) for p in ("gate_proj", "up_proj", "down_proj")):
        raise ConfigError(
            f"{type(layer).__name__}: width pruning needs a gated MLP (gate_proj, up_proj, "
            "down_proj), as in Llama, Mistral and Qwen; MoE layers are pruned by expert instead."
        )
    return mlp


def _attn(layer: nn.Module) -> nn.Module:
    attn = getattr(layer, "self_attn", None)
    if attn is None or not all(hasattr(attn, p) for p in ("q_proj", "o_proj")):
        raise ConfigError(f"{type(layer).__name__}: head pruning needs self_attn.q_proj and o_proj.")
    return attn


def check_width(model: nn.Module, ffn_size: int | None, heads: int | None) -> None:
    """Refuse widths the model cannot take (before any work)."""
    text = _text_config(model.config)
    if ffn_size is not None:
        full = int(text.intermediate_size)
        if not 1 <= ffn_size <= full:
            raise ConfigError(f"ffn_size={ffn_size}: the model's FFN width is {full}; choose 1..{full}.")
    if heads is not None:
        full, kv = (
            int(text.num_attention_heads),
            int(getattr(text, "num_key_value_heads", None) or text.num_attention_heads),
        )
        if not 1 <= heads <= full or heads % kv:
            ok = [h for h in range(kv, full + 1, kv)]
            raise ConfigError(
                f"heads={heads}: the model has {full} query heads in {kv} key/value groups, so the "
                f"kept heads must be a multiple of {kv} up to {full}: {ok}."
            )


def prune_width(
    model: nn.Module,
    ids: torch.Tensor | None,
    *,
    ffn_size: int | None = None,
    heads: int | None = None,
    importance: dict[str, list[torch.Tensor]] | None = None,
) -> nn.Module:
    """A copy of ``model`` with ``ffn_size`` FFN neurons and ``heads`` query heads per layer, the most important
    ones on ``ids`` kept (or by a given ``importance``); key/value heads are all kept, and each key/value group
    keeps the same number of query heads, so grouped-query attention still lines up.
    """
    check_width(model, ffn_size, heads)
    prefix, layers = _layers(model)
    text = _text_config(model.config)
    n_heads = int(text.num_attention_heads)
    kv = int(getattr(text, "num_key_value_heads", None) or n_heads)
    head_dim = int(getattr(text, "head_dim", None) or text.hidden_size // n_heads)
    if importance is None:
        if ids is None:
            raise ConfigError(
                "Width pruning needs calibration ids or an importance to rank neurons and heads."
            )
        importance = width_importance(model, ids)
    state = dict(model.state_dict())
    for i, layer in enumerate(layers):
        base = f"{prefix}.{i}"
        if ffn_size is not None:
            keep = torch.sort(torch.topk(importance["ffn"][i], ffn_size).indices).values
            for proj in ("gate_proj", "up_proj"):
                state[f"{base}.mlp.{proj}.weight"] = state[f"{base}.mlp.{proj}.weight"][keep].clone()
                if f"{base}.mlp.{proj}.bias" in state:
                    state[f"{base}.mlp.{proj}.bias"] = state[f"{base}.mlp.{proj}.bias"][keep].clone()
            state[f"{base}.mlp.down_proj.weight"] = state[f"{base}.mlp.down_proj.weight"][:, keep].clone()
        if heads is not None:
            per_group, group = heads // kv, n_heads // kv
            score = importance["heads"][i].reshape(kv, group)  # query heads h = g * group + j share kv head g
            chosen = torch.sort(torch.topk(score, per_group, dim=1).indices, dim=1).values
            kept = (chosen + torch.arange(kv)[:, None] * group).reshape(-1)  # (heads,) in original order
            rows = (kept[:, None] * head_dim + torch.arange(head_dim)[None, :]).reshape(-1)
            state[f"{base}.self_attn.q_proj.weight"] = state[f"{base}.self_attn.q_proj.weight"][rows].clone()
            if f"{base}.self_attn.q_proj.bias" in state:
                state[f"{base}.self_attn.q_proj.bias"] = state[f"{base}.self_attn.q_proj.bias"][rows].clone()
            state[f"{base}.self_attn.o_proj.weight"] = state[f"{base}.self_attn.o_proj.weight"][
                :, rows
            ].clone()
    config = copy.deepcopy(model.config)
    text = _text_config(config)
    if ffn_size is not None:
        text.intermediate_size = ffn_size
    if heads is not None:
        text.head_dim = head_dim  # kept explicit: hidden_size // heads would change it
        text.num_attention_heads = heads
    return _rebuild(model, config, state)


def n_parameters(model: nn.Module) -> int:
    """Parameters, each shared tensor (tied embeddings) counted once."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def check_same_tokenizer(teacher: Any, student: Any, *, probe: str = PROBE_TEXT) -> None:
    """Refuse a student whose tokenizer differs from the teacher's: the message says what differs."""
    if teacher is None or student is None:
        return
    problems = []
    if len(teacher) != len(student):
        problems.append(f"vocabulary size {len(teacher)} (teacher) vs {len(student)} (student)")
    t_ids = teacher(probe, add_special_tokens=False)["input_ids"]
    s_ids = student(probe, add_special_tokens=False)["input_ids"]
    if t_ids != s_ids:
        first = next((k for k, (a, b) in enumerate(zip(t_ids, s_ids)) if a != b), min(len(t_ids), len(s_ids)))
        problems.append(
            f"ids of the probe text {probe[:24]!r}... differ from token {first} "
            f"(teacher {t_ids[first : first + 4]}, student {s_ids[first : first + 4]})"
        )
    if problems:
        raise ConfigError(
            "The student's tokenizer differs from the teacher's: "
            + "; ".join(problems)
            + ". Distillation compares distributions token by token, so pick a student that shares "
            "the teacher's tokenizer (or prune one from the teacher)."
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
