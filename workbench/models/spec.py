"""Model specs: what to load ("demo", "tiny-llama", "tiny-moe", a Hugging Face id, a folder or a .gguf file)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch

from workbench.errors import ConfigError

TINY = ("tiny-llama", "tiny-moe")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SHORT_DTYPE = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
_HF_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass(frozen=True)
class ModelSpec:
    """What to load. ``source``: "demo", "tiny-llama", "tiny-moe", a Hugging Face id, a folder or a .gguf file."""

    source: str
    dtype: str = "float32"
    device: str = "cpu"
    revision: str | None = None
    trust_remote_code: bool = False  # never run a repository's code unless the user says so
    allow_pickle: bool = (
        False  # safetensors only, unless the user accepts pickle checkpoints (they can run code)
    )

    def __post_init__(self) -> None:
        if not isinstance(self.source, str) or not self.source.strip():
            raise ConfigError(
                "No model given. Use 'demo', a Hugging Face id (org/name), a folder or a .gguf file."
            )
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
        return "|".join(
            [
                source,
                self.dtype,
                self.device,
                self.revision or "",
                f"remote={int(self.trust_remote_code)}",
                f"pickle={int(self.allow_pickle)}",
            ]
        )
