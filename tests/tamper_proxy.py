"""TCP proxies on loopback that forward connections and break them on purpose:
TamperProxy flips one byte of the first ring data message (found by its clear header's
magic) that crosses it, in either direction; FaultProxy cuts or corrupts a stream at a
given offset."""

from __future__ import annotations

import contextlib
import socket
import threading
import time

MAGIC = b"MXR1"
FLIP_AT = 36 + 4  # past the 36-byte clear header: inside the sealed body


class Proxy:
    """Forwards every connection to `target_port` on loopback, both ways; subclasses
    change what `_pump` does to the bytes."""

    def __init__(self, target_port: int):
        self.target_port = target_port
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.sockets: list[socket.socket] = [self.server]
        self.connections = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            self.connections += 1
            upstream = self._connect_upstream()
            self.sockets += [client, upstream]
            number = self.connections
            for a, b, outbound in ((client, upstream, True), (upstream, client, False)):
                args = (a, b, outbound, number)
                threading.Thread(target=self._pump, args=args, daemon=True).start()

    def _connect_upstream(self) -> socket.socket:
        """The target may not listen yet (a ring rank retries too): wait for it."""
        deadline = time.monotonic() + 60
        while True:
            try:
                return socket.create_connection(("127.0.0.1", self.target_port))
            except ConnectionRefusedError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def _pump(self, src: socket.socket, dst: socket.socket, outbound: bool, number: int) -> None:
        with contextlib.suppress(OSError):
            while chunk := src.recv(65536):
                dst.sendall(chunk)
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        for s in self.sockets:
            with contextlib.suppress(OSError):
                s.close()


class TamperProxy(Proxy):
    def __init__(self, target_port: int, flipped: threading.Event):
        self.flipped = flipped  # shared by every proxy of a test: flip only once in all
        super().__init__(target_port)

    def _pump(self, src: socket.socket, dst: socket.socket, outbound: bool, number: int) -> None:
        """Forward at once (holding bytes back could stall the ring's own protocol); once the
        magic is seen, flip the byte FLIP_AT past it when the stream reaches it."""
        offset = 0  # stream position of the chunk's first byte
        tail = b""  # the last bytes seen, for a magic split across chunks
        target: int | None = None
        try:
            while chunk := bytearray(src.recv(65536)):
                if target is None and not self.flipped.is_set():
                    at = (tail + chunk).find(MAGIC)
                    if at >= 0:
                        target = offset - len(tail) + at + FLIP_AT
                if target is not None and offset <= target < offset + len(chunk):
                    chunk[target - offset] ^= 0x01
                    self.flipped.set()
                    target = None
                tail = bytes(chunk[-(len(MAGIC) - 1) :])
                offset += len(chunk)
                dst.sendall(chunk)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_WR)


class FaultProxy(Proxy):
    """The first connection's outbound stream (client to target) is cut after `cut` bytes,
    or has the byte at offset `flip` inverted; later connections pass untouched."""

    def __init__(self, target_port: int, cut: int | None = None, flip: int | None = None):
        self.cut, self.flip = cut, flip
        super().__init__(target_port)

    def _pump(self, src: socket.socket, dst: socket.socket, outbound: bool, number: int) -> None:
        if not outbound or number != 1:
            return super()._pump(src, dst, outbound, number)
        seen = 0
        with contextlib.suppress(OSError):
            while chunk := bytearray(src.recv(65536)):
                if self.cut is not None and seen + len(chunk) >= self.cut:
                    dst.sendall(chunk[: self.cut - seen])
                    break
                if self.flip is not None and seen <= self.flip < seen + len(chunk):
                    chunk[self.flip - seen] ^= 0x40
                seen += len(chunk)
                dst.sendall(chunk)
        for s in (src, dst):  # a cut: both ends see the connection go
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
