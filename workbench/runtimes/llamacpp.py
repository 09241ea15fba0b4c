"""The llama.cpp runtime (through llama-cpp-python) and llama.cpp's own quantizer, as a pipeline's last step.

``LlamaCppConfig(quant="exact")`` exports the variant the earlier steps made to a bit-exact GGUF file
(``workbench.runtimes.gguf``) and runs it in llama.cpp; ``quant="Q4_K_M"`` (or any type this llama.cpp build
quantizes to) exports the variant in F32 and converts it with ``llama_model_quantize``, so llama.cpp's own
formats are points on the user's plot, measured on the user's text next to GPTQ and AWQ.

The step returns :class:`LlamaCppModule`, a torch module whose forward gives llama.cpp's logits, so the
ordinary evaluation scores it on the *same token ids* as the workbench's suite (NLL and KL against the base
model's stored outputs, every scored position) and measures prefill and decode tokens/s in llama.cpp. Each
chunk is evaluated from an empty KV cache, as ``llama-perplexity`` does. llama.cpp quantizes activations to 8
bits for its quantized dot products, so a quantized file's perplexity differs from the simulation by a little
(a few tenths of a percent); an F32 file agrees with the workbench to float rounding.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import shutil
import tempfile
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from workbench.errors import ConfigError
from workbench.runtimes.gguf import FLOAT_TYPES, HF_ARCHS, GGUFExport, export_gguf, gguf_size
from workbench.techniques.base import ApplyContext, register, register_stacking

INSTALL_HINT = (
    "llama-cpp-python is not installed: `make setup` installs it, or `pip install llama-cpp-python` (it builds "
    "llama.cpp from source, several minutes once)."
)


def llama_cpp_available() -> bool:
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return False
    return True


def quantizer_types() -> list[str]:
    """The file types this llama.cpp build's quantizer writes (``Q4_K_M``, ``Q3_K_M``, ``IQ4_XS``, …)."""
    import llama_cpp

    prefix = "LLAMA_FTYPE_MOSTLY_"
    return sorted(n[len(prefix) :] for n in dir(llama_cpp) if n.startswith(prefix))


def _field(help_text: str, default: Any) -> Any:
    return field(default=default, metadata={"help": help_text})


@dataclass(frozen=True)
class LlamaCppConfig:
    """Run the variant in llama.cpp: an exact GGUF export, or llama.cpp's own quantizer on the float export."""

    quant: str = _field(
        "'exact': write the variant's weights bit for bit (Q4_0/Q4_1/Q5_0/Q5_1/Q8_0 where they fit, F32 "
        "otherwise); 'F32': every weight in F32 (the fidelity reference); a llama.cpp type such as Q4_K_M, Q3_K_M, Q2_K, Q5_K_M, Q6_K, IQ4_XS: export F32, then "
        "llama.cpp's quantizer converts it",
        "exact",
    )
    float_type: str = _field("type of the weights no quantizer touched: F32 (exact), F16 or BF16", "F32")
    threads: int = _field("llama.cpp threads; 0: as many as torch uses (the same as the workbench)", 0)

    RUNTIME: ClassVar[str] = "llama.cpp"
    technique: ClassVar[str] = "llama_cpp"
    # What a front end's runtime choice offers (workbench.runtimes.runtime_choices): the exact export, and
    # llama.cpp's own conversion for variants no GGUF type holds exactly.
    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {
        "llama.cpp": {},
        "llama.cpp Q4_0": {"quant": "Q4_0"},
        "llama.cpp Q4_1": {"quant": "Q4_1"},
        "llama.cpp Q8_0": {"quant": "Q8_0"},
    }

    def label(self) -> str:
        return "llama.cpp" if self.quant == "exact" else f"llama.cpp {self.quant}"


def check_llama_cpp(model: Any, config: LlamaCppConfig) -> None:
    if not llama_cpp_available():
        raise ConfigError(f"llama_cpp: {INSTALL_HINT}")
    if config.float_type not in FLOAT_TYPES:
        raise ConfigError(
            f"llama_cpp: float_type={config.float_type!r}; choose one of {', '.join(FLOAT_TYPES)}."
        )
    if config.quant not in ("exact", "F32"):
        known = quantizer_types()
        if config.quant not in known:
            raise ConfigError(
                f"llama_cpp: quant={config.quant!r} is not a type this llama.cpp build writes. Choose 'exact', "
                f"'F32' or one of: {', '.join(known)}."
            )
    if not isinstance(config.threads, int) or config.threads < 0:
        raise ConfigError(f"llama_cpp: threads={config.threads!r}; give 0 (as torch) or a positive number.")
    model_type = getattr(getattr(model, "config", None), "model_type", "")
    if model_type not in HF_ARCHS:
        raise ConfigError(
            f"llama_cpp: the exporter does not write {model_type!r} models ({', '.join(sorted(HF_ARCHS))}). "
            f"Export a safetensors folder and convert it with llama.cpp's convert_hf_to_gguf.py."
        )


