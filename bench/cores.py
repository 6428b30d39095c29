"""How much two ranks on this machine slow each other: the ceiling of a 2-rank ring here.

    python bench/cores.py [--rounds 3]

A pipelined ring of two ranks on one machine can at best do twice one node's work only
if two processes computing at once each run as fast as one alone. This runs the same
fixed mlx work (the prefill of 64 tokens through the benchmark Llama's layers, as a rank
computes it) in one process alone, then in two processes at once, and prints each
one's time and the ceiling they imply for the ring against one node: 2 x alone /
together. Nothing else should run meanwhile (the load average is printed).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

from common import ensure_model

WORK = """
import time, mlx.core as mx
from mlxring.shards import load_shard
shard = load_shard({model!r}, 0, 8, True)
x = shard.embed(mx.array([list(range(64))]))
mx.eval(x)
def once():
    out = shard(x, shard.make_cache())
    mx.eval(out)
once()
started = time.perf_counter()
for _ in range({repeat}):
    once()
print(time.perf_counter() - started, flush=True)
"""


def run(copies: int, model: str, repeat: int) -> list[float]:
    """Seconds each of `copies` processes took for the same work, started together."""
    code = WORK.format(model=model, repeat=repeat)
    procs = [
        subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
        for _ in range(copies)
    ]
    return [float(p.communicate()[0].split()[-1]) for p in procs]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeat", type=int, default=6, help="prefills per process")
    args = parser.parse_args()
    model = str(ensure_model())
    alone, together = [], []
    for _ in range(args.rounds):
        alone += run(1, model, args.repeat)
        together += run(2, model, args.repeat)
    best_alone, mean_together = min(alone), sum(together) / len(together)
    ceiling = 2 * best_alone / mean_together
    print(f"load average before: {os.getloadavg()[0]:.2f}")
    print(f"one process alone: {', '.join(f'{t:.2f}' for t in alone)} s")
    print(f"two at once:       {', '.join(f'{t:.2f}' for t in together)} s")
    print(f"slowdown together: {mean_together / best_alone:.2f}x; 2-rank ceiling: {ceiling:.2f}x")
    print(json.dumps({"alone_s": alone, "together_s": together, "ceiling": round(ceiling, 3)}))


if __name__ == "__main__":
    main()
