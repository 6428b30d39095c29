"""The single-node baselines of `mlxring bench`: the same workload through another
library's own generation on one node, summarized like the ring's runs.

Each library gives two runners (`Run`: prompts -> per-request token times, wall s):
its batched generation, all prompts at once (mlx-lm's BatchGenerator, transformers'
batch `generate`), and its single-stream generation serving the prompts one after
another (mlx-lm's `generate_step`, transformers' batch-1 `generate`). Every prompt
arrives at the start, so a later one's TTFT includes its wait in the queue.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from mlxring.jobs.workload import summarize, synthetic_prompts
from mlxring.model.facts import ModelFacts

Run = Callable[[list[list[int]]], tuple[list[dict], float]]


def one_by_one(generate_one: Callable[[list[int], float], list[float]]) -> Run:
    """A runner serving prompts one after another; `generate_one(prompt, started)`
    returns that prompt's token times in seconds since `started`."""

    def run(batch: list[list[int]]) -> tuple[list[dict], float]:
        started = time.perf_counter()
        results = [{"times": generate_one(prompt, started)} for prompt in batch]
        return results, time.perf_counter() - started

    return run


def mlx_lm_runners(model_dir: str, gen_tokens: int) -> tuple[dict[str, Run], int]:
    """mlx-lm's generation on one node: {system: runner} and the tokenizer's vocabulary."""
    # lazy: the baselines load their library only when run
    import mlx.core as mx
    from mlx_lm import load
    from mlx_lm.generate import BatchGenerator, generate_step

    model, tokenizer = load(model_dir)

    def batched(batch: list[list[int]]) -> tuple[list[dict], float]:
        gen = BatchGenerator(model, max_tokens=gen_tokens, completion_batch_size=len(batch))
        started = time.perf_counter()
        uids = gen.insert(batch, max_tokens=[gen_tokens] * len(batch))
        results = {u: {"times": []} for u in uids}
        live = set(uids)
        while live:
            for r in gen.next_generated():
                results[r.uid]["times"].append(time.perf_counter() - started)
                if r.finish_reason is not None:
                    live.discard(r.uid)
        gen.close()
        return list(results.values()), time.perf_counter() - started

    def single(prompt: list[int], started: float) -> list[float]:
        steps = generate_step(mx.array(prompt), model, max_tokens=gen_tokens)
        return [time.perf_counter() - started for _ in steps]  # no EOS stop: all tokens

    runners = {"mlx-lm-generate": one_by_one(single), "mlx-lm-batch": batched}
    return runners, tokenizer.vocab_size


def transformers_runners(
    model_dir: str, gen_tokens: int, device: str = "cpu", dtype: str = "auto"
) -> tuple[dict[str, Run], int]:
    """transformers' `generate` on one node: {system: runner} and the vocabulary size."""
    # lazy: torch and transformers (the torch extra) only for the torch baseline
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.generation.streamers import BaseStreamer

    from mlxring.shards.torch_shard import resolve_device, resolve_dtype

    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, ModelFacts.read(model_dir))
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch_dtype).to(torch_device)
    model.eval()

    class Clock(BaseStreamer):  # generate calls put() with the prompt, then once per step
        def __init__(self):
            self.times: list[float] = []

        def put(self, value):
            self.times.append(time.perf_counter())

        def end(self):
            pass

    def generate(batch: list[list[int]], started: float) -> list[dict]:
        ids = torch.tensor(batch, device=torch_device)
        clock = Clock()
        with torch.no_grad():
            model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=gen_tokens,
                min_new_tokens=gen_tokens,
                do_sample=False,
                streamer=clock,
                pad_token_id=0,
            )
        if torch_device.type == "cuda":
            torch.cuda.synchronize()
        steps = [t - started for t in clock.times[1:]]  # the first put() is the prompt
        return [{"times": steps} for _ in batch]

    def batched(batch: list[list[int]]) -> tuple[list[dict], float]:
        started = time.perf_counter()
        results = generate(batch, started)
        return results, time.perf_counter() - started

    runners = {
        "transformers-generate": one_by_one(lambda p, t: generate([p], t)[0]["times"]),
        "transformers-batch": batched,
    }
    return runners, model.config.get_text_config().vocab_size


def measure(run: Run, prompts: list[list[int]], mode: str) -> dict:
    """One warmed-up run of `prompts` through `run`, summarized."""
    run(prompts[:1])  # warm-up
    results, wall = run(prompts)
    return summarize(results, wall, mode, len(prompts))


def bench_single(model_dir: str, opts: dict) -> dict:
    """The baseline: mlx-lm's own BatchGenerator on one node, same workload."""
    runners, vocab = mlx_lm_runners(model_dir, opts["gen_tokens"])
    prompts = synthetic_prompts(opts["concurrency"], opts["prompt_tokens"], vocab)
    return measure(runners["mlx-lm-batch"], prompts, "single")


def bench_single_torch(
    model_dir: str, opts: dict, device: str = "cpu", dtype: str = "auto"
) -> dict:
    """The torch baseline: transformers' own `generate` on one node, the whole batch at once."""
    runners, vocab = transformers_runners(model_dir, opts["gen_tokens"], device, dtype)
    prompts = synthetic_prompts(opts["concurrency"], opts["prompt_tokens"], vocab)
    return measure(runners["transformers-batch"], prompts, "single")
