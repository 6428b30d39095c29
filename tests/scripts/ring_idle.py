"""Rank 0 waits WAIT seconds for rank 1's message (on a 2- or 3-rank ring) and prints
whether its transport found its left links and the CPU it used while waiting.

The ranks join as launched ranks do (`join_ring`): the hostfile is a temporary file the
rank deletes once it has joined, and every link is authenticated and sealed."""

import os
import shutil
import sys
import tempfile
import time

from mlxring.cluster.protocol import MLX_HOSTFILE, TEMP_FILES_ENV
from mlxring.crypto.keys import KEY_ENV
from mlxring.ring.connect import join_ring

wait = float(sys.argv[1])
fd, own = tempfile.mkstemp(prefix="mlxring-test-hosts-")
os.close(fd)
shutil.copy(os.environ[MLX_HOSTFILE], own)  # a copy of its own, as a launcher writes it
os.environ.update({MLX_HOSTFILE: own, TEMP_FILES_ENV: own, KEY_ENV: "ab" * 32})
rank, channel = join_ring("ring", "idle-test", None)
assert not os.path.exists(own), "the rank keeps its temporary hostfile"
size = channel.transport.size
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
