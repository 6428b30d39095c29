"""A tiny Gemma 3 or Gemma 4 text model: sliding and global layers, tied embeddings.

The sliding window (4) is shorter than a test prompt, and both families mix the
two attention kinds within 6 layers. The tiny Gemma 4 shares K/V in its last 2
layers, and its sources sit in the second half, so an even 2-way split keeps
every sharing pair on one stage.
"""

from __future__ import annotations

import json

import torch
from transformers import Gemma3ForCausalLM, Gemma3TextConfig, Gemma4ForCausalLM, Gemma4TextConfig

from mlxring.tiny import INIT_STD, VOCAB_SIZE

SLIDING_WINDOW = 4
GEMMA3_PATTERN = 3  # a global layer every 3 layers: 2 and 5 of 6
GEMMA4_SHARED = 2  # the last 2 layers reuse an earlier layer's K/V
# Embeddings are multiplied by sqrt(hidden) and tied to the output: a small init
# keeps each token from mostly predicting itself; random norm scales (instead of
# all ones) make the layers' outputs less alike. Both make greedy tokens vary.
EMBED_STD = 0.02
NORM_STD = 0.5


def gemma4_layer_types(layers: int) -> list[str]:
    """Sliding and full layers alternating, full from the last unshared layer on.

    transformers forces the last layer to be full; making the last unshared layer
    full too puts every sharing pair in the model's second half.
    """
    first_shared = layers - GEMMA4_SHARED
    return [
        "full_attention" if i % 2 or i >= first_shared - 1 else "sliding_attention"
        for i in range(layers)
    ]


def build(
    family: str, layers: int, hidden: int, intermediate: int | None, heads: int, layout: str | None
):
    common = dict(
        vocab_size=VOCAB_SIZE,
        hidden_size=hidden,
        intermediate_size=intermediate or 2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=max(1, heads // 2),
        head_dim=hidden // heads,
        max_position_embeddings=4096,
        sliding_window=SLIDING_WINDOW,
        initializer_range=INIT_STD,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    if family == "gemma3":
        pattern = GEMMA3_PATTERN
        config = Gemma3TextConfig(
            **common,
            query_pre_attn_scalar=hidden // heads,
            sliding_window_pattern=pattern,  # read by mlx-lm
            layer_types=[
                "full_attention" if (i + 1) % pattern == 0 else "sliding_attention"
                for i in range(layers)
            ],
        )
        model = Gemma3ForCausalLM(config)
    else:
        config = Gemma4TextConfig(
            **common,
            global_head_dim=2 * hidden // heads,  # full layers have wider heads, as real ones
            layer_types=gemma4_layer_types(layers),
            num_kv_shared_layers=GEMMA4_SHARED,
            vocab_size_per_layer_input=VOCAB_SIZE,
            hidden_size_per_layer_input=8,
            final_logit_softcapping=30.0,
        )
        model = Gemma4ForCausalLM(config)
    _reinit(model)
    return model


def _reinit(model) -> None:

    with torch.no_grad():
        for name, p in model.named_parameters():
            if "embed_tokens" in name:
                p.normal_(0.0, EMBED_STD)
            elif "norm" in name:
                p.add_(torch.randn_like(p) * NORM_STD)


def finish(out, layout: str | None) -> None:
    """Write Gemma 4's `global_head_dim` into config.json, where real checkpoints have it.

    transformers 5.23 keeps it only as `per_layer_config`, which mlx-lm does not read.
    """

    path = out / "config.json"
    config = json.loads(path.read_text())
    if config["model_type"] == "gemma4_text":
        config["global_head_dim"] = 2 * config["head_dim"]
        path.write_text(json.dumps(config, indent=2) + "\n")
