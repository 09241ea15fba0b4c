"""Tiny random-weight models built from transformers configs, for fast tests and offline examples.

They run the same code paths as real checkpoints (the same classes, a real fast tokenizer) in milliseconds.
``tiny_llama`` is a Llama-style dense model; ``tiny_moe`` a Qwen2-MoE-style sparse model (top-k routed experts,
plus a shared expert), the family the expert-routing technique targets.
"""

from __future__ import annotations

import torch
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2MoeConfig,
    Qwen2MoeForCausalLM,
)

# 256 byte tokens + <eos>; padded to a multiple of 8 so embedding shapes look like real ones.
VOCAB_SIZE = 264
EOS_ID = 256


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """A real fast tokenizer over UTF-8 bytes (byte-level BPE with no merges): any text round-trips."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.pre_tokenizers import ByteLevel

    alphabet = ByteLevel.alphabet()  # the 256 printable stand-ins GPT-2 uses for bytes
    byte_to_unicode = sorted(alphabet, key=lambda ch: _byte_of(ch))
    vocab = {ch: i for i, ch in enumerate(byte_to_unicode)}
    vocab["<eos>"] = EOS_ID
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<eos>")
    fast.add_bos_token = False
    return fast


def _byte_of(ch: str) -> int:
    # Inverse of GPT-2's bytes_to_unicode: printable latin-1 bytes map to themselves, the rest to 256+.
    code = ord(ch)
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    if code in printable:
        return code
    others = [b for b in range(256) if b not in printable]
    return others[code - 256]


def tiny_llama(seed: int = 0, *, hidden_size: int = 64, layers: int = 2) -> LlamaForCausalLM:
    """A 2-layer Llama with hidden 64: every linear width divides by 32 and 64, as group sizes need."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        eos_token_id=EOS_ID,
        bos_token_id=None,
    )
    return LlamaForCausalLM(config).eval()


def tiny_moe(
    seed: int = 0, *, hidden_size: int = 64, layers: int = 2, experts: int = 8, top_k: int = 2
) -> Qwen2MoeForCausalLM:
    """A 2-layer Qwen2-MoE with 8 routed experts (top-2) and a shared expert in each layer."""
    torch.manual_seed(seed)
    config = Qwen2MoeConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        moe_intermediate_size=hidden_size,
        shared_expert_intermediate_size=hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_experts=experts,
        num_experts_per_tok=top_k,
        decoder_sparse_step=1,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        eos_token_id=EOS_ID,
        bos_token_id=None,
    )
    return Qwen2MoeForCausalLM(config).eval()


__all__ = ["EOS_ID", "VOCAB_SIZE", "byte_tokenizer", "tiny_llama", "tiny_moe"]
