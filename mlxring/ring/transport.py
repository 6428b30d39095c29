"""Messages around the ring over `mlx.distributed`, deadlock-free by construction.

`send` blocks until the peer receives, so a ring where every rank sends at the
same moment deadlocks once messages are large. Here every send is evaluated
asynchronously on a stream of its own (mlx runs each stream on its own
thread), while the calling thread receives: a rank can always receive, so no
cycle of waits can form.

Wire format, one hop. `recv` must know sizes in advance, so every message
starts with a fixed-size slot: a clear header (sequence, micro-batch, layer
range, sizes) and as much of the sealed body as fits; a body that does not
fit follows as a second message whose size the header gives. Decode steps fit
in one slot. The header is authenticated as associated data when the link is
sealed (see `mlxring.crypto`); `PlainSealer` is the no-crypto stand-in.
"""

from __future__ import annotations

import collections
import json
import struct
import threading

import mlx.core as mx
import numpy as np

from mlxring.ring import codec

SLOT_BYTES = 16384
_HEADER = struct.Struct("<4sQiIIII")  # magic, seq, micro-batch, start, end, inline, overflow
MAGIC = b"MXR1"
_META_LEN = struct.Struct("<I")
_RETAINED_SENDS = 256


class PeerLost(ConnectionError):
    """A ring neighbour went away (its process died or its connection dropped)."""


class ProtocolError(ValueError):
    """A message that does not follow the ring protocol."""


def _peer_error(e: RuntimeError, peer: int) -> Exception:
    if "connection to a peer was lost" in str(e) or "failed" in str(e):
        return PeerLost(f"lost the connection to rank {peer} ({e})")
    return e


class PlainSealer:
    """No encryption: what `mlxring.crypto`'s link does, minus the crypto (benchmarks)."""

    overhead = 0

    def seal(self, data: bytes, aad: bytes) -> bytes:
        return data

    def open(self, data: bytes, aad: bytes) -> bytes:
        return data


class RingTransport:
    """Byte messages to the right neighbour and from the left one."""

    def __init__(self, group: mx.distributed.Group):
        self.group = group
        self.rank, self.size = group.rank(), group.size()
        self.right, self.left = (self.rank + 1) % self.size, (self.rank - 1) % self.size
        self._local = threading.local()  # mlx streams belong to the thread that made them
        # sends in flight; kept so that flush() can wait on them and see their errors
        self._sends: collections.deque = collections.deque(maxlen=_RETAINED_SENDS)

    def send(self, data: bytes | bytearray, to: int | None = None) -> None:
        """Start sending `data` to the right neighbour (or neighbour `to`); returns at once."""
        arr = mx.array(np.frombuffer(data, dtype=np.uint8))
        if not hasattr(self._local, "stream"):
            self._local.stream = mx.new_stream(mx.cpu)
        with mx.stream(self._local.stream):
            op = mx.distributed.send(arr, self.right if to is None else to, group=self.group)
        mx.async_eval(op)
        self._sends.append(op)

    def recv(self, nbytes: int, peer: int | None = None) -> memoryview:
        """Receive exactly `nbytes` from the left neighbour (or neighbour `peer`)."""
        peer = self.left if peer is None else peer
        try:
            arr = mx.distributed.recv((nbytes,), mx.uint8, peer, group=self.group)
            mx.eval(arr)
        except RuntimeError as e:
            raise _peer_error(e, peer) from e
        return memoryview(np.asarray(arr))

    def flush(self) -> None:
        """Wait until every message sent so far has been received by the right neighbour."""
        try:
            mx.eval(list(self._sends))
        except RuntimeError as e:
            raise _peer_error(e, self.right) from e
        self._sends.clear()


class Channel:
    """Ring messages (metadata dict + named tensors) with per-direction sequence numbers."""

    def __init__(self, transport: RingTransport, sealer=None, slot_bytes: int = SLOT_BYTES):
        self.transport = transport
        self.sealer = sealer or PlainSealer()
        self.slot_bytes = slot_bytes
        self.capacity = slot_bytes - _HEADER.size - self.sealer.overhead
        self.sent = 0
        self.received = 0
        self.received_micro_batch = 0  # of the last message received (bound by the AEAD)

    @property
    def num_stages(self) -> int:
        """Ranks in the ring: every one is a stage."""
        return self.transport.size

    def flush(self) -> None:
        """Wait until the right neighbour has received everything sent so far."""
        self.transport.flush()

    def send(
        self,
        meta: dict,
        tensors: dict[str, mx.array] | None = None,
        micro_batch: int = 0,
        layers: tuple[int, int] = (0, 0),
    ) -> None:
        meta_bytes = json.dumps(meta, separators=(",", ":")).encode()
        body = _META_LEN.pack(len(meta_bytes)) + meta_bytes
        if tensors:
            body += codec.encode_many(tensors)
        inline, rest = body[: self.capacity], body[self.capacity :]
        overflow = len(rest) + self.sealer.overhead if rest else 0
        header = _HEADER.pack(
            MAGIC, self.sent, micro_batch, *layers, len(inline) + self.sealer.overhead, overflow
        )
        slot = bytearray(self.slot_bytes)
        sealed = self.sealer.seal(inline, header)
        slot[: _HEADER.size] = header
        slot[_HEADER.size : _HEADER.size + len(sealed)] = sealed
        self.transport.send(slot)
        if rest:
            self.transport.send(self.sealer.seal(rest, header + b"+"))
        self.sent += 1

    def recv(self) -> tuple[dict, dict[str, mx.array]]:
        slot = self.transport.recv(self.slot_bytes)
        header = bytes(slot[: _HEADER.size])
        magic, seq, micro_batch, _, _, inline_len, overflow = _HEADER.unpack(header)
        if magic != MAGIC or inline_len > self.slot_bytes - _HEADER.size:
            raise ProtocolError(f"malformed message from rank {self.transport.left}")
        if seq != self.received:
            raise ProtocolError(
                f"message {seq} from rank {self.transport.left} is out of order "
                f"(expected {self.received}): replayed or reordered"
            )
        body = self.sealer.open(bytes(slot[_HEADER.size : _HEADER.size + inline_len]), header)
        if overflow:
            body += self.sealer.open(bytes(self.transport.recv(overflow)), header + b"+")
        self.received += 1
        self.received_micro_batch = micro_batch
        (meta_len,) = _META_LEN.unpack_from(body)
        meta = json.loads(body[_META_LEN.size : _META_LEN.size + meta_len])
        rest = memoryview(body)[_META_LEN.size + meta_len :]
        return meta, codec.decode_many(rest) if len(rest) else {}
