"""One rank of a ring: `python -m mlxring.node ARGS`, as the launcher starts it.

The arguments, environment, control lines and exit codes are the rank protocol
(`mlxring.cluster.protocol`). The rank joins the ring (authenticating both
links before it loads anything, so a wrong key fails fast), loads its layers,
and reports ready. Rank 0, the head, then runs its job over an engine; every
other rank serves its stage until the head stops the ring.
"""

from __future__ import annotations

import os
import sys
import threading
import time

import mlx.core as mx

from mlxring.cluster.config import EngineConfig
from mlxring.cluster.protocol import (
    ERROR,
    EXIT_AUTH,
    EXIT_INTEGRITY,
    EXIT_OK,
    EXIT_PEER_LOST,
    EXIT_USER_ERROR,
    LOADED,
    LOADING,
    READY,
    TORCH_THREADS_ENV,
    WATCH_PARENT_ENV,
    RankArgs,
    control,
)
from mlxring.crypto.handshake import HandshakeError
from mlxring.crypto.link import IntegrityError
from mlxring.errors import UserError
from mlxring.model.weights import footprint
from mlxring.ring.connect import join_ring
from mlxring.ring.transport import PeerLost


def run(args: RankArgs) -> None:
    rank, channel = join_ring(args.backend, args.cluster, args.key_file)
    # lazy: a rank refused at the handshake never pays for mlx-lm, transformers or FastAPI
    from mlxring.engine.engine import Engine
    from mlxring.engine.stage import serve_stage
    from mlxring.jobs import JOBS
    from mlxring.model.tokenizer import load_tokenizer
    from mlxring.shards import load_shard

    if args.compute == "torch" and (threads := os.environ.get(TORCH_THREADS_ENV)):
        import torch  # lazy: only torch ranks pay for it

        torch.set_num_threads(int(threads))
    if args.compute == "mlx" and args.device == "cpu":
        mx.set_default_device(mx.cpu)
    start, end = args.layers
    control(LOADING, start, end, weight_bytes(args.model, start, end, rank == 0))
    began = time.monotonic()
    shard = load_shard(
        args.model,
        start,
        end,
        rank == 0,
        backend=args.compute,
        device=args.device,
        dtype=args.dtype,
    )
    control(LOADED, f"{time.monotonic() - began:.2f}")
    if rank != 0:
        control(READY, rank)
        serve_stage(shard, channel)
        return
    config = EngineConfig(**args.job_options.get("engine", {}))
    names = args.job_options.get("nodes")  # ring order: errors name the node, not the rank
    engine = Engine(shard, channel, load_tokenizer(args.model), config, node_names=names)
    control(READY, rank)
    try:
        JOBS[args.job](engine, args.model, args.job_options)
    finally:
        if engine.error is None:  # a failed engine may be stuck in a receive: leave it
            engine.close()


def weight_bytes(model: str, start: int, end: int, is_head: bool) -> int:
    """Bytes of the weights this rank loads (0 if the headers cannot tell: the load says why)."""
    try:
        fp = footprint(model)
    except (UserError, OSError, ValueError):
        return 0
    return sum(fp.layer_bytes[start:end]) + (fp.head_bytes if is_head else 0)


def exit_with_parent(parent: int) -> None:
    """Die with the launcher (or the ssh session) that started this rank: never an orphan."""
    while os.getppid() == parent:
        time.sleep(0.5)
    os._exit(EXIT_PEER_LOST)


def main(argv: list[str] | None = None) -> int:
    args = RankArgs.parse(argv)
    if os.environ.get(WATCH_PARENT_ENV) == "1":
        threading.Thread(target=exit_with_parent, args=(os.getppid(),), daemon=True).start()
    try:
        run(args)
    except PeerLost as e:
        control(ERROR, f"node {args.name!r}: {e}")
        return EXIT_PEER_LOST
    except HandshakeError as e:
        control(ERROR, f"node {args.name!r}: {e}")
        return EXIT_AUTH
    except IntegrityError as e:
        control(ERROR, f"node {args.name!r}: {e}; stopping")
        return EXIT_INTEGRITY
    except UserError as e:
        control(ERROR, f"node {args.name!r}: {e}")
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        return 130
    except Exception as e:
        control(ERROR, f"node {args.name!r}: {type(e).__name__}: {e}")
        raise
    return EXIT_OK


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    # skip interpreter teardown: mlx may abort there after other threads computed with it
    os._exit(code)
