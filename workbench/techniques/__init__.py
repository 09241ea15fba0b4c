"""Techniques: one file each, registered by name in :mod:`workbench.techniques.base` at import."""

from __future__ import annotations

import importlib
from collections.abc import Iterable

from workbench.techniques.base import (
    ApplyContext,
    FieldInfo,
    apply_,
    apply_pipeline_,
    check,
    config_from_dict,
    config_label,
    config_to_dict,
    describe_fields,
    describe_pipeline,
    get_technique,
    make_config,
    pipeline_from_json,
    pipeline_key,
    pipeline_to_json,
    register,
    setting_label,
    technique_names,
)

# Built-in technique modules; each registers itself when imported. Every module listed must import: a missing
# or broken one is an error naming it, never a technique that silently is not there. (Optional back ends are
# not a reason to fail: bnb and quanto import bitsandbytes/optimum-quanto only when used, and their checks say
# what to install.) A new technique file is added here.
BUILTIN = (
    "rtn",
    "gptq",
    "awq",
    "bnb",
    "quanto",
    "mixed",
    "prune_layers",
    "distill",
    "route",
    "moefy",
    "prune_experts",
    "balance_experts",
)


# Runtimes (kind "deploy", the last step of a pipeline) live with their exporters in workbench/runtimes/.
RUNTIME_MODULES: tuple[str, ...] = ("workbench.runtimes.llamacpp", "workbench.runtimes.torch_packed")


def _import_builtin(names: Iterable[str]) -> None:
    for name in names:
        module = name if "." in name else f"{__name__}.{name}"
        try:
            importlib.import_module(module)
        except ImportError as err:
            raise ImportError(
                f"Built-in technique module {module!r} failed to import: {err}. It is listed in "
                f"workbench/techniques/__init__.py; restore the module, or remove it from BUILTIN there.",
                name=module,
            ) from err


_import_builtin(BUILTIN + RUNTIME_MODULES)

__all__ = [
    "BUILTIN",
    "ApplyContext",
    "FieldInfo",
    "apply_",
    "apply_pipeline_",
    "check",
    "config_from_dict",
    "config_label",
    "config_to_dict",
    "describe_fields",
    "describe_pipeline",
    "get_technique",
    "make_config",
    "pipeline_from_json",
    "pipeline_key",
    "pipeline_to_json",
    "register",
    "setting_label",
    "technique_names",
]
