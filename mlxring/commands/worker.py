"""`mlxring worker`: offer this machine to the heads of a cluster (zero-config)."""

from __future__ import annotations

import argparse
import signal

from mlxring.cluster.config import check_name
from mlxring.cluster.fit import local_memory_bytes
from mlxring.cluster.gather import cache_home, default_name
from mlxring.cluster.worker import RING_PORTS, Worker, detect_compute
from mlxring.crypto.keys import KEY_ENV, key_from_env, read_key_file
from mlxring.errors import UserError

DEFAULT_PORT = 41000


def setup_arg_parser(parser: argparse.ArgumentParser) -> None:
    add_key_arg(parser)
    parser.add_argument("--name", help="this worker's name (default: the host name)")
    parser.add_argument(
        "--port",
        type=int,
        default=DEFAULT_PORT,
        help=f"control port P; ring links use P+1..P+{RING_PORTS} (default {DEFAULT_PORT})",
    )
    parser.add_argument(
        "--cache-dir",
        help=f"where received weights are kept, by content hash (default {cache_home()}/worker)",
    )
    parser.add_argument(
        "--interface",
        action="append",
        metavar="IP",
        help="listen and advertise on this address only (repeatable; default: all)",
    )
    parser.add_argument(
        "--backend",
        choices=("mlx", "torch"),
        help="compute backend (default: mlx on Apple Silicon, torch elsewhere)",
    )
    parser.add_argument("--device", choices=("gpu", "cpu", "cuda"), help="default: detected")
    parser.add_argument(
        "--memory-gb", type=float, help="memory offered to the planner (default: all of it)"
    )


def add_key_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--cluster-key-file",
        help=f"the cluster key (mlxring keygen); default: ${KEY_ENV}",
    )


def cluster_key(args: argparse.Namespace) -> bytes:
    """The key from --cluster-key-file or the environment; a clear error without one."""
    if args.cluster_key_file:
        return read_key_file(args.cluster_key_file)
    key = key_from_env()
    if key is None:
        raise UserError(
            f"no cluster key: pass --cluster-key-file (make one with `mlxring keygen`) or set "
            f"{KEY_ENV}; every machine of the cluster needs the same key"
        )
    return key


def main(args: argparse.Namespace) -> int:
    key = cluster_key(args)
    if not 1 <= args.port <= 65535 - RING_PORTS:
        raise UserError(f"--port must be between 1 and {65535 - RING_PORTS}")
    name = check_name(args.name, "--name") if args.name else default_name()
    backend, device = detect_compute()
    backend = args.backend or backend
    if args.device:
        device = args.device
    elif args.backend:
        device = "gpu" if backend == "mlx" and device == "gpu" else "cpu"
    valid = {"mlx": ("gpu", "cpu"), "torch": ("cpu", "cuda")}[backend]
    if device not in valid:
        raise UserError(f"--device {device} does not go with --backend {backend}: {valid}")
    memory = int(args.memory_gb * 2**30) if args.memory_gb else local_memory_bytes()
    worker = Worker(
        name=name,
        key=key,
        port=args.port,
        cache_dir=args.cache_dir or f"{cache_home()}/worker",
        memory_bytes=memory,
        backend=backend,
        device=device,
        interfaces=args.interface,
    )
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, lambda *_: worker.stopping.set())
    try:
        worker.serve_forever()
    except KeyboardInterrupt:
        worker.stopping.set()
    return 0
