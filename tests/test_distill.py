"""The distill technique on tiny random models: training, budgets, stop and resume, stores, bad inputs."""

from __future__ import annotations

import copy
import shutil
from dataclasses import replace

import pytest
import torch

from workbench.corpus import split_paragraphs
from workbench.distill.logit_store import build_store, store_bias
from workbench.distill.train import TrainSettings, batch_rows
from workbench.errors import ConfigError, RunInterrupted
from workbench.progress import Progress
from workbench.techniques import ApplyContext, apply_, check
from workbench.techniques.distill import DistillConfig, checkpoint_root
from workbench.techniques.prune_layers import PruneConfig
from workbench.tiny import byte_tokenizer, tiny_llama

TEXT = "\n\n".join(
    f"Paragraph {i}: the quick brown fox jumps over the lazy dog, and {i * 7} more." * 3 for i in range(60)
)
TINY = {"batch_size": 2, "seq_len": 32, "warmup_steps": 1, "lr": 1e-3}


@pytest.fixture()
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("WORKBENCH_HOME", str(tmp_path))
    return tmp_path


def _ctx(teacher, progress: Progress | None = None) -> ApplyContext:
    return ApplyContext(
        tokenizer=byte_tokenizer(),
        corpus=split_paragraphs("fox", TEXT),
        base=teacher,
        progress=progress or Progress.null(),
    )


def _state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_distilling_a_pruned_student_lowers_its_loss_and_reports_its_work(home):
    teacher = tiny_llama(layers=3)
    student = apply_(copy.deepcopy(teacher), PruneConfig(drop=1, samples=2, seq_len=32), _ctx(teacher))
    student_init = copy.deepcopy(student)
    ctx = _ctx(teacher)
    # alpha=1: soft targets only, so the KL to the (random) teacher is what training lowers
    config = DistillConfig(steps=12, eval_every=64, alpha=1.0, temperature=1.0, **TINY)
    out = apply_(student, config, ctx)
    curve = ctx.extras["loss_curve"]
    assert curve["step"] == list(range(1, 13))
    assert sum(curve["loss"][-3:]) / 3 < sum(curve["loss"][:3]) / 3, curve["loss"]
    assert ctx.metrics["training_tokens"] == 12 * 2 * 31 and ctx.metrics["training_steps"] == 12
    assert ctx.metrics["final_loss"] == curve["loss"][-1] and ctx.metrics["training_seconds"] > 0
    evals = ctx.extras["eval_curve"]
    assert evals["tokens"][0] == 0 and evals["tokens"][-1] == 12 * 62 and len(evals["tokens"]) >= 3
    assert evals["kl"][-1] < evals["kl"][0], evals
    assert out.config.num_hidden_layers == 2
    # The finished student stays as a model folder, and the same distillation again loads it instead of training.
    assert (
        ctx.extras["student_folder"].startswith(str(checkpoint_root()))
        and ctx.metrics["training_reused"] == 0
    )
    again = apply_(
        apply_(copy.deepcopy(teacher), PruneConfig(drop=1, samples=2, seq_len=32), _ctx(teacher)),
        config,
        ctx2 := _ctx(teacher),
    )
    assert ctx2.metrics["training_reused"] == 1 and ctx2.extras["loss_curve"] == curve
    for k, v in out.state_dict().items():
        assert torch.equal(again.state_dict()[k], v), k
    fresh = apply_(copy.deepcopy(student_init), replace(config, resume=False), ctx3 := _ctx(teacher))
    assert ctx3.metrics["training_reused"] == 0 and fresh.config.num_hidden_layers == 2


def test_the_same_seed_repeats_the_run_and_the_hard_baseline_sees_the_same_batches(home):
    teacher = tiny_llama()
    runs = []
    for _ in range(2):
        student = copy.deepcopy(teacher)
        apply_(student, DistillConfig(steps=3, **TINY), _ctx(teacher))
        runs.append(_state(student))
    for k in runs[0]:
        assert torch.equal(runs[0][k], runs[1][k]), k
    kd, hard = (
        TrainSettings(loss="forward_kl", batch_size=2, seed=3),
        TrainSettings(loss="hard", batch_size=2, seed=3),
    )
    for step in range(5):
        assert torch.equal(batch_rows(step, 0, 7, kd), batch_rows(step, 0, 7, hard))
    # every window once per epoch, whatever the batch size
    rows = torch.cat([batch_rows(s, 0, 6, kd) for s in range(3)])
    assert sorted(rows.tolist()) == list(range(6))


