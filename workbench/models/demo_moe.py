"""``"demo-moe"``: the demo model with every feed-forward block made into a Mixture-of-Experts block.

So that the expert slider works offline on a model with real language behind it. Built on first use from the
demo (SmolLM2-135M-Instruct) with the ``moefy`` technique at :data:`DEMO_MOE_SETTINGS` (CMoE-style carving, no
training: always-on shared neurons plus routed experts clustered by co-activation on the calibration part of
``python-docs``, a least-squares router), then cached under :func:`~workbench.models.demo.demo_home`:

- ``experts.safetensors``: the converted blocks' tensors only (the rest is the demo's own weights);
- ``moefy.json``: how it was made (settings, per-block plan, the demo's fingerprint, build seconds).

It loads at k = E, where it computes what the dense demo computes, so its own outputs are the dense reference
for KL divergence when the slider lowers k.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from workbench.models.demo import DEMO_NAME, demo_home
from workbench.progress import Progress

DEMO_MOE = "demo-moe"
DEMO_MOE_FOLDER = "smollm2-135m-instruct-moe"
DEMO_MOE_FILES = ("experts.safetensors", "moefy.json")
# The documented recipe (see docs/moe.md, "Dense to MoE"): 8 experts of 168 neurons plus 192 always-on neurons
# per 1536-neuron FFN, stored at k = 8 (lossless); the slider then chooses k.
DEMO_MOE_SETTINGS: dict[str, Any] = {
    "mode": "carve",
    "n_experts": 8,
    "top_k": 8,
    "shared_fraction": 0.125,
    "router": "regression",
    "calibration_tokens": 4096,
    "seed": 0,
}
# Bumped when the recipe or the file layout changes, so an older cached copy is rebuilt.
DEMO_MOE_VERSION = 1
_LOCK = threading.Lock()


def demo_moe_folder() -> Path:
    return demo_home() / DEMO_MOE_FOLDER


def demo_moe_info(folder: Path | None = None) -> dict[str, Any] | None:
    """What ``moefy.json`` says about the cached copy (None when there is none, or it is from another recipe)."""
    folder = folder or demo_moe_folder()
    try:
        info = json.loads((folder / "moefy.json").read_text())
    except (OSError, ValueError):
        return None
    ok = (
        info.get("version") == DEMO_MOE_VERSION
        and info.get("settings") == DEMO_MOE_SETTINGS
        and (folder / "experts.safetensors").is_file()
    )
    return info if ok else None


def describe(info: dict[str, Any]) -> str:
    """One line on how the model was made, for its description."""
    s = info["settings"]
    shared = sorted(set(info["plan"]["n_shared"]))
    width = sorted(set(info["plan"]["width"]))
    return (
        f"{DEMO_NAME} made into MoE: each FFN carved into {s['n_experts']} experts of "
        f"{'/'.join(map(str, width))} neurons + {'/'.join(map(str, shared))} shared, {s['router']} router, "
        f"from {s['calibration_tokens']} python-docs calibration tokens, no training; top-{s['top_k']}"
    )


def prepare_demo_moe(progress: Progress) -> Path:
    """Build the cached copy if it is missing (about a minute on 2 cores) and return its folder."""
    folder = demo_moe_folder()
    with _LOCK:
        if demo_moe_info(folder) is not None:
            return folder
        from safetensors.torch import save_file

        from workbench.corpus import get_corpus
        from workbench.models.loading import load_model
        from workbench.moefy import moe_blocks
        from workbench.techniques import ApplyContext, apply_, make_config

        t0 = time.perf_counter()
        progress.update(0.0, "loading the demo model to convert")
        dense = load_model("demo", progress=progress.span(0.0, 0.2))
        model = copy.deepcopy(dense.model)
        ctx = ApplyContext(
            tokenizer=dense.tokenizer,
            corpus=get_corpus("python-docs"),
            seed=DEMO_MOE_SETTINGS["seed"],
            progress=progress.span(0.2, 0.9),
        )
        progress.update(0.2, "building demo-moe (once): carving every feed-forward block into experts")
        model = apply_(model, make_config("moefy", **DEMO_MOE_SETTINGS), ctx)
        progress.check()
        progress.update(0.9, "saving demo-moe")
        prefixes = tuple(f"{name}." for name, _ in moe_blocks(model))
        tensors = {k: v.contiguous() for k, v in model.state_dict().items() if k.startswith(prefixes)}
        info = {
            "version": DEMO_MOE_VERSION,
            "settings": DEMO_MOE_SETTINGS,
            "plan": ctx.extras["moefy"]["plan"],
            "source": DEMO_NAME,
            "source_fingerprint": dense.fingerprint,
            "build_seconds": round(time.perf_counter() - t0, 1),
            "active_ffn_fraction": ctx.metrics["active_ffn_fraction"],
        }
        home = demo_home()
        home.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=home, prefix=f".{DEMO_MOE_FOLDER}-"))
        try:
            save_file(tensors, str(tmp / "experts.safetensors"))
            (tmp / "moefy.json").write_text(json.dumps(info, indent=1))
            tmp.chmod(0o755)
            if folder.exists():
                shutil.rmtree(folder, ignore_errors=True)  # another recipe's copy
            os.replace(tmp, folder)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        progress.update(1.0, "demo-moe ready")
        return folder


def load_demo_moe(spec: Any, progress: Progress) -> tuple[Any, Any, str, list[Path]]:
    """(model, tokenizer, description name, weight files): the demo (in ``spec.dtype``) with its MLPs replaced
    by the cached experts."""
    from safetensors.torch import load_file

    from workbench.models.loading import load_model
    from workbench.models.spec import ModelSpec
    from workbench.moefy import Plan, build_structure_

    folder = prepare_demo_moe(progress.span(0.0, 0.8))
    info = demo_moe_info(folder)
    dense = load_model(ModelSpec("demo", dtype=spec.dtype), progress=progress.span(0.8, 0.85))
    progress.update(0.85, "assembling demo-moe")
    model = copy.deepcopy(dense.model)  # the cached demo stays dense
    build_structure_(model, Plan.from_dict(info["plan"]))
    tensors = load_file(str(folder / "experts.safetensors"))
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    missing = [k for k in missing if ".mlp." in k]
    if missing or unexpected:
        raise RuntimeError(
            f"demo-moe at {folder} does not match its plan (missing {missing[:3]}, unexpected "
            f"{unexpected[:3]}); delete the folder to rebuild it."
        )
    return model.eval(), dense.tokenizer, describe(info), [folder / "experts.safetensors"]


__all__ = [
    "DEMO_MOE",
    "DEMO_MOE_FILES",
    "DEMO_MOE_FOLDER",
    "DEMO_MOE_SETTINGS",
    "DEMO_MOE_VERSION",
    "demo_moe_folder",
    "demo_moe_info",
    "describe",
    "load_demo_moe",
    "prepare_demo_moe",
]
