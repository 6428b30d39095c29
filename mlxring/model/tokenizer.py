"""The model's tokenizer (mlx-lm's wrapper, with its streaming detokenizer) and prompts.

End tokens: a model declares them in several places (config.json's `eos_token_id`,
generation_config.json's, which for chat models lists the end-of-turn token too, as
Llama 3's `<|eot_id|>`, and the tokenizer's own). Every one of them stops generation
(`tokenizer.eos_token_ids`), and none reaches the text: `hidden_ids` are the token ids
whose text a reply never shows, the end tokens and the other special tokens (as
mlx-lm's server, which never decodes the stop token), except the markers a tool call
is written with, which the tool-call parser reads.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

from mlxring.model.facts import text_config


def declared_eos_ids(model_dir: str | Path) -> list[int]:
    """Every end token id that config.json and generation_config.json declare."""
    ids: list[int] = []
    for name in ("config.json", "generation_config.json"):
        try:
            config = json.loads((Path(model_dir) / name).read_text())
        except (OSError, ValueError):
            continue
        for source in (config, text_config(config)):
            value = source.get("eos_token_id") if isinstance(source, dict) else None
            for i in value if isinstance(value, list) else [value]:
                if isinstance(i, int) and not isinstance(i, bool) and i not in ids:
                    ids.append(i)
    return ids


def load_tokenizer(model_dir: str | Path):
    """mlx-lm's TokenizerWrapper of a model directory, stopping on every declared end token."""
    # lazy: mlx_lm.utils imports transformers (2 s), which planning and the CLI's help skip
    from mlx_lm.utils import load_tokenizer as mlx_lm_load_tokenizer

    # the wrapper adds the tokenizer's own end token to these
    return mlx_lm_load_tokenizer(Path(model_dir), eos_token_ids=declared_eos_ids(model_dir))


def hidden_ids(tokenizer) -> frozenset[int]:
    """Token ids no reply's text shows: end tokens and special tokens, less the tool-call
    markers. Computed once per tokenizer."""
    cached = getattr(tokenizer, "_mlxring_hidden", None)
    if cached is not None:
        return cached
    special = set(getattr(tokenizer, "all_special_ids", ()) or ())
    decoder = getattr(tokenizer, "added_tokens_decoder", None) or {}
    special.update(i for i, added in decoder.items() if getattr(added, "special", False))
    special.update(getattr(tokenizer, "eos_token_ids", ()) or ())
    for marker in ("tool_call_start_tokens", "tool_call_end_tokens"):
        special.difference_update(getattr(tokenizer, marker, None) or ())
    hidden = frozenset(special)
    with contextlib.suppress(AttributeError):  # the wrapper keeps underscore names itself
        tokenizer._mlxring_hidden = hidden
    return hidden


def encode_prompt(tokenizer, prompt: str, raw: bool = False) -> list[int]:
    """Token ids of `prompt`, as a user turn of the chat template unless `raw`."""
    if not raw and getattr(tokenizer, "chat_template", None):
        messages = [{"role": "user", "content": prompt}]
        return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True))
    return list(tokenizer.encode(prompt))
