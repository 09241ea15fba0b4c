"""GGUF export, bit-exact: the file llama.cpp reads holds exactly the weights the workbench measured.

Each weight is written in the GGUF type its values fit *exactly* (``workbench.runtimes.codes``):

    symmetric, group 32       4 bits -> Q4_0    5 bits -> Q5_0    8 bits -> Q8_0     (w = d·q)
    float minimum, group 32   4 bits -> Q4_1    5 bits -> Q5_1                        (w = d·q + m)
    anything else             F32 (or F16/BF16 when asked and every value is exactly representable)

A quantized module's form comes from what its quantizer recorded (``module.wb_quant``); an unquantized weight is
tried against every type (``detect=True``), because a model loaded from a quantized GGUF (the demo's Q4_1)
sits on such a grid already. A quantized weight whose values fit no GGUF type (3 bits, group 64, integer zero
points) is refused with the closest type named (:class:`NoExactType`); llama.cpp's own quantizer
(``workbench.runtimes.llamacpp``) can then convert it from the float export, its cost measured like any run.

Names and metadata: a model that came from a GGUF file (the demo) keeps that file's metadata (architecture,
tokenizer, chat template: llama.cpp then tokenizes exactly as for the original); a Hugging Face model gets
metadata written from its config and tokenizer (Llama, Mistral, Qwen2, Qwen3, Qwen2-MoE, Qwen3-MoE).
Llama-architecture q/k rows are permuted back into llama.cpp's rotary layout (transformers undoes that
permutation when it loads a GGUF). Fused MoE experts are written as 3-D ``*_exps`` tensors. A tied output head is
not written (llama.cpp reuses ``token_embd``).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from workbench.errors import ConfigError
from workbench.runtimes.codes import Codes, recover_codes

GROUP = 32  # every GGUF type the exporter writes works on blocks of 32 weights

# (form, bits) -> GGUF type name; the order is the detection order for unquantized weights (smallest first).
EXACT_TYPES: dict[tuple[str, int], str] = {
    ("symmetric", 4): "Q4_0",
    ("float_min", 4): "Q4_1",
    ("symmetric", 5): "Q5_0",
    ("float_min", 5): "Q5_1",
    ("symmetric", 8): "Q8_0",
}
FLOAT_TYPES = ("F32", "F16", "BF16")
# Architectures whose metadata can be written from a transformers config (model_type -> llama.cpp arch).
HF_ARCHS = {
    "llama": "llama",
    "mistral": "llama",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "qwen2_moe": "qwen2moe",
    "qwen3_moe": "qwen3moe",
}


# Architectures whose llama.cpp loader reuses token_embd when output.weight is absent; the others get the tied
# head written out (the same values twice in the file, as llama.cpp's own converter does for them).
TIED_FALLBACK = {"llama", "qwen2", "qwen3"}


class NoExactType(ConfigError):
    """A quantized weight fits no GGUF type exactly; ``closest`` names the type a conversion would use."""

    def __init__(self, message: str, tensor: str, closest: str) -> None:
        super().__init__(message)
        self.tensor, self.closest = tensor, closest


@dataclass
class GGUFExport:
    """What :func:`export_gguf` wrote: the file, each tensor's type, and its size."""

    path: Path
    types: dict[str, str]  # GGUF tensor name -> type name
    n_bytes: int  # tensor data bytes in the file
    n_params: int  # weights in the file (a tied head counts once)
    linear_params: int = 0
    linear_bytes: int = 0
    metadata_from: str = ""  # the source GGUF whose metadata was kept, or "transformers config"
    notes: list[str] = field(default_factory=list)

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.n_bytes / max(self.n_params, 1)

    def type_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for t in self.types.values():
            counts[t] = counts.get(t, 0) + 1
        return dict(sorted(counts.items()))


# ---- packing codes into GGML blocks ------------------------------------------------------------------------


def _fp16_bytes(t: torch.Tensor) -> np.ndarray:
    """(rows, nb) float32 holding fp16 values -> (rows, nb, 2) uint8, little-endian fp16."""
    return t.to(torch.float16).numpy().astype("<f2").view(np.uint8).reshape(*t.shape, 2)


