"""Decode tokens/s at batch 1: one rank vs a ring of N ranks, same model, same run.

    python bench/ring_decode.py [--ranks 2] [--trials 3] [--tokens 64] [--json]

Alternates `mlxring generate --ranks 1` and `--ranks N` runs on the benchmark
model (bench/common.py) and reports the median decode rates and their ratio
(target: ring >= 0.9 x one rank).
"""

from __future__ import annotations

import argparse
import json
import statistics

from common import decode_timing, ensure_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    model = ensure_model()
    rates: dict[int, list[float]] = {1: [], args.ranks: []}
    for _ in range(args.trials):
        for ranks in rates:
            rates[ranks].append(decode_timing(ranks, args.tokens)["decode_tok_s"])
    one, ring = (statistics.median(rates[r]) for r in rates)
    result = {
        "model": model.name,
        "decode_tok_s_1_rank": one,
        f"decode_tok_s_{args.ranks}_ranks": ring,
        "step_ms_1_rank": round(1000 / one, 1),
        "ratio": round(ring / one, 3),
        "trials": rates,
    }
    if args.json:
        print(json.dumps(result))
    else:
        print(
            f"batch 1 decode: 1 rank {one:.2f} tok/s ({1000 / one:.1f} ms/step), "
            f"{args.ranks} ranks {ring:.2f} tok/s: ratio {ring / one:.3f}"
        )


if __name__ == "__main__":
    main()
