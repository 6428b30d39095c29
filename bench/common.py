"""What the benchmarks share: the benchmark model and a timed `mlxring generate` run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

MODEL = Path(__file__).resolve().parent.parent / ".cache" / "bench-llama-h1024-l8"
# Large enough that one decode step takes well over 20 ms on a CPU here (364 MB fp32).
SHAPE = ["--layers", "8", "--hidden", "1024", "--intermediate", "2816", "--heads", "16"]


def mlxring(*args: str, env: dict | None = None) -> str:
    out = subprocess.run(
        [sys.executable, "-m", "mlxring", *args],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
    )
    if out.returncode:
        sys.exit(f"mlxring {' '.join(args)} failed:\n{out.stderr}")
    return out.stdout


def ensure_model() -> Path:
    if not (MODEL / "config.json").exists():
        mlxring("make-tiny", "--family", "llama", "--out", str(MODEL), *SHAPE)
    return MODEL


def decode_timing(ranks: int, tokens: int, env: dict | None = None) -> dict:
    """`timing` of one greedy generation through a local ring of `ranks` processes."""
    args = ["--raw", "--max-tokens", str(tokens), "--json", "--ranks", str(ranks)]
    out = mlxring(
        "generate", "--model", str(MODEL), "--prompt", "Benchmark the ring", *args, env=env
    )
    return json.loads(out)["timing"]
