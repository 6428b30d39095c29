"""Messages around the ring over `mlx.distributed`, deadlock-free by construction.

`send` blocks until the peer receives, so a ring where every rank sends at the
same moment deadlocks once messages are large. Here every send is evaluated
asynchronously on a stream of its own (mlx runs each stream on its own
thread), while the calling thread receives: a rank can always receive, so no
cycle of waits can form.

Wire format, one hop. `recv` must know a message's size before its bytes
arrive, so each message fills a slot whose size the previous message on the
link announced (a link's first slot is MIN_SLOT). A slot holds a clear header
(magic, sequence, micro-batch, layer range, the sealed sizes in this slot and
in a remainder, the size of the NEXT slot), the sealed body and zero padding; a
body that does not fit follows as one more message, the remainder, sealed with
`header + b"+"`, whose size the header gives. The sender sizes the next slot
with `SlotRule` (a guess from the link's recent messages, rounded up to one of
32 size classes per doubling, at most MAX_SLOT): in steady decode, pipelined
groups of different sizes included, every hop is one message with under 30%
padding (bench/hops.py measured this against a fixed 16 KiB slot and against a
sealed length message first). The header is associated data of the seal when
the link is sealed (see `mlxring.crypto`); announced sizes are used only once
their message has opened, and one out of bounds is a ProtocolError, as is a
slot that does not start with a header. `PlainSealer` is the no-crypto
stand-in.
"""

from __future__ import annotations

import collections
import json
import struct
import threading

import mlx.core as mx
import numpy as np

from mlxring.ring import codec
from mlxring.ring.idle import LeftLinks

# magic, seq, micro-batch, layer start, end, sealed inline, sealed remainder, next slot
HEADER = struct.Struct("<4sQiIIIII")
MAGIC = b"MXR1"
MIN_SLOT = 256  # also the first slot of a link: nothing is known yet
MAX_SLOT = 1 << 20  # a larger message goes as a full slot plus its remainder
MAX_MESSAGE = 2**31 - 1  # mlx shapes are int32: no larger recv exists
REMAINDER_COST = 32 << 10  # one more message costs as much as this padding, here
HEADROOM = 64  # a slot's room for a slightly longer step header (ids, admits, evictions)
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
        # asleep until the left neighbour's bytes come, not in mlx's spinning receive
        self.left_links = LeftLinks.find(self.rank) if self.size > 1 else LeftLinks([])

    def send(self, data: bytes | bytearray, to: int | None = None) -> None:
        """Start sending `data` to the right neighbour (or neighbour `to`); returns at once."""
        arr = mx.array(np.frombuffer(data, dtype=np.uint8))
        if not hasattr(self._local, "stream"):
            self._local.stream = mx.new_stream(mx.cpu)
        peer = self.right if to is None else to
        with mx.stream(self._local.stream):
            op = mx.distributed.send(arr, peer, group=self.group)
        try:
            mx.async_eval(op)
        except RuntimeError as e:  # the peer is already gone
            raise _peer_error(e, peer) from e
        self._sends.append(op)

    def recv(self, nbytes: int, peer: int | None = None) -> memoryview:
        """Receive exactly `nbytes` from the left neighbour (or neighbour `peer`)."""
        peer = self.left if peer is None else peer
        if peer == self.left:
            self.left_links.wait()
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