def test_stop_then_resume_gives_the_weights_of_an_uninterrupted_run(home):
    teacher = tiny_llama()
    config = DistillConfig(steps=6, **TINY)
    straight = copy.deepcopy(teacher)
    apply_(straight, config, _ctx(teacher))
    shutil.rmtree(checkpoint_root())  # the finished student would be reused; this run must train

    stopped = copy.deepcopy(teacher)
    progress = Progress()
    calls = []

    def on_partial(metrics):
        if "train_loss" in metrics:
            calls.append(metrics["distill_step"])
            if metrics["distill_step"] == 3:
                progress.cancel()

    progress.on_partial = on_partial
    with pytest.raises(RunInterrupted, match=r"stopped at step 3 .*saved in .*Run the same pipeline again"):
        apply_(stopped, config, _ctx(teacher, progress))
    saved = list(checkpoint_root().glob("*"))
    assert len(saved) == 1 and (saved[0] / "config.json").is_file()
    assert calls == [1, 2, 3]

    resumed = copy.deepcopy(teacher)
    ctx = _ctx(teacher)
    apply_(resumed, config, ctx)
    assert ctx.metrics["resumed_from_step"] == 3 and ctx.extras["loss_curve"]["step"] == list(range(1, 7))
    a, b = _state(straight), _state(resumed)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_a_stopped_student_loads_back_from_its_checkpoint_folder(home):
    from workbench.models import load_model

    teacher = tiny_llama()
    progress = Progress()
    progress.on_partial = lambda m: progress.cancel() if m.get("distill_step") == 1 else None
    student = copy.deepcopy(teacher)
    with pytest.raises(RunInterrupted):
        apply_(student, DistillConfig(steps=4, **TINY), _ctx(teacher, progress))
    folder = next(checkpoint_root().glob("*"))
    loaded = load_model(str(folder))
    for k, v in student.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[k], v), k


@pytest.mark.parametrize("kind", ["topk", "sampled"])
def test_stored_teacher_targets_equal_the_live_teacher(home, kind):
    teacher = tiny_llama()
    windows = torch.randint(0, 256, (3, 12), generator=torch.Generator().manual_seed(1))
    store = build_store(teacher, windows, kind=kind, k=8, temperature=2.0, seed=5, batch_size=2)
    with torch.no_grad():
        live = teacher(windows).logits  # (3, 12, V)
    ids = torch.from_numpy(store.ids[:].astype("int64"))
    if kind == "topk":
        top = torch.topk(live, 8, dim=-1)
        assert torch.equal(ids, top.indices)
        values = torch.from_numpy(store.weights[:].astype("float32"))
        torch.testing.assert_close(values, live.gather(-1, ids), atol=2e-3, rtol=1e-3)  # float16 storage
    else:
        # the draws are those of the live teacher's distribution with the same generator
        from workbench.distill.logit_store import _sample

        gen = torch.Generator().manual_seed(5)
        expected = torch.cat(
            [_sample(live[i : i + 2].reshape(-1, live.shape[-1]), 8, 2.0, gen)[0] for i in range(0, 3, 2)]
        ).reshape(3, 12, 8)
        assert torch.equal(ids, expected)
        freq = torch.from_numpy(store.weights[:])
        torch.testing.assert_close(freq.sum(-1), torch.ones(3, 12))
    again = build_store(teacher, windows, kind=kind, k=8, temperature=2.0, seed=5)
    assert again.folder == store.folder and isinstance(again.ids, type(store.ids[:]))  # read back from disk
    assert (again.ids[:] == store.ids[:]).all()


