"""AWQ (Lin et al., 2023, "AWQ: Activation-aware Weight Quantization for LLM Compression and Acceleration"),
implemented after the authors' reference code (``llm-awq``: ``auto_scale`` and ``auto_clip``).

Why our own implementation: the maintained AWQ packages need CUDA kernels or pin library versions that conflict
with the workbench's own (see docs/quantization.md). Per decoder layer:

1. **Scale search.** For each group of linears that read the same input (q/k/v after the input norm; gate/up
   after the post-attention norm; down after up; o after v when the shapes allow), a per-input-channel scale
   s = mean|x|^α (normalised) is searched over an α grid, minimising the MSE between the group's original
   outputs and the outputs with Q(W·s)/s. The best s is folded into the layer: W ← W·s, and the producer of the
   input divides by s (the RMSNorm weight, or the rows of the previous linear), so the float function is
   unchanged while salient channels get finer quantization steps.
2. **Clipping search.** Per linear (q and k are skipped, as in the reference: their errors are hidden by the
   softmax), the weight range of each group is shrunk by a factor from a grid, keeping the factor that
   minimises the group's output error on calibration inputs.
3. The layer's float outputs feed the next layer; the layer's linears are then quantized group-wise.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from workbench.errors import ConfigError
from workbench.techniques._calibration import LayerRunner, calibration_ids, decoder_layers, named_linears
from workbench.techniques._quant import (
    check_group_size,
    fake_quantize,
    mark_quantized,
    validate_common,
)
from workbench.techniques.base import ApplyContext, register
from workbench.techniques.rtn import quantize_embeddings_


@dataclass(frozen=True)
class AWQConfig:
    """AWQ: activation-aware per-channel scaling and weight clipping, calibrated on the corpus.

    bits, group_size, symmetric, zero_point: as for RTN (the packed format is the same).
    n_samples, seq_len: calibration windows. n_grid: points of the α grid (20 as in the paper).
    search_tokens: calibration tokens used by the searches (a sample keeps them fast on a CPU).
    clip: run the clipping search. include_embeddings, include_head, embedding_bits: as for RTN.
    """

    bits: int = 4
    group_size: int = 32
    symmetric: bool = False
    zero_point: str = "float"
    n_samples: int = 32
    seq_len: int = 256
    n_grid: int = 20
    search_tokens: int = 2048
    clip: bool = True
    include_embeddings: bool = False
    include_head: bool = False
    embedding_bits: int = 8

    def __post_init__(self) -> None:
        validate_common("awq", self.bits, self.group_size, self.zero_point)
        if self.n_grid < 2 or self.n_samples < 1 or self.seq_len < 8 or self.search_tokens < 16:
            raise ConfigError("awq: n_grid ≥ 2, n_samples ≥ 1, seq_len ≥ 8 and search_tokens ≥ 16 are needed.")


_NEEDED = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
           "mlp.up_proj", "mlp.down_proj", "input_layernorm", "post_attention_layernorm")


def check_awq(model: Any, config: AWQConfig) -> None:
    layers = decoder_layers(model)
    names = {n for n, _ in layers[0].named_modules()}
    missing = [n for n in _NEEDED if n not in names]
    if missing:
        raise ConfigError(
            f"awq: the decoder layers of {type(model).__name__} lack {', '.join(missing)}; AWQ here supports "
            "Llama-style layers (Llama, Mistral, Qwen2, SmolLM). Use gptq or rtn for this model."
        )
    modules = [(f"model.layers.{i}.{n}", m) for i, layer in enumerate(layers) for n, m in named_linears(layer)]
    check_group_size("awq", model, config.group_size, modules)


def _sample(x: torch.Tensor, n: int) -> torch.Tensor:
    flat = x.reshape(-1, x.shape[-1]).float()
    if flat.shape[0] <= n:
        return flat
    idx = torch.linspace(0, flat.shape[0] - 1, n).long()  # evenly spread, deterministic
    return flat[idx]


def _search_scale(x: torch.Tensor, linears: list[nn.Linear], config: AWQConfig) -> torch.Tensor:
    """Best per-channel scale for the linears reading ``x`` (tokens, C)."""
    originals = [lin.weight.data.float() for lin in linears]
    ref = torch.cat([x @ w.T for w in originals], dim=1)
    x_mean = x.abs().mean(0)
    best_loss, best = float("inf"), torch.ones_like(x_mean)
    for k in range(config.n_grid):
        alpha = k / config.n_grid
        s = x_mean.pow(alpha).clamp(min=1e-4)
        s = s / (s.max() * s.min()).sqrt()
        outs = []
        for w in originals:
            wq = fake_quantize(w * s, config.bits, config.group_size, config.symmetric, config.zero_point) / s
            outs.append(x @ wq.T)
        loss = float((torch.cat(outs, dim=1) - ref).pow(2).mean())
        if loss < best_loss:
            best_loss, best = loss, s
    return best


def _apply_scale(prev: nn.Module, linears: list[nn.Linear], s: torch.Tensor) -> None:
    """Fold ``s`` in: consumers multiply their input columns by s, the producer divides its output by s."""
    with torch.no_grad():
        if isinstance(prev, nn.Linear):
            prev.weight.div_(s.view(-1, 1).to(prev.weight.dtype))
            if prev.bias is not None:
                prev.bias.div_(s.to(prev.bias.dtype))
        else:  # an RMSNorm / LayerNorm with a weight vector
            prev.weight.div_(s.to(prev.weight.dtype))
            if getattr(prev, "bias", None) is not None:
                prev.bias.div_(s.to(prev.bias.dtype))
        for lin in linears:
            lin.weight.mul_(s.view(1, -1).to(lin.weight.dtype))


def _search_clip(x: torch.Tensor, linear: nn.Linear, config: AWQConfig, n_shrink: int = 10,
                 max_shrink: float = 0.5) -> None:
    """Shrink each group's weight range to the factor that minimises its output error (in place)."""
    w = linear.weight.data.float()
    out_f, in_f = w.shape
    gs = in_f if config.group_size == -1 else config.group_size
    n_groups = in_f // gs
    xg = x[: min(512, x.shape[0])].reshape(-1, n_groups, gs)  # (T, G, gs)
    wg = w.reshape(out_f, n_groups, gs)
    ref = torch.einsum("tgk,ogk->otg", xg, wg)  # (O, T, G): each group's share of each output
    best_err = torch.full((out_f, n_groups), float("inf"))
    best_w = wg.clone()
    wmax = wg.amax(-1, keepdim=True)
    wmin = wg.amin(-1, keepdim=True)
    amax = wg.abs().amax(-1, keepdim=True)
    for k in range(n_shrink + 1):
        ratio = 1 - max_shrink * k / n_shrink
        if config.symmetric:
            clipped = wg.clamp(-amax * ratio, amax * ratio)
        else:
            clipped = wg.clamp(wmin * ratio, wmax * ratio)
        q = fake_quantize(clipped.reshape(out_f, in_f), config.bits, config.group_size, config.symmetric,
                          config.zero_point).reshape(out_f, n_groups, gs)
        err = (torch.einsum("tgk,ogk->otg", xg, q) - ref).pow(2).mean(1)  # (O, G)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_w = torch.where(better[..., None], clipped, best_w)
    linear.weight.data = best_w.reshape(out_f, in_f).to(linear.weight.dtype)


