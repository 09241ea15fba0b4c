"""Sequence-level distillation on tiny random models: the teacher's generated corpus (lengths, seeds, the KV cache,
the on-disk cache, a stop) and the distill technique trained on it; bad settings; the Distill tab's Data choice."""

from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch

from workbench.corpus import split_paragraphs
from workbench.distill.generate import GenerationConfig, generate_corpus, prompt_ids
from workbench.errors import ConfigError, RunInterrupted
from workbench.progress import Progress
from workbench.techniques import ApplyContext, apply_, check
from workbench.techniques.distill import DistillConfig
from workbench.tiny import EOS_ID, byte_tokenizer, tiny_llama

TEXT = "\n\n".join(
    f"Paragraph {i}: the quick brown fox jumps over the lazy dog, and {i * 7} more." * 3 for i in range(60)
)
CORPUS = split_paragraphs("fox", TEXT)
TINY = {"batch_size": 2, "seq_len": 32, "warmup_steps": 1, "lr": 1e-3}
GEN = {"gen_prompt_tokens": 8, "gen_new_tokens": 24, "gen_sequences": 8, "gen_batch_size": 4}


@pytest.fixture()
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("WORKBENCH_HOME", str(tmp_path))
    return tmp_path


def _sharp(seed: int = 0) -> torch.nn.Module:
    """A tiny Llama with its decoder weights and (tied) output scaled up. A random tiny model's distribution is
    nearly uniform and its greedy text repeats the last token (the embedding dominates the residual stream),
    so mistakes in positions or masks would hardly show; here every token depends on its context."""
    model = tiny_llama(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".layers." in name and p.ndim == 2:
                p.mul_(10.0)
        model.lm_head.weight.mul_(6.0)
    return model


def _count_forwards(model: torch.nn.Module) -> list[int]:
    calls = [0]
    model.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def test_corpus_prompts_and_lengths_follow_the_settings(tmp_path):
    tok = byte_tokenizer()
    config = GenerationConfig(prompt_tokens=8, new_tokens=16, sequences=6, batch_size=4, stop_at_eos=False)
    out = generate_corpus(tiny_llama(), tok, config, corpus=CORPUS, root=tmp_path)
    assert out.n_sequences == 6 and out.new_tokens == 6 * 16 and not out.reused
    training = tok(CORPUS.text("training"), add_special_tokens=False)["input_ids"]
    chunks = [training[k * 8 : (k + 1) * 8] for k in range(len(training) // 8)]
    for i in range(6):
        assert out.prompt_lengths[i] == 8 and len(out.continuation(i)) == 16
        # Consecutive 8-token prefixes of the training part, evenly spread over all of it.
        assert out.sequence(i)[:8].tolist() == chunks[i * len(chunks) // 6]
    windows = out.windows(16)
    assert windows.shape == (6 * 24 // 16, 16)
    assert windows.flatten().tolist() == out.ids[: windows.numel()].tolist()  # packed back to back
    # With stops at the end-of-sequence token a continuation is at most new_tokens, and shorter only at EOS.
    stops = generate_corpus(
        tiny_llama(), tok, replace(config, stop_at_eos=True, sequences=12), corpus=CORPUS, root=tmp_path
    )
    for i in range(12):
        cont = stops.continuation(i).tolist()
        assert 1 <= len(cont) <= 16 and EOS_ID not in cont[:-1]
        assert len(cont) == 16 or cont[-1] == EOS_ID
    assert stops.new_tokens == sum(len(stops.continuation(i)) for i in range(12))


def test_generation_is_deterministic_for_a_seed_and_differs_across_seeds(tmp_path):
    tok = byte_tokenizer()
    config = GenerationConfig(source="list", prompts=("def f(x):", "The fox"), sequences=4, new_tokens=12)
    a = generate_corpus(tiny_llama(), tok, config, root=tmp_path / "a")
    b = generate_corpus(tiny_llama(), tok, config, root=tmp_path / "b")
    other = generate_corpus(tiny_llama(), tok, replace(config, seed=1), root=tmp_path / "a")
    assert not b.reused and a.ids.tolist() == b.ids.tolist()
    assert other.ids.tolist() != a.ids.tolist()
    # The prompts are used in turn, and the two samples of one prompt differ (each sequence has its own draws).
    assert a.sequence(0)[: a.prompt_lengths[0]].tolist() == a.sequence(2)[: a.prompt_lengths[2]].tolist()
    assert a.continuation(0).tolist() != a.continuation(2).tolist()
    # Prompts given as a list (the CLI, JSON) are kept as a tuple: the frozen configs stay hashable.
    listed = DistillConfig(data="teacher-generated", gen_source="list", gen_prompts=["def f(x):", "The fox"])
    assert listed.gen_prompts == ("def f(x):", "The fox") and hash(listed) == hash(replace(listed))
    assert listed.generation(0) == replace(config, sequences=32, new_tokens=224)


def test_cached_batched_generation_computes_what_a_full_forward_does(tmp_path):
    """Greedy picks equal the argmax of a plain forward over the whole sequence (KV cache, left padding and
    positions right), and a sampled sequence is the same whether it shares a padded batch or runs alone."""
    tok, model = byte_tokenizer(), _sharp()
    prompts = ("a", "The quick brown fox", "def f(x):\n    return")
    greedy = GenerationConfig(
        source="list", prompts=prompts, sequences=3, new_tokens=10, temperature=0, batch_size=3
    )
    out = generate_corpus(model, tok, greedy, root=tmp_path)
    changed = 0
    for i in range(3):
        seq = torch.tensor(out.sequence(i).tolist())[None]
        p = int(out.prompt_lengths[i])
        with torch.no_grad():
            full = model(input_ids=seq).logits[0]
        picks = full[p - 1 : -1].argmax(-1).tolist()
        assert picks == out.continuation(i).tolist(), i
        changed += len(set(picks)) > 1
    assert changed  # not a constant repetition, so the check has teeth
    sampled = GenerationConfig(source="list", prompts=prompts, sequences=3, new_tokens=10, batch_size=3)
    together = generate_corpus(model, tok, sampled, root=tmp_path)
    alone = generate_corpus(model, tok, replace(sampled, batch_size=1), root=tmp_path)
    assert together.ids.tolist() == alone.ids.tolist()


def test_top_p_draws_only_from_the_smallest_set_holding_top_p():
    from workbench.distill.generate import _pick

    probs = torch.tensor([0.05, 0.5, 0.15, 0.3])
    logits = probs.log().expand(400, 4)
    gens = [torch.Generator().manual_seed(i) for i in range(400)]

    def drawn(temperature: float, top_p: float) -> set[int]:
        config = GenerationConfig(temperature=temperature, top_p=top_p)
        return set(_pick(logits, config, gens).tolist())

    assert drawn(1.0, 1.0) == {0, 1, 2, 3}
    assert drawn(1.0, 0.7) == {1, 3}  # 0.5 + 0.3 holds 0.7; 0.5 alone does not
    assert drawn(1.0, 0.5) == {1}
    assert drawn(1.0, 0.81) == {1, 2, 3}
    assert drawn(0.0, 1.0) == {1}  # greedy


def test_a_second_generation_reads_the_cache_and_new_settings_generate_again(tmp_path):
    tok, model = byte_tokenizer(), tiny_llama()
    calls = _count_forwards(model)
    config = GenerationConfig(prompt_tokens=8, new_tokens=6, sequences=4, batch_size=2)
    first = generate_corpus(model, tok, config, corpus=CORPUS, root=tmp_path)
    made = calls[0]
    assert made >= 2 * 6 and not first.reused
    again = generate_corpus(model, tok, config, corpus=CORPUS, root=tmp_path)
    assert calls[0] == made  # nothing generated
    assert again.reused and again.ids.tolist() == first.ids.tolist()
    assert again.seconds == first.seconds and again.new_tokens == first.new_tokens  # the cost it had
    generate_corpus(model, tok, replace(config, new_tokens=7), corpus=CORPUS, root=tmp_path)
    assert calls[0] > made
    # Another teacher is another entry.
    other = tiny_llama(seed=1)
    other_calls = _count_forwards(other)
    generate_corpus(other, tok, config, corpus=CORPUS, root=tmp_path)
    assert other_calls[0] > 0


def test_a_stopped_generation_leaves_no_entry_that_looks_complete(tmp_path):
    tok, model = byte_tokenizer(), tiny_llama()
    config = GenerationConfig(prompt_tokens=8, new_tokens=10, sequences=6, batch_size=2)
    progress = Progress(lambda fraction, _msg: progress.cancel() if fraction > 0.4 else None)
    with pytest.raises(RunInterrupted, match="nothing was kept"):
        generate_corpus(model, tok, config, corpus=CORPUS, root=tmp_path, progress=progress)
    left = list(tmp_path.rglob("*")) if tmp_path.exists() else []
    assert not [p for p in left if p.name == "meta.json"], left
    calls = _count_forwards(model)
    out = generate_corpus(model, tok, config, corpus=CORPUS, root=tmp_path)
    assert calls[0] > 0 and not out.reused and out.n_sequences == 6


def _ctx(teacher, progress: Progress | None = None) -> ApplyContext:
    return ApplyContext(
        tokenizer=byte_tokenizer(), corpus=CORPUS, base=teacher, progress=progress or Progress.null()
    )


def test_distill_on_teacher_generated_data_trains_and_records_the_generation(home):
    teacher = tiny_llama(layers=3)
    student = tiny_llama(seed=5, layers=2)
    before = copy.deepcopy(student.state_dict())
    config = DistillConfig(data="teacher-generated", loss="hard", steps=10, **TINY, **GEN)
    ctx = _ctx(teacher)
    out = apply_(student, config, ctx)
    losses = ctx.extras["loss_curve"]["loss"]
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3, losses
    assert any(not torch.equal(before[k], v) for k, v in out.state_dict().items())
    assert ctx.extras["training_data"] == "teacher-generated"
    assert ctx.metrics["generation_sequences"] == 8 and 8 <= ctx.metrics["generation_tokens"] <= 8 * 24
    assert ctx.metrics["generation_seconds"] > 0 and ctx.metrics["generation_reused"] == 0
    assert ctx.extras["generation"]["sample_prompt"] in CORPUS.text("training")
    assert "teacher-gen 8x24" in config.label() and config.label().startswith("distill hard")
    # Token-level KD on the same generated sequences (the hard + soft mix) reuses the generated corpus.
    kd = replace(config, loss="forward_kl", alpha=0.5, teacher="topk", top_k=8)  # a store over those windows
    ctx2 = _ctx(teacher)
    apply_(tiny_llama(seed=5, layers=2), kd, ctx2)
    assert ctx2.metrics["generation_reused"] == 1 and ctx2.metrics["training_steps"] == 10
    assert ctx2.metrics["store_bytes_per_token"] == 8 * 6
    assert ctx2.metrics["generation_seconds"] == ctx.metrics["generation_seconds"]
    # The corpus-trained baseline with the same settings sees other windows: the data option changes the run.
    corpus_run = replace(config, data="corpus")
    ctx3 = _ctx(teacher)
    apply_(tiny_llama(seed=5, layers=2), corpus_run, ctx3)
    assert "generation_seconds" not in ctx3.metrics and ctx3.extras["training_data"] == "corpus"
    assert ctx3.extras["loss_curve"]["loss"] != losses
    assert "teacher-gen" not in corpus_run.label()


def test_a_run_records_the_data_option_and_the_generation_cost(home, registry_url):
    from workbench.evaluate import Suite
    from workbench.experiment import run_experiment
    from workbench.models import load_model

    suite = Suite(
        "seq-test",
        n_tokens=128,
        context_length=32,
        n_generations=0,
        speed_prompt=8,
        speed_tokens=2,
        speed_repeats=1,
    )
    config = DistillConfig(data="teacher-generated", loss="hard", steps=2, **TINY, **GEN)
    result = run_experiment(load_model("tiny-llama"), [config], suite, registry=registry_url)
    assert result.ok, result.error
    assert result.metrics["generation_sequences"] == 8 and result.metrics["generation_tokens"] > 0
    from workbench.registry import Registry

    with Registry.open(registry_url) as reg:
        row = reg.runs_frame().iloc[-1]
    assert row["param_data"] == "teacher-generated" and row["metric_generation_tokens"] > 0
    assert "teacher-gen" in row["pipeline"]


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"gen_new_tokens": 0}, "gen_new_tokens=0"),
        ({"gen_sequences": 0}, "gen_sequences=0"),
        ({"gen_temperature": -0.5}, "gen_temperature=-0.5 must be >= 0"),
        ({"gen_top_p": 0.0}, "gen_top_p=0.0"),
        ({"gen_source": "list", "gen_prompts": ()}, "at least one prompt"),
        ({"gen_source": "list", "gen_prompts": ("  ",)}, "at least one prompt"),
        ({"gen_source": "file"}, "needs gen_prompt_file"),
        ({"gen_source": "web"}, "choose one of corpus, list, file"),
        ({"data": "synthetic"}, "data='synthetic'; choose one of corpus, teacher-generated"),
        (
            {"gen_source": "list", "gen_prompts": ("a",), "gen_sequences": 2, "gen_temperature": 0},
            "greedy",
        ),
    ],
)
def test_bad_generation_settings_are_refused_with_what_to_do(params, message):
    with pytest.raises(ConfigError, match=message) as err:
        DistillConfig(data=params.pop("data", "teacher-generated"), **params)
    assert str(err.value).startswith("distill: ")


def test_on_the_corpus_the_prompt_source_need_not_be_complete_but_values_are_checked():
    kept = DistillConfig(gen_source="list")  # not used while data='corpus'
    assert "gen_source=list" in kept.label()  # still a different run, so a different label
    with pytest.raises(ConfigError, match="gen_new_tokens=0"):
        DistillConfig(gen_new_tokens=0)


def test_bad_generation_settings_are_refused_before_any_generation(tmp_path):
    for params, message in [
        ({"new_tokens": 0}, "new_tokens=0"),
        ({"sequences": 0}, "sequences=0"),
        ({"temperature": -1}, "temperature=-1"),
        ({"source": "list"}, "at least one prompt"),
    ]:
        with pytest.raises(ConfigError, match=message):
            GenerationConfig(**params)
    tok, model = byte_tokenizer(), tiny_llama()
    calls = _count_forwards(model)
    empty, missing = tmp_path / "empty.txt", tmp_path / "missing.txt"
    empty.write_text("\n  \n")
    for path, message in [(empty, "holds no prompt"), (missing, "cannot be read")]:
        config = GenerationConfig(source="file", prompt_file=str(path))
        with pytest.raises(ConfigError, match=message):
            generate_corpus(model, tok, config, root=tmp_path)
        # The technique's check refuses it before a run is recorded.
        with pytest.raises(ConfigError, match=f"distill: gen_prompt_file=.*{message}"):
            check(
                model, DistillConfig(data="teacher-generated", gen_source="file", gen_prompt_file=str(path))
            )
    with pytest.raises(ConfigError, match="fewer than prompt_tokens=100000; lower prompt_tokens"):
        generate_corpus(model, tok, GenerationConfig(prompt_tokens=100_000), corpus=CORPUS, root=tmp_path)
    with pytest.raises(ConfigError, match="greedy"):
        prompt_ids(GenerationConfig(prompt_tokens=64, sequences=10_000, temperature=0), tok, CORPUS)
    assert calls[0] == 0
    good = tmp_path / "prompts.txt"
    good.write_text("def add(a, b):\n\nThe fox\n")
    out = generate_corpus(
        model,
        tok,
        GenerationConfig(source="file", prompt_file=str(good), sequences=2, new_tokens=3),
        root=tmp_path,
    )
    assert [tok.decode(out.sequence(i)[: out.prompt_lengths[i]].tolist()) for i in range(2)] == [
        "def add(a, b):",
        "The fox",
    ]


def test_the_distill_tab_data_choice_builds_the_config(registry_url, tmp_path, monkeypatch):
    from widgets import Workbench

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WORKBENCH_HOME", str(tmp_path / "home"))
    bench = Workbench(registry_url, model="tiny-llama", poll_interval=0)
    try:
        panel = bench.distill
        assert panel.data.options == ("corpus", "teacher-generated") and panel.data.value == "corpus"
        assert panel.pipeline()[-1].data == "corpus"
        panel.data.value = "teacher-generated"
        panel.overrides = {"gen_sequences": 4, "gen_new_tokens": 16}
        kd, hard = panel.pipeline()[-1], panel.pipeline(hard=True)[-1]
        assert kd.data == hard.data == "teacher-generated" and hard.loss == "hard"
        assert kd.generation(0) == GenerationConfig(sequences=4, new_tokens=16)
        assert "teacher-gen 4x16" in kd.label()
        # The generation's progress partials reach the panel's message.
        panel._listener("x")({"generation_sequences": 2, "generation_of": 4})
        assert "Teacher writing the training corpus: 2 of 4 sequences" in panel.message.value
    finally:
        bench.close()
