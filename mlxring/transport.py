"""Messages around the ring over `mlx.distributed`, deadlock-free by construction.

`send` blocks until the peer receives, so a ring where every rank sends at the
same moment deadlocks once messages are large. Here each rank sends on its own
thread (inside a stream made on that thread: streams are per thread) while the
calling thread receives: a rank can always receive, so no cycle of waits forms.

A message is a fixed-size frame (magic, sizes, sequence) and then a body of
JSON metadata plus an encoded tensor; both cross the wire as uint8 arrays.
"""

from __future__ import annotations

import json
import queue
import struct
import threading

import mlx.core as mx
import numpy as np

from mlxring.crypto import codec

_FRAME = struct.Struct("<4sIQQ")  # magic, meta bytes, tensor bytes, sequence
MAGIC = b"MXR1"


class PeerLost(ConnectionError):
    """A ring neighbour went away (its process died or its connection dropped)."""


class ProtocolError(ValueError):
    """A message that does not follow the ring protocol."""


def _peer_error(e: RuntimeError, peer: int) -> Exception:
    if "connection to a peer was lost" in str(e) or "Connection" in str(e):
        return PeerLost(f"lost the connection to rank {peer}: {e}")
    return e


class RingTransport:
    """Byte messages to the right neighbour and from the left one."""

    def __init__(self, group: mx.distributed.Group):
        self.group = group
        self.rank, self.size = group.rank(), group.size()
        self.right, self.left = (self.rank + 1) % self.size, (self.rank - 1) % self.size
        self._outbox: queue.Queue = queue.Queue()
        self._error: BaseException | None = None
        self._sender = threading.Thread(target=self._send_loop, name="ring-send", daemon=True)
        self._sender.start()

    def _send_loop(self) -> None:
        with mx.stream(mx.new_stream(mx.cpu)):
            while (item := self._outbox.get()) is not None:
                try:
                    if self._error is None:
                        mx.eval(mx.distributed.send(item, self.right, group=self.group))
                except BaseException as e:  # surfaced on the caller's next send/recv
                    self._error = _peer_error(e, self.right) if isinstance(e, RuntimeError) else e
                finally:
                    self._outbox.task_done()
        self._outbox.task_done()

    def _check(self) -> None:
        if self._error is not None:
            raise self._error

    def send(self, data: bytes | np.ndarray) -> None:
        """Queue `data` for the right neighbour; returns at once."""
        self._check()
        arr = mx.array(np.frombuffer(data, dtype=np.uint8))
        mx.eval(arr)
        self._outbox.put(arr)

    def recv(self, nbytes: int) -> memoryview:
        """Receive exactly `nbytes` from the left neighbour."""
        self._check()
        try:
            arr = mx.distributed.recv((nbytes,), mx.uint8, self.left, group=self.group)
            mx.eval(arr)
        except RuntimeError as e:
            raise _peer_error(e, self.left) from e
        return memoryview(np.asarray(arr))

    def flush(self) -> None:
        """Wait until every queued message has been received by the right neighbour."""
        self._outbox.join()
        self._check()

    def close(self) -> None:
        self._outbox.put(None)


class Channel:
    """Ring messages: (metadata dict, optional tensor), with a per-direction sequence."""

    def __init__(self, transport: RingTransport):
        self.transport = transport
        self.sent = 0
        self.received = 0

    def send(self, meta: dict, tensor: mx.array | None = None) -> None:
        meta_bytes = json.dumps(meta, separators=(",", ":")).encode()
        body = codec.encode(tensor) if tensor is not None else b""
        frame = _FRAME.pack(MAGIC, len(meta_bytes), len(body), self.sent)
        self.transport.send(frame)
        self.transport.send(meta_bytes + body)
        self.sent += 1

    def recv(self) -> tuple[dict, mx.array | None]:
        magic, meta_len, body_len, seq = _FRAME.unpack(self.transport.recv(_FRAME.size))
        if magic != MAGIC or seq != self.received:
            raise ProtocolError(f"bad frame from rank {self.transport.left} (seq {seq})")
        payload = self.transport.recv(meta_len + body_len)
        self.received += 1
        meta = json.loads(bytes(payload[:meta_len]))
        tensor = codec.decode(payload[meta_len:]) if body_len else None
        return meta, tensor
