"""The fit planner: memory of a variant at a context and batch, the devices it fits, its extrapolation.

Arithmetic first (published configs, the KV formula, MoE totals), then the same planner on runs recorded
through the real library on the tiny models, the command line and the widget.
"""

from __future__ import annotations

import copy
import dataclasses
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from _require import require

from workbench.errors import ConfigError
from workbench.evaluate import Suite
from workbench.fit import (
    GIB,
    KV_BYTES,
    REFERENCES,
    architecture_for,
    architecture_from_config,
    extrapolate,
    fit_frame,
    fit_table,
    match_reference,
    moe_what_if,
    parse_devices,
    plan_fit,
    reference,
    scale_bits,
    weight_bytes,
)

# A few tokens per run: the planner reads only size metrics, and these runs must be quick.
SUITE = Suite("fit-test", n_tokens=256, context_length=64, n_generations=0, speed=False)
MIB = 1 << 20


# ---- the seeds' arithmetic ------------------------------------------------------------------------------


def test_seven_billion_weights_at_16_and_4_bits():
    assert weight_bytes(7e9, 16) == 14e9  # 14 GB
    assert weight_bytes(7e9, 4) == 3.5e9  # 3.5 GB of 4-bit codes
    assert scale_bits(32) == 0.5  # one fp16 scale per 32 weights
    assert weight_bytes(7e9, 4 + scale_bits(32)) == pytest.approx(3.9375e9)
    assert scale_bits(32, 16, zero_bits=16) == 1.0  # a float minimum as well (Q4_1-style)


def test_llama2_7b_at_16_and_4_bits_from_its_config():
    arch = reference("Llama-2-7B")
    assert arch.counts().total == 6_738_415_616  # the published parameter count
    at16 = plan_fit(arch, weight_bits=16)
    assert at16.weights_bytes == 2 * 6_738_415_616
    assert at16.weights_bytes == pytest.approx(14e9, rel=0.04)  # "7B at 16 bits: 14 GB"
    # A 4-bit group-32 variant with fp16 scales (4.5 bits) and a 16-bit embedding and head.
    variant = dataclasses.replace(plan_fit(arch, weight_bits=16), bits_linear=4.5, bits_other=16.0)
    (at4,) = extrapolate(variant, ["Llama-2-7B"])
    counts = arch.counts()
    assert at4.weights_bytes == pytest.approx(counts.linear * 4.5 / 8 + counts.other * 2)
    assert 3.5e9 < at4.weights_bytes < 4.5e9  # codes 3.5 GB + scales 0.4 GB + embeddings at 16 bits
    assert at4.estimate and at4.total_bytes > at4.weights_bytes + at4.kv_bytes


@pytest.mark.parametrize(
    ("name", "billions"),
    [
        ("Llama-3.2-1B", 1.24),
        ("Llama-3.1-8B", 8.03),
        ("Llama-3.1-70B", 70.6),
        ("SmolLM2-135M", 0.1345),
        ("SmolLM2-1.7B", 1.71),
        ("Qwen2.5-0.5B", 0.494),
        ("Qwen2.5-7B", 7.62),
        ("Qwen2.5-72B", 72.7),
    ],
)
def test_reference_configs_give_the_published_sizes(name, billions):
    assert reference(name).counts().total / 1e9 == pytest.approx(billions, rel=0.01)


def test_every_reference_names_its_source():
    for arch in REFERENCES:
        assert arch.source.startswith("https://huggingface.co/") and arch.source.endswith("config.json")


# ---- KV cache ------------------------------------------------------------------------------------------


def test_kv_cache_of_llama2_7b_at_4096_is_2_gib():
    arch = reference("Llama-2-7B")
    expected = 2 * 32 * 32 * 128 * 4096 * 2
    assert expected == 2 * GIB
    assert arch.kv_bytes(4096) == expected
    assert arch.kv_bytes(4096, batch=3) == 3 * expected
    assert arch.kv_bytes(4096, kv_dtype="f32") == 2 * expected
    assert arch.kv_bytes(4096, kv_dtype="q8_0") == expected * (34 / 32) / 2  # 8.5 bits per element
    assert plan_fit(arch, context=4096).kv_bytes == expected


