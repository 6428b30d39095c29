"""Continuous batching, 2 ranks on loopback: one node (mlx-lm's BatchGenerator) vs a
lockstep ring vs a pipelined ring, at concurrency 1 and 8, same model, same run.

    python bench/batching.py [--prompt-tokens 8] [--gen-tokens 32] [--json]

Targets (issue 6): pipelined @ c8 >= 1.6 x single @ c8, and >= 1.6 x lockstep @ c8.
"""

from __future__ import annotations

import argparse
import json

from common import MODEL, ensure_model, mlxring


def run(mode: str, concurrency: int, prompt_tokens: int, gen_tokens: int) -> dict:
    where = [] if mode == "single" else ["--ranks", "2"]
    out = mlxring(
        "bench",
        "--model",
        str(MODEL),
        *where,
        "--mode",
        mode,
        "--json",
        "--concurrency",
        str(concurrency),
        "--prompt-tokens",
        str(prompt_tokens),
        "--gen-tokens",
        str(gen_tokens),
    )
    return json.loads(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompt-tokens", type=int, default=8)
    parser.add_argument("--gen-tokens", type=int, default=32)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    ensure_model()
    rows = [
        run(mode, c, args.prompt_tokens, args.gen_tokens)
        for c in (1, 8)
        for mode in ("single", "lockstep", "pipelined")
    ]
    agg = {(r["mode"], r["concurrency"]): r["aggregate_tok_s"] for r in rows}
    ratios = {
        "pipelined_vs_single_c8": round(agg["pipelined", 8] / agg["single", 8], 3),
        "pipelined_vs_lockstep_c8": round(agg["pipelined", 8] / agg["lockstep", 8], 3),
    }
    if args.json:
        print(json.dumps({"rows": rows, "ratios": ratios}))
        return
    print(
        "| mode | concurrency | aggregate tok/s | per-request tok/s | TTFT p50 ms | TTFT p95 ms |"
    )
    print("| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        ttft = f"{r['ttft_ms_p50']:.0f} | {r['ttft_ms_p95']:.0f}"
        cells = [
            r["mode"],
            r["concurrency"],
            f"{r['aggregate_tok_s']:.2f}",
            r["per_request_tok_s"],
            ttft,
        ]
        print("| " + " | ".join(map(str, cells)) + " |")
    print(
        f"\npipelined / single @ c8: {ratios['pipelined_vs_single_c8']:.3f}; "
        f"pipelined / lockstep @ c8: {ratios['pipelined_vs_lockstep_c8']:.3f}"
    )


if __name__ == "__main__":
    main()
