"""Decode tokens/s at batch 1: one rank vs a ring of N ranks, same model, same run.

    python bench/ring_decode.py [--ranks 2] [--trials 3] [--tokens 64] [--json]

Makes (once) a random-weight Llama large enough that one decode step takes well
over 20 ms on a CPU here (8 layers, hidden 1024: 364 MB fp32), then alternates
`mlxring generate --ranks 1` and `--ranks N` runs and reports the median
decode rates and their ratio (target: ring >= 0.9 x one rank).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

MODEL = Path(__file__).resolve().parent.parent / ".cache" / "bench-llama-h1024-l8"
SHAPE = ["--layers", "8", "--hidden", "1024", "--intermediate", "2816", "--heads", "16"]


def mlxring(*args: str) -> str:
    out = subprocess.run([sys.executable, "-m", "mlxring", *args], capture_output=True, text=True)
    if out.returncode:
        sys.exit(f"mlxring {' '.join(args)} failed:\n{out.stderr}")
    return out.stdout


def decode_rate(ranks: int, tokens: int) -> dict:
    args = ["--raw", "--max-tokens", str(tokens), "--json", "--ranks", str(ranks)]
    out = mlxring("generate", "--model", str(MODEL), "--prompt", "Benchmark the ring", *args)
    return json.loads(out)["timing"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if not (MODEL / "config.json").exists():
        mlxring("make-tiny", "--family", "llama", "--out", str(MODEL), *SHAPE)
    rates: dict[int, list[float]] = {1: [], args.ranks: []}
    for _ in range(args.trials):
        for ranks in rates:
            rates[ranks].append(decode_rate(ranks, args.tokens)["decode_tok_s"])
    one, ring = (statistics.median(rates[r]) for r in rates)
    result = {
        "model": MODEL.name,
        "decode_tok_s_1_rank": one,
        f"decode_tok_s_{args.ranks}_ranks": ring,
        "step_ms_1_rank": round(1000 / one, 1),
        "ratio": round(ring / one, 3),
        "trials": rates,
    }
    if args.json:
        print(json.dumps(result))
    else:
        print(f"batch 1 decode: 1 rank {one:.2f} tok/s ({1000 / one:.1f} ms/step), "
              f"{args.ranks} ranks {ring:.2f} tok/s: ratio {ring / one:.3f}")  # fmt: skip


if __name__ == "__main__":
    main()
