"""An in-process ring of byte pipes with the transport's interface, for protocol unit tests
(handshake, sealing, replay) where a test must reach into the bytes in flight. The real
mlx.distributed ring is exercised by tests/test_security_ring.py and tests/test_ring.py."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable


class MemoryRing:
    def __init__(self, size: int):
        self.size = size
        self.pipes = {(a, b): queue.Queue() for a in range(size) for b in range(size) if a != b}
        self.tamper: Callable[[int, int, int, bytes], bytes] | None = None  # (src, dst, n, data)
        self.counts = dict.fromkeys(self.pipes, 0)
        self.lock = threading.Lock()

    def transport(self, rank: int) -> MemoryTransport:
        return MemoryTransport(self, rank)


class MemoryTransport:
    def __init__(self, ring: MemoryRing, rank: int):
        self.ring, self.rank, self.size = ring, rank, ring.size
        self.right, self.left = (rank + 1) % ring.size, (rank - 1) % ring.size

    def send(self, data, to: int | None = None) -> None:
        dst = self.right if to is None else to
        data = bytes(data)
        with self.ring.lock:
            n = self.ring.counts[(self.rank, dst)]
            self.ring.counts[(self.rank, dst)] += 1
        if self.ring.tamper:
            data = self.ring.tamper(self.rank, dst, n, data)
        self.ring.pipes[(self.rank, dst)].put(data)

    def recv(self, nbytes: int, peer: int | None = None) -> memoryview:
        src = self.left if peer is None else peer
        data = self.ring.pipes[(src, self.rank)].get(timeout=3)
        assert len(data) == nbytes, f"expected {nbytes} bytes from {src}, got {len(data)}"
        return memoryview(data)

    def flush(self) -> None:
        pass


def run_all(size: int, fn: Callable[[int], object]) -> list[object]:
    """Run fn(rank) for every rank on its own thread; each result or the exception it raised."""
    results: list[object] = [None] * size

    def target(rank: int) -> None:
        try:
            results[rank] = fn(rank)
        except Exception as e:  # collected and checked by the test
            results[rank] = e

    threads = [threading.Thread(target=target, args=(r,)) for r in range(size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    return results
