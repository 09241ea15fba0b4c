"""A trained student as a normal Hugging Face folder (safetensors, config, tokenizer) and back as a model spec."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from workbench.errors import ConfigError


def save_student(model: Any, tokenizer: Any, folder: str | Path) -> Path:
    """Write ``model`` (safetensors weights and config) and ``tokenizer`` into ``folder``; returns the folder.

    ``transformers.AutoModelForCausalLM.from_pretrained(folder)`` loads it anywhere, and
    :func:`student_spec` (``load_model(folder)``) loads it into the workbench. Tied embeddings stay tied.
    """
    folder = Path(folder).expanduser()
    folder.mkdir(parents=True, exist_ok=True)
    if not hasattr(model, "save_pretrained"):
        raise ConfigError(
            f"{type(model).__name__} is not a Hugging Face model; only those save as a model folder."
        )
    model.save_pretrained(folder, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    return folder


def student_spec(folder: str | Path) -> Any:
    """The :class:`~workbench.models.ModelSpec` of a saved student folder (refused if it is not one)."""
    from workbench.models import ModelSpec

    folder = Path(folder).expanduser()
    if not (folder / "config.json").is_file() or not list(folder.glob("*.safetensors")):
        raise ConfigError(
            f"{folder} is not a saved student (config.json and *.safetensors); save it with "
            "save_student(model, tokenizer, folder) first."
        )
    return ModelSpec(str(folder.resolve()))


__all__ = ["save_student", "student_spec"]
