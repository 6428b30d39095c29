"""Many requests at once through an engine: the `batch` and `bench` jobs of the head.

`batch` runs given requests concurrently and prints each one's tokens (tests
compare them with solo runs). `bench` runs a synthetic workload (C requests of P
random prompt tokens and G generated tokens each) and prints the figures:
TTFT p50/p95, per-request decode tokens/s, aggregate tokens/s.
"""

from __future__ import annotations

import json
import random
import statistics
import time

from mlxring.engine.request import SamplingParams


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def synthetic_prompts(count: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(length)] for _ in range(count)]


def run_all(engine, prompts: list[list[int]], params: list[SamplingParams],
            cancel: dict[int, int] | None = None, progress=None) -> list[dict]:  # fmt: skip
    """Submit every request at once; per request its tokens, finish reason and event times.

    `cancel` maps a request index to the number of tokens after which it is cancelled.
    """
    import threading

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


def batch(engine, model_dir: str, opts: dict) -> None:
    """Run opts['requests'] ([{prompt, max_tokens}]) concurrently; print results and stats."""
    reqs = opts["requests"]
    params = [SamplingParams(max_tokens=r["max_tokens"]) for r in reqs]
    cancel = {int(k): v for k, v in opts.get("cancel", {}).items()}
    results = run_all(engine, [r["prompt"] for r in reqs], params, cancel)
    print(json.dumps({"results": results, "stats": engine.stats()}), flush=True)


def summarize(results: list[dict], wall_s: float, mode: str, concurrency: int) -> dict:
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
    }


def bench(engine, model_dir: str, opts: dict) -> None:
    """The synthetic workload through the ring (modes lockstep / pipelined)."""
    from mlxring.node import control

    c, p, g = opts["concurrency"], opts["prompt_tokens"], opts["gen_tokens"]
    prompts = synthetic_prompts(c, p, engine.tokenizer.vocab_size)
    params = [SamplingParams(max_tokens=g, ignore_eos=True) for _ in prompts]
    run_all(engine, prompts[:1], params[:1])  # warm-up
    done, shown = 0, 0.0

    def progress(n: int) -> None:  # at most ~10 lines a second for the launcher's bar
        nonlocal done, shown
        done += n
        if opts.get("progress") and (time.monotonic() - shown > 0.1 or done == c * g):
            shown = time.monotonic()
            control("progress", done, c * g)

    started = time.perf_counter()
    results = run_all(engine, prompts, params, progress=progress)
    summary = summarize(results, time.perf_counter() - started, opts["mode"], c)
    print(json.dumps(summary), flush=True)


def bench_single(model_dir: str, opts: dict) -> dict:
    """The baseline: mlx-lm's own BatchGenerator on one node, same workload."""
    from mlx_lm import load
    from mlx_lm.generate import BatchGenerator

    model, tokenizer = load(model_dir)
    c, p, g = opts["concurrency"], opts["prompt_tokens"], opts["gen_tokens"]
    prompts = synthetic_prompts(c, p, tokenizer.vocab_size)

    def run(batch: list[list[int]]) -> tuple[list[dict], float]:
        gen = BatchGenerator(model, max_tokens=g, completion_batch_size=max(c, 1))
        started = time.perf_counter()
        uids = gen.insert(batch, max_tokens=[g] * len(batch))
        results = {u: {"times": []} for u in uids}
        live = set(uids)
        while live:
            for r in gen.next_generated():
                results[r.uid]["times"].append(time.perf_counter() - started)
                if r.finish_reason is not None:
                    live.discard(r.uid)
        gen.close()
        return list(results.values()), time.perf_counter() - started

    run(prompts[:1])  # warm-up
    results, wall = run(prompts)
    return summarize(results, wall, "single", c)


def bench_single_torch(model_dir: str, opts: dict, device: str = "cpu",
                       dtype: str = "auto") -> dict:  # fmt: skip
    """The torch baseline: transformers' own `generate` on one node, the whole batch at once."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.generation.streamers import BaseStreamer

    from mlxring.shards.torch_shard import resolve_device, resolve_dtype
    from mlxring.weights import read_config

    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, read_config(model_dir))
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch_dtype).to(torch_device)
    model.eval()
    c, p, g = opts["concurrency"], opts["prompt_tokens"], opts["gen_tokens"]
    vocab = model.config.get_text_config().vocab_size
    prompts = synthetic_prompts(c, p, vocab)

    class Clock(BaseStreamer):  # generate calls put() with the prompt, then once per step
        def __init__(self):
            self.times: list[float] = []

        def put(self, value):
            self.times.append(time.perf_counter())

        def end(self):
            pass

    def run(batch: list[list[int]]) -> tuple[list[dict], float]:
        ids = torch.tensor(batch, device=torch_device)
        clock = Clock()
        started = time.perf_counter()
        with torch.no_grad():
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=g,
                           min_new_tokens=g, do_sample=False, streamer=clock,
                           pad_token_id=0)  # fmt: skip
        if torch_device.type == "cuda":
            torch.cuda.synchronize()
        wall = time.perf_counter() - started
        steps = [t - started for t in clock.times[1:]]  # the first put() is the prompt
        return [{"times": steps} for _ in batch], wall

    run(prompts[:1])  # warm-up
    results, wall = run(prompts)
    return summarize(results, wall, "single", c)
