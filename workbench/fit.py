"""The fit planner: how much memory a variant needs at a context length and batch size, which devices hold it,
and what the same variant would need at 1B, 7B or 70B parameters of its architecture family.

    from workbench.fit import plan_fit, extrapolate, fit_frame
    plan = plan_fit(run, context=8192, batch=4, kv_dtype="q8_0")   # a registry Run, RunResult, metrics, model
    plan.total_bytes, plan.fits_on                                  # bytes; the device sizes (GB) that hold it
    fit_frame([plan, *extrapolate(plan)])                           # one row per plan (pandas)

Memory = weights as stored + KV cache + runtime overhead:

- **weights**: the run's ``size_bytes`` (packed codes, scales and zero points, as the evaluation measured them);
  for a model or config given without a run, its own size report or its parameters at ``weight_bits``.
- **KV cache**: ``2 × layers × kv_heads × head_dim × context × batch × bytes per element`` (f16/bf16 2, f32 4,
  q8_0 34/32, q4_0 18/32: llama.cpp's block types). A sliding-window layer keeps at most ``window`` tokens, a
  layer without attention (Mamba, linear attention in hybrid models) keeps none, and multi-head latent
  attention (DeepSeek-V2/V3) caches one latent of ``kv_lora_rank + qk_rope_head_dim`` per token and layer.
- **overhead** (an estimate, llama.cpp's reservation): the compute buffer of one micro-batch of
  ``T = min(ubatch, context × batch)`` tokens, ``4 × T × max(vocab + 2·hidden, 3·hidden + ffn + A)`` bytes
  with ``A = (heads + 1) × context`` without flash attention (the f32 attention scores and mask) and 0 with
  it, plus the logits of the last token of each sequence, ``4 × vocab × batch``. Measured against llama.cpp
  0.3.36 on SmolLM2-135M (docs/deployment.md): the KV cache exactly, the compute buffer within 1.2%.

Device sizes are GiB (a card sold as "24 GB" has 24 GiB); the headroom is what is left after the estimate,
and it must still hold the runtime's own context (a few hundred MiB on a GPU).

Extrapolation keeps the variant's precision: its linear layers at ``bits_per_weight_linear`` and everything
else (embeddings, head, norms, routers) at the bits that remain of its ``size_bytes``, applied to the published
configs in :data:`REFERENCES`. Mixture-of-Experts: memory follows the total parameters, compute the active
ones; :func:`moe_what_if` shows what fewer experts (pruning: memory down) and a lower k (compute down, memory
unchanged) change. Everything here is arithmetic on configs and recorded metrics: no weights are read.
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import pandas as pd

from workbench.errors import ConfigError
from workbench.export import export_frame, format_significant

GIB = 1 << 30
DEFAULT_DEVICES_GB: tuple[float, ...] = (8, 16, 24, 80)
# Bytes per cached element: llama.cpp's cache types (q8_0: 32 int8 codes + one f16 scale per block of 32;
# q4_0: 32 4-bit codes + one f16 scale).
KV_BYTES: dict[str, float] = {"f16": 2.0, "bf16": 2.0, "f32": 4.0, "q8_0": 34 / 32, "q4_0": 18 / 32}
# llama.cpp's default micro-batch: the compute buffer is reserved for this many tokens at once.
DEFAULT_UBATCH = 512
ACTIVATION_BYTES = 4  # llama.cpp computes in f32

# Layer kinds of a config's ``layer_types`` (transformers) that keep a KV cache, and how many tokens.
_FULL = {"full_attention", "attention", "global_attention"}
_WINDOW = {"sliding_attention", "sliding_window", "local_attention", "chunked_attention"}


# ---- architectures -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Architecture:
    """The numbers of a decoder that memory depends on (a transformers config, or a published reference).

    Llama-style throughout: gated FFNs (3 matrices), RMS norms (2 per layer + 1 final), grouped-query attention,
    or multi-head latent attention when ``kv_lora_rank`` is set. MoE: ``n_experts`` routed experts of width
    ``moe_intermediate_size`` (top ``top_k`` per token), ``shared_intermediate_size`` of always-on shared
    experts, and ``dense_layers`` (indices) that keep a dense FFN of ``intermediate_size``.
    """

    name: str
    family: str
    hidden_size: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    tied_embeddings: bool = False
    qkv_bias: bool = False
    qk_norm: int = 0  # per-layer q/k norm weights (Qwen3: 2 × head_dim)
    n_experts: int = 0
    top_k: int = 0
    moe_intermediate_size: int = 0
    shared_intermediate_size: int = 0
    shared_expert_gate: bool = False  # Qwen2-MoE: a sigmoid gate (hidden → 1) on the shared expert
    router_bias: bool = False  # DeepSeek-V3: the selection bias, one per expert and layer
    dense_layers: tuple[int, ...] = ()
    q_lora_rank: int = 0
    kv_lora_rank: int = 0
    qk_rope_head_dim: int = 0
    qk_nope_head_dim: int = 0
    v_head_dim: int = 0
    layer_types: tuple[str, ...] = ()  # per layer (transformers' names); empty: every layer full attention
    sliding_window: int | None = None
    max_context: int | None = None
    source: str = ""

    # -- structure --

    @property
    def is_moe(self) -> bool:
        return self.n_experts > 0

    @property
    def is_mla(self) -> bool:
        return self.kv_lora_rank > 0

    @property
    def n_moe_layers(self) -> int:
        return self.n_layers - len(self.dense_layers) if self.is_moe else 0

    def kinds(self) -> list[str]:
        """Each layer's attention kind: ``full``, ``window`` or ``none`` (no KV cache)."""
        types = list(self.layer_types) or ["full_attention"] * self.n_layers
        out = []
        for t in types[: self.n_layers]:
            if t in _FULL:
                out.append("full")
            elif t in _WINDOW:
                out.append("window" if self.sliding_window else "full")
            else:
                out.append("none")
        return out + ["full"] * (self.n_layers - len(out))

    # -- parameters --

    def _attention(self) -> tuple[int, int]:
        """(linear weights, other parameters) of one layer's attention."""
        h = self.hidden_size
        if self.is_mla:
            qk = self.qk_nope_head_dim + self.qk_rope_head_dim
            if self.q_lora_rank:
                q = h * self.q_lora_rank + self.q_lora_rank * self.n_heads * qk
            else:
                q = h * self.n_heads * qk
            kv_a = h * (self.kv_lora_rank + self.qk_rope_head_dim)
            kv_b = self.kv_lora_rank * self.n_heads * (self.qk_nope_head_dim + self.v_head_dim)
            o = self.n_heads * self.v_head_dim * h
            return q + kv_a + kv_b + o, self.q_lora_rank + self.kv_lora_rank  # the two latent norms
        q, kv = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        linear = h * q + 2 * h * kv + q * h
        other = (q + 2 * kv if self.qkv_bias else 0) + self.qk_norm
        return linear, other

    def _expert(self) -> int:
        return 3 * self.hidden_size * self.moe_intermediate_size

    def counts(self, *, n_experts: int | None = None, top_k: int | None = None) -> ParamCounts:
        """Parameters by kind; ``n_experts`` / ``top_k`` override the config's (pruning, a lower k)."""
        h, v = self.hidden_size, self.vocab_size
        e = self.n_experts if n_experts is None else int(n_experts)
        k = self.top_k if top_k is None else int(top_k)
        att_lin, att_other = self._attention()
        dense_ffn = 3 * h * self.intermediate_size
        moe_layers = self.n_moe_layers
        dense_layers = self.n_layers - moe_layers
        shared = 3 * h * self.shared_intermediate_size
        routed = e * self._expert()
        linear = self.n_layers * att_lin + dense_layers * dense_ffn + moe_layers * (routed + shared)
        router = moe_layers * (e * h + (e if self.router_bias else 0) + (h if self.shared_expert_gate else 0))
        norms = self.n_layers * (2 * h + att_other) + h
        embedding = v * h * (1 if self.tied_embeddings else 2)
        total = linear + router + norms + embedding
        inactive = moe_layers * max(e - k, 0) * self._expert()
        # One multiply-add per weight a token uses: its linears, the routers' scores and the output head
        # (attention's context-long products and element-wise work left out, as workbench.routing counts).
        flops = 2.0 * (linear - inactive + moe_layers * e * h + v * h)
        return ParamCounts(
            total=total,
            linear=linear,
            embedding=embedding,
            active=total - inactive,
            active_linear=linear - inactive,
            flops_per_token=flops,
        )

    @property
    def n_params(self) -> int:
        return self.counts().total

    # -- memory --

    def kv_elements_per_token(self) -> int:
        """Cached elements per token and layer: K and V of every KV head, or MLA's one latent."""
        if self.is_mla:
            return self.kv_lora_rank + self.qk_rope_head_dim
        return 2 * self.n_kv_heads * self.head_dim

    def kv_bytes(self, context: int, batch: int = 1, kv_dtype: str = "f16") -> float:
        """The KV cache of ``batch`` sequences of ``context`` tokens, in bytes."""
        per = KV_BYTES[_kv_dtype(kv_dtype)]
        tokens = 0
        for kind in self.kinds():
            if kind == "full":
                tokens += context
            elif kind == "window":
                tokens += min(context, int(self.sliding_window or context))
        return float(tokens) * batch * self.kv_elements_per_token() * per

    def ffn_width(self) -> int:
        """Neurons one token's FFN runs: the dense width, or k experts plus the shared ones."""
        moe = self.top_k * self.moe_intermediate_size + self.shared_intermediate_size if self.is_moe else 0
        dense = self.intermediate_size if (not self.is_moe or self.dense_layers) else 0
        return max(dense, moe)

    def compute_bytes(
        self, context: int, batch: int = 1, *, flash_attention: bool = True, ubatch: int = DEFAULT_UBATCH
    ) -> float:
        """llama.cpp's compute buffer (an estimate, see the module docstring): one micro-batch's widest live
        tensors, the logits of its tokens or the attention rows plus the FFN."""
        tokens = min(int(ubatch), int(context) * int(batch))
        h = self.hidden_size
        scores = 0 if flash_attention else (self.n_heads + 1) * int(context)
        widest = max(self.vocab_size + 2 * h, 3 * h + self.ffn_width() + scores)
        return float(ACTIVATION_BYTES * tokens * widest)

    def output_bytes(self, batch: int = 1) -> float:
        """The logits kept for each sequence's last token (f32)."""
        return float(ACTIVATION_BYTES * self.vocab_size * int(batch))

    def describe(self) -> str:
        kinds = self.kinds()
        text = (
            f"{self.name}: {self.n_layers} layers, hidden {self.hidden_size}, {self.n_heads} heads "
            f"({self.n_kv_heads} KV, head dim {self.head_dim}), FFN {self.intermediate_size}, vocab {self.vocab_size}"
        )
        if self.is_moe:
            text += f", {self.n_experts} experts of {self.moe_intermediate_size} (top {self.top_k})"
        if "window" in kinds:
            text += f", sliding window {self.sliding_window} on {kinds.count('window')} layers"
        return text