def _quiet() -> Any:
    """llama.cpp prints its loading and quantizing logs to stderr; a panel or a test wants none of that."""
    try:
        from llama_cpp._utils import suppress_stdout_stderr

        return suppress_stdout_stderr(disable=False)
    except Exception:  # noqa: BLE001 (a missing helper only means the logs show)
        return contextlib.nullcontext()


def quantize_file(src: Path, dst: Path, quant: str, threads: int = 0) -> None:
    """llama.cpp's quantizer (``llama_model_quantize``): ``src`` (F32/F16 GGUF) -> ``dst`` in type ``quant``."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{quant}")
    params.nthread = threads or torch.get_num_threads()
    with _quiet():
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if rc != 0 or not dst.is_file():
        raise ConfigError(f"llama.cpp's quantizer failed converting {src.name} to {quant} (code {rc}).")


def gguf_tensor_types(path: Path) -> dict[str, str]:
    import gguf

    return {t.name: t.tensor_type.name for t in gguf.GGUFReader(path).tensors}


@contextlib.contextmanager
def _model_params(*, extra_buffers: bool) -> Any:
    """Model parameters llama-cpp-python's ``Llama`` does not expose: ``use_extra_bufts`` (llama.cpp's
    repacked and AMX weight buffers) off when this machine cannot run them."""
    import llama_cpp.llama as high_level

    original = high_level.llama_cpp.llama_model_default_params

    def params() -> Any:
        p = original()
        p.use_extra_bufts = bool(extra_buffers)
        return p

    high_level.llama_cpp.llama_model_default_params = params
    try:
        yield
    finally:
        high_level.llama_cpp.llama_model_default_params = original


_PROBE = r"""
import sys
from llama_cpp import Llama
llm = Llama(model_path=sys.argv[1], n_ctx=64, n_batch=64, n_ubatch=64, logits_all=True, verbose=False)
llm.eval(list(range(1, 33)))
print("ok")
"""


@functools.cache
def extra_buffers_work() -> bool:
    """Whether llama.cpp's extra weight buffers (repacked layouts, AMX tiles) run on this machine.

    On some machines (CPUs that report AMX inside sandboxes that do not grant its state) decoding a quantized
    model with them crashes the process. A child process tries once, on a tiny Q4_0 file; the answer is kept
    beside the runtime files for this llama.cpp build and CPU. ``WORKBENCH_LLAMA_EXTRA_BUFFERS=0/1`` decides.
    """
    import json
    import os
    import platform
    import subprocess
    import sys

    forced = os.environ.get("WORKBENCH_LLAMA_EXTRA_BUFFERS", "").strip()
    if forced in ("0", "1"):
        return forced == "1"
    import llama_cpp

    from workbench.models.demo import demo_home

    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        cpu = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")), "")
    except OSError:
        cpu = platform.processor()
    build = llama_cpp.llama_print_system_info().decode(errors="replace")  # the kernels this build has (AMX…)
    key = f"{llama_cpp.__version__}|{build}|{cpu}|{platform.node()}"
    memo = demo_home() / "runtime" / "llama-extra-buffers.json"
    try:
        known = json.loads(memo.read_text())
        if known.get("key") == key:
            return bool(known["ok"])
    except (OSError, ValueError, KeyError):
        pass
    folder = Path(tempfile.mkdtemp(prefix="wb-llama-probe-"))
    try:
        from workbench.techniques._quant import fake_quantize_, mark_quantized
        from workbench.tiny import byte_tokenizer, tiny_llama

        model = tiny_llama(hidden_size=256, layers=1)
        for module in model.modules():
            if isinstance(module, nn.Linear) and module is not model.lm_head:
                fake_quantize_(module.weight.data, 4, 32, True)
                mark_quantized(module, 4, 32, True, "float", "rtn")
        export_gguf(model, folder / "probe.gguf", tokenizer=byte_tokenizer())
        result = subprocess.run(
            [sys.executable, "-c", _PROBE, str(folder / "probe.gguf")],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        ok = result.returncode == 0 and "ok" in result.stdout
    except (OSError, subprocess.TimeoutExpired):
        ok = False
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    try:
        memo.parent.mkdir(parents=True, exist_ok=True)
        memo.write_text(json.dumps({"key": key, "ok": ok}))
    except OSError:
        pass
    return ok


@dataclass
class _Past:
    """Stands for the KV cache llama.cpp holds: how many positions it has seen."""

    n: int


@dataclass
class _Out:
    logits: torch.Tensor
    past_key_values: _Past | None = None


class LlamaCppModule(nn.Module):
    """A GGUF file running in llama.cpp, seen as a causal LM: ``forward(input_ids)`` gives llama.cpp's logits.

    Two llama.cpp contexts share the memory-mapped weights: one keeps the logits of every position (scoring,
    ``use_cache=False``), one only the last (prefill/decode speed and generations, ``use_cache=True``), so
    measured speed does not pay for logits the user would never compute.
    """

    def __init__(
        self, path: Path, *, vocab_size: int, threads: int = 0, report: GGUFExport | None = None
    ) -> None:
        super().__init__()
        self.path = Path(path)
        self.threads = threads or torch.get_num_threads()
        self.config = SimpleNamespace(vocab_size=vocab_size, model_type="llama.cpp")
        self.report = report
        self._scorer: Any = None
        self._runner: Any = None

    def _llama(self, n_ctx: int, logits_all: bool) -> Any:
        from llama_cpp import Llama

        n_ctx = max(64, int(np.ceil(n_ctx / 64) * 64))
        try:
            with _quiet():
                return self._open(Llama, n_ctx, logits_all)
        except ValueError as err:
            raise ConfigError(
                f"llama.cpp could not load {self.path.name} ({err}). Run it with llama.cpp's own tools to see "
                f"its log: llama-cli -m {self.path}"
            ) from None

    def _open(self, Llama: Any, n_ctx: int, logits_all: bool) -> Any:
        with _model_params(extra_buffers=extra_buffers_work()):
            return Llama(
                model_path=str(self.path),
                n_ctx=n_ctx,
                n_batch=n_ctx if logits_all else min(n_ctx, 512),
                n_ubatch=n_ctx if logits_all else min(n_ctx, 512),
                n_threads=self.threads,
                n_threads_batch=self.threads,
                logits_all=logits_all,
                verbose=False,
            )

    def _scoring(self, n: int) -> Any:
        if self._scorer is None or self._scorer.n_ctx() < n:
            self._scorer = None
            self._scorer = self._llama(n, True)
        return self._scorer

    def _running(self, n: int) -> Any:
        if self._runner is None or self._runner.n_ctx() < n:
            self._runner = None
            self._runner = self._llama(max(n, 1024), False)
        return self._runner

    def _row_logits(self, row: list[int]) -> np.ndarray:
        llm = self._scoring(len(row))
        llm.reset()
        llm.eval(row)
        return llm.scores[: len(row)]

    def wb_scored_logits(self, ids: torch.Tensor, start: int) -> torch.Tensor:
        """Logits at positions ``start .. T-2`` of every row, as ``(B * T', V)`` float32 (see scoring.py)."""
        rows = [torch.from_numpy(np.array(self._row_logits(r.tolist())[start:-1])) for r in ids]
        return torch.cat(rows, 0)

    def forward(
        self, input_ids: torch.Tensor, use_cache: bool = False, past_key_values: _Past | None = None, **_: Any
    ) -> _Out:
        if not use_cache:
            rows = [torch.from_numpy(np.array(self._row_logits(r.tolist()))) for r in input_ids]
            return _Out(torch.stack(rows, 0))
        if input_ids.shape[0] != 1:
            raise ValueError("llama.cpp runs one sequence at a time with a cache.")
        tokens = input_ids[0].tolist()
        seen = past_key_values.n if past_key_values is not None else 0
        llm = self._running(seen + len(tokens) + 64)
        if past_key_values is None or llm.n_tokens != seen:
            llm.reset()
            if past_key_values is not None:
                raise ValueError("The llama.cpp context was reused by another sequence; start again.")
        llm.eval(tokens)
        last = np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(self.config.vocab_size,))
        logits = torch.from_numpy(np.array(last, dtype=np.float32)).view(1, 1, -1)
        return _Out(logits, _Past(llm.n_tokens))

    def wb_size_report(self) -> Any:
        """Sizes from the file itself: every tensor's bytes as llama.cpp stores them."""
        import gguf

        from workbench.models.size import SizeReport

        reader = gguf.GGUFReader(self.path)
        n_bytes = n_params = lin_bytes = lin_params = 0
        for t in reader.tensors:
            n_bytes += int(t.n_bytes)
            n_params += int(t.n_elements)
            weight = t.name.startswith("blk.") and t.name.endswith(".weight") and len(t.shape) >= 2
            if weight and not t.name.split(".")[2].startswith("ffn_gate_inp"):  # routers are not linear
                lin_bytes += int(t.n_bytes)
                lin_params += int(t.n_elements)
        return SizeReport(
            n_params=n_params,
            n_bytes=n_bytes,
            bits_per_weight=8 * n_bytes / max(n_params, 1),
            linear_params=lin_params,
            linear_bytes=lin_bytes,
            bits_per_weight_linear=8 * lin_bytes / max(lin_params, 1),
        )

    def close(self) -> None:
        self._scorer = self._runner = None

    def __deepcopy__(self, memo: dict[int, Any]) -> LlamaCppModule:
        return LlamaCppModule(
            self.path, vocab_size=self.config.vocab_size, threads=self.threads, report=self.report
        )


