"""The model's tokenizer (mlx-lm's wrapper, with its streaming detokenizer) and prompts."""

from __future__ import annotations

from pathlib import Path


def load_tokenizer(model_dir: str | Path):
    """mlx-lm's TokenizerWrapper of a model directory (eos ids from its generation config)."""
    # lazy: mlx_lm.utils imports transformers (2 s), which planning and the CLI's help skip
    from mlx_lm.utils import load_tokenizer as mlx_lm_load_tokenizer

    return mlx_lm_load_tokenizer(Path(model_dir))


def encode_prompt(tokenizer, prompt: str, raw: bool = False) -> list[int]:
    """Token ids of `prompt`, as a user turn of the chat template unless `raw`."""
    if not raw and getattr(tokenizer, "chat_template", None):
        messages = [{"role": "user", "content": prompt}]
        return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True))
    return list(tokenizer.encode(prompt))
