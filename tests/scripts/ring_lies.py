"""Rank 0 lies about a message's size in the way argv[1] names; rank 1 receives and must
end with a ProtocolError (printed), not hang or fail otherwise. Both hold the key, so the
lies are authenticated: what a buggy or hostile rank of the ring itself could send."""

import contextlib
import sys

import mlx.core as mx

from mlxring.crypto.handshake import secure_ring
from mlxring.ring.transport import (
    HEADER,
    MAGIC,
    MAX_SLOT,
    MIN_SLOT,
    Channel,
    PeerLost,
    ProtocolError,
    RingTransport,
)

lie = sys.argv[1]
group = mx.distributed.init(backend="ring", strict=True)
transport = RingTransport(group)
channel = Channel(transport, secure_ring(transport, "lies", bytes(range(32))))


def tensors(nbytes: int) -> dict:
    return {"x": mx.zeros((nbytes,), dtype=mx.uint8)}


class Announce:
    """A slot rule that announces `size` for the next message, whatever it will be."""

    def __init__(self, size: int):
        self.size = size

    def next_slot(self, kind, nbytes: int) -> int:
        return self.size


def forged(overflow: int, full: bool, body: bytes | None = None) -> None:
    """A sealed message of `body` (zeros filling the slot or not) whose header claims a
    remainder of `overflow` bytes (none follows)."""
    slot = channel.slot_out
    body = body or bytes(slot - HEADER.size - 16 if full else 100)
    header = HEADER.pack(MAGIC, channel.sent, 0, 0, 0, len(body) + 16, overflow, MIN_SLOT)
    sealed = channel.sealer.seal(body, header)
    transport.send(header + sealed + bytes(slot - HEADER.size - len(sealed)))


if group.rank() == 0:
    channel.send({"n": 0}, tensors(8000))  # the next slot is now about 8 KiB
    if lie in ("next-too-big", "next-too-small"):
        channel.rule = Announce(MAX_SLOT * 2 if lie == "next-too-big" else 16)
        channel.send({"n": 1}, tensors(100))
    elif lie in ("more", "fewer"):  # a message in a slot other than the announced one
        channel.slot_out = channel.slot_out * 2 if lie == "more" else 512
        channel.send({"n": 1}, tensors(100))
    elif lie == "remainder-in-a-slot-not-full":
        forged(overflow=100, full=False)
    elif lie == "remainder-too-large":
        forged(overflow=2**32 - 1, full=True)
    elif lie == "garbage-body":
        forged(overflow=0, full=False, body=b"\x05\0\0\0[1,2]")  # metadata not an object
    if not lie.startswith("next"):  # traffic after the lie: a misled receiver must see it
        for n in range(2, 8):
            channel.send({"n": n}, tensors(8000))
    with contextlib.suppress(PeerLost):  # rank 1 found the lie and left
        channel.flush()
else:
    try:
        for _ in range(8):
            channel.recv()
    except ProtocolError as e:
        print(f"rank 1: ProtocolError: {e}", flush=True)
    else:
        print("rank 1: every message accepted", flush=True)
mx.clear_streams()
