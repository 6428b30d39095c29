"""What the head does with a ready ring: generate from one prompt.

Jobs drive an `Engine` (mlxring.engine.engine). `complete` is the plain
one-sequence loop over a `LocalChain`, kept as the simplest reference path.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from mlxring.engine.request import SamplingParams
from mlxring.generate import DEFAULT_PREFILL_CHUNK, generate_tokens

DEFAULT_MAX_TOKENS = 64


def encode_prompt(tokenizer, prompt: str, raw: bool = False) -> list[int]:
    """Token ids of `prompt`, as a user turn of the chat template unless `raw`."""
    if not raw and getattr(tokenizer, "chat_template", None):
        messages = [{"role": "user", "content": prompt}]
        return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True))
    return list(tokenizer.encode(prompt))


def load_tokenizer(model_dir: str):
    from mlx_lm.utils import load_tokenizer as mlx_lm_load_tokenizer

    return mlx_lm_load_tokenizer(Path(model_dir))


def sampling(opts: dict) -> SamplingParams:
    return SamplingParams(
        max_tokens=opts.get("max_tokens", DEFAULT_MAX_TOKENS),
        temperature=opts.get("temp", 0.0),
        top_p=opts.get("top_p") or 1.0,
        seed=opts.get("seed"),
    )


def run_prompt(engine, tokenizer, prompt: str, opts: dict, out=sys.stdout) -> dict:
    """One request through the engine, streaming text to `out` unless opts['json']."""
    prompt_ids = encode_prompt(tokenizer, prompt, opts.get("raw", False))
    started = time.perf_counter()
    tokens, texts, times = [], [], []
    for event in engine.submit(prompt_ids, sampling(opts)):
        if event.finish_reason == "error":
            raise RuntimeError(f"the ring failed: {engine.error}")
        if event.token is not None:
            tokens.append(event.token)
            times.append(time.perf_counter())
        texts.append(event.text)
        if not opts.get("json"):
            print(event.text, end="", file=out, flush=True)
    if not opts.get("json"):
        print(file=out, flush=True)
    decode_s = times[-1] - times[0] if len(times) > 1 else 0.0
    timing = {
        "ttft_s": round(times[0] - started, 6) if times else None,
        "decode_s": round(decode_s, 6),
        "decode_tok_s": round((len(times) - 1) / decode_s, 3) if decode_s else None,
    }
    return {"tokens": tokens, "text": "".join(texts), "prompt_tokens": len(prompt_ids),
            "timing": timing}  # fmt: skip


def generate(engine, model_dir: str, opts: dict) -> None:
    """One prompt; with opts['json'] print one JSON object at the end."""
    result = run_prompt(engine, engine.tokenizer, opts["prompt"], opts)
    if opts.get("json"):
        print(json.dumps(result), flush=True)


def complete(model, tokenizer, prompt: str, opts: dict) -> dict:
    """The reference path: one sequence through a `LocalChain`, no engine, no batching."""
    model.reset()
    prompt_ids = encode_prompt(tokenizer, prompt, opts.get("raw", False))
    tokens = list(generate_tokens(
        model, model.cache_state, prompt_ids, opts.get("max_tokens", DEFAULT_MAX_TOKENS),
        temp=opts.get("temp", 0.0), top_p=opts.get("top_p", 0.0), seed=opts.get("seed"),
        stop_ids=tokenizer.eos_token_ids,
        prefill_chunk=opts.get("prefill_chunk", DEFAULT_PREFILL_CHUNK),
    ))  # fmt: skip
    return {"tokens": tokens, "text": tokenizer.decode(tokens), "prompt_tokens": len(prompt_ids)}