def test_grouped_query_attention_caches_only_the_kv_heads():
    # Llama-3.1-8B: 8 KV heads of 32 query heads, so a quarter of Llama-2-7B's cache at the same context.
    assert reference("Llama-3.1-8B").kv_bytes(8192) == reference("Llama-2-7B").kv_bytes(8192) / 4


def test_sliding_window_and_hybrid_layers():
    mistral = SimpleNamespace(
        model_type="mistral",
        hidden_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=100,
        intermediate_size=128,
        sliding_window=256,
    )
    arch = architecture_from_config(mistral)
    per_token = 4 * 2 * 2 * 16 * 2  # layers × (K, V) × kv heads × head dim × f16
    assert arch.kv_bytes(100) == 100 * per_token
    assert arch.kv_bytes(1000) == 256 * per_token  # every layer holds at most its window
    assert any("sliding window 256 on 4 of 4" in n for n in plan_fit(arch, context=1000).notes)

    gemma_like = SimpleNamespace(
        **{**mistral.__dict__, "layer_types": ["sliding_attention", "full_attention"] * 2}
    )
    arch = architecture_from_config(gemma_like)
    assert arch.kv_bytes(1000) == (2 * 256 + 2 * 1000) * per_token // 4

    hybrid = SimpleNamespace(**{**mistral.__dict__, "sliding_window": None})
    hybrid.layer_types = ["linear_attention", "linear_attention", "linear_attention", "full_attention"]
    arch = architecture_from_config(hybrid)
    assert arch.kv_bytes(1000) == 1000 * per_token // 4
    assert any("hybrid: 3 of 4 layers keep no KV cache" in n for n in plan_fit(arch).notes)


def test_latent_attention_caches_one_latent_per_layer():
    ds = reference("DeepSeek-V3")
    assert ds.kv_elements_per_token() == 512 + 64
    assert ds.kv_bytes(4096) == 61 * 576 * 4096 * 2


# ---- runtime overhead against llama.cpp -------------------------------------------------------------------

# What llama.cpp (llama-cpp-python 0.3.36, CPU) reserved for SmolLM2-135M's GGUF: KV cache, compute buffer and
# output buffer in MiB, per (context, sequences, flash attention, KV type, micro-batch). See docs/deployment.md.
LLAMA_CPP_SMOLLM2 = [
    # context, batch, flash, kv, ubatch, KV MiB, compute MiB, output MiB
    (4096, 1, True, "f16", 512, 90.00, 98.25, 0.19),
    (4096, 1, False, "f16", 512, 90.00, 99.38, 0.19),
    (8192, 1, False, "f16", 512, 180.00, 166.38, 0.19),
    (8192, 1, True, "f16", 512, 180.00, 98.25, 0.19),
    (4096, 4, False, "f16", 512, 360.00, 99.38, 0.75),
    (4096, 1, True, "q8_0", 512, 47.81, 99.38, 0.19),
    (4096, 1, True, "f32", 512, 180.00, 98.25, 0.19),
    (256, 1, False, "f16", 512, 5.62, 49.13, 0.19),
    (4096, 1, False, "f16", 256, 90.00, 49.69, 0.19),
]


@pytest.mark.parametrize(
    ("context", "batch", "flash", "kv", "ubatch", "kv_mib", "compute_mib", "out_mib"), LLAMA_CPP_SMOLLM2
)
def test_kv_and_overhead_match_what_llama_cpp_reserved(
    context, batch, flash, kv, ubatch, kv_mib, compute_mib, out_mib
):
    plan = plan_fit(
        "SmolLM2-135M", context=context, batch=batch, kv_dtype=kv, flash_attention=flash, ubatch=ubatch
    )
    assert plan.kv_bytes / MIB == pytest.approx(kv_mib, abs=0.01)
    assert plan.compute_bytes / MIB == pytest.approx(compute_mib, rel=0.02)
    assert plan.output_bytes / MIB == pytest.approx(out_mib, abs=0.01)


