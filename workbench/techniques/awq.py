"""AWQ (Lin et al., 2023, "AWQ: Activation-aware Weight Quantization for LLM Compression and Acceleration"),
implemented after the authors' reference code (``llm-awq``: ``run_awq``, ``auto_scale_block``, ``auto_clip_block``).

Why our own implementation: the maintained AWQ packages need CUDA kernels or pin library versions that conflict
with the workbench's own (see docs/quantization.md). Per decoder layer, on calibration text:

1. **Capture.** The layer runs once on its calibration inputs; hooks record the inputs of q_proj (= k, v), o_proj,
   gate_proj (= up) and down_proj. Its outputs (float, before any change, as in the reference) become the next
   layer's inputs.
2. **Scale search** (``auto_scale_block``). For each group of linears that read the same input, a per-input-
   channel scale s = mean|x|^α (normalised by sqrt(max·min)) is tried for α = 0, 1/n_grid, …, and the α with the
   smallest output MSE is kept. The output is that of the module the reference inspects: the attention block
   for q/k/v (after ``input_layernorm``), the MLP for gate/up (after ``post_attention_layernorm``), and the
   linear itself for o_proj (after v_proj, only without grouped-query attention) and down_proj (after up_proj).
   The weights tried are Q(W·s)/s. The best s is folded in: W ← W·s, and the producer of the input divides by s
   (the RMSNorm weight, or the rows of the previous linear), so the float function is unchanged while salient
   input channels get finer quantization steps.
3. **Clipping search** (``auto_clip_layer``). Per linear (q and k skipped, as in the reference: the softmax hides
   their errors), each group's max |w| is shrunk by 1 - i/20 for i < 10, keeping per group the factor that
   minimises that group's share of the output error on 512 evenly spread calibration tokens.
4. The layer's linears are quantized group-wise (round to nearest on the scaled, clipped weights).

Searches use the first ``search_tokens`` calibration tokens (whole sequences, since attention needs them); the
activation statistic mean|x| uses all of them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from workbench.errors import ConfigError
from workbench.techniques._calibration import LayerRunner, calibration_ids, decoder_layers, named_linears
from workbench.techniques._grid import WeightGridConfig, check_at_least
from workbench.techniques._quant import (
    check_embedding_groups,
    check_group_size,
    fake_quantize_,
    mark_quantized,
    quantize_embeddings_from_config_,
)
from workbench.techniques.base import ApplyContext, register
from workbench.techniques.space import DEFAULT_GROUP_SIZES, declare_space


@dataclass(frozen=True)
class AWQConfig(WeightGridConfig):
    """AWQ: activation-aware per-channel scaling and weight clipping, calibrated on the corpus.

    The shared weight-grid fields (bits, group_size, symmetric, zero_point, embedding options) are as for RTN
    (the packed format is the same; embeddings and head by RTN); the rest tune the calibration and the searches.
    """

    technique: ClassVar[str] = "awq"

    n_samples: int = field(
        default=64,
        metadata={"help": "Calibration windows for the activation statistics (n_samples × seq_len tokens)."},
    )
    seq_len: int = field(default=256, metadata={"help": "Tokens per calibration window, at least 8."})
    n_grid: int = field(
        default=20, metadata={"help": "Points of the scale exponent grid α, at least 2 (20 as in the paper)."}
    )
    search_tokens: int = field(
        default=512,
        metadata={
            "help": "Calibration tokens (whole sequences) on which scales and clipping are searched, at least 16; "
            "512 keeps a CPU run of the demo model near a minute and is already many outputs per candidate."
        },
    )
    clip: bool = field(
        default=True, metadata={"help": "Run the weight clipping search after the scale search."}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        check_at_least("awq", "n_samples", self.n_samples, 1, "64 is usual")
        check_at_least("awq", "seq_len", self.seq_len, 8, "256 is usual")
        check_at_least("awq", "n_grid", self.n_grid, 2, "20 as in the paper")
        check_at_least("awq", "search_tokens", self.search_tokens, 16, "512 is usual")
        if not isinstance(self.clip, bool):
            raise ConfigError(f"awq: clip={self.clip!r} must be True or False.")


_NEEDED = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
    "input_layernorm",
    "post_attention_layernorm",
)


def check_awq(model: Any, config: AWQConfig) -> None:
    """AWQ needs to know which op produces each linear's input: Llama-style layers only."""
    layers = decoder_layers(model)
    names = {n for n, _ in layers[0].named_modules()}
    missing = [n for n in _NEEDED if n not in names]
    if missing:
        raise ConfigError(
            f"awq: the decoder layers of {type(model).__name__} lack {', '.join(missing)}; AWQ here supports "
            "Llama-style layers (Llama, Mistral, Qwen2, SmolLM). Use gptq or rtn for this model."
        )
    modules = [
        (f"model.layers.{i}.{n}", m) for i, layer in enumerate(layers) for n, m in named_linears(layer)
    ]
    check_group_size("awq", model, config.group_size, modules)
    check_embedding_groups("awq", model, config.group_size, config.include_embeddings, config.include_head)


