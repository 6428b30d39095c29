"""The memory-bandwidth roofline of decoding, measured on this machine.

A decode step reads every weight once, whatever the batch, so one stream cannot
decode faster than `copy bandwidth / weight bytes` tokens per second
(`tok_s_batch1`), and each request of a batch gets at most that: a batch of C
decodes at most C x `tok_s_batch1` in all. A system's `roofline_fraction` is its
per-request decode rate (tokens after the first, per second, median over requests)
over `tok_s_batch1`, that is steps per second x weight bytes / bandwidth.

Weight bytes are the checkpoint's (`footprint`: every layer plus embedding, final
norm and lm_head; a step reads only C rows of an untied embedding, a small
overcount). The bandwidth is the fastest of a 256 MiB numpy copy and the same copy
by the backend (mlx, or torch on its device), best of 5, counting bytes read plus
written (STREAM's Copy convention), measured in the same run as the systems.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import mlx.core as mx
import numpy as np

from mlxring.model.weights import footprint

COPY_BYTES = 256 << 20
REPEATS = 5


def weight_bytes(model_dir: str | Path) -> int:
    """Bytes of the checkpoint's weights: every layer's plus the head's tensors."""
    fp = footprint(model_dir)
    return sum(fp.layer_bytes) + fp.head_bytes


def best_seconds(copy: Callable[[], None], repeats: int = REPEATS) -> float:
    copy()  # warm-up: page faults, allocation, kernel compilation
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        copy()
        times.append(time.perf_counter() - started)
    return min(times)


def numpy_copy(nbytes: int) -> Callable[[], None]:
    src = np.ones(nbytes, dtype=np.uint8)
    dst = np.empty_like(src)
    return lambda: np.copyto(dst, src)


def mlx_copy(nbytes: int) -> Callable[[], None]:
    src = mx.ones((nbytes // 4,), dtype=mx.float32)
    mx.eval(src)
    return lambda: mx.eval(src + 0)  # one read and one write of every byte, like a copy


def torch_copy(nbytes: int, device: str) -> Callable[[], None]:
    # lazy: torch is the torch extra's, only for a torch comparison
    import torch

    src = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)

    def copy() -> None:
        dst.copy_(src)
        if dst.is_cuda:
            torch.cuda.synchronize()

    return copy


def copy_gb_s(compute: dict | None = None, nbytes: int = COPY_BYTES) -> float:
    """Memory bandwidth in GB/s: the fastest of numpy's copy and the backend's own."""
    seconds = best_seconds(numpy_copy(nbytes))  # its buffers are freed on return
    if compute and compute.get("backend") == "torch":
        own = torch_copy(nbytes, compute.get("device") or "cpu")
    else:
        own = mlx_copy(nbytes)
    seconds = min(seconds, best_seconds(own))
    return 2 * nbytes / seconds / 1e9


def measure(model_dir: str | Path, compute: dict | None = None) -> dict:
    """{weight_bytes, copy_gb_s, tok_s_batch1} of this model on this machine."""
    weights = weight_bytes(model_dir)
    gb_s = round(copy_gb_s(compute), 2)
    return {
        "weight_bytes": weights,
        "copy_gb_s": gb_s,
        "tok_s_batch1": round(gb_s * 1e9 / weights, 2),
    }


def fraction(per_request_tok_s: float | None, roofline: dict) -> float | None:
    """A per-request decode rate as a fraction of the batch-1 roofline."""
    if per_request_tok_s is None:
        return None
    return round(per_request_tok_s / roofline["tok_s_batch1"], 4)
