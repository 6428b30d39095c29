"""A decode step's linear products on one CPU thread: torch's default path against
oneDNN on packed weights (what `mlxring.shards.torch_pack` does at load).

    python bench/cpu_linear.py [--hidden 768] [--intermediate 2048] [--layers 4]
                               [--batches 1,4,8] [--rounds 3] [--json]

The products are those of `--layers` Llama layers after fusion (q/k/v as one, o, gate/up
as one, down), float32, one thread (a local ring stage's share of this machine). Each
round times every batch size both ways, alternated; the table gives every round.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F
from torch import nn

from mlxring.shards.torch_pack import PackedLinear


def shapes(hidden: int, intermediate: int) -> list[tuple[int, int]]:
    """(out, in) of one layer's products, as fused (Llama, no grouped K/V)."""
    return [
        (3 * hidden, hidden),
        (hidden, hidden),
        (2 * intermediate, hidden),
        (hidden, intermediate),
    ]


def mean_ms(run, reps: int) -> float:
    """The mean of `reps` calls of `run`, in ms, after 3 unmeasured ones."""
    for _ in range(3):
        run()
    started = time.perf_counter()
    for _ in range(reps):
        run()
    return (time.perf_counter() - started) / reps * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--intermediate", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batches", default="1,4,8")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    dense = [
        nn.Linear(i, o, bias=False)
        for _ in range(args.layers)
        for o, i in shapes(args.hidden, args.intermediate)
    ]
    packed = [PackedLinear(m) for m in dense]
    rows = []
    with torch.no_grad():
        for _ in range(args.rounds):
            for batch in (int(b) for b in args.batches.split(",")):
                xs = {m.in_features: torch.randn(batch, 1, m.in_features) for m in dense}
                torch_ms = mean_ms(
                    lambda xs=xs: [F.linear(xs[m.in_features], m.weight) for m in dense], args.reps
                )
                packed_ms = mean_ms(lambda xs=xs: [m(xs[m.in_features]) for m in packed], args.reps)
                rows.append(
                    {
                        "batch": batch,
                        "torch_ms": round(torch_ms, 2),
                        "packed_ms": round(packed_ms, 2),
                    }
                )
    if args.json:
        print(json.dumps({"products": len(dense), "rows": rows}))
        return
    print(
        f"{len(dense)} products, hidden {args.hidden}, intermediate {args.intermediate}, 1 thread"
    )
    print("| batch | torch F.linear ms | packed (oneDNN) ms | speed-up |")
    print("| --- | --- | --- | --- |")
    for r in sorted(rows, key=lambda r: r["batch"]):
        speedup = r["torch_ms"] / r["packed_ms"]
        print(f"| {r['batch']} | {r['torch_ms']:.2f} | {r['packed_ms']:.2f} | {speedup:.2f} |")


if __name__ == "__main__":
    main()
