"""Loading a model spec: Hugging Face id or folder (safetensors unless allowed), GGUF, the demo, the tiny models.

Loaded base models are cached in-process by spec; callers that modify a model work on a deep copy.
"""

from __future__ import annotations

import copy
import socket
import struct
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from workbench.errors import ConfigError
from workbench.models.demo import DEMO_NAME, fix_smollm2_tokenizer, load_gguf_model, prepare_demo
from workbench.models.demo_moe import DEMO_MOE, load_demo_moe
from workbench.models.fingerprints import _cached_fingerprint
from workbench.models.memory import (
    _estimate_params,
    _gguf_dense_bytes,
    _safetensors_dense_bytes,
    check_fits_in_memory,
)
from workbench.models.size import SizeReport, size_report
from workbench.models.spec import _HF_ID, DTYPES, PICKLE_SUFFIXES, SHORT_DTYPE, TINY, ModelSpec
from workbench.progress import Progress, ProgressCallback, as_progress


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
            raise ConfigError(
                f"Model {spec.source!r} is a file; give a model folder, a .gguf file or a Hugging Face id."
            )
        safetensors, pickles = _folder_weights(path)
        if not (path / "config.json").is_file():
            raise ConfigError(
                f"Model {spec.source!r}: the folder has no config.json, so it is not a model folder."
            )
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
            source,
            dtype=dtype,
            use_safetensors=use_safetensors,
            **common,
            **({"device_map": spec.device} if spec.device != "cpu" else {}),
        )
    except ConfigError:
        raise
    except (OSError, ValueError, KeyError, RuntimeError, ImportError) as err:
        hint = (
            " (it may have only pickle weights: allow_pickle=True loads them if you trust it)"
            if use_safetensors and "safetensors" in str(err).lower()
            else ""
        )
        raise ConfigError(f"Could not load model {spec.source!r}: {_one_line(err)}{hint}") from None
    name = path.name if path.exists() else source
    return model, tokenizer, name


def _load_gguf(spec: ModelSpec, progress: Progress) -> tuple[Any, Any, str]:
    path = Path(spec.source).expanduser().resolve()
    if not path.is_file():
        raise ConfigError(f"Model {spec.source!r}: no GGUF file there. Check the path.")
    # Reads the header: a file cut short (interrupted download or copy) is refused here with its sizes, not
    # as the struct.error or "cannot reshape array" that reading its tensors would end in.
    check_fits_in_memory(_gguf_dense_bytes(path, DTYPES[spec.dtype]), repr(spec.source))
    progress.update(0.2, "dequantizing the GGUF")
    try:
        model, tokenizer = load_gguf_model(path, DTYPES[spec.dtype])
    except (OSError, ValueError, KeyError, RuntimeError, ImportError, struct.error) as err:
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
    elif spec.source == DEMO_MOE:  # the demo with its FFNs made into experts (workbench/models/demo_moe.py)
        model, tokenizer, name, stamp = load_demo_moe(spec, progress)
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
