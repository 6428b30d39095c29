"""A tiny Llama: GQA, untied lm_head."""

from __future__ import annotations

from transformers import LlamaConfig, LlamaForCausalLM

from mlxring.tiny import INIT_STD, VOCAB_SIZE


def build(
    family: str, layers: int, hidden: int, intermediate: int | None, heads: int, layout: str | None
):

    config = LlamaConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=hidden,
        intermediate_size=intermediate or 2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=max(1, heads // 2),
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        initializer_range=INIT_STD,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    return LlamaForCausalLM(config)
