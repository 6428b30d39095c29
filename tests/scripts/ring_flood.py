"""Every rank sends NBYTES to its right neighbour at the same moment, ROUNDS times."""

import sys

import mlx.core as mx
import numpy as np

from mlxring.ring.transport import Channel, RingTransport

nbytes, rounds = int(sys.argv[1]), int(sys.argv[2])
group = mx.distributed.init(backend="ring", strict=True)
channel = Channel(RingTransport(group))
rank, left = group.rank(), (group.rank() - 1) % group.size()
for i in range(rounds):
    payload = mx.full((nbytes,), (rank * 7 + i) % 251, dtype=mx.uint8)
    channel.send({"round": i, "from": rank}, {"x": payload})  # all send before receiving
    meta, got = channel.recv()
    got = got["x"]
    assert meta == {"round": i, "from": left}, meta
    assert got.shape == (nbytes,) and np.all(np.asarray(got) == (left * 7 + i) % 251)
channel.transport.flush()
print(f"rank {rank}: {rounds} x {nbytes} bytes ok", flush=True)