def _work_folder() -> Path:
    """A folder for one runtime step's files, named after this process: a process killed before its cleanup
    leaves it behind, and the next step removes such leftovers (a GGUF file of the demo is 90–540 MB)."""
    from workbench.models.demo import demo_home
    from workbench.tempdirs import owned_tempdir, remove_leftovers

    root = demo_home() / "runtime"
    root.mkdir(parents=True, exist_ok=True)
    remove_leftovers(root, "llama-cpp-")
    return owned_tempdir(root, "llama-cpp-")


def export_for_llama_cpp(
    model: nn.Module, config: LlamaCppConfig, *, tokenizer: Any, spec: Any, folder: Path, progress: Any = None
) -> tuple[Path, GGUFExport | None]:
    """The GGUF file the step runs: the exact export, or llama.cpp's conversion of the F32 export."""
    if config.quant in ("exact", "F32"):
        report = export_gguf(
            model,
            folder / "model.gguf",
            tokenizer=tokenizer,
            spec=spec,
            float_type=config.float_type if config.quant == "exact" else "F32",
            detect=config.quant == "exact",
            packed=config.quant == "exact",
            progress=progress,
        )
        return report.path, report
    f32 = export_gguf(
        model,
        folder / "model-f32.gguf",
        tokenizer=tokenizer,
        spec=spec,
        float_type="F32",
        detect=False,
        packed=False,
        progress=progress,
    )
    out = folder / f"model-{config.quant}.gguf"
    quantize_file(f32.path, out, config.quant, config.threads)
    f32.path.unlink(missing_ok=True)  # only the converted file is run
    return out, None