@dataclass(frozen=True)
class ParamCounts:
    """Parameters of an :class:`Architecture`: all of them, the linears (what a weight quantizer changes), the
    embedding and head (counted once when tied), and what one token uses (MoE: k of the routed experts)."""

    total: int
    linear: int
    embedding: int
    active: int
    active_linear: int
    flops_per_token: float

    @property
    def other(self) -> int:
        return self.total - self.linear


def _llama(name: str, source: str, **kw: Any) -> Architecture:
    kw.setdefault("head_dim", kw["hidden_size"] // kw["n_heads"])
    kw.setdefault("family", "llama")
    return Architecture(name=name, source=source, **kw)


_HF = "https://huggingface.co/{}/blob/main/config.json"

# Published configs (config.json on the Hugging Face hub, the repository named in ``source``).
REFERENCES: tuple[Architecture, ...] = (
    _llama(
        "Llama-3.2-1B",
        _HF.format("meta-llama/Llama-3.2-1B"),
        hidden_size=2048,
        n_layers=16,
        n_heads=32,
        n_kv_heads=8,
        intermediate_size=8192,
        vocab_size=128256,
        tied_embeddings=True,
        max_context=131072,
    ),
    _llama(
        "Llama-2-7B",
        _HF.format("meta-llama/Llama-2-7b-hf"),
        hidden_size=4096,
        n_layers=32,
        n_heads=32,
        n_kv_heads=32,
        intermediate_size=11008,
        vocab_size=32000,
        max_context=4096,
    ),
    _llama(
        "Llama-3.1-8B",
        _HF.format("meta-llama/Llama-3.1-8B"),
        hidden_size=4096,
        n_layers=32,
        n_heads=32,
        n_kv_heads=8,
        intermediate_size=14336,
        vocab_size=128256,
        max_context=131072,
    ),
    _llama(
        "Llama-3.1-70B",
        _HF.format("meta-llama/Llama-3.1-70B"),
        hidden_size=8192,
        n_layers=80,
        n_heads=64,
        n_kv_heads=8,
        intermediate_size=28672,
        vocab_size=128256,
        max_context=131072,
    ),
    _llama(
        "SmolLM2-135M",
        _HF.format("HuggingFaceTB/SmolLM2-135M"),
        family="smollm2",
        hidden_size=576,
        n_layers=30,
        n_heads=9,
        n_kv_heads=3,
        intermediate_size=1536,
        vocab_size=49152,
        tied_embeddings=True,
        max_context=8192,
    ),
    _llama(
        "SmolLM2-360M",
        _HF.format("HuggingFaceTB/SmolLM2-360M"),
        family="smollm2",
        hidden_size=960,
        n_layers=32,
        n_heads=15,
        n_kv_heads=5,
        intermediate_size=2560,
        vocab_size=49152,
        tied_embeddings=True,
        max_context=8192,
    ),
    _llama(
        "SmolLM2-1.7B",
        _HF.format("HuggingFaceTB/SmolLM2-1.7B"),
        family="smollm2",
        hidden_size=2048,
        n_layers=24,
        n_heads=32,
        n_kv_heads=32,
        intermediate_size=8192,
        vocab_size=49152,
        tied_embeddings=True,
        max_context=8192,
    ),
    # Qwen2.5: q/k/v projections with biases; use_sliding_window is false in every published config.
    _llama(
        "Qwen2.5-0.5B",
        _HF.format("Qwen/Qwen2.5-0.5B"),
        family="qwen2",
        hidden_size=896,
        n_layers=24,
        n_heads=14,
        n_kv_heads=2,
        intermediate_size=4864,
        vocab_size=151936,
        tied_embeddings=True,
        qkv_bias=True,
        max_context=32768,
    ),
    _llama(
        "Qwen2.5-1.5B",
        _HF.format("Qwen/Qwen2.5-1.5B"),
        family="qwen2",
        hidden_size=1536,
        n_layers=28,
        n_heads=12,
        n_kv_heads=2,
        intermediate_size=8960,
        vocab_size=151936,
        tied_embeddings=True,
        qkv_bias=True,
        max_context=131072,
    ),
    _llama(
        "Qwen2.5-7B",
        _HF.format("Qwen/Qwen2.5-7B"),
        family="qwen2",
        hidden_size=3584,
        n_layers=28,
        n_heads=28,
        n_kv_heads=4,
        intermediate_size=18944,
        vocab_size=152064,
        qkv_bias=True,
        max_context=131072,
    ),
    _llama(
        "Qwen2.5-72B",
        _HF.format("Qwen/Qwen2.5-72B"),
        family="qwen2",
        hidden_size=8192,
        n_layers=80,
        n_heads=64,
        n_kv_heads=8,
        intermediate_size=29568,
        vocab_size=152064,
        qkv_bias=True,
        max_context=131072,
    ),
    # Mixture of Experts.
    _llama(
        "Mixtral-8x7B",
        _HF.format("mistralai/Mixtral-8x7B-v0.1"),
        family="mixtral",
        hidden_size=4096,
        n_layers=32,
        n_heads=32,
        n_kv_heads=8,
        intermediate_size=14336,
        vocab_size=32000,
        n_experts=8,
        top_k=2,
        moe_intermediate_size=14336,
        max_context=32768,
    ),
    _llama(
        "Qwen1.5-MoE-A2.7B",
        _HF.format("Qwen/Qwen1.5-MoE-A2.7B"),
        family="qwen2_moe",
        hidden_size=2048,
        n_layers=24,
        n_heads=16,
        n_kv_heads=16,
        intermediate_size=5632,
        vocab_size=151936,
        qkv_bias=True,
        n_experts=60,
        top_k=4,
        moe_intermediate_size=1408,
        shared_intermediate_size=5632,
        shared_expert_gate=True,
        max_context=8192,
    ),
    # The multi-token-prediction layer (num_nextn_predict_layers = 1, ~14B) is not part of the 671B.
    _llama(
        "DeepSeek-V3",
        _HF.format("deepseek-ai/DeepSeek-V3"),
        family="deepseek_v3",
        hidden_size=7168,
        n_layers=61,
        n_heads=128,
        n_kv_heads=128,
        head_dim=128,
        intermediate_size=18432,
        vocab_size=129280,
        n_experts=256,
        top_k=8,
        moe_intermediate_size=2048,
        shared_intermediate_size=2048,
        router_bias=True,
        dense_layers=(0, 1, 2),
        q_lora_rank=1536,
        kv_lora_rank=512,
        qk_rope_head_dim=64,
        qk_nope_head_dim=128,
        v_head_dim=128,
        max_context=163840,
    ),
)
REFERENCES_BY_NAME = {a.name.lower(): a for a in REFERENCES}

# Where each family's variant extrapolates to: Llama-style dense models always reach Llama's 1B/7B/70B; a
# family with published sizes of its own adds those; MoE variants reach the MoE references.
LLAMA_TARGETS = ("Llama-3.2-1B", "Llama-2-7B", "Llama-3.1-70B")
FAMILY_TARGETS: dict[str, tuple[str, ...]] = {
    "smollm2": ("SmolLM2-135M", "SmolLM2-360M", "SmolLM2-1.7B"),
    "qwen2": ("Qwen2.5-0.5B", "Qwen2.5-1.5B", "Qwen2.5-7B", "Qwen2.5-72B"),
}
MOE_TARGETS = ("Qwen1.5-MoE-A2.7B", "Mixtral-8x7B", "DeepSeek-V3")


def reference(name: str) -> Architecture:
    """The reference config called ``name`` (case-insensitive); ConfigError listing them otherwise."""
    arch = REFERENCES_BY_NAME.get(str(name).strip().lower())
    if arch is None:
        raise ConfigError(f"No reference config {name!r}. Known: {', '.join(a.name for a in REFERENCES)}.")
    return arch


_SUFFIXES = ("-instruct", "-hf", "-chat", "-base", "-v0.1", "-it")


def _normal(name: str) -> str:
    name = name.strip().replace("\\", "/").rstrip("/").rsplit("/", 1)[-1].lower()
    changed = True
    while changed:
        changed = False
        for suffix in _SUFFIXES:
            if name.endswith(suffix):
                name, changed = name[: -len(suffix)], True
    return name


def match_reference(description: str) -> Architecture | None:
    """The reference whose name the model description starts with ("SmolLM2-135M-Instruct (134.5M params, …)"
    → SmolLM2-135M), or None."""
    if not description:
        return None
    name = _normal(str(description).split(" (", 1)[0])
    for arch in REFERENCES:
        if _normal(arch.name) == name:
            return arch
    return None


def _get(config: Any, *names: str, default: Any = None) -> Any:
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return value
    return default


def architecture_from_config(config: Any, name: str = "") -> Architecture:
    """The :class:`Architecture` of a transformers config (a multimodal one's text config)."""
    get_text = getattr(config, "get_text_config", None)
    if callable(get_text):
        try:
            config = get_text()
        except (TypeError, ValueError):
            pass
    model_type = str(getattr(config, "model_type", "") or "")
    try:
        hidden = int(config.hidden_size)
        layers = int(config.num_hidden_layers)
        heads = int(config.num_attention_heads)
        vocab = int(config.vocab_size)
    except (AttributeError, TypeError) as err:
        raise ConfigError(
            f"The config of {name or model_type or 'this model'} lacks {err}: the fit planner needs hidden_size, "
            "num_hidden_layers, num_attention_heads and vocab_size."
        ) from None
    kv_heads = int(_get(config, "num_key_value_heads", default=heads))
    head_dim = int(_get(config, "head_dim", default=hidden // heads))
    n_experts = int(_get(config, "num_local_experts", "num_experts", "n_routed_experts", default=0) or 0)
    dense_layers: tuple[int, ...] = ()
    if n_experts:
        first_dense = int(_get(config, "first_k_dense_replace", default=0) or 0)
        only_mlp = {int(i) for i in (_get(config, "mlp_only_layers", default=()) or ())}
        step = int(_get(config, "decoder_sparse_step", "moe_layer_freq", default=1) or 1)
        dense_layers = tuple(
            i for i in range(layers) if i < first_dense or i in only_mlp or (i + 1) % step != 0 and step > 1
        )
    shared_width = int(_get(config, "shared_expert_intermediate_size", default=0) or 0)
    n_shared = int(_get(config, "n_shared_experts", default=0) or 0)
    moe_width = int(_get(config, "moe_intermediate_size", default=0) or 0)
    if n_experts and not moe_width:
        moe_width = int(config.intermediate_size)  # Mixtral: every expert has the dense width
    if n_shared and not shared_width:
        shared_width = n_shared * moe_width
    kv_lora = int(_get(config, "kv_lora_rank", default=0) or 0)
    layer_types = tuple(str(t) for t in (_get(config, "layer_types", default=()) or ()))
    if not layer_types:
        block_types = _get(config, "layers_block_type", default=None)  # Jamba: "attention" | "mamba"
        if block_types:
            layer_types = tuple(str(t) for t in block_types)
    window = _get(config, "sliding_window", "attention_chunk_size", default=None)
    window = int(window) if window else None
    if not layer_types and window and getattr(config, "use_sliding_window", True) is not False:
        layer_types = ("sliding_attention",) * layers  # Mistral: one window for every layer
    qkv_bias = bool(_get(config, "qkv_bias", "attention_bias", default=model_type in ("qwen2", "qwen2_moe")))
    family = model_type or "unknown"
    if model_type == "llama" and (vocab == 49152 or "smollm" in name.lower()):
        family = "smollm2"  # SmolLM2 is a Llama with its own 49152-token vocabulary
    return Architecture(
        name=name or model_type or "model",
        family=family,
        hidden_size=hidden,
        n_layers=layers,
        n_heads=heads,
        n_kv_heads=kv_heads,
        head_dim=head_dim,
        intermediate_size=int(_get(config, "intermediate_size", default=4 * hidden)),
        vocab_size=vocab,
        tied_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
        qkv_bias=qkv_bias,
        qk_norm=2 * head_dim if model_type.startswith("qwen3") else 0,
        n_experts=n_experts,
        top_k=int(_get(config, "num_experts_per_tok", "moe_topk", default=0) or 0) if n_experts else 0,
        moe_intermediate_size=moe_width if n_experts else 0,
        shared_intermediate_size=shared_width if n_experts else 0,
        shared_expert_gate=model_type == "qwen2_moe" and shared_width > 0,
        router_bias=model_type in ("deepseek_v3",) and n_experts > 0,
        dense_layers=dense_layers,
        q_lora_rank=int(_get(config, "q_lora_rank", default=0) or 0) if kv_lora else 0,
        kv_lora_rank=kv_lora,
        qk_rope_head_dim=int(_get(config, "qk_rope_head_dim", default=0) or 0) if kv_lora else 0,
        qk_nope_head_dim=int(_get(config, "qk_nope_head_dim", default=0) or 0) if kv_lora else 0,
        v_head_dim=int(_get(config, "v_head_dim", default=0) or 0) if kv_lora else 0,
        layer_types=layer_types,
        sliding_window=window if any(t in _WINDOW for t in layer_types) else None,
        max_context=_get(config, "max_position_embeddings", default=None),
        source="the model's config",
    )


def _model_name(description: Any) -> str:
    if not isinstance(description, str) or not description:
        return ""
    name = description.split(" (", 1)[0].replace("\\", "/").rstrip("/")
    return name.rsplit("/", 1)[-1] or name


def _tiny_architecture(name: str) -> Architecture | None:
    """The tiny test models (``workbench.tiny``) by their description name; built small, read, dropped."""
    if name not in ("tiny-llama", "tiny-moe"):
        return None
    from workbench.tiny import tiny_llama, tiny_moe

    model = tiny_llama() if name == "tiny-llama" else tiny_moe()
    return architecture_from_config(model.config, name)


def as_architecture(value: Any, name: str = "") -> Architecture:
    """An :class:`Architecture` from one, a reference name, a transformers config, a model or a LoadedModel."""
    if isinstance(value, Architecture):
        return value
    if isinstance(value, str):
        return reference(value)
    model = getattr(value, "model", None)
    if model is not None and hasattr(model, "config"):  # a LoadedModel
        return architecture_from_config(model.config, name or _model_name(getattr(value, "description", "")))
    config = getattr(value, "config", None)
    if config is not None and hasattr(config, "num_hidden_layers"):  # a model
        return architecture_from_config(config, name)
    if hasattr(value, "num_hidden_layers") or hasattr(value, "get_text_config"):
        return architecture_from_config(value, name)
    raise ConfigError(
        f"Cannot read an architecture from {type(value).__name__}: give a transformers config or model, a "
        f"LoadedModel, or a reference name ({', '.join(a.name for a in REFERENCES)})."
    )


def architecture_for(spec: str) -> Architecture:
    """The architecture a model spec names, without loading weights: a reference name (``Llama-2-7B``), the
    embedded ``demo`` / ``demo-moe`` (SmolLM2-135M's published config, which the demo is), the tiny test models,
    or a model folder / Hugging Face id whose ``config.json`` is on this machine."""
    text = str(spec).strip()
    if text.lower() in REFERENCES_BY_NAME:
        return REFERENCES_BY_NAME[text.lower()]
    if text in ("demo", "demo-moe"):
        return dataclasses.replace(reference("SmolLM2-135M"), name="SmolLM2-135M-Instruct")
    tiny = _tiny_architecture(text)
    if tiny is not None:
        return tiny
    if text.lower().endswith(".gguf"):
        raise ConfigError(
            f"Model {text!r}: the fit planner reads configs, not GGUF files; give the model's folder, its "
            "Hugging Face id, or a reference name."
        )
    try:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(text, local_files_only=True)
    except Exception:  # noqa: BLE001 - not a folder, not in the local cache: say what would work
        raise ConfigError(
            f"Model {text!r}: no config.json for it on this machine. Give a model folder, a Hugging Face id "
            f"already downloaded, or a reference name ({', '.join(a.name for a in REFERENCES)})."
        ) from None
    return architecture_from_config(config, _model_name(text))


def variant_architecture(
    model: Any, pipeline: Sequence[Any], name: str = ""
) -> tuple[Architecture, list[str]]:
    """The architecture ``model`` has after ``pipeline`` (configs or stored dicts), read from the shapes each
    step's stacking preview declares (pruning steps rebuild a config on the meta device; nothing runs), and
    notes for steps whose shapes are not known beforehand."""
    from workbench.techniques.base import config_from_dict, stacking_for, technique_for

    view, notes, top_k = model, [], None
    for step in pipeline:
        config = config_from_dict(dict(step)) if isinstance(step, Mapping) else step
        stacking = stacking_for(config)
        tech = technique_for(config)
        if stacking.preview is not None:
            preview = stacking.preview(view, config)
            if preview is None:
                notes.append(
                    f"{tech.name} changes shapes it does not preview: sizes read from the model before it"
                )
                break
            view = preview
        elif not (
            stacking.same_shapes or (stacking.same_shapes is None and tech.kind in ("quantize", "deploy"))
        ):
            notes.append(f"{tech.name} may change shapes: sizes read from the model before it")
            break
        k = getattr(config, "k", None)
        if tech.kind == "route" and isinstance(k, int) and not getattr(config, "k_per_layer", ()):
            top_k = k  # route sets k on the modules, not in the config the preview keeps
    arch = architecture_from_config(view.config, name)
    if top_k is not None and arch.is_moe:
        arch = dataclasses.replace(arch, top_k=min(top_k, arch.n_experts))
    return arch, notes


# ---- plans --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DeviceFit:
    """One device size: its capacity (GiB), the headroom left (negative: short by that much), whether it fits."""

    device_gb: float
    capacity_bytes: float
    headroom_bytes: float

    @property
    def fits(self) -> bool:
        return self.headroom_bytes >= 0


@dataclass(frozen=True)
class FitPlan:
    """What a variant needs at one context length and batch size, and which device sizes hold it.

    Bytes are plain numbers; ``estimate`` is True when the weights are computed (an extrapolation or a config
    without a run) rather than the run's measured ``size_bytes``. ``overhead_bytes`` (compute buffer + logits)
    is always an estimate (see the module docstring).
    """

    label: str
    model: str
    context: int
    batch: int
    kv_dtype: str
    weights_bytes: float
    kv_bytes: float
    compute_bytes: float
    output_bytes: float
    n_params: float
    active_params: float
    bits_per_weight: float
    bits_linear: float
    bits_other: float
    devices: tuple[DeviceFit, ...]
    flash_attention: bool = True
    flops_per_token: float | None = None
    estimate: bool = False
    run_id: int | None = None
    architecture: Architecture | None = None
    notes: tuple[str, ...] = ()

    @property
    def overhead_bytes(self) -> float:
        return self.compute_bytes + self.output_bytes

    @property
    def total_bytes(self) -> float:
        return self.weights_bytes + self.kv_bytes + self.overhead_bytes

    @property
    def kv_bytes_per_token(self) -> float:
        return self.kv_bytes / max(self.context * self.batch, 1)

    @property
    def fits_on(self) -> list[float]:
        """The device sizes (GB) that hold the variant, smallest first."""
        return sorted(d.device_gb for d in self.devices if d.fits)

    @property
    def smallest_device(self) -> float | None:
        fits = self.fits_on
        return fits[0] if fits else None

    @property
    def is_moe(self) -> bool:
        return self.active_params < self.n_params * 0.999

    def row(self) -> dict[str, Any]:
        """The plan as one flat row (sizes in GiB, parameters in billions)."""
        row: dict[str, Any] = {
            "variant": self.label,
            "model": self.model,
            "estimate": self.estimate,
            "context": self.context,
            "batch": self.batch,
            "kv_dtype": self.kv_dtype,
            "params_b": self.n_params / 1e9,
            "active_params_b": self.active_params / 1e9,
            "bits_per_weight": self.bits_per_weight,
            "bits_linear": self.bits_linear,
            "bits_other": self.bits_other,
            "weights_gib": self.weights_bytes / GIB,
            "kv_cache_gib": self.kv_bytes / GIB,
            "overhead_gib": self.overhead_bytes / GIB,
            "total_gib": self.total_bytes / GIB,
        }
        for d in self.devices:
            row[f"headroom_{_gb(d.device_gb)}gb"] = d.headroom_bytes / GIB
        row["fits"] = ", ".join(f"{_gb(g)} GB" for g in self.fits_on) or "none"
        row["run_id"] = self.run_id
        row["notes"] = "; ".join(self.notes)
        return row

    def frame(self) -> pd.DataFrame:
        """One row: :meth:`row` as a DataFrame (:func:`fit_frame` stacks several plans)."""
        return pd.DataFrame([self.row()])


def _gb(value: float) -> str:
    return f"{value:g}"


def fit_frame(plans: Iterable[FitPlan]) -> pd.DataFrame:
    """One row per plan (see :meth:`FitPlan.row`); device columns are the union over the plans."""
    rows = [p.row() for p in plans]
    return pd.DataFrame(rows)


# Significant digits of the people's table (workbench.export.export_frame's ``digits``).
TABLE_DIGITS = {
    "params B": 3,
    "active B": 3,
    "bits/weight": 3,
    "weights GiB": 3,
    "KV GiB": 3,
    "overhead GiB": 3,
    "total GiB": 3,
    "GFLOP/token": 3,
}


def fit_table(plans: Iterable[FitPlan]) -> pd.DataFrame:
    """The plans as people read them: sizes in GiB, parameters in billions, and per device size the headroom
    ("3.2 free") or the shortfall ("1.1 short"); estimated weights marked "~"."""
    rows = []
    for plan in plans:
        row: dict[str, Any] = {
            "variant": plan.label,
            "params B": plan.n_params / 1e9,
            "active B": plan.active_params / 1e9,
            "bits/weight": plan.bits_per_weight,
            "weights GiB": plan.weights_bytes / GIB,
            "KV GiB": plan.kv_bytes / GIB,
            "overhead GiB": plan.overhead_bytes / GIB,
            "total GiB": plan.total_bytes / GIB,
            "GFLOP/token": (plan.flops_per_token or 0.0) / 1e9,
        }
        for d in plan.devices:
            room = format_significant(abs(d.headroom_bytes) / GIB, 3)
            row[f"{_gb(d.device_gb)} GB"] = f"{room} free" if d.fits else f"{room} short"
        smallest = plan.smallest_device
        row["fits"] = f"{_gb(smallest)} GB" if smallest is not None else "none"
        row["weights"] = "estimate" if plan.estimate else "measured"
        rows.append(row)
    return pd.DataFrame(rows)


def format_table(plans: Iterable[FitPlan], fmt: str = "md") -> str:
    """:func:`fit_table` as Markdown, HTML (escaped), CSV, LaTeX or JSON text."""
    return export_frame(fit_table(plans), fmt, digits=TABLE_DIGITS)


def _check_settings(
    context: Any, batch: Any, kv_dtype: str, devices_gb: Sequence[Any]
) -> tuple[str, tuple[float, ...]]:
    if isinstance(context, bool) or not isinstance(context, numbers.Integral) or context < 1:
        raise ConfigError(
            f"context={context!r}: give the tokens per sequence as a whole number of 1 or more."
        )
    if isinstance(batch, bool) or not isinstance(batch, numbers.Integral) or batch < 1:
        raise ConfigError(
            f"batch={batch!r}: give the sequences served at once as a whole number of 1 or more."
        )
    kv = _kv_dtype(kv_dtype)
    try:
        devices = tuple(float(g) for g in devices_gb)
    except (TypeError, ValueError):
        raise ConfigError(
            f"devices_gb={devices_gb!r}: give device sizes in GB as numbers, e.g. 8, 16, 24, 80."
        ) from None
    if not devices or any(not math.isfinite(g) or g <= 0 for g in devices):
        raise ConfigError(
            f"devices_gb={devices_gb!r}: give one or more device sizes above 0 GB, e.g. 8, 16, 24, 80."
        )
    return kv, devices


def _kv_dtype(kv_dtype: str) -> str:
    key = str(kv_dtype).strip().lower()
    if key not in KV_BYTES:
        raise ConfigError(f"kv_dtype={kv_dtype!r} is not a KV cache type; use one of {', '.join(KV_BYTES)}.")
    return key


def parse_devices(text: str) -> tuple[float, ...]:
    """``"8, 16, 24, 80"`` → (8.0, 16.0, 24.0, 80.0); ConfigError naming what is not a size."""
    parts = [p for p in str(text).replace(";", ",").replace(" ", ",").split(",") if p.strip()]
    try:
        values = tuple(float(p) for p in parts)
    except ValueError:
        raise ConfigError(
            f"Device sizes {text!r}: give GB numbers separated by commas, e.g. 8, 16, 24, 80."
        ) from None
    _check_settings(1, 1, "f16", values)
    return values


def _metrics_of(obj: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """(metrics, facts) of a Run, RunResult or a mapping (a metrics dict or a runs_frame row)."""
    facts: dict[str, Any] = {}
    if isinstance(obj, pd.Series):
        obj = obj.to_dict()
    if isinstance(obj, Mapping):
        metrics = {}
        for key, value in obj.items():
            key = str(key)
            if key.startswith("metric_"):
                metrics[key[len("metric_") :]] = value
            elif key not in metrics:
                metrics[key] = value
        for key in ("run_id", "model", "pipeline", "pipeline_json", "model_fingerprint"):
            if (
                key in obj
                and obj[key] is not None
                and not (isinstance(obj[key], float) and math.isnan(obj[key]))
            ):
                facts[key] = obj[key]
        return metrics, facts
    metrics = dict(getattr(obj, "metrics", {}) or {})
    run_id = getattr(obj, "id", None) if hasattr(obj, "model_description") else getattr(obj, "run_id", None)
    facts["run_id"] = run_id
    facts["model"] = getattr(obj, "model_description", "") or ""
    facts["pipeline"] = getattr(obj, "pipeline_label", None) or getattr(obj, "label", None) or ""
    pipeline_json = getattr(obj, "pipeline_json", None)
    if pipeline_json is not None:
        facts["pipeline_json"] = pipeline_json
    facts["model_fingerprint"] = getattr(obj, "model_fingerprint", "") or ""
    return metrics, facts


def _number(metrics: Mapping[str, Any], key: str) -> float | None:
    value = metrics.get(key)
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def _is_run_like(obj: Any) -> bool:
    return isinstance(obj, (Mapping, pd.Series)) or hasattr(obj, "metrics")


def plan_fit(
    run_or_metrics: Any,
    *,
    context: int = 4096,
    batch: int = 1,
    kv_dtype: str = "f16",
    devices_gb: Sequence[float] = DEFAULT_DEVICES_GB,
    arch: Any = None,
    workspace: Any = None,
    flash_attention: bool = True,
    ubatch: int = DEFAULT_UBATCH,
    weight_bits: float = 16.0,
) -> FitPlan:
    """The memory a variant needs at ``context`` tokens × ``batch`` sequences, and the devices it fits.

    Args:
        run_or_metrics: a registry ``Run``, a ``RunResult``, a metrics mapping or ``runs_frame`` row (its
            ``size_bytes``, ``n_params``, ``bits_per_weight(_linear)`` and, for MoE, ``active_params``); or a
            loaded model / ``LoadedModel`` (its own size report: a variant after ``apply_pipeline_`` counts its
            packed bytes); or a transformers config, an :class:`Architecture` or a reference name (weights at
            ``weight_bits``).
        arch: the architecture when the input does not carry one: an :class:`Architecture`, reference name,
            config or model. For a run, otherwise: the workspace's loaded model when it is the run's (the
            pipeline's shape changes applied), the reference config its model is named after, or the tiny test
            models; ConfigError when none is known.
        workspace: a :class:`~workbench.workspace.Workspace` whose loaded model may be the run's base model.
        flash_attention: llama.cpp computes attention without materialising the scores (its default where the
            backend has it); False adds the f32 score rows to the compute buffer.
        ubatch: llama.cpp's micro-batch (tokens per step of prompt processing).
        weight_bits: bits per weight for a config given without a run (16: bf16/f16 checkpoints).
    """
    kv_dtype, devices = _check_settings(context, batch, kv_dtype, devices_gb)
    notes: list[str] = []
    estimate = False
    run_id = None
    label = ""
    if _is_run_like(run_or_metrics):
        metrics, facts = _metrics_of(run_or_metrics)
        run_id = facts.get("run_id")
        run_id = (
            int(run_id)
            if run_id is not None and not (isinstance(run_id, float) and math.isnan(run_id))
            else None
        )
        model_name = _model_name(facts.get("model", ""))
        pipeline_label = str(facts.get("pipeline") or "baseline")
        label = f"#{run_id} {pipeline_label}" if run_id is not None else pipeline_label
        size = _number(metrics, "size_bytes")
        if size is None:
            mb = _number(metrics, "size_mb")
            size = mb * 1e6 if mb is not None else None
        n_params = _number(metrics, "n_params")
        if size is None or n_params is None:
            raise ConfigError(
                f"{label or 'These metrics'} have no size_bytes / n_params: plan a run that was evaluated (done), "
                "or give a model or config instead."
            )
        architecture, arch_notes = _run_architecture(arch, facts, workspace, model_name)
        notes += arch_notes
        counts = architecture.counts()
        bpw = _number(metrics, "bits_per_weight") or 8 * size / n_params
        bits_linear = _number(metrics, "bits_per_weight_linear") or bpw
        active = _number(metrics, "active_params")
        if active is None:
            active = n_params * counts.active / counts.total if architecture.is_moe else n_params
        flops = _number(metrics, "flops_per_token")
        bits_other = _bits_other(size, n_params, bits_linear, counts, notes)
        weights = size
        model = model_name or architecture.name
    elif hasattr(run_or_metrics, "parameters") or hasattr(
        getattr(run_or_metrics, "model", None), "parameters"
    ):
        from workbench.anatomy import anatomy
        from workbench.models import size_report
        from workbench.routing import expert_params

        loaded = run_or_metrics
        model_obj = getattr(loaded, "model", loaded)
        model = _model_name(getattr(loaded, "description", "")) or type(model_obj).__name__
        architecture = (
            as_architecture(arch, model)
            if arch is not None
            else architecture_from_config(model_obj.config, model)
        )
        rep = size_report(model_obj)
        weights, n_params = float(rep.n_bytes), float(rep.n_params)
        bpw, bits_linear = rep.bits_per_weight, rep.bits_per_weight_linear
        other = rep.n_params - rep.linear_params
        bits_other = 8 * (rep.n_bytes - rep.linear_bytes) / other if other else bits_linear
        anat = anatomy(model_obj)
        active = n_params - sum(
            max(b.n_experts - int(b.top_k or b.n_experts), 0) * expert_params(model_obj, b)
            for b in anat.experts
        )
        flops = None
        label = model
    else:
        architecture = as_architecture(run_or_metrics if arch is None else arch)
        counts = architecture.counts()
        bits_linear = bits_other = bpw = float(weight_bits)
        weights = weight_bytes(counts.total, weight_bits)
        n_params, active, flops = float(counts.total), float(counts.active), counts.flops_per_token
        estimate = True
        model = label = architecture.name
        notes.append(f"weights: {counts.total / 1e9:.3g}B parameters at {weight_bits:g} bits (no run)")
    if flops is None:
        flops = architecture.counts().flops_per_token
    notes += _architecture_notes(architecture, context, kv_dtype, flash_attention)
    if active < n_params * 0.999:
        notes.append(
            f"MoE: memory holds all {n_params / 1e9:.3g}B parameters; a token uses {active / 1e9:.3g}B"
        )
    return _finish(
        label=label,
        model=model,
        architecture=architecture,
        context=context,
        batch=batch,
        kv_dtype=kv_dtype,
        devices=devices,
        weights=float(weights),
        n_params=float(n_params),
        active=float(active),
        bpw=float(bpw),
        bits_linear=float(bits_linear),
        bits_other=float(bits_other),
        flops=flops,
        flash_attention=flash_attention,
        ubatch=ubatch,
        estimate=estimate,
        run_id=run_id,
        notes=notes,
    )


def _finish(
    *,
    label: str,
    model: str,
    architecture: Architecture,
    context: int,
    batch: int,
    kv_dtype: str,
    devices: Sequence[float],
    weights: float,
    n_params: float,
    active: float,
    bpw: float,
    bits_linear: float,
    bits_other: float,
    flops: float | None,
    flash_attention: bool,
    ubatch: int,
    estimate: bool,
    run_id: int | None,
    notes: Sequence[str],
) -> FitPlan:
    kv = architecture.kv_bytes(context, batch, kv_dtype)
    compute = architecture.compute_bytes(context, batch, flash_attention=flash_attention, ubatch=ubatch)
    output = architecture.output_bytes(batch)
    total = weights + kv + compute + output
    fits = tuple(DeviceFit(g, g * GIB, g * GIB - total) for g in devices)
    return FitPlan(
        label=label,
        model=model,
        context=context,
        batch=batch,
        kv_dtype=kv_dtype,
        weights_bytes=weights,
        kv_bytes=kv,
        compute_bytes=compute,
        output_bytes=output,
        n_params=n_params,
        active_params=active,
        bits_per_weight=bpw,
        bits_linear=bits_linear,
        bits_other=bits_other,
        devices=fits,
        flash_attention=flash_attention,
        flops_per_token=flops,
        estimate=estimate,
        run_id=run_id,
        architecture=architecture,
        notes=tuple(dict.fromkeys(notes)),
    )


def _bits_other(
    size: float, n_params: float, bits_linear: float, counts: ParamCounts, notes: list[str]
) -> float:
    """The bits of everything that is not a decoder linear, from what the linears leave of ``size``.

    The linear share comes from the architecture; when its parameter count is off the run's by more than 3%
    (a structure the formula does not know), the run's overall bits per weight stand for both.
    """
    bpw = 8 * size / n_params
    if abs(counts.total - n_params) > 0.03 * n_params:
        notes.append(
            f"the architecture counts {counts.total / 1e6:.4g}M parameters, the run {n_params / 1e6:.4g}M: "
            f"extrapolation uses {bpw:.3g} bits for every weight"
        )
        return bpw
    linear = counts.linear * n_params / counts.total
    other = n_params - linear
    other_bytes = size - bits_linear * linear / 8
    if other <= 0 or other_bytes <= 0:
        return bits_linear
    return 8 * other_bytes / other


def _run_architecture(
    arch: Any, facts: Mapping[str, Any], workspace: Any, model_name: str
) -> tuple[Architecture, list[str]]:
    """Where a run's architecture comes from (see :func:`plan_fit`), with a note naming the source."""
    if arch is not None:
        if isinstance(arch, (Architecture, str)):
            return as_architecture(arch, model_name), []
        model = getattr(arch, "model", arch)
        if hasattr(model, "config") and facts.get("pipeline_json"):
            return _with_pipeline(model, facts, model_name)
        return as_architecture(arch, model_name), []
    loaded = workspace.loaded_model() if workspace is not None else None
    if (
        loaded is not None
        and facts.get("model_fingerprint")
        and loaded.fingerprint == facts["model_fingerprint"]
    ):
        return _with_pipeline(loaded.model, facts, model_name)
    ref = match_reference(model_name)
    if ref is not None:
        notes = [f"architecture: the published {ref.name} config (matched by the run's model name)"]
        pipeline = json.loads(facts.get("pipeline_json") or "[]")
        if any(_changes_shapes(step) for step in pipeline):
            notes.append("a pipeline step changes shapes: load the run's model for its own sizes")
        return ref, notes
    tiny = _tiny_architecture(model_name)
    if tiny is not None:
        if facts.get("pipeline_json"):
            from workbench.tiny import tiny_llama, tiny_moe

            model = tiny_llama() if model_name == "tiny-llama" else tiny_moe()
            return _with_pipeline(model, facts, model_name)
        return tiny, []
    raise ConfigError(
        f"{_whose(facts)}: the architecture of {model_name or 'its model'} is not known here. Load "
        "its model in the workspace, or pass arch= (a transformers config, a model, or a reference name such "
        f"as {REFERENCES[1].name})."
    )


def _whose(facts: Mapping[str, Any]) -> str:
    run_id = facts.get("run_id")
    return f"Run {run_id}" if run_id is not None else "These metrics"


def _changes_shapes(step: Mapping[str, Any]) -> bool:
    try:
        from workbench.techniques.base import config_from_dict, stacking_for, technique_for

        config = config_from_dict(dict(step))
    except Exception:  # noqa: BLE001 - a technique this workbench lacks: assume it may
        return True
    stacking, tech = stacking_for(config), technique_for(config)
    return stacking.preview is not None or not (
        stacking.same_shapes or (stacking.same_shapes is None and tech.kind in ("quantize", "deploy"))
    )


def _with_pipeline(model: Any, facts: Mapping[str, Any], name: str) -> tuple[Architecture, list[str]]:
    pipeline = json.loads(facts.get("pipeline_json") or "[]")
    try:
        return variant_architecture(model, pipeline, name)
    except ConfigError as err:
        return architecture_from_config(model.config, name), [f"sizes of the base model ({err})"]


def _architecture_notes(arch: Architecture, context: int, kv_dtype: str, flash_attention: bool) -> list[str]:
    notes = []
    kinds = arch.kinds()
    if "window" in kinds:
        n = kinds.count("window")
        notes.append(
            f"sliding window {arch.sliding_window} on {n} of {arch.n_layers} layers: they cache at most "
            f"{arch.sliding_window} tokens"
        )
    if "none" in kinds:
        notes.append(
            f"hybrid: {kinds.count('none')} of {arch.n_layers} layers keep no KV cache (their recurrent state is "
            "fixed-size and not counted)"
        )
    if arch.is_mla:
        notes.append(
            f"multi-head latent attention: {arch.kv_elements_per_token()} cached values per token and layer "
            "(the compressed latent)"
        )
    if arch.max_context and context > arch.max_context:
        notes.append(
            f"context {context} is beyond the {arch.max_context} positions the model was trained for"
        )
    if kv_dtype in ("q8_0", "q4_0") and not flash_attention:
        notes.append(f"llama.cpp needs flash attention for a {kv_dtype} V cache")
    return notes


# ---- extrapolation ---------------------------------------------------------------------------------------


def weight_bytes(n_params: float, bits: float) -> float:
    """``n_params`` weights at ``bits`` each, in bytes (7e9 at 16 bits: 14e9 bytes; at 4 bits: 3.5e9)."""
    return float(n_params) * float(bits) / 8


def scale_bits(group_size: int, scale_bits: float = 16, zero_bits: float = 0) -> float:
    """Bits per weight that a group's scale (and zero point) add: an fp16 scale per 32 weights is 0.5."""
    if group_size < 1:
        raise ConfigError(f"group_size={group_size}: give the weights per scale (e.g. 32, 64, 128).")
    return (scale_bits + zero_bits) / group_size


def default_targets(arch: Architecture | None) -> tuple[Architecture, ...]:
    """Where a variant extrapolates to: MoE references for an MoE, else Llama 1B/7B/70B and its own family's
    published sizes (SmolLM2, Qwen2.5)."""
    if arch is not None and arch.is_moe:
        names: tuple[str, ...] = MOE_TARGETS
    else:
        names = FAMILY_TARGETS.get(arch.family if arch is not None else "", ()) + LLAMA_TARGETS
    return tuple(reference(n) for n in names)


def extrapolate(
    variant: Any,
    targets: Sequence[Any] | None = None,
    *,
    context: int | None = None,
    batch: int | None = None,
    kv_dtype: str | None = None,
    devices_gb: Sequence[float] | None = None,
    flash_attention: bool | None = None,
    ubatch: int = DEFAULT_UBATCH,
    n_experts: int | None = None,
    top_k: int | None = None,
    **plan_kwargs: Any,
) -> list[FitPlan]:
    """The variant's precision applied to larger (or smaller) models of its family: one estimated plan each.

    ``variant`` is a :class:`FitPlan` (its context, batch, KV type and devices are the defaults here) or
    anything :func:`plan_fit` takes. ``targets`` are reference names, configs or architectures (default
    :func:`default_targets`). Weights = linear parameters × the variant's linear bits + the rest × its other
    bits; the target's own KV cache and overhead at the same context and batch. ``n_experts`` / ``top_k``
    change MoE targets (pruned experts, a lower k).
    """
    if not isinstance(variant, FitPlan):
        given = {"context": context, "batch": batch, "kv_dtype": kv_dtype, "devices_gb": devices_gb}
        given["flash_attention"] = flash_attention
        variant = plan_fit(variant, **{k: v for k, v in given.items() if v is not None}, **plan_kwargs)
    context = variant.context if context is None else context
    batch = variant.batch if batch is None else batch
    kv_dtype = variant.kv_dtype if kv_dtype is None else kv_dtype
    devices = tuple(d.device_gb for d in variant.devices) if devices_gb is None else tuple(devices_gb)
    flash = variant.flash_attention if flash_attention is None else flash_attention
    kv_dtype, devices = _check_settings(context, batch, kv_dtype, devices)
    chosen = (
        default_targets(variant.architecture)
        if targets is None
        else tuple(as_architecture(t) for t in targets)
    )
    out = []
    for target in chosen:
        if target.is_moe and (n_experts is not None or top_k is not None):
            target = _moe_changed(target, n_experts, top_k)
        counts = target.counts()
        weights = weight_bytes(counts.linear, variant.bits_linear) + weight_bytes(
            counts.other, variant.bits_other
        )
        bits = f"{variant.bits_linear:.3g} / {variant.bits_other:.3g} bits"
        label = (
            f"{target.name} as {variant.label}" if variant.run_id is not None else f"{target.name} at {bits}"
        )
        out.append(
            _finish(
                label=label,
                model=target.name,
                architecture=target,
                context=context,
                batch=batch,
                kv_dtype=kv_dtype,
                devices=devices,
                weights=weights,
                n_params=float(counts.total),
                active=float(counts.active),
                bpw=8 * weights / counts.total,
                bits_linear=variant.bits_linear,
                bits_other=variant.bits_other,
                flops=counts.flops_per_token,
                flash_attention=flash,
                ubatch=ubatch,
                estimate=True,
                run_id=variant.run_id,
                notes=[f"estimate: {variant.label} extrapolated ({target.source})"]
                + _architecture_notes(target, context, kv_dtype, flash),
            )
        )
    return out


def _moe_changed(arch: Architecture, n_experts: int | None, top_k: int | None) -> Architecture:
    e = arch.n_experts if n_experts is None else int(n_experts)
    k = arch.top_k if top_k is None else int(top_k)
    if not 1 <= e <= arch.n_experts:
        raise ConfigError(
            f"n_experts={n_experts}: {arch.name} has {arch.n_experts} experts; keep 1 to {arch.n_experts}."
        )
    if not 1 <= k <= e:
        raise ConfigError(f"top_k={top_k}: pick 1 to {e} of {arch.name}'s {e} experts per token.")
    parts = [arch.name]
    if e != arch.n_experts:
        parts.append(f"{e} of {arch.n_experts} experts")
    if k != arch.top_k:
        parts.append(f"k={k}")
    return dataclasses.replace(arch, name=", ".join(parts), n_experts=e, top_k=k)


def moe_what_if(variant: Any, **kwargs: Any) -> list[FitPlan]:
    """For an MoE variant (or reference), what pruning experts and lowering k change: the variant as it is,
    3/4 and 1/2 of the experts kept (memory down, compute as it was), k halved and k = 1 (compute down, memory
    unchanged), each an estimate at the variant's bits. Empty for a dense variant."""
    if not isinstance(variant, FitPlan):
        variant = plan_fit(variant, **kwargs)
        kwargs = {}
    arch = variant.architecture
    if arch is None or not arch.is_moe:
        return []
    e, k = arch.n_experts, arch.top_k
    options: list[tuple[int, int]] = [(e, k)]
    for kept in (max(k, (3 * e) // 4), max(k, e // 2)):
        if kept < e and (kept, k) not in options:
            options.append((kept, k))
    for lower in (max(1, k // 2), 1):
        if lower < k and (e, lower) not in options:
            options.append((e, lower))
    plans = []
    for kept, top in options:
        plans += extrapolate(variant, [arch], n_experts=kept, top_k=top, **kwargs)
    return plans


def report(plan: FitPlan, fmt: str = "md", *, extrapolation: bool = True) -> str:
    """What ``workbench fit`` prints: the plan's table and notes, its extrapolation to the family's reference
    sizes and, for an MoE, what pruning experts or a lower k change."""
    where = f"context {plan.context} × batch {plan.batch}, KV cache {plan.kv_dtype}"
    parts = [f"Memory at {where} (device sizes in GiB):", format_table([plan], fmt)]
    parts += [f"note: {n}" for n in plan.notes]
    if extrapolation:
        others = extrapolate(plan)
        if others:
            parts += ["", "The same precision at other sizes (estimates):", format_table(others, fmt)]
    what_if = moe_what_if(plan)
    if what_if:
        parts += [
            "",
            "Fewer experts (memory down) or a lower k (compute down, memory unchanged), estimates:",
            format_table(what_if, fmt),
        ]
    return "\n".join(parts)


__all__ = [
    "DEFAULT_DEVICES_GB",
    "DEFAULT_UBATCH",
    "FAMILY_TARGETS",
    "GIB",
    "KV_BYTES",
    "LLAMA_TARGETS",
    "MOE_TARGETS",
    "REFERENCES",
    "Architecture",
    "DeviceFit",
    "FitPlan",
    "ParamCounts",
    "architecture_for",
    "architecture_from_config",
    "as_architecture",
    "default_targets",
    "extrapolate",
    "fit_frame",
    "fit_table",
    "format_table",
    "match_reference",
    "moe_what_if",
    "parse_devices",
    "plan_fit",
    "reference",
    "report",
    "scale_bits",
    "variant_architecture",
    "weight_bytes",
]