def _nibbles(u: np.ndarray) -> np.ndarray:
    """(rows, nb, 32) values 0..15 -> (rows, nb, 16) bytes: element j in the low nibble, j + 16 in the high."""
    return (u[..., :16] | (u[..., 16:] << 4)).astype(np.uint8)


def _high_bits(u: np.ndarray) -> np.ndarray:
    """(rows, nb, 32) values 0..31 -> (rows, nb, 4): bit 4 of element j as bit j of a little-endian uint32."""
    h = ((u >> 4) & 1).astype(np.uint32)
    qh = (h << np.arange(32, dtype=np.uint32)).sum(-1, dtype=np.uint32)
    return qh.astype("<u4").view(np.uint8).reshape(*u.shape[:-1], 4)


def pack(codes: Codes, qtype: str) -> np.ndarray:
    """Codes of a (rows, in) weight -> (rows, in / 32 * block bytes) uint8 in ``qtype``'s block layout."""
    rows, cols = codes.q.shape
    nb = cols // GROUP
    q = codes.q.numpy().astype(np.int32).reshape(rows, nb, GROUP)
    d = _fp16_bytes(codes.scale)
    if qtype == "Q8_0":
        parts = [d, q.astype(np.int8).view(np.uint8)]
    elif qtype == "Q4_0":
        parts = [d, _nibbles((q + 8).astype(np.uint8))]
    elif qtype == "Q4_1":
        assert codes.zero is not None
        parts = [d, _fp16_bytes(codes.zero), _nibbles(q.astype(np.uint8))]
    elif qtype in ("Q5_0", "Q5_1"):
        u = (q + 16) if qtype == "Q5_0" else q
        u = u.astype(np.uint8)
        low = _nibbles(u & 15)
        if qtype == "Q5_0":
            parts = [d, _high_bits(u), low]
        else:
            assert codes.zero is not None
            parts = [d, _fp16_bytes(codes.zero), _high_bits(u), low]
    else:
        raise ValueError(f"pack: {qtype} is not a type the exporter writes.")
    return np.concatenate(parts, axis=-1).reshape(rows, -1)


def _form_of(quant: dict[str, Any]) -> str:
    if quant.get("symmetric"):
        return "symmetric"
    return "float_min" if quant.get("zero_point", "float") == "float" else "int_zero"


def closest_type(quant: dict[str, Any]) -> str:
    """The GGUF type nearest a quantized weight's form: same family (Q*_0 symmetric, Q*_1 with a minimum)."""
    bits = int(quant.get("bits", 4))
    sym = bool(quant.get("symmetric"))
    if bits <= 4:
        return "Q4_0" if sym else "Q4_1"
    if bits == 5:
        return "Q5_0" if sym else "Q5_1"
    if bits <= 6:
        return "Q6_K"
    return "Q8_0"


def static_gguf_check(config: Any) -> None:
    """Refuse, from its settings alone, a weight quantizer whose result no GGUF type holds exactly.

    Configs without a weight grid (bnb, quanto, routing, distillation) pass; their weights are checked when
    exported. Raises :class:`NoExactType` naming the closest type.
    """
    fields = ("bits", "group_size", "symmetric", "zero_point")
    if not all(hasattr(config, f) for f in fields):
        return
    if getattr(config, "technique", "") not in ("rtn", "gptq", "awq", "mixed"):
        return
    quant = {f: getattr(config, f) for f in fields}
    bits_set = {int(quant["bits"])}
    if getattr(config, "high_bits", None) is not None:  # mixed precision's kept modules
        bits_set.add(int(config.high_bits))
    if getattr(config, "include_embeddings", False) or getattr(config, "include_head", False):
        bits_set.add(int(getattr(config, "embedding_bits", quant["bits"])))
    for bits in sorted(bits_set):
        q = {**quant, "bits": bits}
        form = _form_of(q)
        if EXACT_TYPES.get((form, bits)) is None or int(q["group_size"]) != GROUP:
            label = config.label() if hasattr(config, "label") else type(config).__name__
            why = (
                f"{bits}-bit {form.replace('_', ' ')} has no GGUF block type"
                if EXACT_TYPES.get((form, bits)) is None
                else f"GGUF blocks hold {GROUP} weights, not groups of {q['group_size']}"
            )
            closest = closest_type(q)
            raise NoExactType(
                f"{label} fits no GGUF type exactly ({why}). The closest is {closest}: choose the runtime "
                f"'llama.cpp {closest}' (llama.cpp's quantizer converts the variant, the run measures the cost), "
                f"or quantize with group_size={GROUP} at 4, 5 or 8 bits, symmetric or with a float minimum.",
                label,
                closest,
            )


