"""What sealing every hop costs: per hop, and as a share of a decode step.

    python bench/crypto_cost.py [--trials 3] [--tokens 64] [--json]

1. Per hop, in-process: seal + open (ChaCha20-Poly1305) of a decode step's
   message (batch 1, hidden 1024, fp32: the benchmark model's) and of a
   512-token prefill chunk, median of many runs.
2. Through a 2-rank ring on the benchmark model, alternating runs with crypto on
   and off (MLXRING_UNSAFE_NO_CRYPTO=1, which exists for this measurement only):
   median decode step time of each. Target: crypto <= 2% of a decode step.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

from common import decode_timing, ensure_model

from mlxring.crypto.link import Direction

HIDDEN = 1024


def hop_seconds(nbytes: int, runs: int = 2000) -> float:
    """Median time to seal and open one message of `nbytes` (both ends of a hop)."""
    key = bytes(32)
    sender, receiver = Direction("bench", 0, 1, key), Direction("bench", 0, 1, key)
    body, header = bytes(nbytes), bytes(32)
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        receiver.open(sender.seal(body, header), header)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    decode_bytes = HIDDEN * 4 + 64  # one decode step's sealed body (hidden states + header)
    per_hop_decode = hop_seconds(decode_bytes)
    per_hop_prefill = hop_seconds(512 * HIDDEN * 4, runs=200)

    ensure_model()
    steps: dict[str, list[float]] = {"on": [], "off": []}
    for _ in range(args.trials):
        for mode, env in (("on", {}), ("off", {"MLXRING_UNSAFE_NO_CRYPTO": "1"})):
            steps[mode].append(1000 / decode_timing(2, args.tokens, env)["decode_tok_s"])
    on, off = statistics.median(steps["on"]), statistics.median(steps["off"])
    hops = 2  # a 2-rank ring: head -> rank 1 -> head
    result = {
        "seal_open_us_per_hop_decode": round(per_hop_decode * 1e6, 1),
        "seal_open_us_per_hop_prefill_512": round(per_hop_prefill * 1e6, 1),
        "decode_step_ms_crypto_on": round(on, 2),
        "decode_step_ms_crypto_off": round(off, 2),
        "crypto_share_of_step_from_hops": round(hops * per_hop_decode * 1e3 / on, 5),
        "crypto_share_of_step_on_vs_off": round((on - off) / on, 4),
        "trials_ms": steps,
    }
    if args.json:
        print(json.dumps(result))
    else:
        print(
            f"seal+open per hop: {per_hop_decode * 1e6:.1f} us (decode), "
            f"{per_hop_prefill * 1e6:.0f} us (512-token prefill chunk)"
        )
        print(
            f"2-rank decode step: crypto on {on:.2f} ms, off {off:.2f} ms; crypto share "
            f"{hops * per_hop_decode * 1e3 / on:.3%} from the hops, "
            f"{(on - off) / on:+.2%} measured on vs off"
        )


if __name__ == "__main__":
    main()