_LLAMA_CPP_PROBE = r"""
import sys, llama_cpp as L
path, ctx, seqs, flash = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
L.llama_backend_init()
model = L.llama_model_load_from_file(path.encode(), L.llama_model_default_params())
params = L.llama_context_default_params()
params.n_ctx, params.n_seq_max, params.flash_attn_type, params.n_threads = ctx * seqs, seqs, flash, 1
assert L.llama_init_from_model(model, params) is not None
"""


@pytest.mark.slow
@pytest.mark.parametrize(("context", "batch", "flash"), [(4096, 1, True), (8192, 1, False), (2048, 4, False)])
def test_llama_cpp_itself_reserves_what_the_planner_says(context, batch, flash, tmp_path):
    """Runs llama.cpp on the demo's GGUF and reads the buffers it reports (needs llama-cpp-python)."""
    require("llama_cpp")
    from workbench.models.demo import DEMO_GGUF, demo_home

    gguf = demo_home() / "gguf" / DEMO_GGUF
    if not gguf.is_file():
        from workbench.models.demo import _find_demo_gguf

        gguf = _find_demo_gguf(demo_home())
    script = tmp_path / "probe.py"
    script.write_text(_LLAMA_CPP_PROBE)
    out = subprocess.run(
        [sys.executable, str(script), str(gguf), str(context), str(batch), str(int(flash))],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stderr
    kv = float(re.search(r"llama_kv_cache: size =\s+([\d.]+) MiB", out).group(1))
    compute = float(re.search(r"CPU compute buffer size =\s+([\d.]+) MiB", out).group(1))
    plan = plan_fit("SmolLM2-135M", context=context, batch=batch, flash_attention=flash)
    assert plan.kv_bytes / MIB == pytest.approx(kv, abs=0.01)
    assert plan.compute_bytes / MIB == pytest.approx(compute, rel=0.02)


# ---- the formula against transformers' own models --------------------------------------------------------


def _tiny_configs():
    from transformers import (
        DeepseekV3Config,
        LlamaConfig,
        MistralConfig,
        MixtralConfig,
        Qwen2Config,
        Qwen2MoeConfig,
        Qwen3Config,
    )

    common = {"vocab_size": 264, "hidden_size": 64, "num_hidden_layers": 3}
    common.update(num_attention_heads=4, num_key_value_heads=2)
    return [
        LlamaConfig(**common, intermediate_size=96, tie_word_embeddings=True),
        Qwen2Config(**common, intermediate_size=96),
        Qwen3Config(**common, intermediate_size=96, head_dim=32),
        MistralConfig(**common, intermediate_size=96, sliding_window=32),
        MixtralConfig(**common, intermediate_size=96, num_local_experts=4, num_experts_per_tok=2),
        Qwen2MoeConfig(
            **common,
            intermediate_size=96,
            num_experts=6,
            num_experts_per_tok=2,
            moe_intermediate_size=32,
            shared_expert_intermediate_size=48,
            mlp_only_layers=[1],
        ),
        DeepseekV3Config(
            vocab_size=264,
            hidden_size=64,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=4,
            intermediate_size=96,
            moe_intermediate_size=16,
            n_routed_experts=8,
            num_experts_per_tok=2,
            n_shared_experts=1,
            first_k_dense_replace=1,
            q_lora_rank=24,
            kv_lora_rank=16,
            qk_rope_head_dim=8,
            qk_nope_head_dim=16,
            v_head_dim=16,
            n_group=1,
            topk_group=1,
        ),
    ]


@pytest.mark.parametrize("config", _tiny_configs(), ids=lambda c: c.model_type)
def test_parameter_formula_matches_the_model_transformers_builds(config):
    from transformers import AutoModelForCausalLM

    from workbench.models import size_report

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    rep = size_report(model)
    counts = architecture_from_config(config).counts()
    assert (counts.total, counts.linear) == (rep.n_params, rep.linear_params)


# ---- Mixture of Experts -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "total", "active"),
    [("Mixtral-8x7B", 46.7e9, 12.9e9), ("DeepSeek-V3", 671e9, 37e9), ("Qwen1.5-MoE-A2.7B", 14.3e9, 2.7e9)],
)
def test_moe_references_reproduce_total_and_active_parameters(name, total, active):
    counts = reference(name).counts()
    assert counts.total == pytest.approx(total, rel=0.02)
    assert counts.active == pytest.approx(active, rel=0.02)