def exact_codes(weight: torch.Tensor, quant: dict[str, Any] | None, name: str) -> tuple[str, Codes | None]:
    """(type, codes) for one (rows, in) weight; codes None for a float type. Raises :class:`NoExactType`."""
    if quant is None:
        return "F32", None
    form, bits, group = _form_of(quant), int(quant["bits"]), int(quant["group_size"])
    qtype = EXACT_TYPES.get((form, bits))
    why = ""
    if qtype is None:
        why = f"{bits}-bit {form.replace('_', ' ')} has no GGUF block type"
    elif group != GROUP:
        why = f"GGUF blocks hold {GROUP} weights, the variant's groups {group if group > 0 else 'whole rows'}"
    if not why:
        codes = recover_codes(weight, bits, GROUP, form)
        if codes is not None:
            return qtype, codes
        why = f"its values are not on a {qtype} grid"
    closest = closest_type(quant)
    raise NoExactType(
        f"'{name}' fits no GGUF type exactly ({why}). The closest is {closest}: export with "
        f"llama.cpp's quantizer converting to {closest} (runtime step 'llama_cpp' with quant='{closest}'), "
        f"whose cost the run measures, or quantize with group_size={GROUP} and 4, 5 or 8 bits (symmetric or "
        f"with a float minimum) for an exact file.",
        name,
        closest,
    )


def detect_type(weight: torch.Tensor) -> tuple[str, Codes | None]:
    """The smallest GGUF type an unquantized (rows, in) weight fits exactly, else ('F32', None)."""
    if weight.dim() != 2 or weight.shape[1] % GROUP:
        return "F32", None
    for (form, bits), qtype in EXACT_TYPES.items():
        codes = recover_codes(weight, bits, GROUP, form)
        if codes is not None:
            return qtype, codes
    return "F32", None


def _float_array(t: torch.Tensor, float_type: str) -> tuple[np.ndarray, Any, str]:
    """(array, raw dtype or None, type name) for a float tensor; F16/BF16 only where they lose nothing."""
    import gguf

    t = t.detach().float().cpu()
    if float_type == "F16" and torch.equal(t.half().float(), t):
        return t.half().numpy(), None, "F16"
    if float_type == "BF16" and torch.equal(t.bfloat16().float(), t):
        return t.bfloat16().view(torch.int16).numpy(), gguf.GGMLQuantizationType.BF16, "BF16"
    return t.numpy(), None, "F32"


# ---- names, layouts and metadata ---------------------------------------------------------------------------