def test_the_sampled_store_is_unbiased_and_top_k_is_not(home):
    teacher = tiny_llama()
    windows = torch.randint(0, 256, (1, 4), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        live = teacher(windows).logits
    rows = torch.tensor([0])
    many = build_store(teacher, windows, kind="sampled", k=20000, temperature=1.0)
    top = build_store(teacher, windows, kind="topk", k=8)
    assert store_bias(many, live, rows, 1.0) < 0.06  # sampling noise only, shrinking with more draws
    assert store_bias(top, live, rows, 1.0) > 0.5  # a random 264-token model has a flat tail top-8 drops


def test_training_from_a_store_uses_it_and_records_its_size(home):
    teacher = tiny_llama()
    ctx = _ctx(teacher)
    apply_(copy.deepcopy(teacher), DistillConfig(steps=2, teacher="topk", top_k=16, **TINY), ctx)
    assert ctx.metrics["store_bytes_per_token"] == 16 * 6
    assert len(list((home / "teacher_logits").glob("topk16-*"))) == 1
    ctx = _ctx(teacher)
    apply_(copy.deepcopy(teacher), DistillConfig(steps=2, teacher="sampled", top_k=12, **TINY), ctx)
    assert ctx.extras["loss_curve"]["step"] == [1, 2]


@pytest.mark.parametrize(
    "params, match",
    [
        ({"temperature": 0}, "temperature=0 must be > 0"),
        ({"temperature": -1.0}, "must be > 0"),
        ({"alpha": 1.5}, r"alpha=1.5 must be in \[0, 1\]"),
        ({"alpha": -0.1}, r"must be in \[0, 1\]"),
        ({"steps": 0}, "budget .* is zero"),
        ({"loss": "reverse_kl", "teacher": "topk"}, "needs the full teacher distribution"),
        ({"loss": "l2"}, "choose one of forward_kl"),
    ],
)
def test_bad_settings_are_refused_when_the_config_is_built(params, match):
    with pytest.raises(ConfigError, match=match):
        DistillConfig(**params)


def test_a_student_larger_than_the_teacher_is_refused_before_work(home):
    small = tiny_llama(layers=1)
    with pytest.raises(ConfigError, match="more than the teacher"):
        check(small, DistillConfig(student="tiny-llama"))
    with pytest.raises(ConfigError, match="more than the teacher"):
        apply_(tiny_llama(layers=3), DistillConfig(steps=1, **TINY), _ctx(small))


def test_a_student_with_another_tokenizer_is_refused(home, monkeypatch):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    import workbench.techniques.distill as distill_module
    from workbench.models import LoadedModel

    vocab = {chr(c): i for i, c in enumerate(range(32, 127))}
    vocab["[UNK]"] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    other = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")
    fake = LoadedModel(tiny_llama(layers=1), other, None, "x", "other", None)  # type: ignore[arg-type]
    monkeypatch.setattr(distill_module, "_student_model", lambda _config: fake)
    with pytest.raises(ConfigError, match="tokenizer differs from the teacher's: vocabulary size 257"):
        apply_(tiny_llama(), DistillConfig(steps=1, student="other", **TINY), _ctx(tiny_llama()))


def test_distill_without_a_teacher_says_how_to_run_it():
    with pytest.raises(ConfigError, match="needs the teacher"):
        apply_(tiny_llama(), DistillConfig(steps=1))


def test_different_distillation_settings_get_different_labels():
    configs = [
        DistillConfig(),
        DistillConfig(lr=1e-3),
        DistillConfig(seq_len=64),
        DistillConfig(loss="hard"),
        DistillConfig(loss="jsd"),
        DistillConfig(loss="jsd", skew=0.5),
        DistillConfig(teacher="topk"),
        DistillConfig(teacher="sampled", top_k=12),
        DistillConfig(steps=0, seconds=60),
        DistillConfig(steps=10, tokens=1000),
        DistillConfig(bf16=True),
        DistillConfig(temperature=1.0),
    ]
    labels = [c.label() for c in configs]
    assert len(set(labels)) == len(labels), labels
    assert DistillConfig().label() == "distill forward_kl T2 a0.5 50 steps"
    assert (
        DistillConfig(resume=False).label() == DistillConfig().label()
    )  # resuming does not change the result