def test_memory_follows_total_and_compute_follows_active():
    plan = plan_fit("Mixtral-8x7B", weight_bits=4.5)
    assert plan.weights_bytes == pytest.approx(46.7e9 * 4.5 / 8, rel=0.02)
    assert plan.active_params == pytest.approx(12.9e9, rel=0.02)
    assert any("a token uses 12.9B" in n for n in plan.notes)
    rows = {p.architecture.name: p for p in moe_what_if(plan)}
    base, pruned, low_k = (
        rows["Mixtral-8x7B"],
        rows["Mixtral-8x7B, 4 of 8 experts"],
        rows["Mixtral-8x7B, k=1"],
    )
    assert pruned.weights_bytes < 0.6 * base.weights_bytes  # fewer experts: memory down
    # still 2 experts per token (only the router's rows of the pruned experts go)
    assert pruned.active_params == pytest.approx(base.active_params, rel=1e-4)
    assert low_k.weights_bytes == base.weights_bytes  # a lower k: memory unchanged
    assert low_k.active_params < 0.6 * base.active_params and low_k.flops_per_token < base.flops_per_token
    assert moe_what_if(plan_fit("Llama-2-7B")) == []


# ---- devices ----------------------------------------------------------------------------------------------


def test_devices_it_fits_and_the_headroom_left():
    plan = plan_fit("Llama-2-7B", weight_bits=4.5, context=4096, devices_gb=(4, 8, 16))
    total = plan.weights_bytes + plan.kv_bytes + plan.compute_bytes + plan.output_bytes
    assert plan.total_bytes == total
    assert [d.device_gb for d in plan.devices] == [4, 8, 16]
    assert [d.headroom_bytes for d in plan.devices] == [g * GIB - total for g in (4, 8, 16)]
    assert plan.fits_on == [8, 16] and plan.smallest_device == 8
    assert plan_fit("Llama-3.1-70B", weight_bits=16).fits_on == []  # 141 GB of bf16 weights
    assert plan_fit("Llama-3.1-70B", weight_bits=4.5).fits_on == [80]
    table = fit_table([plan])
    assert table.loc[0, "4 GB"].endswith("short") and table.loc[0, "8 GB"].endswith("free")
    assert table.loc[0, "fits"] == "8 GB"
    frame = plan.frame()
    assert frame.loc[0, "headroom_8gb"] == pytest.approx((8 * GIB - total) / GIB)


def test_longer_context_and_bigger_batch_need_more():
    short = plan_fit("Llama-3.1-8B", weight_bits=4.5, context=2048)
    long = plan_fit("Llama-3.1-8B", weight_bits=4.5, context=32768, batch=8)
    assert long.kv_bytes == 16 * 8 * short.kv_bytes
    assert long.total_bytes > short.total_bytes and long.weights_bytes == short.weights_bytes
    assert len(short.fits_on) > len(long.fits_on)


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"context": 0}, "context=0"),
        ({"batch": -1}, "batch=-1"),
        ({"kv_dtype": "q3"}, "kv_dtype='q3'"),
        ({"devices_gb": (8, 0)}, "devices_gb="),
        ({"devices_gb": ()}, "devices_gb="),
    ],
)
def test_bad_settings_are_refused_with_their_value(kwargs, needle):
    with pytest.raises(ConfigError, match=re.escape(needle)):
        plan_fit("Llama-2-7B", **kwargs)


