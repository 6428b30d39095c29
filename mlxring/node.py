"""One rank of a ring, as started by `mlxring launch` (or `generate --ranks/--config`).

    python -m mlxring.node --name NAME --model DIR --layers START END \
        [--backend ring|jaccl] [--compute mlx|torch --device cpu|cuda --dtype DTYPE] \
        [--job serve|generate|batch|bench] [--job-args JSON]

The rank comes from the environment mlx.distributed reads (`MLX_RANK`,
`MLX_HOSTFILE`, or JACCL's). Rank 0 is the head and runs the job; the other
ranks serve their stage until the head stops the ring. Lines starting with
CONTROL on stderr talk to the launcher; the exit code says how the rank ended.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import threading
import time

CONTROL = "\x1e@mlxring"
EXIT_OK, EXIT_CRASH, EXIT_USER_ERROR, EXIT_PEER_LOST, EXIT_AUTH, EXIT_INTEGRITY = range(6)
JOBS = {"generate": "mlxring.jobs", "serve": "mlxring.server.serve",
        "batch": "mlxring.workload", "bench": "mlxring.workload"}  # fmt: skip
NO_CRYPTO_ENV = "MLXRING_UNSAFE_NO_CRYPTO"  # benchmarks only: plain hops, no handshake


_control_lock = threading.Lock()


def control(*words: object) -> None:
    """A line for the launcher (readiness, pid, the reason this rank failed)."""
    line = " ".join(map(str, (CONTROL, *words))) + "\n"
    with _control_lock:  # one write per line: job threads report too
        sys.stderr.write(line)
        sys.stderr.flush()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m mlxring.node")
    parser.add_argument("--name", required=True)
    parser.add_argument("--cluster", default="mlxring", help="cluster name (bound into every hop)")
    parser.add_argument("--key-file", help="cluster key file (else $MLXRING_CLUSTER_KEY)")
    parser.add_argument("--model", required=True)
    parser.add_argument("--layers", type=int, nargs=2, required=True, metavar=("START", "END"))
    parser.add_argument("--backend", default="ring", choices=("ring", "jaccl"))
    parser.add_argument(
        "--compute",
        default="mlx",
        choices=("mlx", "torch"),
        help="compute backend of this rank's layers",
    )
    parser.add_argument("--device", default=None, help="torch: cpu | cuda")
    parser.add_argument(
        "--dtype", default="auto", help="torch: float32 | float16 | bfloat16 | auto"
    )
    parser.add_argument("--job", default="serve", choices=JOBS)
    parser.add_argument("--job-args", default="{}", help="JSON options of the head's job")
    return parser.parse_args(argv)


def cluster_key(args: argparse.Namespace) -> bytes:
    from mlxring.crypto.keys import KEY_ENV, ClusterKeyError, key_from_env, read_key_file

    key = read_key_file(args.key_file) if args.key_file else key_from_env()
    if key is None:
        raise ClusterKeyError(f"no cluster key: pass --key-file or set {KEY_ENV}")
    return key


def connect(args: argparse.Namespace):
    """Join the ring and authenticate both links: (rank, channel); no channel when alone."""
    import mlx.core as mx

    from mlxring.crypto.handshake import secure_ring
    from mlxring.transport import Channel, RingTransport

    if not (os.environ.get("MLX_HOSTFILE") or os.environ.get("MLX_JACCL_COORDINATOR")):
        return 0, None
    group = mx.distributed.init(backend=args.backend, strict=True)
    for path in os.environ.get("MLXRING_TEMP_FILES", "").split():
        with contextlib.suppress(OSError):
            os.unlink(path)
    transport = RingTransport(group)
    if os.environ.get(NO_CRYPTO_ENV) == "1":
        print(f"{NO_CRYPTO_ENV}=1: hops are NOT encrypted (benchmarks only)", file=sys.stderr)
        return group.rank(), Channel(transport)
    cipher = secure_ring(transport, args.cluster, cluster_key(args))
    return group.rank(), Channel(transport, cipher)


def run(args: argparse.Namespace) -> None:
    rank, channel = connect(args)  # before loading the model: a wrong key fails fast

    import importlib

    from mlxring.ring import serve_stage
    from mlxring.shards import load_shard

    start, end = args.layers
    if args.compute == "torch" and (threads := os.environ.get("MLXRING_TORCH_THREADS")):
        import torch

        torch.set_num_threads(int(threads))
    shard = load_shard(args.model, start, end, is_head=rank == 0, backend=args.compute,
                       device=args.device, dtype=args.dtype)  # fmt: skip
    if rank != 0:
        control("ready", rank)
        serve_stage(shard, channel)
        return
    opts = json.loads(args.job_args)
    engine = head_engine(shard, channel, args.model, opts)
    control("ready", rank)
    try:
        job = getattr(importlib.import_module(JOBS[args.job]), args.job)
        job(engine, args.model, opts)
    finally:
        engine.close()


def head_engine(shard, channel, model: str, opts: dict):
    """The head's engine: continuous batching, pipelined over the ring's stages by default."""
    from mlxring.engine.engine import Engine
    from mlxring.jobs import load_tokenizer

    size = channel.transport.size if channel is not None else 1
    return Engine(shard, channel, load_tokenizer(model), num_stages=size,
                  mode=opts.get("mode", "pipelined"), max_batch=opts.get("max_batch", 16),
                  prefill_chunk=opts.get("prefill_chunk", 512),
                  step_timeout=opts.get("step_timeout", 60.0))  # fmt: skip


def exit_with_parent(parent: int) -> None:
    """Die with the launcher (or the ssh session) that started this rank: never an orphan."""
    while os.getppid() == parent:
        time.sleep(0.5)
    os._exit(EXIT_PEER_LOST)


def main(argv: list[str] | None = None) -> int:
    from mlxring.crypto.handshake import HandshakeError
    from mlxring.crypto.link import IntegrityError
    from mlxring.errors import user_errors
    from mlxring.transport import PeerLost

    args = parse_args(argv)
    if os.environ.get("MLXRING_WATCH_PARENT") == "1":
        threading.Thread(target=exit_with_parent, args=(os.getppid(),), daemon=True).start()
    try:
        run(args)
    except PeerLost as e:
        control("error", f"node {args.name!r}: {e}")
        return EXIT_PEER_LOST
    except HandshakeError as e:
        control("error", f"node {args.name!r}: {e}")
        return EXIT_AUTH
    except IntegrityError as e:
        control("error", f"node {args.name!r}: {e}; stopping")
        return EXIT_INTEGRITY
    except user_errors() as e:
        control("error", f"node {args.name!r}: {e}")
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        return 130
    except Exception as e:
        control("error", f"node {args.name!r}: {type(e).__name__}: {e}")
        raise
    return EXIT_OK


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    # skip interpreter teardown: mlx may abort there after other threads computed with it
    os._exit(code)
