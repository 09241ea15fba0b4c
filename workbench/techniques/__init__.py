"""Techniques: one file each, registered by name in :mod:`workbench.techniques.base` at import."""

from __future__ import annotations

import importlib

from workbench.techniques.base import (
    ApplyContext,
    apply_,
    apply_pipeline_,
    check,
    config_from_dict,
    config_to_dict,
    describe_pipeline,
    get_technique,
    make_config,
    pipeline_from_json,
    pipeline_key,
    pipeline_to_json,
    register,
    technique_names,
)

# Built-in technique modules; each registers itself when imported. A module listed here that is missing is
# skipped so the package imports while techniques are added one file at a time.
_BUILTIN = ("rtn", "gptq", "awq", "hqq", "bnb", "quanto", "mixed", "moe", "distill")
for _name in _BUILTIN:
    try:
        importlib.import_module(f"workbench.techniques.{_name}")
    except ModuleNotFoundError as _err:
        if _err.name != f"workbench.techniques.{_name}":
            raise

__all__ = [
    "ApplyContext",
    "apply_",
    "apply_pipeline_",
    "check",
    "config_from_dict",
    "config_to_dict",
    "describe_pipeline",
    "get_technique",
    "make_config",
    "pipeline_from_json",
    "pipeline_key",
    "pipeline_to_json",
    "register",
    "technique_names",
]