class _Features:
    """Inputs of the watched linears: mean |x| over every calibration token, and the first sequences kept whole."""

    def __init__(self, keep_batches: int) -> None:
        self.keep_batches = keep_batches
        self.abs_sum: dict[str, torch.Tensor] = {}
        self.count: dict[str, int] = {}
        self.kept: dict[str, list[torch.Tensor]] = {}
        self.batch = 0

    def hook(self, key: str) -> Callable[..., None]:
        def record(_module: nn.Module, inp: tuple[torch.Tensor, ...], _out: torch.Tensor) -> None:
            x = inp[0].detach().float()
            flat = x.reshape(-1, x.shape[-1])
            self.abs_sum[key] = self.abs_sum.get(key, 0) + flat.abs().sum(0)
            self.count[key] = self.count.get(key, 0) + flat.shape[0]
            if self.batch < self.keep_batches:
                self.kept.setdefault(key, []).append(x)

        return record

    def x_mean(self, key: str) -> torch.Tensor:
        return self.abs_sum[key] / self.count[key]  # the reference's get_act_scale: mean |x| per channel


def _search_scale(
    block: Callable[[torch.Tensor, dict[str, Any]], torch.Tensor],
    xs: list[torch.Tensor],
    kwargs: list[dict[str, Any]],
    linears: list[nn.Linear],
    x_mean: torch.Tensor,
    config: AWQConfig,
) -> torch.Tensor:
    """``auto_scale_block._search_module_scale``: the s = x_mean^α minimising the inspected block's output MSE."""
    originals = [lin.weight.data.clone() for lin in linears]
    with torch.no_grad():
        ref = [block(x, kw) for x, kw in zip(xs, kwargs, strict=True)]
        best_loss, best = float("inf"), torch.ones_like(x_mean)
        try:
            for k in range(config.n_grid):
                alpha = k / config.n_grid
                s = x_mean.pow(alpha).clamp(min=1e-4)
                s = s / (s.max() * s.min()).sqrt()
                for lin, w in zip(linears, originals, strict=True):
                    scaled = fake_quantize_(
                        w * s.view(1, -1), config.bits, config.group_size, config.symmetric, config.zero_point
                    )
                    lin.weight.data = scaled.div_(s.view(1, -1)).to(w.dtype)
                loss = sum(
                    float((block(x, kw) - r).float().pow(2).mean())
                    for x, kw, r in zip(xs, kwargs, ref, strict=True)
                ) / len(xs)
                if loss < best_loss:
                    best_loss, best = loss, s
        finally:
            for lin, w in zip(linears, originals, strict=True):
                lin.weight.data = w
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


def _search_clip(
    x: torch.Tensor,
    linear: nn.Linear,
    config: AWQConfig,
    n_tokens: int = 512,
    n_grid: int = 20,
    max_shrink: float = 0.5,
) -> None:
    """``auto_clip_layer`` + ``apply_clip``: clamp each group to ±(best shrink of its max |w|), in place.

    The reference measures each group's output error directly, mean_t (x_t,g · (q_g - w_g))², on 512 tokens.
    The same number is (q_g - w_g)ᵀ C_g (q_g - w_g) with C_g = X_gᵀ X_g / T, the group's input Gram matrix,
    which costs group_size instead of T multiply-adds per weight: identical choices, ~16x less work.
    """
    w_all = linear.weight.data.float()
    out_f, in_f = w_all.shape
    gs = in_f if config.group_size == -1 else config.group_size
    n_groups = in_f // gs
    flat = x.reshape(-1, in_f).float()
    step = max(1, flat.shape[0] // n_tokens)
    xg = (
        flat[0::step][:n_tokens].reshape(-1, n_groups, gs).transpose(0, 1)
    )  # (G, T, gs), evenly spread tokens
    gram = torch.bmm(xg.transpose(1, 2), xg) / xg.shape[1]  # (G, gs, gs)
    with torch.no_grad():
        wg = w_all.reshape(out_f, n_groups, gs)
        org_max = wg.abs().amax(-1, keepdim=True)  # (O, G, 1)
        min_err = torch.full((out_f, n_groups), float("inf"), device=wg.device)
        best = org_max.clone()
        for i in range(int(max_shrink * n_grid)):
            max_val = org_max * (1 - i / n_grid)
            clipped = torch.maximum(torch.minimum(wg, max_val), -max_val)
            q = fake_quantize_(
                clipped.reshape(out_f, in_f),
                config.bits,
                config.group_size,
                config.symmetric,
                config.zero_point,
            ).reshape(out_f, n_groups, gs)
            d = (q - wg).transpose(0, 1)  # (G, O, gs)
            err = (torch.bmm(d, gram) * d).sum(-1).transpose(0, 1)  # (O, G): mean squared output error
            better = err < min_err
            min_err = torch.where(better, err, min_err)
            best = torch.where(better[..., None], max_val, best)
        clamped = torch.maximum(torch.minimum(wg, best), -best).reshape(out_f, in_f)
        linear.weight.data = clamped.to(linear.weight.dtype)


def _layer_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in kwargs.items() if k not in ("past_key_values", "use_cache", "position_ids")}


