"""The shared oracles of the shard tests: mlx-lm's own full model, step by step, and
transformers' own `generate` (greedy) for the torch shards."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
from mlx_lm.models.cache import make_prompt_cache


def mlx_lm_steps(model, batch: int, prompt_len: int, decode_steps: int):
    """A random batch prompt, then greedy decode steps: (inputs, logits) per step."""
    rng = np.random.default_rng(0)
    prompt = mx.array(rng.integers(3, 300, size=(batch, prompt_len)))
    cache = make_prompt_cache(model)
    steps, logits = [prompt], [model(prompt, cache=cache)]
    for _ in range(decode_steps):
        steps.append(mx.argmax(logits[-1][:, -1:, :], axis=-1))
        logits.append(model(steps[-1], cache=cache))
    mx.eval(logits)
    return steps, logits


def hf_generate(model_dir, prompt: list[int], new_tokens: int, device: str = "cpu") -> list[int]:
    """transformers' own greedy tokens for `prompt` (EOS does not stop it)."""
    import torch  # lazy: the mlx-only shard tests need no torch
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device).eval()
    with torch.no_grad():
        out = hf.generate(
            torch.tensor([prompt], device=device),
            max_new_tokens=new_tokens,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )
    return out[0, len(prompt) :].tolist()
