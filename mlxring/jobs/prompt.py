"""The head's `generate` job: one prompt through the engine, text streamed to stdout, then
(as mlx_lm.generate does) the prompt and generation speeds and the peak memory, as notes
for the user: on stderr, or through the launcher when the head is a rank."""

from __future__ import annotations

import json
import resource
import sys
import time
from collections.abc import Callable

import mlx.core as mx

from mlxring.cluster.protocol import NOTE, control
from mlxring.engine.engine import Engine
from mlxring.engine.request import SamplingParams
from mlxring.errors import UserError
from mlxring.model.facts import ModelFacts
from mlxring.model.tokenizer import encode_prompt
from mlxring.ring.transport import PeerLost

GB = 1e9  # mlx_lm.generate's "Peak memory: X GB" is in 10^9 bytes


def sampling(opts: dict) -> SamplingParams:
    """The sampling parameters of `mlxring generate`'s options."""
    return SamplingParams(
        max_tokens=opts.get("max_tokens"),  # None: the engine's default
        temperature=opts.get("temp", 0.0),
        top_p=opts.get("top_p") or 1.0,
        seed=opts.get("seed"),
    )


def check_fits(prompt_tokens: int, max_tokens: int, context_length: int) -> None:
    if prompt_tokens + max_tokens > context_length:
        raise UserError(
            f"the prompt ({prompt_tokens} tokens) plus --max-tokens {max_tokens} exceed the "
            f"model's context length ({context_length} tokens); shorten the prompt or lower "
            "--max-tokens"
        )


def run_prompt(
    engine: Engine,
    tokenizer,
    prompt: str,
    opts: dict,
    out=sys.stdout,
    context_length: int | None = None,
) -> dict:
    """One request through the engine, streaming text to `out` unless opts['json']."""
    prompt_ids = encode_prompt(tokenizer, prompt, opts.get("raw", False))
    if context_length is not None:
        wanted = opts.get("max_tokens") or engine.config.max_tokens
        check_fits(len(prompt_ids), wanted, context_length)
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


def peak_memory(engine: Engine) -> tuple[int, str]:
    """The head's peak memory in bytes, and what was measured: mlx's peak, torch's CUDA
    max_memory_allocated, or (torch on the CPU) the process's peak resident memory."""
    device = getattr(engine.shard, "device", None)  # a torch shard's torch.device
    kind = getattr(device, "type", None)
    where = "" if engine.channel is None else ", the head node only"
    if kind == "cuda":
        # lazy: torch is loaded already on a torch node, and never needed elsewhere
        import torch

        return torch.cuda.max_memory_allocated(device), f"torch cuda max_memory_allocated{where}"
    if kind is not None:
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KB on Linux, bytes on macOS
        scale = 1 if sys.platform == "darwin" else 1024
        return rss * scale, f"torch cpu: peak resident memory of the process{where}"
    return mx.get_peak_memory(), f"mlx{where}"


def stats_lines(result: dict, peak: tuple[int, str]) -> list[str]:
    """mlx_lm.generate's summary: prompt and generation speeds, peak memory."""
    timing, generated = result["timing"], len(result["tokens"])
    ttft = timing["ttft_s"]
    prompt_tps = result["prompt_tokens"] / ttft if ttft else 0.0
    generation_tps = timing["decode_tok_s"] or 0.0
    peak_bytes, measured = peak
    return [
        "=" * 10,
        f"Prompt: {result['prompt_tokens']} tokens, {prompt_tps:.3f} tokens-per-sec",
        f"Generation: {generated} tokens, {generation_tps:.3f} tokens-per-sec",
        f"Peak memory: {peak_bytes / GB:.3f} GB ({measured})",
    ]


def control_note(line: str) -> None:
    control(NOTE, line)  # the launcher prints it as it is


def generate(
    engine: Engine, model_dir: str, opts: dict, note: Callable[[str], None] = control_note
) -> None:
    """One prompt; with opts['json'] print one JSON object at the end. The speeds and peak
    memory go to `note` (a rank's: control lines, printed by the launcher)."""
    context = ModelFacts.read(model_dir).context_length
    result = run_prompt(engine, engine.tokenizer, opts["prompt"], opts, context_length=context)
    peak = peak_memory(engine)
    result["peak_memory_bytes"] = peak[0]
    if opts.get("json"):
        print(json.dumps(result), flush=True)
    for line in stats_lines(result, peak):
        note(line)