def slot_class(nbytes: int) -> int:
    """The smallest size class that holds `nbytes`: 32 classes per doubling (multiples of
    1/32 of its power of two), so rounding up pads less than 3.2%; MIN_SLOT to MAX_SLOT."""
    n = min(max(nbytes, MIN_SLOT), MAX_SLOT)
    step = 1 << (n.bit_length() - 6)
    return -(-n // step) * step


Kind = tuple[int, bool]  # what a message is, to the slot rule: (micro-batch, has tensors)


class SlotRule:
    """The sender's choice of a link's next slot. Pipelined decode groups of different sizes
    take turns, and probes and prefill chunks come between them, so the next message is
    predicted from this one's kind: the kind that followed it most often of late, sized by
    its own recent messages. Padding wastes bandwidth, a remainder costs one more message:
    the size chosen is the one that would have cost least lately, each remainder counted as
    REMAINDER_COST bytes. A steady pattern costs one message a hop, a surprise a remainder."""

    def __init__(self, memory: int = 4):
        self.sizes: dict[Kind, collections.deque] = {}  # bytes its recent messages needed
        self.after: dict[Kind, collections.deque] = {}  # the kinds that came next, of late
        self.previous: Kind | None = None
        self.memory = memory

    def size(self, kind: Kind) -> int:
        """Of the recent sizes of `kind`, the one that would have cost least as the slot."""
        seen = self.sizes[kind]
        if seen.count(seen[-1]) == len(seen):  # steady: the common case, made cheap
            return seen[-1]
        return min(seen, key=lambda s: (sum(REMAINDER_COST if a > s else s - a for a in seen), s))

    def next_slot(self, kind: Kind, nbytes: int) -> int:
        """Record a message of `kind` needing `nbytes` (header + sealed body); the size of
        the link's next slot."""
        self._recent(self.sizes, kind).append(nbytes)
        if self.previous is not None:
            self._recent(self.after, self.previous).append(kind)
        self.previous = kind
        after = self.after.get(kind)
        if not after:
            guess = kind
        elif after.count(after[-1]) == len(after):
            guess = after[-1]
        else:
            seen = collections.Counter(after)
            guess = min(seen, key=lambda k: (-seen[k], self.size(k)))
        size = self.size(guess) + HEADROOM
        # a message no slot holds goes as the smallest slot and its remainder: a full slot
        # with a small remainder after it is slower (bench/hops.py)
        return slot_class(size) if size <= MAX_SLOT else MIN_SLOT

    def _recent(self, table: dict, kind: Kind) -> collections.deque:
        if kind not in table:
            table[kind] = collections.deque(maxlen=self.memory)
        return table[kind]


class Channel:
    """Ring messages (metadata dict + named tensors) with per-direction sequence numbers."""

    def __init__(self, transport: RingTransport, sealer=None, rule=None):
        self.transport = transport
        self.sealer = sealer or PlainSealer()
        self.rule = rule or SlotRule()  # anything with next_slot(kind, nbytes) (benchmarks)
        self.slot_out = self.slot_in = MIN_SLOT  # what the next message on each link fills
        self._slot = bytearray()  # the last message sent (reused)
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
        tensor_parts = codec.encode_parts(tensors) if tensors else []
        body = memoryview(b"".join([_META_LEN.pack(len(meta_bytes)), meta_bytes, *tensor_parts]))
        overhead, slot = self.sealer.overhead, self.slot_out
        capacity = slot - HEADER.size - overhead
        inline, rest = body[:capacity], body[capacity:]  # views: no copies
        overflow = len(rest) + overhead if rest else 0
        needed = HEADER.size + len(body) + overhead  # to go as one message
        if len(rest) + overhead > MAX_MESSAGE:
            raise ProtocolError(f"a {needed}-byte message is larger than a ring hop carries")
        next_slot = self.rule.next_slot((micro_batch, bool(tensors)), needed)
        header = HEADER.pack(
            MAGIC, self.sent, micro_batch, *layers, len(inline) + overhead, overflow, next_slot
        )
        sealed = self.sealer.seal(inline, header)
        if len(self._slot) != slot:  # one buffer per size: fresh large buffers are slow here
            self._slot = bytearray(slot)
        end = HEADER.size + len(sealed)
        self._slot[: HEADER.size], self._slot[HEADER.size : end] = header, sealed
        self._slot[end:] = bytes(slot - end)
        self.transport.send(self._slot)  # copied at once: the buffer is free again
        if rest:
            self.transport.send(self.sealer.seal(rest, header + b"+"))
        self.sent += 1
        self.slot_out = next_slot

    def recv(self) -> tuple[dict, dict[str, mx.array]]:
        slot, left = self.slot_in, self.transport.left
        message = self.transport.recv(slot)
        header = bytes(message[: HEADER.size])
        magic, seq, micro_batch, _, _, inline_len, overflow, next_slot = HEADER.unpack(header)
        if magic != MAGIC:
            raise ProtocolError(
                f"no message header from rank {left} where one was due: the ranks disagree "
                "on message sizes, or the stream is corrupt"
            )
        if inline_len > slot - HEADER.size or (overflow and inline_len != slot - HEADER.size):
            raise ProtocolError(  # a remainder follows only a full slot
                f"malformed message from rank {left}: its sizes do not fit the agreed "
                f"{slot}-byte slot"
            )
        if seq != self.received:
            raise ProtocolError(
                f"message {seq} from rank {left} is out of order "
                f"(expected {self.received}): replayed or reordered"
            )
        body = self.sealer.open(message[HEADER.size : HEADER.size + inline_len], header)
        if not MIN_SLOT <= next_slot <= MAX_SLOT:  # authenticated: the peer itself is wrong
            raise ProtocolError(
                f"rank {left} announced a {next_slot}-byte next message "
                f"(the protocol allows {MIN_SLOT} to {MAX_SLOT})"
            )
        if overflow > MAX_MESSAGE:
            raise ProtocolError(f"rank {left} announced a {overflow}-byte remainder (too large)")
        if overflow:
            rest = self.sealer.open(self.transport.recv(overflow), header + b"+")
            body = b"".join([body, rest])
        self.received += 1
        self.received_micro_batch = micro_batch
        self.slot_in = next_slot
        try:  # sealed by the peer, so well formed unless the peer itself is wrong
            (meta_len,) = _META_LEN.unpack_from(body)
            meta = json.loads(bytes(body[_META_LEN.size : _META_LEN.size + meta_len]))
            tensors = memoryview(body)[_META_LEN.size + meta_len :]
            decoded = codec.decode_many(tensors) if len(tensors) else {}
        except (struct.error, ValueError) as e:  # bad JSON, UTF-8 and CodecError included
            raise ProtocolError(f"a malformed message body from rank {left} ({e})") from None
        if not isinstance(meta, dict):
            raise ProtocolError(f"a message from rank {left} has no metadata object")
        return meta, decoded
