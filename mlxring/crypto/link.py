"""Sealed ring messages: ChaCha20-Poly1305 with counter nonces, one key per direction.

Each direction of a link has its own key (from the handshake), so a nonce is
never used twice with one key: it is a 64-bit counter that both ends advance
in step and that never wraps. The associated data binds the cluster, the
source and destination ranks, and what the caller adds (the message header:
sequence number, micro-batch, layer range, sizes). Messages are opened
strictly in order: a replayed, reordered, dropped or modified one fails.
"""

from __future__ import annotations

import struct

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

TAG_BYTES = 16
_MAX_COUNTER = 2**64 - 1


class IntegrityError(ValueError):
    """A sealed message failed authentication: tampered, corrupted, replayed or reordered."""


class Direction:
    """One direction of one link (`src` -> `dst`): sealed at src, opened at dst."""

    def __init__(self, cluster: str, src: int, dst: int, key: bytes):
        self.src, self.dst = src, dst
        self._aead = ChaCha20Poly1305(key)
        name = cluster.encode()
        self._aad = struct.pack("<H", len(name)) + name + struct.pack("<II", src, dst)
        self.counter = 0  # the next nonce

    def _next_nonce(self) -> bytes:
        if self.counter >= _MAX_COUNTER:
            raise IntegrityError("nonce counter exhausted; restart the ring to rekey")
        nonce = b"\x00" * 4 + self.counter.to_bytes(8, "little")
        self.counter += 1
        return nonce

    def seal(self, data: bytes, aad: bytes = b"") -> bytes:
        return self._aead.encrypt(self._next_nonce(), data, self._aad + aad)

    def open(self, data: bytes, aad: bytes = b"") -> bytes:
        nonce = b"\x00" * 4 + self.counter.to_bytes(8, "little")
        try:
            plain = self._aead.decrypt(nonce, data, self._aad + aad)
        except InvalidTag:
            raise IntegrityError(
                f"a message from rank {self.src} failed authentication (tampered, corrupted, "
                "replayed or out of order)"
            ) from None
        self._next_nonce()
        return plain


class RingCipher:
    """What a rank's channel uses: seal towards the right neighbour, open from the left one."""

    overhead = TAG_BYTES

    def __init__(self, outbound: Direction, inbound: Direction):
        self.outbound, self.inbound = outbound, inbound

    def seal(self, data: bytes, aad: bytes) -> bytes:
        return self.outbound.seal(data, aad)

    def open(self, data: bytes, aad: bytes) -> bytes:
        return self.inbound.open(data, aad)
