"""Rank 0 waits WAIT seconds for rank 1's message (on a 2- or 3-rank ring) and prints
whether its transport found its left links and the CPU it used while waiting."""

import sys
import time

import mlx.core as mx

from mlxring.ring.transport import Channel, RingTransport

wait = float(sys.argv[1])
group = mx.distributed.init(backend="ring", strict=True)
channel = Channel(RingTransport(group))
rank, size = group.rank(), group.size()
if rank == 0:
    channel.send({"go": True})
    cpu, wall = time.process_time(), time.perf_counter()
    meta, _ = channel.recv()  # comes round the ring after the last rank's nap
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    assert meta == {"slept": True}, meta
    print(f"found={channel.transport.left_links.found} wall={wall:.3f} cpu={cpu:.3f}", flush=True)
else:
    meta, _ = channel.recv()
    if rank == size - 1:
        time.sleep(wait)
        meta = {"slept": True}
    channel.send(meta)
channel.transport.flush()