def _permute_rows(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """transformers' rotary layout -> llama.cpp's (the inverse of what transformers does loading a GGUF)."""
    shape = w.shape
    return w.reshape(n_head, 2, shape[0] // n_head // 2, *shape[1:]).transpose(1, 2).reshape(shape)


def _cfg(config: Any, *names: str, default: Any = None) -> Any:
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return value
    return default


def _rope_theta(config: Any) -> float:
    params = getattr(config, "rope_parameters", None) or {}
    if isinstance(params, dict):
        kind = params.get("rope_type", "default")
        if kind not in (None, "default"):
            raise ConfigError(
                f"GGUF export: rope type {kind!r} of this {config.model_type} model is not written by the "
                f"exporter (only plain rotary). Convert it with llama.cpp's convert_hf_to_gguf.py instead."
            )
        if "rope_theta" in params:
            return float(params["rope_theta"])
    return float(_cfg(config, "rope_theta", default=10000.0))


def source_gguf(spec: Any) -> Path | None:
    """The GGUF file a model spec loads from (the demo's, or a ``.gguf`` file), whose metadata is kept."""
    source = str(getattr(spec, "source", spec or ""))
    if source == "demo":
        from workbench.models.demo import _find_demo_gguf, demo_home

        return _find_demo_gguf(demo_home())
    if source.lower().endswith(".gguf") and Path(source).expanduser().is_file():
        return Path(source).expanduser()
    return None


def _arch(model: nn.Module, source: Path | None) -> str:
    if source is not None:
        import gguf

        field_ = gguf.GGUFReader(source).fields.get("general.architecture")
        if field_ is not None:
            return str(field_.contents())
    model_type = getattr(getattr(model, "config", None), "model_type", "")
    arch = HF_ARCHS.get(model_type)
    if arch is None:
        raise ConfigError(
            f"GGUF export: model type {model_type!r} is not one the exporter writes metadata for "
            f"({', '.join(sorted(HF_ARCHS))}). Convert its float safetensors export with llama.cpp's "
            f"convert_hf_to_gguf.py."
        )
    return arch


def _copy_metadata(writer: Any, source: Path) -> None:
    """Every key of the source GGUF except what describes its own tensors (file type is set anew)."""
    import gguf

    reader = gguf.GGUFReader(source)
    for key, fld in reader.fields.items():
        if key.startswith("GGUF.") or key in (
            "general.architecture",
            "general.file_type",
            "general.quantization_version",
        ):  # what describes the source's own tensors is written anew
            continue
        vtype = fld.types[0]
        sub = fld.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, fld.contents(), vtype, sub_type=sub)


def _write_hf_metadata(writer: Any, arch: str, config: Any, tokenizer: Any) -> None:
    n_head = int(config.num_attention_heads)
    hidden = int(config.hidden_size)
    head_dim = int(_cfg(config, "head_dim", default=hidden // n_head))
    writer.add_name(str(_cfg(config, "_name_or_path", default="workbench export") or "workbench export"))
    writer.add_context_length(int(_cfg(config, "max_position_embeddings", default=4096)))
    writer.add_embedding_length(hidden)
    writer.add_block_count(int(config.num_hidden_layers))
    writer.add_feed_forward_length(int(_cfg(config, "intermediate_size", default=4 * hidden)))
    writer.add_head_count(n_head)
    writer.add_head_count_kv(int(_cfg(config, "num_key_value_heads", default=n_head)))
    writer.add_layer_norm_rms_eps(float(_cfg(config, "rms_norm_eps", default=1e-6)))
    writer.add_rope_freq_base(_rope_theta(config))
    writer.add_rope_dimension_count(head_dim)
    if arch in ("qwen3", "qwen3moe") or head_dim * n_head != hidden:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_vocab_size(int(config.vocab_size))
    if arch in ("qwen2moe", "qwen3moe"):
        writer.add_expert_count(int(_cfg(config, "num_experts", "num_local_experts")))
        writer.add_expert_used_count(int(config.num_experts_per_tok))
        writer.add_expert_feed_forward_length(int(config.moe_intermediate_size))
        shared = _cfg(config, "shared_expert_intermediate_size")
        if shared:
            writer.add_expert_shared_feed_forward_length(int(shared))
        if arch == "qwen3moe":
            writer.add_expert_weights_norm(bool(_cfg(config, "norm_topk_prob", default=True)))
    _write_tokenizer(writer, tokenizer, int(config.vocab_size))


def _write_tokenizer(writer: Any, tokenizer: Any, vocab_size: int) -> None:
    """A byte-level BPE tokenizer (GPT-2 style, what these families use) as llama.cpp's ``gpt2`` model."""
    import gguf

    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ConfigError(
            "GGUF export: the tokenizer is not a fast (tokenizers) tokenizer; the exporter writes byte-level "
            "BPE vocabularies only. Convert with llama.cpp's convert_hf_to_gguf.py."
        )
    spec = json.loads(backend.to_str())
    model = spec.get("model", {})
    if model.get("type") != "BPE":
        raise ConfigError(
            f"GGUF export: tokenizer model {model.get('type')!r} is not byte-level BPE; convert with "
            f"llama.cpp's convert_hf_to_gguf.py."
        )
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    if not merges:
        # llama.cpp requires the key and gguf-py drops empty arrays. One merge whose result is no token changes
        # nothing: llama.cpp falls back to the pieces' byte tokens, exactly what a merge-free BPE gives.
        first = next(t for t, _ in sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1]))
        merges = [f"{first} {first}"]
    specials = {int(t["id"]) for t in spec.get("added_tokens", []) if t.get("special")}
    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    tokens, kinds = [], []
    for i in range(vocab_size):
        text = by_id.get(i)
        if text is None:
            tokens.append(f"[PAD{i}]")
            kinds.append(gguf.TokenType.UNUSED)
        else:
            tokens.append(text)
            kinds.append(gguf.TokenType.CONTROL if i in specials else gguf.TokenType.NORMAL)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(kinds)
    writer.add_token_merges(merges)
    for setter, value in (
        (writer.add_eos_token_id, getattr(tokenizer, "eos_token_id", None)),
        (writer.add_bos_token_id, getattr(tokenizer, "bos_token_id", None)),
        (writer.add_pad_token_id, getattr(tokenizer, "pad_token_id", None)),
    ):
        if value is not None:
            setter(int(value))
    writer.add_add_bos_token(bool(getattr(tokenizer, "add_bos_token", False)))
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str) and template:
        writer.add_chat_template(template)


