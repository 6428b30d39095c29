"""Joining the ring: mlx.distributed's group, then the authenticated handshake on both links."""

from __future__ import annotations

import contextlib
import os
import sys

import mlx.core as mx

from mlxring.cluster.protocol import (
    JACCL_COORDINATOR,
    MLX_HOSTFILE,
    NO_CRYPTO_ENV,
    TEMP_FILES_ENV,
)
from mlxring.crypto.handshake import secure_ring
from mlxring.crypto.keys import KEY_ENV, ClusterKeyError, key_from_env, read_key_file
from mlxring.ring.transport import Channel, RingTransport


def cluster_key(key_file: str | None) -> bytes:
    """The cluster key from `key_file`, else from MLXRING_CLUSTER_KEY."""
    key = read_key_file(key_file) if key_file else key_from_env()
    if key is None:
        raise ClusterKeyError(f"no cluster key: pass --key-file or set {KEY_ENV}")
    return key


def join_ring(backend: str, cluster: str, key_file: str | None) -> tuple[int, Channel | None]:
    """Join the ring this process's environment describes and authenticate both links:
    (rank, channel); rank 0 and no channel when the environment names no ring."""
    if not (os.environ.get(MLX_HOSTFILE) or os.environ.get(JACCL_COORDINATOR)):
        return 0, None
    group = mx.distributed.init(backend=backend, strict=True)
    transport = RingTransport(group)  # reads the hostfile to find its left links: first
    for path in os.environ.get(TEMP_FILES_ENV, "").split():
        with contextlib.suppress(OSError):
            os.unlink(path)
    if os.environ.get(NO_CRYPTO_ENV) == "1":
        print(f"{NO_CRYPTO_ENV}=1: hops are NOT encrypted (benchmarks only)", file=sys.stderr)
        return group.rank(), Channel(transport)
    cipher = secure_ring(transport, cluster, cluster_key(key_file))
    return group.rank(), Channel(transport, cipher)
