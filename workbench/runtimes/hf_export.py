"""Hugging Face folders of a variant: compressed-tensors (what vLLM serves) and plain safetensors.

:func:`export_compressed_tensors` writes the compressed-tensors ``pack-quantized`` format, the form GPTQ/AWQ
checkpoints are served in: per quantized linear, the integer codes packed into int32 (``weight_packed``, 32
codes of b bits in b words), ``weight_scale`` (one per group, in the model's dtype), ``weight_zero_point``
(asymmetric only; packed the same way along the output rows), ``weight_shape``, and in ``config.json`` a
``quantization_config`` with ``quant_method: "compressed-tensors"``, ``format: "pack-quantized"``, the group
strategy and group size. Codes are signed (q - 2^(b-1)), and so is the zero point, so
``(q_ct - z_ct) · s = (q - z) · s``.

Only variants whose weights have that form exactly are written: symmetric group-wise weights (w = q · s) and
the integer zero point (w = (q - z) · s, ``zero_point="int"``), at 4 or 8 bits (what vLLM's int4/int8 kernels
take). The codes come from :func:`workbench.runtimes.codes.recover_codes`, which finds integers that reproduce
the variant's float weights bit for bit, so the folder computes exactly what the workbench measured. The
float-minimum form (``zero_point="float"``, llama.cpp's Q4_1: w = q · d + m) has no exact compressed-tensors
equivalent; it is refused with the closest form (the integer zero point) and what converting would move. Decoder
linears no step quantized and the embeddings and head (even when quantized: compressed-tensors packs linears)
are written dense with the variant's values, and the card says so. Models that keep their routed experts fused
(transformers' MoE layout) are refused: transformers reads compressed-tensors MoE checkpoints only with each
expert's linears packed on their own, which this exporter does not write.

:func:`export_safetensors` writes any variant as a plain folder (dequantized float weights, config, tokenizer).

Both reload the folder through transformers afterwards (``verify=True``) and record how far its logits are from
the variant's on a fixed probe (``details["reload_max_abs_logit_diff"]``): 0 for safetensors, and at most a
float rounding for compressed-tensors (the weights unpack to the same floats).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from workbench.errors import ConfigError
from workbench.runtimes.card import ExportInfo
from workbench.techniques._quant import decoder_linears, fused_expert_tensors

CT_BITS = (4, 8)
# The workbench's weight-grid forms (module.wb_quant) and recover_codes' names for them.
_FORMS = {"symmetric": "symmetric", "int": "int_zero", "float": "float_min"}
# Backends whose modules hold their own packed tensors: their weights are not floats an exporter can read.
_PACKED_METHODS = ("bnb", "quanto", "torch_packed")
RELOAD_TOLERANCE = 1e-4  # max |logit difference| a reload may show before the export is reported as failed
_PROBE_TOKENS = 32


@dataclass
class PackedLinear:
    """One decoder linear as compressed-tensors stores it: its codes and the scheme they belong to."""

    name: str
    bits: int
    group_size: int  # -1: one group per output row (the "channel" strategy)
    symmetric: bool
    codes: Any  # workbench.runtimes.codes.Codes

    @property
    def scheme(self) -> tuple[int, int, bool]:
        return (self.bits, self.group_size, self.symmetric)


def _form(quant: dict[str, Any]) -> str:
    return "symmetric" if quant.get("symmetric") else str(quant.get("zero_point", "float"))


def _check_not_packed(model: nn.Module, what: str) -> None:
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None and "Gguf" not in type(quantizer).__name__:  # GGUF weights are already floats
        raise ConfigError(
            f"{what}: the model is loaded quantized by {type(quantizer).__name__}; export a float or simulated "
            "variant."
        )
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        quant = getattr(module, "wb_quant", None)
        method = quant.get("method") if isinstance(quant, dict) else None
        packed = isinstance(weight, torch.Tensor) and type(weight.data) is not torch.Tensor
        if packed or method in _PACKED_METHODS:
            raise ConfigError(
                f"{what}: '{name}' is stored packed by {method or type(weight.data).__name__}, not as float "
                "weights; export the variant without that step (the simulated variant before a runtime step)."
            )


def _float_min_cost(found: list[tuple[str, Any]]) -> str:
    """What moving float-minimum groups to the nearest integer zero point would change, as one sentence."""
    max_shift, max_frac, diff_sq, ref_sq, clamped, groups = 0.0, 0.0, 0.0, 0.0, 0, 0
    for _, codes in found:
        d, m = codes.scale, codes.zero  # (out, G)
        qmax = 2**codes.bits - 1
        z = torch.round(-m / d)
        clamped += int(((z < 0) | (z > qmax)).sum())
        groups += z.numel()
        z = z.clamp(0, qmax)
        w = codes.dequantize()
        # The same codes, the minimum replaced by the nearest whole number of steps: w' = (q - z) · d.
        q = codes.q.float().view(*d.shape, -1)
        diff = (((q - z[..., None]) * d[..., None]).view_as(w) - w).abs()
        max_shift = max(max_shift, float(diff.max()))
        max_frac = max(max_frac, float((diff.view(*d.shape, -1) / d.abs()[..., None]).max()))
        diff_sq += float(diff.double().pow(2).sum())
        ref_sq += float(w.double().pow(2).sum())
    rel = math.sqrt(diff_sq / ref_sq) if ref_sq else 0.0
    out = (
        f"converting would round each group's minimum to a whole step, moving weights by up to {max_shift:.3g} "
        f"({max_frac:.0%} of a step; relative error {rel:.2g} over those layers)"
    )
    if clamped:
        out += f", and {clamped} of {groups} groups would need a zero point outside the codes (clamped)"
    return out


def compressed_tensors_plan(model: nn.Module) -> tuple[list[PackedLinear], list[str]]:
    """The decoder linears to pack (with their exact codes) and the quantized tensors left dense; checked first.

    Raises:
        ConfigError: nothing is quantized, a layer is packed by a backend, bits other than 4 or 8, the
            float-minimum form (with what converting it would change), or weights off their recorded grid.
    """
    from workbench.runtimes.codes import recover_codes

    what = "compressed-tensors export"
    _check_not_packed(model, what)
    fused = fused_expert_tensors(model)
    if fused:
        raise ConfigError(
            f"{what}: this model keeps its routed experts fused ('{fused[0][0]}'); transformers reads "
            "compressed-tensors MoE checkpoints only with every expert's linears packed on their own, which "
            "this exporter does not write. Export it as GGUF or as plain safetensors."
        )
    linears = list(decoder_linears(model))
    quantized = [(n, m, m.wb_quant) for n, m in linears if isinstance(getattr(m, "wb_quant", None), dict)]
    if not quantized:
        raise ConfigError(
            f"{what}: no decoder linear of this variant is quantized; compressed-tensors stores quantized "
            "weights. Export it as plain safetensors instead (format 'safetensors')."
        )
    for name, _, quant in quantized:
        bits = quant.get("bits")
        if bits not in CT_BITS:
            raise ConfigError(
                f"{what}: '{name}' is quantized at {bits} bits; the pack-quantized format vLLM serves takes "
                f"{' or '.join(map(str, CT_BITS))} bits. Export this variant as GGUF or as plain safetensors, "
                "or quantize at 4 or 8 bits."
            )
    float_min = [(n, m, q) for n, m, q in quantized if _form(q) == "float"]
    if float_min:
        found = []
        for name, module, quant in float_min:
            codes = recover_codes(module.weight.data, quant["bits"], quant["group_size"], "float_min")
            if codes is not None:
                found.append((name, codes))
        cost = _float_min_cost(found) if found else "its weights are not on that grid exactly either"
        raise ConfigError(
            f"{what}: '{float_min[0][0]}' and {len(float_min) - 1} other layer(s) store a float minimum per "
            "group (zero_point='float', Q4_1-style: w = q·d + m), which compressed-tensors cannot hold exactly. "
            f"Its closest form is the integer zero point (w = (q − z)·s): {cost}. Quantize with "
            "zero_point='int' or symmetric=True to export exactly, export GGUF (Q4_1 stores this form), or "
            "export plain safetensors (dequantized weights)."
        )
    packed = []
    for name, module, quant in quantized:
        bits, group, form = quant["bits"], quant["group_size"], _FORMS[_form(quant)]
        codes = recover_codes(module.weight.data, bits, group, form)
        if codes is None:
            raise ConfigError(
                f"{what}: '{name}' is recorded as {bits}-bit {form} with group size {group}, but its weights "
                "are not exactly on such a grid (changed after quantizing?). Export plain safetensors, which "
                "keeps them as they are."
            )
        packed.append(PackedLinear(name, bits, group, form == "symmetric", codes))
    dense: list[str] = []
    names = {p.name for p in packed}
    for name, module in model.named_modules():
        if name in names:
            continue
        if "wb_storage_bytes" in module.__dict__ or "wb_param_storage_bytes" in module.__dict__:
            dense.append(name)
    return packed, dense


def _pack_int32(codes: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Signed b-bit integers (int8, in [-2^(b-1), 2^(b-1))) packed densely into int32 along ``dim`` (0 or 1):
    code i of a row sits at bits i·b .. i·b+b-1 of the row's words (little-endian; b = 4 or 8 never straddles
    a word). The layout compressed-tensors' ``pack_to_int32`` writes."""
    per_word = 32 // bits
    value = (codes.to(torch.int64) + (1 << (bits - 1))) & ((1 << bits) - 1)  # unsigned, as packed
    if dim == 0:
        value = value.t()
    rows, cols = value.shape
    pad = (-cols) % per_word
    if pad:
        value = torch.nn.functional.pad(value, (0, pad))
    value = value.view(rows, -1, per_word)
    shifts = torch.arange(per_word, dtype=torch.int64) * bits
    words = (value << shifts).sum(-1)  # < 2^32
    words = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)  # the same bits, as int32
    if dim == 0:
        words = words.t()
    return words.contiguous()


