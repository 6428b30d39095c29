"""The head's `generate` job: one prompt through the engine, text streamed to stdout."""

from __future__ import annotations

import json
import sys
import time

from mlxring.engine.engine import Engine
from mlxring.engine.request import SamplingParams
from mlxring.model.tokenizer import encode_prompt
from mlxring.ring.transport import PeerLost


def sampling(opts: dict) -> SamplingParams:
    """The sampling parameters of `mlxring generate`'s options."""
    return SamplingParams(
        max_tokens=opts.get("max_tokens"),  # None: the engine's default
        temperature=opts.get("temp", 0.0),
        top_p=opts.get("top_p") or 1.0,
        seed=opts.get("seed"),
    )


def run_prompt(engine: Engine, tokenizer, prompt: str, opts: dict, out=sys.stdout) -> dict:
    """One request through the engine, streaming text to `out` unless opts['json']."""
    prompt_ids = encode_prompt(tokenizer, prompt, opts.get("raw", False))
    started = time.perf_counter()
    tokens, texts, times = [], [], []
    for event in engine.submit(prompt_ids, sampling(opts)):
        if event.finish_reason == "error":
            raise PeerLost(f"the ring failed: {engine.error}")  # the rank exits as lost
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
    return {
        "tokens": tokens,
        "text": "".join(texts),
        "prompt_tokens": len(prompt_ids),
        "timing": timing,
    }


def generate(engine: Engine, model_dir: str, opts: dict) -> None:
    """One prompt; with opts['json'] print one JSON object at the end."""
    result = run_prompt(engine, engine.tokenizer, opts["prompt"], opts)
    if opts.get("json"):
        print(json.dumps(result), flush=True)