@register("awq", AWQConfig, kind="quantize", check=check_awq)
def _apply_awq(model: Any, config: AWQConfig, ctx: ApplyContext) -> Any:
    ids = calibration_ids(ctx, config.n_samples, config.seq_len, "awq")
    runner = LayerRunner(model, ids)
    for layer in ctx.progress.iter(list(runner.layers), desc="awq layer"):
        attn, mlp = layer.self_attn, layer.mlp
        captured: dict[str, list[torch.Tensor]] = {"q": [], "o": [], "gate": [], "down": []}
        watch = {"q": attn.q_proj, "o": attn.o_proj, "gate": mlp.gate_proj, "down": mlp.down_proj}
        hooks = [
            mod.register_forward_hook(lambda _m, inp, _o, key=key: captured[key].append(inp[0].detach()))
            for key, mod in watch.items()
        ]
        try:
            for _ in runner.run(layer):
                pass
        finally:
            for h in hooks:
                h.remove()
        xs = {k: _sample(torch.cat([t.reshape(-1, t.shape[-1]) for t in v]), config.search_tokens)
              for k, v in captured.items()}
        groups: list[tuple[nn.Module, list[nn.Linear], str]] = [
            (layer.input_layernorm, [attn.q_proj, attn.k_proj, attn.v_proj], "q"),
            (layer.post_attention_layernorm, [mlp.gate_proj, mlp.up_proj], "gate"),
            (mlp.up_proj, [mlp.down_proj], "down"),
        ]
        if attn.v_proj.out_features == attn.o_proj.in_features:  # no grouped-query attention: v → o folds
            groups.append((attn.v_proj, [attn.o_proj], "o"))
        for prev, linears, key in groups:
            s = _search_scale(xs[key], linears, config)
            _apply_scale(prev, linears, s)
            xs[key] = xs[key] / s  # the producer now emits x / s
        if config.clip:
            for key, lin in (("o", attn.o_proj), ("gate", mlp.gate_proj), ("gate", mlp.up_proj),
                             ("q", attn.v_proj), ("down", mlp.down_proj)):
                _search_clip(xs[key], lin, config)
        runner.advance(layer)  # next inputs from this layer in float (scaled, clipped), as the reference does
        with torch.no_grad():
            for _, lin in named_linears(layer):
                lin.weight.data = fake_quantize(lin.weight.data, config.bits, config.group_size, config.symmetric,
                                                config.zero_point)
                mark_quantized(lin, config.bits, config.group_size, config.symmetric, config.zero_point, "awq")
    if config.include_embeddings or config.include_head:
        quantize_embeddings_(model, config.embedding_bits, config.group_size, config.symmetric, config.zero_point,
                             config.include_head, "awq")
    return model


__all__ = ["AWQConfig"]
