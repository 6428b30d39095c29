"""One node, one request: mlxring's engine against mlx-lm's `generate_step`, alternated.

    python bench/single_stream.py [--rounds 4] [--tokens 64]

Both run in this process on the benchmark Llama, greedy, 8 prompt tokens, and take
turns (one warm-up each first), so that the machine's drift from minute to minute
falls on both alike. Decode tok/s = (tokens - 1) / (last - first token time).
Issue 15's target: mlxring >= 0.95 x generate_step.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import mlx.core as mx
from common import ensure_model
from mlx_lm import load
from mlx_lm.generate import generate_step

from mlxring.cluster.config import EngineConfig
from mlxring.engine.engine import Engine
from mlxring.engine.request import SamplingParams
from mlxring.model.tokenizer import load_tokenizer
from mlxring.shards import load_shard

PROMPT = list(range(10, 18))


def rate(times: list[float]) -> float:
    return (len(times) - 1) / (times[-1] - times[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=64)
    args = parser.parse_args()
    model_dir = str(ensure_model())
    model, _ = load(model_dir)
    shard = load_shard(model_dir, 0, shard_layers(model_dir), True)
    engine = Engine(shard, None, load_tokenizer(model_dir), EngineConfig())

    def mlx_lm() -> float:
        steps = generate_step(mx.array(PROMPT), model, max_tokens=args.tokens)
        return rate([time.perf_counter() for _ in steps])

    def mlxring() -> float:
        params = SamplingParams(max_tokens=args.tokens, ignore_eos=True)
        events = engine.submit(PROMPT, params)
        return rate([time.perf_counter() for e in events if e.token is not None])

    try:
        mlx_lm(), mlxring()  # warm-up
        theirs, ours = [], []
        for _ in range(args.rounds):
            theirs.append(mlx_lm())
            ours.append(mlxring())
    finally:
        engine.close()
    ratio = statistics.median(ours) / statistics.median(theirs)
    print(f"mlx-lm generate_step decode tok/s: {', '.join(f'{x:.2f}' for x in theirs)}")
    print(f"mlxring engine decode tok/s:       {', '.join(f'{x:.2f}' for x in ours)}")
    print(f"median ratio: {ratio:.3f} (target >= 0.95)")
    print(json.dumps({"mlx_lm": theirs, "mlxring": ours, "ratio": round(ratio, 3)}))


def shard_layers(model_dir: str) -> int:
    return json.loads(open(f"{model_dir}/config.json").read())["num_hidden_layers"]


if __name__ == "__main__":
    main()
