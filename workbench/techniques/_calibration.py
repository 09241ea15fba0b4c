"""Calibration data and layer-by-layer execution shared by the calibrated quantizers (GPTQ, AWQ).

Calibration text comes from the corpus's calibration part, which never overlaps the evaluation part, so a
calibrated method cannot score well by having seen the evaluation text. Decoder layers are processed one at a
time: the inputs of layer 0 are captured once, and each layer's outputs (computed after it is quantized) become
the next layer's inputs, as in the GPTQ and AWQ reference implementations.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from workbench.anatomy import decoder_layer_list, layer_linears
from workbench.errors import ConfigError


def calibration_ids(ctx: Any, n_samples: int, seq_len: int, name: str) -> torch.Tensor:
    """``(n_samples, seq_len)`` token windows drawn (seeded) from the corpus's calibration part."""
    if ctx.tokenizer is None or ctx.corpus is None:
        raise ConfigError(
            f"{name} needs calibration text: run it through run_experiment, or pass a tokenizer "
            "and a corpus in the ApplyContext."
        )
    ids = ctx.tokenizer(ctx.corpus.text("calibration"), add_special_tokens=False)["input_ids"]
    ids = torch.tensor(ids, dtype=torch.long)
    if ids.numel() < seq_len + 1:
        raise ConfigError(
            f"{name}: the calibration text has {ids.numel()} tokens, fewer than seq_len={seq_len}."
        )
    n_windows = ids.numel() // seq_len
    if n_windows >= n_samples:
        # Non-overlapping windows in a seeded random order: as much distinct text as the part holds.
        gen = torch.Generator().manual_seed(ctx.seed)
        order = torch.randperm(n_windows, generator=gen)[:n_samples]
        return torch.stack([ids[i * seq_len : (i + 1) * seq_len] for i in order.tolist()])
    gen = torch.Generator().manual_seed(ctx.seed)
    starts = torch.randint(0, ids.numel() - seq_len, (n_samples,), generator=gen)
    return torch.stack([ids[s : s + seq_len] for s in starts.tolist()])


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers, as :mod:`workbench.anatomy` finds them (``model.layers``, DBRX's ``blocks``, ...)."""
    _, layers = decoder_layer_list(model)
    if not isinstance(layers, nn.ModuleList):
        raise ConfigError(
            f"{type(model).__name__} has no list of decoder layers (config.num_hidden_layers blocks); "
            "calibrated quantization supports Llama-, Mistral-, Qwen- and similar decoder models."
        )
    return layers


class _Captured(Exception):
    pass


class LayerRunner:
    """Holds the current inputs of one decoder layer for every calibration batch and moves them forward."""

    def __init__(self, model: nn.Module, ids: torch.Tensor, batch_size: int = 8) -> None:
        self.layers = decoder_layers(model)
        self.inputs: list[torch.Tensor] = []
        self.kwargs: list[dict[str, Any]] = []

        def grab(_module: nn.Module, args: tuple, kwargs: dict) -> None:
            hidden = args[0] if args else kwargs.pop("hidden_states")
            self.inputs.append(hidden.detach())
            self.kwargs.append({k: v for k, v in kwargs.items() if k not in ("past_key_values", "use_cache")})
            raise _Captured

        handle = self.layers[0].register_forward_pre_hook(grab, with_kwargs=True)
        device = next(model.parameters()).device
        try:
            with torch.no_grad():
                for start in range(0, ids.shape[0], batch_size):
                    try:
                        model(input_ids=ids[start : start + batch_size].to(device), use_cache=False)
                    except _Captured:
                        pass
        finally:
            handle.remove()

    def run(self, layer: nn.Module) -> Iterator[torch.Tensor]:
        """Outputs of ``layer`` for every stored batch (inputs unchanged)."""
        with torch.no_grad():
            for hidden, kwargs in zip(self.inputs, self.kwargs, strict=True):
                out = layer(hidden, **kwargs)
                yield out[0] if isinstance(out, tuple) else out

    def advance(self, layer: nn.Module) -> None:
        """Replace the stored inputs by ``layer``'s outputs: the next layer's inputs."""
        self.inputs = list(self.run(layer))


def named_linears(layer: nn.Module) -> list[tuple[str, nn.Linear]]:
    """The quantizable linears of one decoder layer, named relative to it, as :mod:`workbench.anatomy` describes
    them (MoE routers and shared-expert gates stay in full precision)."""
    return [(name, module) for name, module in layer_linears(layer) if isinstance(module, nn.Linear)]
