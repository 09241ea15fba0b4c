"""A distilled student as a model folder, and prune → distill → quantize as one recorded pipeline."""

from __future__ import annotations

import copy

import pytest
import torch

from workbench.distill import save_student, student_spec
from workbench.errors import ConfigError
from workbench.experiment import run_experiment
from workbench.models import load_model
from workbench.prefix_cache import PrefixCache
from workbench.registry import Registry
from workbench.techniques.distill import DistillConfig
from workbench.techniques.prune_layers import PruneConfig
from workbench.techniques.rtn import RTNConfig
from workbench.tiny import byte_tokenizer, tiny_llama

TINY = {"batch_size": 2, "seq_len": 32, "warmup_steps": 1, "lr": 1e-3}


@pytest.fixture()
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("WORKBENCH_HOME", str(tmp_path / "home"))
    return tmp_path


def test_a_saved_student_loads_in_transformers_and_as_a_model_spec(home):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from workbench.distill import drop_layers

    student = drop_layers(tiny_llama(layers=3), [1])
    folder = save_student(student, byte_tokenizer(), home / "student")
    assert (folder / "model.safetensors").is_file() and (folder / "config.json").is_file()
    assert (folder / "tokenizer.json").is_file()
    ids = torch.randint(0, 256, (1, 10), generator=torch.Generator().manual_seed(0))
    again = AutoModelForCausalLM.from_pretrained(folder)
    assert again.config.num_hidden_layers == 2
    torch.testing.assert_close(again(ids).logits, student(ids).logits)
    assert AutoTokenizer.from_pretrained(folder)("abc")["input_ids"] == byte_tokenizer()("abc")["input_ids"]
    loaded = load_model(student_spec(folder))
    torch.testing.assert_close(loaded.model(ids).logits, student(ids).logits)
    with pytest.raises(ConfigError, match="is not a saved student"):
        student_spec(home)


def test_prune_distill_quantize_is_one_pipeline_with_stages_lineage_and_reuse(home):
    url = f"sqlite:///{home / 'runs.db'}"
    loaded = load_model("tiny-llama")
    cache = PrefixCache()
    base = run_experiment(loaded, [], "quick", registry=url)
    prune, distill = PruneConfig(drop=1, samples=2, seq_len=32), DistillConfig(steps=3, **TINY)
    student = run_experiment(
        loaded, [prune, distill], "quick", registry=url, prefix_cache=cache, parent_id=base.run_id
    )
    assert student.ok, student.error
    assert student.parent_id == base.run_id  # the teacher's run
    assert student.metrics["training_tokens"] == 3 * 2 * 31 and student.metrics["layers_dropped"] == 1
    assert student.metrics["n_params"] < base.metrics["n_params"]
    assert [s["technique"] for s in student.extras["stages"]] == ["prune", "distill"]
    assert student.extras["loss_curve"]["step"] == [1, 2, 3]

    q4 = run_experiment(
        loaded, [prune, distill, RTNConfig(bits=4, group_size=32)], "quick", registry=url, prefix_cache=cache
    )
    assert q4.ok, q4.error
    assert q4.parent_id == student.run_id  # the distilled student's run
    stages = q4.extras["stages"]
    assert [s["technique"] for s in stages] == ["prune", "distill", "rtn"]
    assert stages[1]["metrics"]["training_tokens"] == 186 and not stages[2]["reused"]

    hits = cache.hits
    q8 = run_experiment(
        loaded, [prune, distill, RTNConfig(bits=8, group_size=32)], "quick", registry=url, prefix_cache=cache
    )
    assert q8.ok and cache.hits == hits + 1  # only the quantization step ran again
    assert [s["reused"] for s in q8.extras["stages"]] == [True, True, False]
    assert q8.metrics["training_tokens"] == 186

    with Registry.open(url) as reg:
        frame = reg.runs_frame()
    assert set(frame["run_id"]) >= {base.run_id, student.run_id, q4.run_id, q8.run_id}


def test_a_stopped_pipeline_is_recorded_interrupted_with_its_checkpoint(home):
    from workbench.progress import Progress

    url = f"sqlite:///{home / 'runs.db'}"
    loaded = load_model("tiny-llama")
    progress = Progress()
    progress.on_partial = lambda m: progress.cancel() if m.get("distill_step") == 2 else None
    res = run_experiment(
        loaded, [DistillConfig(steps=5, **TINY)], "quick", registry=url, progress=progress, prefix_cache=False
    )
    assert res.status == "interrupted" and "saved in" in res.error
    with Registry.open(url) as reg:
        frame = reg.runs_frame(status=None)
    row = frame[frame["run_id"] == res.run_id].iloc[0]
    assert row["status"] == "interrupted" and "distill_checkpoints" in str(row["error"])
    again = run_experiment(
        loaded, [DistillConfig(steps=5, **TINY)], "quick", registry=url, prefix_cache=False
    )
    assert again.ok and again.metrics["resumed_from_step"] == 2
    assert copy.deepcopy(again.extras["loss_curve"]["step"]) == [1, 2, 3, 4, 5]
