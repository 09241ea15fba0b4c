"""Calibration data and layer-by-layer execution shared by the calibrated quantizers (GPTQ, AWQ).

Calibration text comes from the corpus's calibration part, which never overlaps the evaluation part, so a
calibrated method cannot score well by having seen the evaluation text. Decoder layers are processed one at a
time: the inputs of layer 0 are captured once, and each layer's outputs (computed after it is quantized) become
the next layer's inputs, as in the GPTQ and AWQ reference implementations.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from workbench.anatomy import decoder_layer_list, layer_linears
from workbench.errors import ConfigError


@dataclass(frozen=True)
class TextNeed:
    """Text one step reads from a corpus part before it can work: ``tokens`` at least, asked for by
    ``setting`` (e.g. ``"seq_len=256"``), and what lowers the need (``fix``, e.g. ``"lower seq_len"``)."""

    part: str
    tokens: int
    setting: str
    fix: str


# technique name -> its config's TextNeed (None: this config reads no text). Declared here for the built-in
# techniques that draw calibration or training windows; another technique calls declare_text_need beside its
# register() call.
_TEXT_NEEDS: dict[str, Callable[[Any], TextNeed | None]] = {}


def declare_text_need(technique: str, need: Callable[[Any], TextNeed | None]) -> None:
    """Say how many tokens of which corpus part a technique's config needs, so that a run with too short a
    text is refused before it is recorded (:func:`check_text_needs`)."""
    _TEXT_NEEDS[technique] = need


def _window_need(name: str, seq_len: int) -> TextNeed:
    # calibration_ids needs one window and the token after it.
    return TextNeed("calibration", seq_len + 1, f"{name}: seq_len={seq_len}", "lower seq_len")


def _prune_need(config: Any) -> TextNeed | None:
    ranks = (config.drop and not config.layers) or config.ffn_size is not None or config.heads is not None
    return _window_need("prune", config.seq_len) if ranks else None


def _moefy_need(config: Any) -> TextNeed | None:
    from workbench.techniques.moefy import CALIBRATION_SEQ_LEN

    if config.mode != "carve":
        return None  # upcycling copies the FFN: no calibration text
    return TextNeed(
        "calibration",
        CALIBRATION_SEQ_LEN + 1,
        f"moefy: carving clusters neurons on windows of {CALIBRATION_SEQ_LEN} tokens",
        "use mode='upcycle'",
    )


def _distill_need(config: Any) -> TextNeed:
    return TextNeed(
        "training",
        config.seq_len * config.batch_size,
        f"distill: batch_size={config.batch_size} windows of seq_len={config.seq_len}",
        "lower seq_len or batch_size",
    )


declare_text_need("gptq", lambda c: _window_need("gptq", c.seq_len))
declare_text_need("awq", lambda c: _window_need("awq", c.seq_len))
declare_text_need("prune", _prune_need)
declare_text_need("moefy", _moefy_need)
declare_text_need("distill", _distill_need)


def _short_text(need: TextNeed, corpus: Any, have: int) -> ConfigError:
    from workbench.corpus import describe_part, part_share

    whole = math.ceil(need.tokens / part_share(need.part))
    return ConfigError(
        f"{need.setting} needs {need.tokens} tokens of text, but {describe_part(corpus, need.part)} has "
        f"{have}. Use a longer text (about {whole} tokens or more in all), or {need.fix}."
    )


def check_text_needs(steps: Sequence[Any], tokenizer: Any, corpus: Any) -> None:
    """Refuse (ConfigError) a pipeline whose steps need more calibration or training text than ``corpus``
    holds for ``tokenizer``: checked before a run is recorded, so too short a file is bad input, not a failed
    run. A stacked pipeline's message starts ``Step i of n (name)``."""
    from workbench.corpus import leading_token_ids
    from workbench.techniques.base import technique_for

    counts: dict[tuple[str, int], int] = {}
    for i, step in enumerate(steps):
        name = technique_for(step).name
        declared = _TEXT_NEEDS.get(name)
        need = declared(step) if declared is not None else None
        if need is None:
            continue
        key = (need.part, need.tokens)
        if key not in counts:
            counts[key] = len(leading_token_ids(tokenizer, corpus.text(need.part), need.tokens))
        if counts[key] < need.tokens:
            err = _short_text(need, corpus, counts[key])
            if len(steps) > 1:
                raise ConfigError(f"Step {i + 1} of {len(steps)} ({name}): {err}")
            raise err


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
        raise _short_text(_window_need(name, seq_len), ctx.corpus, ids.numel())
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
