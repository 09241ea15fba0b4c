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
import math
import os
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass
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


# What demo-moe of this recipe (DEMO_MOE_VERSION, DEMO_MOE_SETTINGS) measured, shown where the registry has no run
# of it yet. Not computed here: copied from one run of the bench command below (docs/moe.md, "Measured"), so a
# changed recipe drops it (quality_summary checks version and settings).
DEMO_MOE_MEASURED: dict[str, Any] = {
    "version": 1,
    "settings": dict(DEMO_MOE_SETTINGS),
    "command": ".venv/bin/python bench/moe_routing.py --threads 1 --chunks 8",
    "recovery": "the '+ distill' rows with --ks K --recover-steps 12 --recover-ks K added (12 steps of 2 × 128 "
    "training tokens at that k, lr 1e-4)",
    "text": "8 chunks of 512 tokens of python-docs (evaluation part), second-half scoring",
    "dense_ppl": 11.919,
    # (label, k, perplexity, mean KL against the dense demo); "+ distill": recovered by route k → distill
    "points": [
        ("k = 8", 8, 11.919, 0.0),
        ("k = 6", 6, 15.288, 0.296),
        ("k = 6 + distill 12 steps", 6, 14.684, 0.267),
        ("k = 4", 4, 28.847, 0.946),
        ("k = 4 + distill 12 steps", 4, 22.616, 0.715),
        ("k = 2", 2, 148.8, 2.539),
    ],
}


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


@dataclass(frozen=True)
class QualityPoint:
    """One measured setting of a converted model: ``k``, its FFN active fraction, perplexity, the change against
    the reference (a fraction: 0.28 is +28%; None without a reference), mean KL against it, and the run it comes
    from (None: the shipped table)."""

    label: str
    k: int
    ffn_active: float
    ppl: float
    delta_ppl: float | None
    kl_mean: float | None
    run_id: int | None = None


@dataclass(frozen=True)
class MoeSummary:
    """How a converted model was made and how good it is, for the Route tab (rendered there, decided here).

    ``recipe``: (what, value) rows; ``points``: measured settings, fewest experts last; ``source``: ``"registry"``
    (the user's own runs on the current suite), ``"shipped"`` (:data:`DEMO_MOE_MEASURED`) or ``""`` (nothing
    measured yet); ``note``: where the numbers come from, in a sentence.
    """

    recipe: tuple[tuple[str, str], ...]
    points: tuple[QualityPoint, ...]
    source: str
    note: str


def _recipe_rows(recipe: dict[str, Any], info: dict[str, Any] | None) -> list[tuple[str, str]]:
    def join(values: list[int]) -> str:
        return "/".join(map(str, values))

    upcycled = recipe["mode"] == "upcycle"
    rows = [
        ("made by", f"moefy {recipe['mode']}" + (f" of {info['source']}" if info else "") + ", no training"),
        ("experts per FFN", join(recipe["n_experts"]) + f" in each of {recipe['blocks']} layers"),
        ("neurons per expert", join(recipe["width"]) + (" (whole copies of the MLP)" if upcycled else "")),
    ]
    if not upcycled:
        rows.append(("shared neurons", join(recipe["n_shared"]) + " (always on)"))
    rows.append(("router", recipe["router"]))
    if info:
        s = info["settings"]
        rows.append(("calibration", f"{s['calibration_tokens']} tokens of python-docs (calibration part)"))
        rows.append(("seed", str(s["seed"])))
        if info.get("build_seconds") is not None:
            rows.append(("build", f"{info['build_seconds']:.0f} s"))
    rows.append(("k now", join(recipe["top_k"])))
    return rows


def _number(value: Any) -> bool:
    """A finite number (a frame cell is NaN or None where a run lacks the metric)."""
    return isinstance(value, (int, float)) and math.isfinite(value)


def _plain_route_k(steps: list[dict[str, Any]]) -> int | None:
    """The k of a pipeline that is one fixed-k ``route`` step (nothing else changed), else None."""
    if len(steps) != 1 or steps[0].get("technique") != "route":
        return None
    params = steps[0].get("params") or {}
    dynamic = any(params.get(name) is not None for name in ("top_p", "skip_beta", "budget"))
    if dynamic or params.get("k_per_layer") or params.get("renormalize", "model") != "model":
        return None
    k = params.get("k")
    return int(k) if isinstance(k, int) else None