def _ct_tensors(p: PackedLinear, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The four (or three) tensors compressed-tensors stores for one linear, by their suffix."""
    half = 1 << (p.bits - 1)
    c = p.codes
    if p.symmetric:
        q = c.q  # already signed, in [-half, half - 1]
    else:
        q = c.q - half  # [0, 2^b - 1] -> signed
    out = {
        "weight_packed": _pack_int32(q.to(torch.int8), p.bits, 1),
        "weight_scale": c.scale.to(dtype).contiguous(),
        "weight_shape": torch.tensor(list(c.q.shape), dtype=torch.int64),
    }
    if not p.symmetric:
        out["weight_zero_point"] = _pack_int32((c.zero - half).to(torch.int8), p.bits, 0)
    return out


def _scheme_args(bits: int, group_size: int, symmetric: bool) -> dict[str, Any]:
    return {
        "num_bits": bits,
        "type": "int",
        "symmetric": symmetric,
        "strategy": "channel" if group_size == -1 else "group",
        "group_size": None if group_size == -1 else group_size,
        "dynamic": False,
        "observer": "minmax",
        "actorder": None,
    }


def quantization_config(model: nn.Module, packed: list[PackedLinear]) -> dict[str, Any]:
    """The ``quantization_config`` of ``config.json``: one config group per scheme, every other Linear ignored.

    With one scheme the group targets ``Linear`` (as llm-compressor writes it); with several (mixed precision)
    each group lists its layers by exact name (``re:^model\\.layers\\.0\\.mlp\\.down_proj$``).
    """
    import re

    schemes: dict[tuple[int, int, bool], list[str]] = {}
    for p in packed:
        schemes.setdefault(p.scheme, []).append(p.name)
    names = {p.name for p in packed}
    ignore = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n not in names]
    groups = {}
    for i, ((bits, group, sym), members) in enumerate(sorted(schemes.items(), key=lambda kv: kv[0])):
        targets = ["Linear"] if len(schemes) == 1 else [f"re:^{re.escape(n)}$" for n in members]
        groups[f"group_{i}"] = {
            "targets": targets,
            "weights": _scheme_args(bits, group, sym),
            "input_activations": None,
            "output_activations": None,
            "format": "pack-quantized",
        }
    return {
        "quant_method": "compressed-tensors",
        "format": "pack-quantized",
        "quantization_status": "compressed",
        "config_groups": groups,
        "ignore": ignore,
        "kv_cache_scheme": None,
        "global_compression_ratio": None,
    }


def _prepare_folder(folder: str | Path, overwrite: bool) -> Path:
    path = Path(folder).expanduser()
    if path.exists() and not path.is_dir():
        raise ConfigError(f"Export folder {path} is a file; give a folder path.")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise ConfigError(f"Export folder {path} is not empty; choose a new folder (or pass overwrite=True).")
    path.mkdir(parents=True, exist_ok=True)
    return path


@contextlib.contextmanager
def _quiet():
    """No progress bars, per-layer warnings or loader notices in a panel or a log."""
    with (
        warnings.catch_warnings(),
        contextlib.redirect_stderr(io.StringIO()),
        contextlib.redirect_stdout(io.StringIO()),
    ):
        warnings.simplefilter("ignore")
        loggers = [logging.getLogger(n) for n in ("transformers", "compressed_tensors", "torchao")]
        levels = [lg.level for lg in loggers]
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        try:
            from loguru import logger as loguru_logger  # compressed-tensors logs through loguru

            loguru_logger.disable("compressed_tensors")
        except ImportError:
            loguru_logger = None
        try:
            yield
        finally:
            for lg, level in zip(loggers, levels, strict=True):
                lg.setLevel(level)
            if loguru_logger is not None:
                loguru_logger.enable("compressed_tensors")


def _save_dense(model: nn.Module, folder: Path) -> None:
    """``save_pretrained`` as safetensors, without a leftover GGUF quantizer (a GGUF-loaded model refuses to
    save while it has one; its weights are plain floats already)."""
    config = model.config
    had_qconfig = hasattr(config, "quantization_config")
    saved = (getattr(model, "hf_quantizer", None), getattr(config, "quantization_config", None))
    try:
        if had_qconfig:
            delattr(config, "quantization_config")
        if hasattr(model, "hf_quantizer"):
            model.hf_quantizer = None
        with _quiet():
            model.save_pretrained(folder, safe_serialization=True)
    finally:
        if hasattr(model, "hf_quantizer"):
            model.hf_quantizer = saved[0]
        if had_qconfig:
            config.quantization_config = saved[1]


def _weight_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.safetensors"))


def _rewrite_packed(folder: Path, packed: list[PackedLinear], dtype: torch.dtype) -> None:
    """Replace each packed linear's ``.weight`` in the saved safetensors files by its compressed tensors."""
    from safetensors.torch import load_file, save_file

    by_key = {f"{p.name}.weight": p for p in packed}
    index_path = folder / "model.safetensors.index.json"
    index = json.loads(index_path.read_text()) if index_path.is_file() else None
    done = set()
    for path in _weight_files(folder):
        tensors = load_file(str(path))
        changed = False
        for key in [k for k in tensors if k in by_key]:
            p = by_key[key]
            del tensors[key]
            for suffix, tensor in _ct_tensors(p, dtype).items():
                tensors[f"{p.name}.{suffix}"] = tensor
                if index is not None:
                    index["weight_map"][f"{p.name}.{suffix}"] = path.name
            if index is not None:
                index["weight_map"].pop(key, None)
            done.add(key)
            changed = True
        if changed:
            save_file(tensors, str(path), metadata={"format": "pt"})
    missing = sorted(set(by_key) - done)
    if missing:
        raise ConfigError(f"compressed-tensors export: save_pretrained wrote no tensor {missing[0]!r}.")
    if index is not None:
        index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def _probe_ids(model: nn.Module) -> torch.Tensor:
    config = model.config
    vocab = int(getattr(config, "vocab_size", 256))
    n = min(_PROBE_TOKENS, int(getattr(config, "max_position_embeddings", _PROBE_TOKENS) or _PROBE_TOKENS))
    gen = torch.Generator().manual_seed(0)
    return torch.randint(0, vocab, (1, n), generator=gen)


def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    device = next(model.parameters()).device
    with torch.no_grad():
        return model(input_ids=ids.to(device)).logits.float().cpu()


def reload_difference(folder: str | Path, variant_model: nn.Module, *, dequantize: bool = False) -> float:
    """Load the folder through transformers and return the max |logit difference| from the variant's.

    ``dequantize=True`` loads a compressed-tensors folder through ``CompressedTensorsConfig(dequantize=True)``
    (weights unpacked while loading), the path transformers takes for asymmetric pack-quantized folders.
    """
    from transformers import AutoModelForCausalLM

    ids = _probe_ids(variant_model)
    expected = _logits(variant_model, ids)
    kwargs: dict[str, Any] = {}
    if dequantize:
        from transformers import CompressedTensorsConfig

        kwargs["quantization_config"] = CompressedTensorsConfig(dequantize=True)
    with _quiet():
        reloaded = AutoModelForCausalLM.from_pretrained(str(folder), use_safetensors=True, **kwargs).eval()
        got = _logits(reloaded, ids)
    del reloaded
    return float((got - expected).abs().max())


def _finish(
    info: ExportInfo,
    folder: Path,
    variant_model: nn.Module,
    verify: bool,
    tokenizer: Any,
    dequantize: bool = False,
) -> ExportInfo:
    if tokenizer is not None:
        with _quiet():
            tokenizer.save_pretrained(str(folder))
    info.files = sorted(p.name for p in folder.iterdir() if p.is_file())
    info.n_bytes = sum(p.stat().st_size for p in _weight_files(folder))
    if verify:
        diff = reload_difference(folder, variant_model, dequantize=dequantize)
        info.details["reload_max_abs_logit_diff"] = diff
        info.details["reload_check"] = "passed" if diff <= RELOAD_TOLERANCE else "FAILED"
        if diff > RELOAD_TOLERANCE:
            info.notes.append(
                f"Reloading this folder through transformers gives logits up to {diff:.3g} away from the "
                "variant's: the export does not reproduce it."
            )
    return info


def export_compressed_tensors(
    loaded_model: Any,
    variant_model: nn.Module,
    folder: str | Path,
    *,
    verify: bool = True,
    overwrite: bool = False,
) -> ExportInfo:
    """Write ``variant_model`` as a compressed-tensors ``pack-quantized`` Hugging Face folder.

    ``loaded_model`` is the base :class:`~workbench.models.LoadedModel` the variant was made from (its tokenizer
    is saved with the weights). Everything is checked before anything is written (:func:`compressed_tensors_plan`).

    Raises:
        ConfigError: the variant has no exact compressed-tensors form (the message says why and what to do),
            or ``folder`` is not empty.
    """
    packed, dense = compressed_tensors_plan(variant_model)
    path = _prepare_folder(folder, overwrite)
    dtype = next(variant_model.parameters()).dtype
    _save_dense(variant_model, path)
    _rewrite_packed(path, packed, dtype)
    qconfig = quantization_config(variant_model, packed)
    config_path = path / "config.json"
    config = json.loads(config_path.read_text())
    config["quantization_config"] = qconfig
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    schemes = sorted({p.scheme for p in packed})
    info = ExportInfo(
        format="compressed-tensors",
        folder=str(path),
        details={
            "quantization": ", ".join(
                f"{b}-bit {'symmetric' if s else 'integer zero point'} "
                f"{'per output row' if g == -1 else f'groups of {g}'}"
                for b, g, s in schemes
            ),
            "packed_linears": len(packed),
            "codes": "recovered exactly from the variant's weights (dequantize to the same floats)",
            "base_fingerprint": getattr(loaded_model, "fingerprint", None),
        },
    )
    if dense:
        info.details["quantized_but_dense"] = dense
        info.notes.append(
            "Quantized tensors compressed-tensors does not pack here (embeddings, head) are "
            f"stored dense with the variant's values: {', '.join(dense)}."
        )
    if any(p.symmetric and bool((p.codes.scale < 0).any()) for p in packed):
        info.notes.append(
            "Some symmetric scales are negative (the group's extreme weight sits on the code -2^(b-1), "
            "llama.cpp's Q*_0 rule); the format stores them as they are."
        )
    asymmetric = any(not p.symmetric for p in packed)
    if asymmetric:
        # transformers (5.24, with compressed-tensors 0.20) builds unpacked zero-point parameters for its
        # default loading path and then refuses the packed ones every pack-quantized checkpoint stores
        # (llm-compressor issue #1618); unpacking while loading works.
        info.details["reload_with"] = "CompressedTensorsConfig(dequantize=True)"
        info.notes.append(
            "Asymmetric (zero-point) folders load in transformers with "
            "`quantization_config=CompressedTensorsConfig(dequantize=True)`; its default path refuses the packed "
            "zero points."
        )
    if any(not p.symmetric and p.bits == 8 for p in packed):
        info.notes.append(
            "vLLM's packed int kernels take zero points at 4 bits; for 8 bits it may serve symmetric weights only."
        )
    tokenizer = getattr(loaded_model, "tokenizer", None)
    return _finish(info, path, variant_model, verify, tokenizer, dequantize=asymmetric)


def export_safetensors(
    variant_model: nn.Module,
    tokenizer: Any,
    folder: str | Path,
    *,
    verify: bool = True,
    overwrite: bool = False,
) -> ExportInfo:
    """Write any float or simulated variant as a plain safetensors Hugging Face folder (config, tokenizer).

    Quantized weights are written dequantized, as the variant holds them, so the folder reloads with the
    variant's logits; it is as large as a float model of that dtype.

    Raises:
        ConfigError: a module holds a backend's packed tensors (bitsandbytes, quanto, torchao), or ``folder``
            is not empty.
    """
    _check_not_packed(variant_model, "safetensors export")
    path = _prepare_folder(folder, overwrite)
    _save_dense(variant_model, path)
    dtype = next(variant_model.parameters()).dtype
    quantized = sorted(
        {
            f"{q.get('method')} {q.get('bits')}-bit"
            for m in variant_model.modules()
            if isinstance(q := getattr(m, "wb_quant", None), dict)
        }
    )
    info = ExportInfo(
        format="safetensors",
        folder=str(path),
        details={"dtype": str(dtype).removeprefix("torch.")},
    )
    if quantized:
        info.notes.append(
            f"Weights quantized by {', '.join(quantized)} are stored dequantized ({info.details['dtype']}), so the "
            "files are as large as the float model's; use the compressed-tensors or GGUF export for packed files."
        )
    return _finish(info, path, variant_model, verify, tokenizer)


__all__ = [
    "CT_BITS",
    "PackedLinear",
    "compressed_tensors_plan",
    "export_compressed_tensors",
    "export_safetensors",
    "quantization_config",
    "reload_difference",
]
