"""GPTQ (Frantar et al., 2022, "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained
Transformers"), implemented after the authors' reference code.

Why our own implementation: the maintained packages (llm-compressor, GPTQModel) pin transformers or torch
versions that conflict with the workbench's own, so a user could not install them cleanly beside it (see
docs/quantization.md). The algorithm is short, and this version follows the reference step by step:

1. Layer by layer, the inputs of every linear are captured on calibration text (the corpus's calibration part)
   and accumulated into H = 2 X Xᵀ / n.
2. Dead inputs (H_ii = 0) are zeroed; H is damped by ``damp`` × mean(diag H).
3. Optionally columns are processed in order of decreasing H_ii (``act_order``); group parameters are then
   fixed from the original weights before the sweep ("static groups"), so each group keeps contiguous columns.
4. The upper Cholesky factor of H⁻¹ drives the sweep: each column is quantized, its error divided by the
   diagonal, and the remaining columns of the block are corrected; the block's error then updates the rest
   (lazy batch updates, ``block_size`` columns at a time).
5. The layer's outputs, with quantized weights, become the next layer's inputs.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import hashlib
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from workbench.errors import ConfigError
from workbench.techniques._calibration import LayerRunner, calibration_ids, decoder_layers, named_linears
from workbench.techniques._grid import WeightGridConfig, check_at_least, check_bits
from workbench.techniques._quant import (
    check_embedding_groups,
    check_group_size,
    decoder_linears,
    fused_experts,
    mark_quantized,
    quant_params,
    quantize_embeddings_from_config_,
    quantize_fused_experts_,
    quantize_groups,
)
from workbench.techniques.base import ApplyContext, register
from workbench.techniques.space import DEFAULT_GROUP_SIZES, declare_space


@dataclass(frozen=True)
class GPTQConfig(WeightGridConfig):
    """GPTQ: second-order error compensation, calibrated on the corpus's calibration part.

    The shared weight-grid fields (bits, group_size, symmetric, zero_point, embedding options) are as for RTN
    (the packed format is the same; embeddings and head by RTN); the rest tune the calibration and the sweep.
    """

    technique: ClassVar[str] = "gptq"
    ADDED_FIELDS: ClassVar[tuple[str, ...]] = ("module_bits",)  # stored only when set (see config_to_dict)

    act_order: bool = field(
        default=True,
        metadata={
            "help": "Quantize columns in order of decreasing Hessian diagonal, with static groups (the stored "
            "layout is unchanged). On by default, unlike the reference: on the demo model it cuts the 3-bit KL "
            "divergence by almost half at the same cost and size."
        },
    )
    damp: float = field(
        default=0.01,
        metadata={
            "help": "Fraction of the mean Hessian diagonal added to it, for numerical stability; between "
            "0 and 1 (0.01 as in the paper)."
        },
    )
    n_samples: int = field(
        default=32,
        metadata={"help": "Calibration windows taken from the corpus (n_samples × seq_len tokens)."},
    )
    seq_len: int = field(default=256, metadata={"help": "Tokens per calibration window, at least 8."})
    block_size: int = field(
        default=128,
        metadata={"help": "Columns per lazy batch update (128 as in the reference); any positive size."},
    )
    module_bits: tuple[tuple[str, int], ...] = field(
        default=(),
        metadata={
            "help": "Per-module bit widths: (glob pattern, bits) pairs over decoder linear names, first match "
            "wins; a module no pattern matches gets `bits`. E.g. (('*.v_proj', 8), ('model.layers.0.*', 5)). "
            "Plan one for a size budget from measured sensitivity with "
            "workbench.quant_analysis.plan_module_bits (the way llama.cpp's Q4_K_M keeps some tensors higher)."
        },
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.act_order, bool):
            raise ConfigError(f"gptq: act_order={self.act_order!r} must be True or False.")
        if isinstance(self.damp, bool) or not isinstance(self.damp, (int, float)) or not 0 < self.damp < 1:
            raise ConfigError(f"gptq: damp={self.damp!r} must be between 0 and 1 (0.01 is usual).")
        check_at_least("gptq", "n_samples", self.n_samples, 1, "32 is usual")
        check_at_least("gptq", "seq_len", self.seq_len, 8, "256 is usual")
        check_at_least("gptq", "block_size", self.block_size, 1, "128 as in the reference")
        object.__setattr__(self, "module_bits", _module_bits(self.module_bits))

    def bits_for(self, name: str) -> int:
        """The bits of the module called ``name``: the first ``module_bits`` pattern it matches, else ``bits``."""
        for pattern, bits in self.module_bits:
            if fnmatch.fnmatchcase(name, pattern):
                return bits
        return self.bits

    def label(self) -> str:
        """As the base label, with a per-module map summarised (``map 5b:200 8b:10 #1a2b``): a map of hundreds
        of patterns would not fit a legend, and the digest keeps two different maps apart."""
        if not self.module_bits:
            return super().label()
        plain = dataclasses.replace(self, module_bits=())
        counts: dict[int, int] = {}
        for _, b in self.module_bits:
            counts[b] = counts.get(b, 0) + 1
        digest = hashlib.sha1(repr(self.module_bits).encode()).hexdigest()[:4]
        summary = " ".join(f"{b}b:{n}" for b, n in sorted(counts.items()))
        return f"{plain.label()} map {summary} #{digest}"


def _module_bits(value: Any) -> tuple[tuple[str, int], ...]:
    """``module_bits`` as a tuple of (pattern, bits): a dict or lists (as stored in JSON) are accepted."""
    items = list(value.items()) if isinstance(value, dict) else list(value)
    pairs = []
    for item in items:
        if isinstance(item, str) or len(item) != 2 or not isinstance(item[0], str) or not item[0]:
            raise ConfigError(
                f"gptq: module_bits entry {item!r} is not a (pattern, bits) pair; write e.g. "
                "(('*.v_proj', 8),)."
            )
        check_bits("gptq", f"module_bits[{item[0]!r}]", item[1])
        pairs.append((item[0], int(item[1])))
    return tuple(pairs)


def check_gptq(model: Any, config: GPTQConfig) -> None:
    layers = decoder_layers(model)
    modules = [
        (f"model.layers.{i}.{n}", m) for i, layer in enumerate(layers) for n, m in named_linears(layer)
    ]
    check_group_size("gptq", model, config.group_size, modules)
    check_embedding_groups("gptq", model, config.group_size, config.include_embeddings, config.include_head)
    if config.module_bits:  # a typo would otherwise silently keep nothing at its bits
        names = [n for n, _ in decoder_linears(model)] + [label for label, _, _, _ in fused_experts(model)]
        for pattern, _ in config.module_bits:
            if not any(fnmatch.fnmatchcase(n, pattern) for n in names):
                raise ConfigError(
                    f"gptq: module_bits pattern {pattern!r} matches no decoder linear (names look like "
                    f"{names[0]!r}; use e.g. '*.v_proj' or '{names[0].rsplit('.', 2)[0]}.*')."
                )


class _Hessian:
    """Running H = 2/n Σ x xᵀ over a linear's inputs (the reference's streaming update, n counted in tokens)."""

    def __init__(self, columns: int) -> None:
        self.columns = columns
        self.H: torch.Tensor | None = None  # created on the device of the first input (CPU or GPU)
        self.n = 0

    def add(self, inp: torch.Tensor) -> None:
        x = inp.reshape(-1, inp.shape[-1]).float()
        if self.H is None:
            self.H = torch.zeros(self.columns, self.columns, dtype=torch.float32, device=x.device)
        m = x.shape[0]
        self.H *= self.n / (self.n + m)
        self.n += m
        x = math.sqrt(2 / self.n) * x
        self.H.addmm_(x.T, x)


class _HessianHooks:
    """Forward hooks that accumulate one Hessian per distinct input.

    q/k/v read the same tensor, as do gate/up: the reference keeps one (identical) Hessian per linear, here a
    linear whose input is the very tensor the previous hook saw shares that Hessian, which saves most of the
    X Xᵀ work on a CPU without changing any number.
    """

    def __init__(self, linears: list[tuple[str, nn.Linear]]) -> None:
        self.stats: dict[str, _Hessian] = {}
        self._last: tuple[torch.Tensor, _Hessian] | None = None
        self._handles = [mod.register_forward_hook(self._hook(name)) for name, mod in linears]

    def _hook(self, name: str) -> Any:
        def hook(_module: nn.Module, inp: tuple[torch.Tensor, ...], _out: torch.Tensor) -> None:
            x = inp[0].detach()
            if self._last is not None and self._last[0] is x:
                self.stats.setdefault(name, self._last[1])  # same input as the previous linear: shared H
                return
            stats = self.stats.setdefault(name, _Hessian(x.shape[-1]))
            stats.add(x)
            self._last = (x, stats)

        return hook

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._last = None


def gptq_quantize(
    weight: torch.Tensor, H: torch.Tensor, config: GPTQConfig, bits: int | None = None
) -> torch.Tensor:
    """Return the dequantized GPTQ solution for one (rows, columns) weight given its Hessian.

    Follows ``GPTQ.fasterquant`` of the reference step by step; the comments name its variables. ``bits``
    overrides ``config.bits`` (a module of a per-module map).
    """
    W = weight.detach().clone().float()
    H = H.clone()
    rows, cols = W.shape
    bits = config.bits if bits is None else bits
    gs, sym, zp = config.group_size, config.symmetric, config.zero_point

    dead = torch.diag(H) == 0  # inputs that were always 0: any weight there is free, set it to 0
    H[dead, dead] = 1
    W[:, dead] = 0

    static: list[tuple[torch.Tensor, torch.Tensor]] | None = None
    if gs == -1:
        scale, zero = quant_params(W, bits, sym, zp)
    elif config.act_order:
        # Static groups: with act_order the columns of a group are not reached together, so each group's grid
        # is fixed from the original weights first, keeping groups contiguous in the stored layout.
        static = [quant_params(W[:, g : g + gs], bits, sym, zp) for g in range(0, cols, gs)]

    perm = None
    if config.act_order:
        perm = torch.argsort(torch.diag(H), descending=True)
        W, H = W[:, perm], H[perm][:, perm]

    H += config.damp * torch.mean(torch.diag(H)) * torch.eye(cols, device=H.device)
    try:
        L = torch.linalg.cholesky(H)
    except torch.linalg.LinAlgError:
        raise ConfigError(
            f"gptq: the Hessian of a {rows}x{cols} layer is not positive definite even with "
            f"damp={config.damp}; raise damp (e.g. 0.1) or use more calibration tokens."
        ) from None
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)

    Q = torch.zeros_like(W)
    bs = config.block_size
    for i1 in range(0, cols, bs):
        i2 = min(i1 + bs, cols)
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if gs != -1:
                if static is not None:
                    scale, zero = static[int(perm[col]) // gs]  # type: ignore[index]
                elif col % gs == 0:
                    # The group's grid, computed when its first column is reached, from W as updated by the
                    # earlier blocks (the reference reads W[:, col:col+gs], not the in-block copy).
                    scale, zero = quant_params(W[:, col : col + gs], bits, sym, zp)
            w = W1[:, i : i + 1]
            q = quantize_groups(w, scale, zero, bits, sym, zp)
            Q1[:, i : i + 1] = q
            err = (w - q) / Hinv1[i, i]
            W1[:, i:] -= err @ Hinv1[i : i + 1, i:]
            Err1[:, i : i + 1] = err
        Q[:, i1:i2] = Q1
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]  # lazy batch update of the columns after this block

    if perm is not None:
        Q = Q[:, torch.argsort(perm)]
    return Q.to(weight.dtype)


# What the bit-width slider and `workbench sweep` offer (see workbench/techniques/space.py).
declare_space("gptq", bits=range(2, 9), group_sizes=DEFAULT_GROUP_SIZES, symmetric=True, grid_sensitive=True)


@register("gptq", GPTQConfig, kind="quantize", check=check_gptq)
def _apply_gptq(model: Any, config: GPTQConfig, ctx: ApplyContext) -> Any:
    ids = calibration_ids(ctx, config.n_samples, config.seq_len, "gptq")
    runner = LayerRunner(model, ids)
    full_names = {id(m): n for n, m in decoder_linears(model)}  # per-module bits match the model's own names
    for layer in ctx.progress.iter(list(runner.layers), desc="gptq layer"):
        linears = named_linears(layer)
        hooks = _HessianHooks(linears)
        try:
            for _ in runner.run(layer):
                ctx.progress.check()
        finally:
            hooks.remove()
        for name, mod in linears:
            ctx.progress.check()
            H = hooks.stats[name].H
            if (
                H is None
            ):  # no calibration token reached this linear: every input is dead, as the reference treats it
                H = torch.zeros(mod.in_features, mod.in_features, device=mod.weight.device)
            bits = config.bits_for(full_names.get(id(mod), name))
            mod.weight.data = gptq_quantize(mod.weight.data, H, config, bits)
            mark_quantized(mod, bits, config.group_size, config.symmetric, config.zero_point, "gptq")
        runner.advance(layer)  # inputs of the next layer come from this one with its weights quantized
    # Routed experts kept as 3D tensors see only the tokens routed to them; they get round to nearest here
    # (recorded with the run) so that sizes stay comparable.
    fallback = quantize_fused_experts_(
        model,
        config.bits,
        config.group_size,
        config.symmetric,
        config.zero_point,
        "gptq (rtn for fused experts)",
        bits_for=config.bits_for,
    )
    if fallback:
        ctx.extras["gptq"] = {"fused_expert_tensors_by_rtn": fallback}
    quantize_embeddings_from_config_(model, config, "gptq")
    return model


__all__ = ["GPTQConfig", "gptq_quantize"]