def test_device_text_and_names():
    assert parse_devices("8, 16 24;80") == (8, 16, 24, 80)
    with pytest.raises(ConfigError, match="'8, lots'"):
        parse_devices("8, lots")
    with pytest.raises(ConfigError, match="No reference config 'Llama-9'"):
        reference("Llama-9")
    assert match_reference("SmolLM2-135M-Instruct (134.5M params, 538 MB f32)").name == "SmolLM2-135M"
    assert match_reference("HuggingFaceTB/SmolLM2-360M-Instruct").name == "SmolLM2-360M"
    assert match_reference("my-model (1M params)") is None
    assert architecture_for("demo").counts().total == reference("SmolLM2-135M").counts().total
    with pytest.raises(ConfigError, match="no config.json"):
        architecture_for("/no/such/model")


# ---- runs recorded through the library ------------------------------------------------------------------


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    """tiny-llama: baseline, rtn 4-bit and a one-layer prune; tiny-moe: baseline and route k=1."""
    from workbench.experiment import run_experiment
    from workbench.registry import Registry
    from workbench.techniques import make_config

    url = f"sqlite:///{tmp_path_factory.mktemp('fit') / 'runs.db'}"
    pipelines = {
        "base": ("tiny-llama", []),
        "rtn": ("tiny-llama", [make_config("rtn", bits=4, group_size=32)]),
        "prune": ("tiny-llama", [make_config("prune", layers=(1,))]),
        "moe": ("tiny-moe", []),
        "k1": ("tiny-moe", [make_config("route", k=1)]),
    }
    results = {key: run_experiment(m, p, SUITE, registry=url) for key, (m, p) in pipelines.items()}
    assert all(r.status == "done" for r in results.values()), [r.error for r in results.values()]
    reg = Registry.open(url)
    yield SimpleNamespace(
        url=url, registry=reg, results=results, runs={k: reg.get_run(r.run_id) for k, r in results.items()}
    )
    reg.close()


def test_a_run_is_planned_from_its_measured_size(recorded, tiny_llama):
    run = recorded.runs["rtn"]
    plan = plan_fit(run, context=256)
    assert plan.weights_bytes == run.metrics["size_bytes"] and not plan.estimate
    assert plan.run_id == run.id and plan.label == f"#{run.id} {run.pipeline_label}"
    # tiny-llama: 2 layers × 2 KV heads × head dim 16, K and V, f16
    assert plan.kv_bytes == 2 * 2 * 2 * 16 * 256 * 2
    assert plan.bits_linear == run.metrics["bits_per_weight_linear"]
    assert plan.bits_other == pytest.approx(32.0)  # the tied embedding stays float32
    # The same plan from every form of the run: a runs_frame row, and a RunResult (which does not name its
    # model, so the architecture comes with it).
    frame = recorded.registry.runs_frame()
    row = frame[frame["run_id"] == run.id].iloc[0]
    with pytest.raises(ConfigError, match="not known here"):
        plan_fit(recorded.results["rtn"])
    for other, arch in ((row, None), (recorded.results["rtn"], tiny_llama)):
        again = plan_fit(other, context=256, arch=arch)
        assert (again.weights_bytes, again.kv_bytes, again.total_bytes) == (
            plan.weights_bytes,
            plan.kv_bytes,
            plan.total_bytes,
        )


