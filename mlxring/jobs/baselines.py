"""The single-node baselines of `mlxring bench`: the same workload through another
library's own batched generation on one node (mlx-lm's BatchGenerator; transformers'
`generate` for the torch backend), summarized like the ring's runs."""

from __future__ import annotations

import time

from mlxring.jobs.workload import summarize, synthetic_prompts
from mlxring.model.facts import ModelFacts


def bench_single(model_dir: str, opts: dict) -> dict:
    """The baseline: mlx-lm's own BatchGenerator on one node, same workload."""
    # lazy: the baselines load their library only when run
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


def bench_single_torch(
    model_dir: str, opts: dict, device: str = "cpu", dtype: str = "auto"
) -> dict:
    """The torch baseline: transformers' own `generate` on one node, the whole batch at once."""
    # lazy: torch and transformers (the torch extra) only for the torch baseline
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.generation.streamers import BaseStreamer

    from mlxring.shards.torch_shard import resolve_device, resolve_dtype

    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, ModelFacts.read(model_dir))
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
            model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=g,
                min_new_tokens=g,
                do_sample=False,
                streamer=clock,
                pad_token_id=0,
            )
        if torch_device.type == "cuda":
            torch.cuda.synchronize()
        wall = time.perf_counter() - started
        steps = [t - started for t in clock.times[1:]]  # the first put() is the prompt
        return [{"times": steps} for _ in batch], wall

    run(prompts[:1])  # warm-up
    results, wall = run(prompts)
    return summarize(results, wall, "single", c)