@register("llama_cpp", LlamaCppConfig, kind="deploy", check=check_llama_cpp)
def _apply_llama_cpp(model: nn.Module, config: LlamaCppConfig, ctx: ApplyContext) -> LlamaCppModule:
    """Export (bit-exact, or through llama.cpp's quantizer) and return the module that runs in llama.cpp."""
    folder = _work_folder()
    try:
        path, report = export_for_llama_cpp(
            model, config, tokenizer=ctx.tokenizer, spec=ctx.model_spec, folder=folder, progress=ctx.progress
        )
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    module = LlamaCppModule(
        path, vocab_size=int(model.config.vocab_size), threads=config.threads, report=report
    )
    weakref.finalize(module, shutil.rmtree, folder, True)  # the file lives as long as the module runs it
    n_bytes, n_params = gguf_size(path)
    types = report.type_counts() if report is not None else _counts(gguf_tensor_types(path))
    ctx.extras["gguf"] = {"types": types, "file_bytes": path.stat().st_size, "quant": config.quant}
    ctx.metrics["gguf_file_mb"] = path.stat().st_size / 1e6
    ctx.metrics["gguf_bits_per_weight"] = 8 * n_bytes / max(n_params, 1)
    return module


def _counts(types: dict[str, str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for t in types.values():
        out[t] = out.get(t, 0) + 1
    return dict(sorted(out.items()))


# The step holds a llama.cpp context: its result is never kept for reuse by a later run.
register_stacking(LlamaCppConfig, same_shapes=True, cacheable=False)


__all__ = [
    "INSTALL_HINT",
    "LlamaCppConfig",
    "LlamaCppModule",
    "export_for_llama_cpp",
    "gguf_tensor_types",
    "llama_cpp_available",
    "quantize_file",
    "quantizer_types",
]
