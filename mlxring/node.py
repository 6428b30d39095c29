"""One rank of a ring, as started by `mlxring launch` (or `generate --ranks/--config`).

    python -m mlxring.node --name NAME --model DIR --layers START END \
        [--backend ring|jaccl] [--job generate|repl] [--job-args JSON]

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

CONTROL = "\x1e@mlxring"
EXIT_OK, EXIT_CRASH, EXIT_USER_ERROR, EXIT_PEER_LOST, EXIT_AUTH, EXIT_INTEGRITY = range(6)
NO_CRYPTO_ENV = "MLXRING_UNSAFE_NO_CRYPTO"  # benchmarks only: plain hops, no handshake


def control(*words: object) -> None:
    """A line for the launcher (readiness, pid, the reason this rank failed)."""
    print(CONTROL, *words, file=sys.stderr, flush=True)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m mlxring.node")
    parser.add_argument("--name", required=True)
    parser.add_argument("--cluster", default="mlxring", help="cluster name (bound into every hop)")
    parser.add_argument("--key-file", help="cluster key file (else $MLXRING_CLUSTER_KEY)")
    parser.add_argument("--model", required=True)
    parser.add_argument("--layers", type=int, nargs=2, required=True, metavar=("START", "END"))
    parser.add_argument("--backend", default="ring", choices=("ring", "jaccl"))
    parser.add_argument("--job", default="repl", choices=("generate", "repl"))
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

    from mlxring import jobs
    from mlxring.ring import RingHead, serve_stage
    from mlxring.shards import load_shard

    start, end = args.layers
    shard = load_shard(args.model, start, end, is_head=rank == 0)
    control("ready", rank)
    if rank != 0:
        serve_stage(shard, channel)
        return
    head = RingHead(shard, channel)
    getattr(jobs, args.job)(head, args.model, json.loads(args.job_args))
    head.stop()


def main(argv: list[str] | None = None) -> int:
    from mlxring.crypto.handshake import HandshakeError
    from mlxring.crypto.link import IntegrityError
    from mlxring.errors import user_errors
    from mlxring.transport import PeerLost

    args = parse_args(argv)
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
    sys.exit(main())
