"""What the head does with a ready ring: generate from one prompt, or a prompt loop.

A job gets `model`: anything with `__call__(tokens) -> logits`, `cache_state()`
and `reset()` (a `LocalChain` on one node, a `RingHead` on a ring).
"""

from __future__ import annotations

import json
import sys
import time

from mlxring.generate import DEFAULT_PREFILL_CHUNK, generate_tokens

DEFAULT_MAX_TOKENS = 64


def encode_prompt(tokenizer, prompt: str, raw: bool = False) -> list[int]:
    """Token ids of `prompt`, as a user turn of the chat template unless `raw`."""
    if not raw and getattr(tokenizer, "chat_template", None):
        messages = [{"role": "user", "content": prompt}]
        return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True))
    return list(tokenizer.encode(prompt))


def load_tokenizer(model_dir: str):
    from pathlib import Path

    from mlx_lm.utils import load_tokenizer as mlx_lm_load_tokenizer

    return mlx_lm_load_tokenizer(Path(model_dir))


def complete(model, tokenizer, prompt: str, opts: dict, out=sys.stdout) -> dict:
    """Generate for `prompt`, streaming text to `out` unless opts['json']; return the result."""
    model.reset()
    prompt_ids = encode_prompt(tokenizer, prompt, opts.get("raw", False))
    detok = tokenizer.detokenizer
    detok.reset()
    tokens = []
    times = [time.perf_counter()]
    for token in generate_tokens(
        model,
        model.cache_state,
        prompt_ids,
        opts.get("max_tokens", DEFAULT_MAX_TOKENS),
        temp=opts.get("temp", 0.0),
        top_p=opts.get("top_p", 0.0),
        seed=opts.get("seed"),
        stop_ids=tokenizer.eos_token_ids,
        prefill_chunk=opts.get("prefill_chunk", DEFAULT_PREFILL_CHUNK),
    ):
        tokens.append(token)
        times.append(time.perf_counter())
        detok.add_token(token)
        if not opts.get("json"):
            print(detok.last_segment, end="", file=out, flush=True)
    detok.finalize()
    if not opts.get("json"):
        print(detok.last_segment, file=out, flush=True)
    decode_s = times[-1] - times[1]
    timing = {
        "ttft_s": round(times[1] - times[0], 6),
        "decode_s": round(decode_s, 6),
        "decode_tok_s": round((len(tokens) - 1) / decode_s, 3) if len(tokens) > 1 else None,
    }
    return {
        "tokens": tokens,
        "text": detok.text,
        "prompt_tokens": len(prompt_ids),
        "timing": timing,
    }


def generate(model, model_dir: str, opts: dict) -> None:
    """One prompt; with opts['json'] print one JSON object at the end."""
    result = complete(model, load_tokenizer(model_dir), opts["prompt"], opts)
    if opts.get("json"):
        print(json.dumps(result), flush=True)


def repl(model, model_dir: str, opts: dict) -> None:
    """Read prompts from stdin, one per line, until an empty line or end of input."""
    tokenizer = load_tokenizer(model_dir)
    print("ring ready: type a prompt and press Enter (empty line or Ctrl-D stops)", flush=True)
    for line in sys.stdin:
        if not line.strip():
            break
        complete(model, tokenizer, line.strip(), opts)