@dataclass
class _Tensor:
    name: str  # GGUF name
    weight: torch.Tensor  # (rows, in) or (E, rows, in) float, in llama.cpp's row order
    quant: dict[str, Any] | None  # what the quantizer recorded, None: unquantized
    linear: bool  # a decoder linear or routed expert (bits_per_weight_linear)


def _tensors(model: nn.Module, arch: str) -> Iterator[_Tensor]:
    """The model's tensors under their GGUF names, in llama.cpp's layout (tied head left out)."""
    import gguf

    from workbench.anatomy import anatomy

    config = model.config
    anat = anatomy(model)
    linear_names = {lin.name for lin in anat.linears}
    expert_names = {spec.name for _, spec in anat.expert_tensors()}
    arch_enum = next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == arch)
    names = gguf.get_tensor_name_map(arch_enum, int(config.num_hidden_layers))
    n_head = int(config.num_attention_heads)
    n_kv = int(_cfg(config, "num_key_value_heads", default=n_head))
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    tied = head is not None and emb is not None and head.weight is emb.weight
    modules = dict(model.named_modules())
    for full, param in model.state_dict(keep_vars=True).items():
        owner, _, pname = full.rpartition(".")
        module = modules.get(owner)
        if tied and module is head and arch in TIED_FALLBACK:
            continue
        if not param.is_floating_point():
            continue
        quant = getattr(module, "wb_quant", None) if module is not None else None
        is_weight = pname == "weight" or full in expert_names
        quant = quant if is_weight else None
        w = param.detach()
        if full.endswith("experts.gate_up_proj"):  # fused (E, 2F, H): llama.cpp keeps gate and up apart
            base = full[: -len("gate_up_proj")]
            half = w.shape[1] // 2
            for part, rows in (("gate_proj", w[:, :half]), ("up_proj", w[:, half:])):
                gname = names.get_name(base + part, try_suffixes=(".weight",))
                if gname is None:
                    raise ConfigError(f"GGUF export: no llama.cpp name for '{base + part}' ({arch}).")
                yield _Tensor(gname + ".weight", rows, quant, True)
            continue
        gname = names.get_name(full, try_suffixes=(".weight", ".bias"))
        if gname is None:
            if full.endswith("rotary_emb.inv_freq"):
                continue
            raise ConfigError(
                f"GGUF export: tensor '{full}' has no llama.cpp name for architecture {arch}; this model "
                f"cannot be exported by the workbench. Convert its safetensors export with llama.cpp's "
                f"convert_hf_to_gguf.py."
            )
        if not gname.endswith((".weight", ".bias")):
            gname += ".weight"
        if arch == "llama" and (".attn_q." in gname or ".attn_k." in gname):
            w = _permute_rows(w, n_head if ".attn_q." in gname else n_kv)
        linear = (owner in linear_names and pname == "weight") or full in expert_names
        yield _Tensor(gname, w, quant, linear)