def test_a_model_after_the_pipeline_plans_like_its_run(recorded, tiny_llama):
    from workbench.techniques import apply_, make_config

    model = apply_(copy.deepcopy(tiny_llama), make_config("rtn", bits=4, group_size=32))
    plan = plan_fit(model, context=256)
    assert plan.weights_bytes == recorded.runs["rtn"].metrics["size_bytes"]
    assert plan.bits_other == pytest.approx(plan_fit(recorded.runs["rtn"], context=256).bits_other)


def test_a_pruned_run_has_the_pruned_architecture(recorded):
    base, pruned = plan_fit(recorded.runs["base"]), plan_fit(recorded.runs["prune"])
    assert pruned.architecture.n_layers == base.architecture.n_layers - 1
    assert pruned.kv_bytes == base.kv_bytes / 2
    assert pruned.weights_bytes < base.weights_bytes


def test_the_workspace_model_gives_a_runs_architecture(recorded):
    from workbench.workspace import Workspace

    run = recorded.runs["prune"]
    stripped = {**recorded.results["prune"].metrics, "run_id": run.id, "model": "an unknown model"}
    with pytest.raises(ConfigError, match="not known here"):
        plan_fit(stripped)
    with Workspace(recorded.url, model="tiny-llama", suite=SUITE) as ws:
        ws.load()
        facts = {**stripped, "model_fingerprint": run.model_fingerprint, "pipeline_json": run.pipeline_json}
        assert plan_fit(facts, workspace=ws).architecture.n_layers == 1


def test_extrapolation_keeps_the_variants_precision(recorded):
    plan = plan_fit(recorded.runs["rtn"])
    targets = extrapolate(plan)
    assert [t.architecture.name for t in targets] == ["Llama-3.2-1B", "Llama-2-7B", "Llama-3.1-70B"]
    seven = targets[1]
    counts = reference("Llama-2-7B").counts()
    assert seven.weights_bytes == pytest.approx(
        counts.linear * plan.bits_linear / 8 + counts.other * plan.bits_other / 8
    )
    assert seven.kv_bytes == reference("Llama-2-7B").kv_bytes(plan.context)
    assert seven.estimate and seven.label.startswith("Llama-2-7B as #")
    smol = plan_fit(reference("SmolLM2-135M"), weight_bits=16)
    assert [t.architecture.name for t in extrapolate(smol)][:3] == [
        "SmolLM2-135M",
        "SmolLM2-360M",
        "SmolLM2-1.7B",
    ]


def test_moe_run_shows_total_and_measured_active(recorded):
    base, k1 = plan_fit(recorded.runs["moe"]), plan_fit(recorded.runs["k1"])
    assert k1.n_params == base.n_params and k1.weights_bytes == base.weights_bytes  # a lower k keeps memory
    assert k1.active_params == recorded.runs["k1"].metrics["active_params"] < base.active_params
    assert k1.architecture.top_k == 1 and base.architecture.top_k == 2
    names = [p.architecture.name for p in moe_what_if(base)]
    assert names == ["tiny-moe", "tiny-moe, 6 of 8 experts", "tiny-moe, 4 of 8 experts", "tiny-moe, k=1"]
    assert [t.architecture.name for t in extrapolate(base)] == [
        "Qwen1.5-MoE-A2.7B",
        "Mixtral-8x7B",
        "DeepSeek-V3",
    ]
    frame = fit_frame([base, k1])
    assert list(frame["active_params_b"]) == [base.active_params / 1e9, k1.active_params / 1e9]


# ---- the command line ---------------------------------------------------------------------------------


def test_cli_prints_the_table_for_a_run(recorded, capsys):
    from workbench.cli import main

    run = recorded.runs["rtn"]
    argv = [
        "fit",
        str(run.id),
        "--registry",
        recorded.url,
        "--context",
        "2048",
        "--batch",
        "2",
        "--kv",
        "q8_0",
    ]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "context 2048 × batch 2, KV cache q8_0" in out and f"#{run.id} rtn" in out
    assert "Llama-2-7B as #" in out and "| 80 GB" in out and "measured" in out