def _registry_points(recipe: dict[str, Any], runs: Any) -> tuple[list[QualityPoint], float | None]:
    """Fixed-k ``route`` runs, and ``route k → distill`` recoveries, of the loaded model in ``runs`` (a runs frame,
    newest last: the newest run of a setting wins), with the baseline's perplexity as the reference."""
    from workbench.moefy import ffn_fraction_at

    if runs is None or len(runs) == 0 or "metric_ppl" not in runs.columns:
        return [], None
    reference = None
    found: dict[tuple[int, str], QualityPoint] = {}
    for row in runs.itertuples(index=False):
        steps = json.loads(row.pipeline_json or "[]")
        ppl = getattr(row, "metric_ppl", None)
        if not _number(ppl):
            continue
        if not steps:
            reference = float(ppl)
            continue
        k = _plain_route_k(steps)
        label = ""
        if k is None and len(steps) == 2 and steps[1].get("technique") == "distill":
            k = _plain_route_k(steps[:1])
            budget = {key: steps[1]["params"].get(key) for key in ("steps", "tokens", "seconds")}
            label = " + distill " + ", ".join(f"{v:g} {key}" for key, v in budget.items() if v)
        if k is None:
            continue
        kl = getattr(row, "metric_kl_mean", None)
        found[(k, label)] = QualityPoint(
            f"k = {k}{label}",
            k,
            ffn_fraction_at(recipe, k),
            float(ppl),
            None,
            float(kl) if _number(kl) else None,
            int(row.run_id),
        )
    points = sorted(found.values(), key=lambda p: (-p.k, p.label))
    if reference is not None:
        points = [
            QualityPoint(p.label, p.k, p.ffn_active, p.ppl, p.ppl / reference - 1, p.kl_mean, p.run_id)
            for p in points
        ]
    return points, reference


def _same_shapes(recipe: dict[str, Any], info: dict[str, Any]) -> bool:
    """Whether the model's blocks are the ones ``moefy.json`` describes (experts, widths, shared neurons)."""
    plan = info["plan"]
    return (
        recipe["n_experts"] == [int(plan["n_experts"])]
        and recipe["width"] == sorted(set(plan["width"]))
        and recipe["n_shared"] == sorted(set(plan["n_shared"]))
        and recipe["blocks"] == len(plan["width"])
    )


def quality_summary(model: Any, *, source: str = "", runs: Any = None) -> MoeSummary | None:
    """The recipe and measured quality of a model converted by ``moefy`` (None for any other model).

    ``source``: the loaded model's spec; for ``"demo-moe"`` whose blocks are the cached copy's, what its
    ``moefy.json`` says (calibration, seed, build time) and the shipped table are added;
    ``runs``: the registry's runs of this model on the current suite (``runs_frame``). The user's own fixed-k
    ``route`` runs (and ``route → distill`` recoveries) are shown when there are any, with Δppl against the
    baseline run (the model as loaded); otherwise, for ``demo-moe`` of the current recipe, the shipped table
    measured by ``bench/moe_routing.py``.
    """
    from workbench.moefy import conversion_recipe, ffn_fraction_at

    recipe = conversion_recipe(model)
    if recipe is None:
        return None
    info = demo_moe_info() if source == DEMO_MOE else None
    if info is not None and not _same_shapes(recipe, info):
        info = None  # not the cached copy of this recipe: its moefy.json says nothing about this model
    rows = tuple(_recipe_rows(recipe, info))
    points, reference = _registry_points(recipe, runs)
    if points:
        kl = "KL against the model as loaded" + (
            " (at k = E: the dense model's outputs)" if recipe["top_k"] == recipe["n_experts"] else ""
        )
        if reference is not None:
            note = f"Measured by your runs on this suite; Δppl against its baseline run, {kl}."
        else:
            note = f"Measured by your runs on this suite; {kl}; run the baseline to see Δppl."
        return MoeSummary(rows, tuple(points), "registry", note)
    shipped = DEMO_MOE_MEASURED
    if (
        info is not None
        and shipped["version"] == DEMO_MOE_VERSION
        and shipped["settings"] == DEMO_MOE_SETTINGS
    ):
        dense = shipped["dense_ppl"]
        table = tuple(
            QualityPoint(label, k, ffn_fraction_at(recipe, k), ppl, ppl / dense - 1, kl)
            for label, k, ppl, kl in shipped["points"]
        )
        note = (
            f"Measured by {shipped['command']} on {shipped['text']} (dense perplexity {dense:g}); "
            f"{shipped['recovery']}. Run a k here to measure it on this suite."
        )
        return MoeSummary(rows, table, "shipped", note)
    return MoeSummary(rows, (), "", "Nothing measured yet: run a k (or Run as sweep) to measure quality.")


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
    "DEMO_MOE_MEASURED",
    "DEMO_MOE_SETTINGS",
    "DEMO_MOE_VERSION",
    "MoeSummary",
    "QualityPoint",
    "demo_moe_folder",
    "demo_moe_info",
    "describe",
    "load_demo_moe",
    "prepare_demo_moe",
    "quality_summary",
]
