"""The torch backend: a 2-rank torch ring vs transformers' own `generate` on one node.

    python bench/torch_ring.py [--prompt-tokens 8] [--gen-tokens 32] [--rounds 3]
                               [--device cpu|cuda] [--dtype auto] [--json]

Every configuration runs once per round, rounds interleaved, and the median of
each is reported (this machine's speed drifts from minute to minute). Rows:
transformers' `generate` on one node at batch 1 and 8 ("single"), the torch
ring at concurrency 1 (pipelined) and 8 (lockstep and pipelined). Each rank of
the local ring gets its share of the cores (`MLXRING_TORCH_THREADS`).

Targets (issue 8), torch CPU backend, concurrency 8: the ring's aggregate >= 3 x its
concurrency 1, >= 1.0 x transformers' batch 8, and pipelined >= 1.3 x lockstep.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from common import mlxring

MODEL = Path(__file__).resolve().parent.parent / ".cache" / "bench-llama-h768-l8"
# 211 MB of fp32 weights, the size the transformers figures were taken with
SHAPE = ["--layers", "8", "--hidden", "768", "--intermediate", "2048", "--heads", "12"]
RUNS = [("single", 1), ("single", 8), ("pipelined", 1), ("lockstep", 8), ("pipelined", 8)]


def run(mode: str, concurrency: int, args: argparse.Namespace, model: Path) -> dict:
    where = [] if mode == "single" else ["--ranks", "2"]
    compute = ["--backend", "torch", "--dtype", args.dtype]
    if args.device:
        compute += ["--device", args.device]
    out = mlxring(
        "bench",
        "--model",
        str(model),
        *where,
        *compute,
        "--mode",
        mode,
        "--json",
        "--concurrency",
        str(concurrency),
        "--prompt-tokens",
        str(args.prompt_tokens),
        "--gen-tokens",
        str(args.gen_tokens),
        env={"TRANSFORMERS_VERBOSITY": "error"},
    )
    return json.loads(out)


def median_row(rows: list[dict]) -> dict:
    out = dict(rows[0])
    for key in ("aggregate_tok_s", "per_request_tok_s", "ttft_ms_p50", "ttft_ms_p95", "wall_s"):
        out[key] = round(statistics.median(r[key] for r in rows), 3)
    out["aggregate_all_rounds"] = [r["aggregate_tok_s"] for r in rows]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompt-tokens", type=int, default=8)
    parser.add_argument("--gen-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--model", type=Path, default=MODEL, help="default: the 211 MB Llama")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if not (args.model / "config.json").exists():
        mlxring("make-tiny", "--family", "llama", "--out", str(args.model), *SHAPE)
    results: dict[tuple[str, int], list[dict]] = {key: [] for key in RUNS}
    for _ in range(args.rounds):
        for mode, c in RUNS:
            results[mode, c].append(run(mode, c, args, args.model))
    rows = [median_row(results[key]) for key in RUNS]
    agg = {(r["mode"], r["concurrency"]): r["aggregate_tok_s"] for r in rows}
    ratios = {
        "ring_c8_vs_c1": round(agg["pipelined", 8] / agg["pipelined", 1], 3),
        "ring_c8_vs_transformers_b8": round(agg["pipelined", 8] / agg["single", 8], 3),
        "pipelined_vs_lockstep_c8": round(agg["pipelined", 8] / agg["lockstep", 8], 3),
    }
    if args.json:
        print(json.dumps({"rows": rows, "ratios": ratios}))
        return
    print(
        "| mode | concurrency | aggregate tok/s (median) | all rounds | per-request tok/s "
        "| TTFT p50 ms |"
    )
    print("| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        mode = "transformers generate" if r["mode"] == "single" else f"torch ring, {r['mode']}"
        cells = [
            mode,
            r["concurrency"],
            f"{r['aggregate_tok_s']:.1f}",
            " / ".join(f"{a:.1f}" for a in r["aggregate_all_rounds"]),
            r["per_request_tok_s"],
            f"{r['ttft_ms_p50']:.0f}",
        ]
        print("| " + " | ".join(map(str, cells)) + " |")
    print("\n" + "; ".join(f"{k}: {v:.3f}" for k, v in ratios.items()))


if __name__ == "__main__":
    main()
