"""An authenticated, sealed message channel over one TCP connection: the control channel
between a head and a worker (`mlxring worker`).

The handshake is the ring's (`mlxring.crypto.handshake`): ephemeral X25519 on both sides,
both prove knowledge of the cluster key over the transcript, one session key per
direction. The connecting side (the head) is the initiator. A peer without the key is
refused on both sides before any other byte is exchanged.

After the handshake every message is one frame: a 4-byte big-endian length, then the
sealed body (ChaCha20-Poly1305, counter nonces, the length bound as associated data). A
body is a 4-byte JSON length, a JSON header and a binary payload. Frames are opened
strictly in order: a tampered, dropped, replayed or reordered frame fails, and the
session is then unusable (the caller reconnects).
"""

from __future__ import annotations

import contextlib
import hmac
import json
import socket
import struct
import threading

from mlxring.crypto.handshake import (
    CONFIRM_BYTES,
    HELLO_BYTES,
    MAC_BYTES,
    REPLY_BYTES,
    HandshakeError,
    Hello,
    LinkEnd,
)
from mlxring.crypto.link import Direction, IntegrityError

LABEL = "mlxring-control"  # the "cluster" bound into the handshake and every frame
HANDSHAKE_TIMEOUT = 10.0
MAX_FRAME = 8 << 20  # a chunk of weights (1 MiB) and its header fit with room to spare
_LEN = struct.Struct(">I")
_HEAD, _WORKER = 0, 1  # the handshake's "ranks" of the two roles
_OK, _REFUSED = 1, 0


class SessionClosed(ConnectionError):
    """The peer closed the connection (between frames)."""


class Session:
    """One end of an authenticated control connection: `send` and `recv` messages."""

    def __init__(self, sock: socket.socket, out: Direction, inp: Direction, peer: str):
        self.sock, self.peer = sock, peer
        self._out, self._in = out, inp
        self._send_lock = threading.Lock()

    def send(self, header: dict, payload: bytes = b"") -> None:
        meta = json.dumps(header, separators=(",", ":")).encode()
        body = _LEN.pack(len(meta)) + meta + payload
        with self._send_lock:  # several threads may report on one session
            size = _LEN.pack(len(body) + 16)
            sealed = self._out.seal(body, size)
            if len(sealed) < 65536:
                self.sock.sendall(size + sealed)
            else:  # no copy of a large frame to prepend 4 bytes
                self.sock.sendall(size)
                self.sock.sendall(sealed)

    def recv(self) -> tuple[dict, memoryview]:
        """The next message (header, payload). Raises SessionClosed at a clean end,
        IntegrityError for a frame that fails authentication or is malformed."""
        size = _read(self.sock, _LEN.size, eof_ok=True)
        (n,) = _LEN.unpack(size)
        if not 16 < n <= MAX_FRAME:
            raise IntegrityError(f"a frame from {self.peer} has an impossible size ({n} bytes)")
        body = memoryview(self._in.open(_read(self.sock, n), size))
        (m,) = _LEN.unpack_from(body)
        try:
            header = json.loads(bytes(body[4 : 4 + m]))
        except ValueError:
            raise IntegrityError(f"a frame from {self.peer} has a malformed header") from None
        if not isinstance(header, dict):
            raise IntegrityError(f"a frame from {self.peer} has a malformed header")
        return header, body[4 + m :]

    def request(self, header: dict, payload: bytes = b"") -> dict:
        """Send one message and return the header of the answer; an answer with an
        "error" raises ConnectionError with its text."""
        self.send(header, payload)
        answer, _ = self.recv()
        if "error" in answer:
            raise ConnectionError(str(answer["error"]))
        return answer

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()


def _read(sock: socket.socket, n: int, eof_ok: bool = False) -> bytearray:
    data = bytearray(n)
    view, got = memoryview(data), 0
    while got < n:
        k = sock.recv_into(view[got:], n - got)
        if not k:
            if eof_ok and not got:
                raise SessionClosed("the peer closed the connection")
            raise ConnectionError("the connection closed in the middle of a message")
        got += k
    return data


def _check(end: LinkEnd, theirs: Hello, role: int, what: str) -> None:
    try:
        end.check_peer(theirs, role)
    except HandshakeError:
        raise HandshakeError(f"{what} (run the same mlxring on every machine)") from None


def _directions(end: LinkEnd, initiator: Hello, responder: Hello, we_initiate: bool):
    to_worker, to_head = end.directions(initiator, responder)
    out_key, in_key = (to_worker, to_head) if we_initiate else (to_head, to_worker)
    src, dst = (_HEAD, _WORKER) if we_initiate else (_WORKER, _HEAD)
    return Direction(LABEL, src, dst, out_key), Direction(LABEL, dst, src, in_key)


def connect(address: tuple[str, int], key: bytes, timeout: float = 5.0) -> Session:
    """Connect to a worker's control port and authenticate (the initiator's side)."""
    peer = f"{address[0]}:{address[1]}"
    sock = socket.create_connection(address, timeout=timeout)
    try:
        sock.settimeout(HANDSHAKE_TIMEOUT)
        end = LinkEnd(LABEL, key, _HEAD)
        sock.sendall(end.hello.pack())
        reply = _read(sock, REPLY_BYTES)
        theirs = Hello.unpack(reply[:HELLO_BYTES])
        _check(end, theirs, _WORKER, f"{peer} is not an mlxring worker of this version")
        if not hmac.compare_digest(reply[HELLO_BYTES:], end.mac(b"responder", end.hello, theirs)):
            sock.sendall(bytes([_REFUSED]) + bytes(MAC_BYTES))
            raise HandshakeError(
                f"the worker at {peer} does not hold this cluster key (refused; it received "
                "nothing): give it the same key file as this head"
            )
        sock.sendall(bytes([_OK]) + end.mac(b"initiator", end.hello, theirs))
        sock.settimeout(None)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        return Session(sock, *_directions(end, end.hello, theirs, True), peer)
    except BaseException:
        sock.close()
        raise


def accept(sock: socket.socket, key: bytes) -> Session:
    """Authenticate a connection accepted on the control port (the responder's side).
    Raises HandshakeError (the connecting side lacks the key) or ConnectionError."""
    host, port = sock.getpeername()[:2]
    peer = f"{host}:{port}"
    sock.settimeout(HANDSHAKE_TIMEOUT)
    end = LinkEnd(LABEL, key, _WORKER)
    theirs = Hello.unpack(_read(sock, HELLO_BYTES))
    _check(end, theirs, _HEAD, f"{peer} is not an mlxring head of this version")
    sock.sendall(end.hello.pack() + end.mac(b"responder", theirs, end.hello))
    confirm = _read(sock, CONFIRM_BYTES)
    if confirm[0] != _OK:
        raise HandshakeError(f"{peer} refused this worker's proof: it holds another cluster key")
    if not hmac.compare_digest(confirm[1:], end.mac(b"initiator", theirs, end.hello)):
        raise HandshakeError(f"{peer} could not prove it holds the cluster key (refused)")
    sock.settimeout(None)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    return Session(sock, *_directions(end, theirs, end.hello, False), peer)