# What the bit-width slider and `workbench sweep` offer (see workbench/techniques/space.py).
declare_space("awq", bits=range(2, 9), group_sizes=DEFAULT_GROUP_SIZES, symmetric=True, grid_sensitive=True)


@register("awq", AWQConfig, kind="quantize", check=check_awq)
def _apply_awq(model: Any, config: AWQConfig, ctx: ApplyContext) -> Any:
    ids = calibration_ids(ctx, config.n_samples, config.seq_len, "awq")
    batch_size = max(1, min(8, config.search_tokens // config.seq_len))
    runner = LayerRunner(model, ids, batch_size=batch_size)
    keep = max(1, -(-config.search_tokens // (batch_size * config.seq_len)))
    for layer in ctx.progress.iter(list(runner.layers), desc="awq layer"):
        attn, mlp = layer.self_attn, layer.mlp
        feats = _Features(keep)
        watch = {"q": attn.q_proj, "o": attn.o_proj, "gate": mlp.gate_proj, "down": mlp.down_proj}
        hooks = [mod.register_forward_hook(feats.hook(key)) for key, mod in watch.items()]
        outputs = []
        try:
            for out in runner.run(layer):
                outputs.append(out)
                feats.batch += 1
                ctx.progress.check()
        finally:
            for h in hooks:
                h.remove()
        kw = [_layer_kwargs(k) for k in runner.kwargs[:keep]]
        no_kw: list[dict[str, Any]] = [{} for _ in range(keep)]
        x = feats.kept

        def attn_block(h: torch.Tensor, k: dict[str, Any], attn: nn.Module = attn) -> torch.Tensor:
            return attn(hidden_states=h, **k)[0]

        groups: list[
            tuple[nn.Module, list[nn.Linear], str, Callable[..., torch.Tensor], list[dict[str, Any]]]
        ] = [
            (layer.input_layernorm, [attn.q_proj, attn.k_proj, attn.v_proj], "q", attn_block, kw),
            (
                layer.post_attention_layernorm,
                [mlp.gate_proj, mlp.up_proj],
                "gate",
                lambda h, _k, mlp=mlp: mlp(h),
                no_kw,
            ),
            (mlp.up_proj, [mlp.down_proj], "down", lambda h, _k, mlp=mlp: mlp.down_proj(h), no_kw),
        ]
        if (
            attn.v_proj.weight.shape == attn.o_proj.weight.shape
        ):  # the reference's condition for folding v → o
            groups.insert(
                1, (attn.v_proj, [attn.o_proj], "o", lambda h, _k, attn=attn: attn.o_proj(h), no_kw)
            )
        for prev, linears, key, block, block_kw in groups:
            ctx.progress.check()
            s = _search_scale(block, x[key], block_kw, linears, feats.x_mean(key), config)
            _apply_scale(prev, linears, s)
            x[key] = [t / s for t in x[key]]  # the producer now emits x / s
        if config.clip:
            for key, lin in (
                ("q", attn.v_proj),
                ("o", attn.o_proj),
                ("gate", mlp.gate_proj),
                ("gate", mlp.up_proj),
                ("down", mlp.down_proj),
            ):
                ctx.progress.check()
                _search_clip(torch.cat([t.reshape(-1, t.shape[-1]) for t in x[key]]), lin, config)
        for _, lin in named_linears(layer):
            fake_quantize_(
                lin.weight.data, config.bits, config.group_size, config.symmetric, config.zero_point
            )
            mark_quantized(lin, config.bits, config.group_size, config.symmetric, config.zero_point, "awq")
        runner.inputs = outputs  # the next layer's inputs: this layer's float outputs, as in the reference
    quantize_embeddings_from_config_(model, config, "awq")
    return model


__all__ = ["AWQConfig", "check_awq"]