def test_cli_plans_a_reference_config(capsys):
    from workbench.cli import main

    assert (
        main(["fit", "--model", "Mixtral-8x7B", "--bits", "4.5", "--devices", "24", "48", "--format", "csv"])
        == 0
    )
    out = capsys.readouterr().out
    assert out.count("Mixtral-8x7B") >= 3  # the plan, its extrapolation and the what-ifs
    assert "24 GB" in out and "48 GB" in out and "4 of 8 experts" in out


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["fit"], "needs a RUN_ID"),
        (["fit", "999"], "No run 999"),
        (["fit", "--model", "Llama-2-7B", "--context", "0"], "context=0"),
        (["fit", "--model", "Llama-2-7B", "--devices", "8", "x"], "'8,x'"),
        (["fit", "--model", "/no/such/model"], "no config.json"),
    ],
)
def test_cli_bad_input_is_one_line(argv, needle, registry_url, capsys):
    from workbench.cli import main

    assert main([*argv, "--registry", registry_url]) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err and err.count("\n") == 1


def test_cli_kv_choices_are_the_planners():
    from workbench.cli import build_parser

    fit = build_parser()._subparsers._group_actions[0].choices["fit"]
    kv = next(a for a in fit._actions if a.dest == "kv")
    assert set(kv.choices) == set(KV_BYTES)


# ---- the widget ---------------------------------------------------------------------------------------


def test_fit_box_follows_its_controls(recorded):
    from widgets.panels.fit import LOADED, FitBox
    from workbench.workspace import Workspace

    with Workspace(recorded.url, model="tiny-llama", suite=SUITE) as ws:
        box = FitBox(ws)
        ids = [v for _, v in box.runs.options]
        assert len(box.runs.value) == 3 and set(box.runs.value) <= set(ids)
        box.select(recorded.runs["rtn"].id)
        assert f"#{recorded.runs['rtn'].id} rtn" in box.table.value and "<table" in box.table.value
        assert "Llama-2-7B as #" in box.extrapolation.value and box.what_if.value == ""
        kv_4096 = box.plans[0].kv_bytes
        box.context.value = 8192
        assert box.plans[0].kv_bytes == 2 * kv_4096 and "context 8192" in box.table.value
        box.kv.value = "f32"
        assert box.plans[0].kv_bytes == 4 * kv_4096
        box.batch.value = 3
        assert box.plans[0].batch == 3
        box.devices.value = "4, 12"
        assert "12 GB" in box.table.value and "80 GB" not in box.table.value
        box.devices.value = "4, lots"
        assert "lots" in box.errors.message and "Traceback" not in box.errors.message
        box.devices.value = "8"
        assert box.errors.message == ""
        box.select(recorded.runs["k1"].id)
        assert "6 of 8 experts" in box.what_if.value
        assert LOADED not in ids  # nothing loaded yet
        ws.load()
        box.refresh()
        assert box.runs.options[0][1] == LOADED
        box.select(LOADED)
        assert box.plans[0].weights_bytes == ws.loaded.size.n_bytes


def test_fit_box_in_the_app(registry_url, tmp_path, monkeypatch):
    from widgets import Workbench
    from widgets.panels.fit import FitBox

    monkeypatch.chdir(tmp_path)
    app = Workbench(registry_url, model="tiny-llama", suite=SUITE, poll_interval=0)
    try:
        box = FitBox(app)
        assert box.workspace is app.workspace and box.plans == []
        assert "record one first" in box.table.value
        app.run_baseline()
        assert app.jobs.wait(60)
        app.watcher.poke()
        assert len(box.plans) == 1 and "baseline" in box.table.value
    finally:
        app.close()


def test_docs_describe_the_planner():
    text = (Path(__file__).resolve().parents[1] / "docs" / "deployment.md").read_text()
    assert "## Fit planner" in text and "2 × layers × kv_heads × head_dim" in text