def export_gguf(
    model: nn.Module,
    path: str | Path,
    *,
    tokenizer: Any,
    spec: Any = None,
    float_type: str = "F32",
    detect: bool = True,
    packed: bool = True,
    progress: Any = None,
) -> GGUFExport:
    """Write ``model`` (a variant, or a loaded model itself) to a GGUF file, bit-exact.

    Args:
        tokenizer: the model's tokenizer, written into the file unless a source GGUF's is kept.
        spec: the :class:`~workbench.models.ModelSpec` the model was loaded from: a model from a GGUF file (the
            demo) keeps that file's metadata and tokenizer.
        float_type: F32 (default: exact), F16 or BF16 for weights that are not quantized; a tensor not exactly
            representable in F16/BF16 stays F32, so the file is always exact.
        detect: write unquantized weights that already lie on a GGUF grid in that type (lossless).
        packed: write quantized weights in their GGUF type; False writes every weight as a float (the input
            llama.cpp's own quantizer converts from).

    Raises:
        NoExactType: a quantized weight fits no GGUF type (the message names it and the closest type).
        ConfigError: an architecture or tokenizer the exporter does not write.
    """
    import gguf

    from workbench.progress import as_progress

    progress = as_progress(progress)
    if float_type not in FLOAT_TYPES:
        raise ConfigError(f"float_type={float_type!r}; choose one of {', '.join(FLOAT_TYPES)}.")
    source = source_gguf(spec)
    arch = _arch(model, source)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.part")
    writer = gguf.GGUFWriter(tmp, arch)
    report = GGUFExport(path, {}, 0, 0)
    try:
        if source is not None:
            _copy_metadata(writer, source)
            report.metadata_from = source.name
        else:
            _write_hf_metadata(writer, arch, model.config, tokenizer)
            report.metadata_from = "transformers config"
        tensors = list(_tensors(model, arch))
        for i, t in enumerate(tensors):
            progress.update(i / max(len(tensors), 1), f"exporting {t.name}")
            array, raw, qtype = _encode(
                t if packed else _Tensor(t.name, t.weight, None, t.linear), float_type, detect
            )
            writer.add_tensor(t.name, array, raw_dtype=raw)
            report.types[t.name] = qtype
            n = t.weight.numel()
            report.n_params += n
            report.n_bytes += array.nbytes
            if t.linear:
                report.linear_params += n
                report.linear_bytes += array.nbytes
        writer.add_file_type(_file_type(report))
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        tmp.replace(path)  # a file that exists is a whole file
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    progress.update(1.0, f"wrote {path.name}")
    return report


def _encode(t: _Tensor, float_type: str, detect: bool) -> tuple[np.ndarray, Any, str]:
    """One tensor as (array to write, raw GGML type or None, type name)."""
    import gguf

    w = t.weight.detach().float().cpu()
    if w.dim() < 2:
        return w.numpy(), None, "F32"  # norms and biases: llama.cpp wants them in F32
    rows = w.reshape(-1, w.shape[-1])
    if t.quant is not None:
        qtype, codes = exact_codes(rows, t.quant, t.name)
    elif detect:
        qtype, codes = detect_type(rows)
    else:
        qtype, codes = "F32", None
    if codes is None:
        return _float_array(w, float_type)
    packed = pack(codes, qtype).reshape(*w.shape[:-1], -1)
    return packed, gguf.GGMLQuantizationType[qtype], qtype


def _file_type(report: GGUFExport) -> int:
    """``general.file_type``: the type most of the linear weights have (what llama.cpp names the file by)."""
    import gguf

    weights: dict[str, int] = {}
    for name, qtype in report.types.items():
        if name.endswith(".weight") and not name.startswith(("token_embd", "output")):
            weights[qtype] = weights.get(qtype, 0) + 1
    main = max(weights, key=lambda k: weights[k]) if weights else "F32"
    names = {"F32": "ALL_F32", "F16": "MOSTLY_F16", "BF16": "MOSTLY_BF16"}
    return int(gguf.LlamaFileType[names.get(main, f"MOSTLY_{main}")])


