"""Many requests at once through an engine: the `batch` and `bench` jobs of the head.

`batch` runs given requests concurrently and prints each one's tokens (tests
compare them with solo runs). `bench` runs a synthetic workload (C requests of P
random prompt tokens and G generated tokens each) and prints the figures:
TTFT p50/p95, per-request decode tokens/s, aggregate tokens/s and aggregate decode
tokens/s. The single-node baselines of `mlxring bench` are in `mlxring.jobs.baselines`,
`--compare` in `mlxring.jobs.compare`.
"""

from __future__ import annotations

import json
import random
import statistics
import threading
import time

from mlxring.cluster.protocol import PROGRESS, control
from mlxring.engine.engine import Engine
from mlxring.engine.request import SamplingParams


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def synthetic_prompts(count: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(length)] for _ in range(count)]


def run_all(
    engine: Engine,
    prompts: list[list[int]],
    params: list[SamplingParams],
    cancel: dict[int, int] | None = None,
    progress=None,
) -> list[dict]:
    """Submit every request at once; per request its tokens, finish reason and event times.

    `cancel` maps a request index to the number of tokens after which it is cancelled.
    """
    started = time.perf_counter()
    handles = [engine.submit(p, sp) for p, sp in zip(prompts, params)]
    results: list[dict] = [{} for _ in handles]
    order = iter(range(10**9))  # a global order of token events across requests
    lock = threading.Lock()

    def consume(i: int) -> None:
        tokens, times, ticks, reason = [], [], [], None
        for event in handles[i]:
            if event.token is not None:
                with lock:
                    ticks.append(next(order))
                tokens.append(event.token)
                times.append(time.perf_counter() - started)
                if progress:
                    progress(1)
            reason = event.finish_reason or reason
            if cancel and cancel.get(i) == len(tokens) and not event.finish_reason:
                handles[i].cancel()
        results[i] = {"tokens": tokens, "times": times, "ticks": ticks, "finish_reason": reason}

    threads = [threading.Thread(target=consume, args=(i,)) for i in range(len(handles))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def batch(engine: Engine, model_dir: str, opts: dict) -> None:
    """Run opts['requests'] ([{prompt, max_tokens}]) concurrently; print results and stats."""
    reqs = opts["requests"]
    params = [SamplingParams(max_tokens=r["max_tokens"]) for r in reqs]
    cancel = {int(k): v for k, v in opts.get("cancel", {}).items()}
    results = run_all(engine, [r["prompt"] for r in reqs], params, cancel)
    print(json.dumps({"results": results, "stats": engine.stats()}), flush=True)


def decode_rate(results: list[dict]) -> float | None:
    """Aggregate decode tokens/s: every token after a request's first, over the time in
    which at least one request was decoding (the union of first-to-last-token spans)."""
    spans = sorted((r["times"][0], r["times"][-1]) for r in results if len(r["times"]) > 1)
    busy, covered = 0.0, float("-inf")
    for start, end in spans:
        busy += max(0.0, end - max(start, covered))
        covered = max(covered, end)
    tokens = sum(len(r["times"]) - 1 for r in results if r["times"])
    return round(tokens / busy, 3) if busy > 0 else None


def summarize(results: list[dict], wall_s: float, mode: str, concurrency: int) -> dict:
    """The figures of one run: `results` per request its token times (s from the start)."""
    ttft = [r["times"][0] * 1000 for r in results if r["times"]]
    per_request = [
        (len(r["times"]) - 1) / (r["times"][-1] - r["times"][0])
        for r in results
        if len(r["times"]) > 1 and r["times"][-1] > r["times"][0]
    ]
    total = sum(len(r["times"]) for r in results)
    return {
        "mode": mode,
        "concurrency": concurrency,
        "aggregate_tok_s": round(total / wall_s, 3),
        "per_request_tok_s": round(statistics.median(per_request), 3) if per_request else None,
        "ttft_ms_p50": round(percentile(ttft, 0.5), 1),
        "ttft_ms_p95": round(percentile(ttft, 0.95), 1),
        "generated_tokens": total,
        "wall_s": round(wall_s, 3),
        "decode_tok_s": decode_rate(results),
    }


def bench(engine: Engine, model_dir: str, opts: dict) -> None:
    """The synthetic workload through the ring; one summary line per concurrency
    (opts['concurrencies'], else the one opts['concurrency']), the same prompts for all."""
    levels = opts.get("concurrencies") or [opts["concurrency"]]
    p, g = opts["prompt_tokens"], opts["gen_tokens"]
    prompts = synthetic_prompts(max(levels), p, engine.tokenizer.vocab_size)
    params = [SamplingParams(max_tokens=g, ignore_eos=True) for _ in prompts]
    run_all(engine, prompts[:1], params[:1])  # warm-up
    total, done, shown = sum(levels) * g, 0, 0.0

    def progress(n: int) -> None:  # at most ~10 lines a second for the launcher's bar
        nonlocal done, shown
        done += n
        if opts.get("progress") and (time.monotonic() - shown > 0.1 or done == total):
            shown = time.monotonic()
            control(PROGRESS, done, total)

    for c in levels:
        started = time.perf_counter()
        results = run_all(engine, prompts[:c], params[:c], progress=progress)
        summary = summarize(results, time.perf_counter() - started, opts["mode"], c)
        print(json.dumps(summary), flush=True)
