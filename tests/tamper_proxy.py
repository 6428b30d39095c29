"""A TCP proxy on loopback that forwards a connection and flips one byte of the first ring
data message (found by its clear header's magic) that crosses it, in either direction."""

from __future__ import annotations

import contextlib
import socket
import threading
import time

MAGIC = b"MXR1"
FLIP_AT = 32 + 8  # past the 32-byte clear header: inside the sealed body


class TamperProxy:
    def __init__(self, target_port: int, flipped: threading.Event):
        self.target_port = target_port
        self.flipped = flipped  # shared by every proxy of a test: flip only once in all
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.sockets: list[socket.socket] = [self.server]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            upstream = self._connect_upstream()
            self.sockets += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _connect_upstream(self) -> socket.socket:
        """The target rank may not listen yet (it retries too): wait for it."""
        deadline = time.monotonic() + 60
        while True:
            try:
                return socket.create_connection(("127.0.0.1", self.target_port))
            except ConnectionRefusedError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
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

    def close(self) -> None:
        for s in self.sockets:
            with contextlib.suppress(OSError):
                s.close()
