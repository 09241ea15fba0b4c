"""Students cut from the teacher: shapes, the weights they copy, Block Influence, tokenizer checks."""

from __future__ import annotations

import copy

import pytest
import torch

from workbench.corpus import split_paragraphs
from workbench.distill import (
    block_influence,
    check_same_tokenizer,
    drop_layers,
    layers_to_drop,
    prune_width,
    width_importance,
)
from workbench.errors import ConfigError
from workbench.techniques import ApplyContext, apply_, check
from workbench.techniques.prune_layers import PruneConfig
from workbench.tiny import byte_tokenizer, tiny_llama


def _ids(n: int = 4, s: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, s), generator=torch.Generator().manual_seed(seed))


def test_block_influence_ranks_an_identity_layer_least_important():
    model = tiny_llama(layers=4)
    with torch.no_grad():  # layer 2 adds nothing to the residual stream: output == input
        model.model.layers[2].self_attn.o_proj.weight.zero_()
        model.model.layers[2].mlp.down_proj.weight.zero_()
    influence = block_influence(model, _ids())
    assert influence[2] == pytest.approx(0.0, abs=1e-6), influence
    assert min(v for i, v in enumerate(influence) if i != 2) > 1e-3, influence
    assert layers_to_drop(influence, 1) == [2]


def test_dropped_layers_leave_the_kept_ones_with_their_teacher_weights():
    teacher = tiny_llama(layers=4)
    student = drop_layers(teacher, [0, 2])
    assert student.config.num_hidden_layers == 2 and len(student.model.layers) == 2
    assert teacher.config.num_hidden_layers == 4  # the teacher is untouched
    for new, old in ((0, 1), (1, 3)):
        for name, p in student.model.layers[new].state_dict().items():
            assert torch.equal(p, teacher.model.layers[old].state_dict()[name]), (new, old, name)
    assert torch.equal(student.model.embed_tokens.weight, teacher.model.embed_tokens.weight)
    # The student runs, and its KV-cache layer indices were renumbered (generation uses them).
    out = student.generate(_ids(1, 4), max_new_tokens=3, do_sample=False)
    assert out.shape == (1, 7)


def test_a_model_with_its_second_layer_dropped_matches_the_teacher_run_without_it():
    teacher = tiny_llama(layers=3)
    ids = _ids(2, 8)
    skipped = copy.deepcopy(teacher)
    with torch.no_grad():
        skipped.model.layers[1].self_attn.o_proj.weight.zero_()
        skipped.model.layers[1].mlp.down_proj.weight.zero_()
    student = drop_layers(teacher, [1])
    torch.testing.assert_close(student(ids).logits, skipped(ids).logits, atol=1e-5, rtol=1e-5)


def test_width_pruning_keeps_the_most_active_neurons_and_heads_with_their_weights():
    teacher = tiny_llama(layers=2)  # hidden 64, FFN 128, 4 query heads in 2 kv groups, head_dim 16
    ids = _ids()
    imp = width_importance(teacher, ids)
    student = prune_width(teacher, ids, ffn_size=96, heads=2, importance=imp)
    assert student.config.intermediate_size == 96 and student.config.num_attention_heads == 2
    assert student.config.head_dim == 16 and student.config.num_key_value_heads == 2
    for i in range(2):
        t_mlp, s_mlp = teacher.model.layers[i].mlp, student.model.layers[i].mlp
        keep = torch.sort(torch.topk(imp["ffn"][i], 96).indices).values
        assert torch.equal(s_mlp.gate_proj.weight, t_mlp.gate_proj.weight[keep])
        assert torch.equal(s_mlp.up_proj.weight, t_mlp.up_proj.weight[keep])
        assert torch.equal(s_mlp.down_proj.weight, t_mlp.down_proj.weight[:, keep])
        # one query head kept per kv group: the more active of heads (0, 1) and of heads (2, 3)
        h = imp["heads"][i]
        kept = [int(torch.argmax(h[0:2])), 2 + int(torch.argmax(h[2:4]))]
        t_attn, s_attn = teacher.model.layers[i].self_attn, student.model.layers[i].self_attn
        for slot, head in enumerate(kept):
            assert torch.equal(
                s_attn.q_proj.weight[slot * 16 : (slot + 1) * 16],
                t_attn.q_proj.weight[head * 16 : (head + 1) * 16],
            )
            assert torch.equal(
                s_attn.o_proj.weight[:, slot * 16 : (slot + 1) * 16],
                t_attn.o_proj.weight[:, head * 16 : (head + 1) * 16],
            )
        assert torch.equal(s_attn.k_proj.weight, t_attn.k_proj.weight)
    assert student(ids).logits.shape == (4, 16, teacher.config.vocab_size)


def test_pruning_every_neuron_but_the_inactive_ones_changes_nothing():
    teacher = tiny_llama()
    with torch.no_grad():  # neurons 100.. never fire: their up rows are zero, so their activation is 0
        for layer in teacher.model.layers:
            layer.mlp.up_proj.weight[100:] = 0
    ids = _ids()
    student = prune_width(teacher, ids, ffn_size=100)
    torch.testing.assert_close(student(ids).logits, teacher(ids).logits, atol=1e-5, rtol=1e-5)


def _ctx() -> ApplyContext:
    text = "\n\n".join(f"Paragraph {i}: the quick brown fox jumps over the lazy dog. " * 8 for i in range(40))
    return ApplyContext(tokenizer=byte_tokenizer(), corpus=split_paragraphs("fox", text))


def test_prune_technique_reports_what_it_dropped_and_the_preview_matches():
    from workbench.techniques.base import stacking_for

    model = tiny_llama(layers=4)
    config = PruneConfig(drop=1, ffn_size=64, samples=2, seq_len=32)
    preview = stacking_for(config).preview(model, config)
    ctx = _ctx()
    student = apply_(copy.deepcopy(model), config, ctx)
    assert student.config.num_hidden_layers == preview.config.num_hidden_layers == 3
    assert student.config.intermediate_size == preview.config.intermediate_size == 64
    assert len(ctx.extras["block_influence"]) == 4 and len(ctx.extras["dropped_layers"]) == 1
    assert ctx.metrics["params_after_prune"] < ctx.metrics["params_before_prune"]
    assert PruneConfig(layers=(1, 3)).label() == "prune -L1,3"


@pytest.mark.parametrize(
    "config, match",
    [
        ({"drop": 2}, "leaves none"),
        ({"layers": (0, 5)}, "layers 0..1"),
        ({"ffn_size": 500}, "FFN width is 128"),
        ({"heads": 3}, "multiple of 2"),
    ],
)
def test_bad_student_shapes_are_refused_before_work(config, match):
    with pytest.raises(ConfigError, match=match):
        check(tiny_llama(), PruneConfig(**config))


def test_an_empty_prune_is_refused():
    with pytest.raises(ConfigError, match="nothing to prune"):
        PruneConfig()


def test_a_different_tokenizer_is_refused_with_what_differs():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {chr(c): i for i, c in enumerate(range(32, 127))}
    vocab["[UNK]"] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    other = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")
    check_same_tokenizer(byte_tokenizer(), byte_tokenizer())  # the same one passes
    with pytest.raises(
        ConfigError, match=r"vocabulary size 257 \(teacher\) vs 96 \(student\).*ids of the probe"
    ):
        check_same_tokenizer(byte_tokenizer(), other)