def read_gguf_weights(
    path: str | Path, arch: str | None = None, config: Any = None
) -> dict[str, torch.Tensor]:
    """The dequantized tensors of a GGUF file (gguf-py's reference dequantization), by GGUF name, in the
    workbench's layout (Llama q/k rows un-permuted when ``config`` gives the head counts)."""
    import gguf

    reader = gguf.GGUFReader(path)
    arch = arch or str(reader.fields["general.architecture"].contents())
    out = {}
    for t in reader.tensors:
        data = gguf.quants.dequantize(t.data, t.tensor_type)
        w = torch.from_numpy(np.ascontiguousarray(data, dtype=np.float32)).reshape(
            tuple(int(x) for x in reversed(t.shape))
        )
        if arch == "llama" and config is not None and (".attn_q." in t.name or ".attn_k." in t.name):
            n_head = int(config.num_attention_heads)
            n = n_head if ".attn_q." in t.name else int(_cfg(config, "num_key_value_heads", default=n_head))
            w = _unpermute_rows(w, n)
        out[t.name] = w
    return out


def _unpermute_rows(w: torch.Tensor, n_head: int) -> torch.Tensor:
    shape = w.shape
    return w.reshape(n_head, shape[0] // n_head // 2, 2, *shape[1:]).transpose(1, 2).reshape(shape)


def gguf_size(path: str | Path) -> tuple[int, int]:
    """(tensor data bytes, weights) of a GGUF file."""
    import gguf

    reader = gguf.GGUFReader(path)
    return sum(int(t.n_bytes) for t in reader.tensors), sum(int(t.n_elements) for t in reader.tensors)


def expected_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's weights under their GGUF names, in the workbench's layout: what a round trip must equal."""
    arch = HF_ARCHS.get(getattr(model.config, "model_type", ""), "llama")
    out = {}
    n_head = int(model.config.num_attention_heads)
    n_kv = int(_cfg(model.config, "num_key_value_heads", default=n_head))
    for t in _tensors(model, arch):
        w = t.weight.detach().float()
        if arch == "llama" and (".attn_q." in t.name or ".attn_k." in t.name):
            w = _unpermute_rows(w, n_head if ".attn_q." in t.name else n_kv)
        out[t.name] = w
    return out


def bits_label(report: GGUFExport) -> str:
    """A short description of the file's types: 'Q4_0 (196), F32 (61)'."""
    return ", ".join(f"{k} ({v})" for k, v in sorted(report.type_counts().items(), key=lambda kv: -kv[1]))


__all__ = [
    "EXACT_TYPES",
    "FLOAT_TYPES",
    "HF_ARCHS",
    "GGUFExport",
    "NoExactType",
    "bits_label",
    "closest_type",
    "detect_type",
    "exact_codes",
    "expected_weights",
    "export_gguf",
    "export_gguf_folder",
    "gguf_size",
    "pack",
    "read_gguf_weights",
    "source_gguf",
    "static_gguf_check",
]


def export_gguf_folder(loaded: Any, variant: nn.Module, folder: str | Path) -> Any:
    """``workbench export --format gguf``: ``folder/model.gguf`` (bit-exact), as a card's
    :class:`~workbench.runtimes.card.ExportInfo`. A variant already running in llama.cpp (a run whose last step
    is the llama.cpp runtime) is written as the very file that runtime measured."""
    import shutil

    from workbench.runtimes.card import ExportInfo

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / "model.gguf"
    source_file = getattr(variant, "path", None)
    if isinstance(source_file, Path) and source_file.suffix == ".gguf":
        shutil.copyfile(source_file, target)
        n_bytes, n_params = gguf_size(target)
        details = {
            "file": "the file the llama.cpp run measured",
            "bits_per_weight": f"{8 * n_bytes / n_params:.3f}",
        }
        return ExportInfo("gguf", str(folder), [target.name], target.stat().st_size, details, [])
    report = export_gguf(variant, target, tokenizer=loaded.tokenizer, spec=loaded.spec)
    notes = []
    floats = [n for n, t in report.types.items() if t == "F32" and n.endswith(".weight") and "norm" not in n]
    if floats:
        notes.append(
            f"{len(floats)} weight tensors are F32 (not quantized by the pipeline), e.g. {floats[0]}."
        )
    details = {
        "types": bits_label(report),
        "bits_per_weight": f"{report.bits_per_weight:.3f}",
        "metadata and tokenizer": report.metadata_from,
        "exact": "dequantized tensors equal the workbench's weights bit for bit",
    }
    return ExportInfo("gguf", str(folder), [target.name], target.stat().st_size, details, notes)
