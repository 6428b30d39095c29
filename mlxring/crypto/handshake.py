"""The authenticated key exchange each ring link runs before any model data.

Per link, the left rank is the initiator and the right rank the responder:

    initiator -> responder   HELLO   version, cluster tag, rank, ephemeral X25519 key, nonce
    responder -> initiator   REPLY   the same fields + HMAC(auth key, "responder" | transcript)
    initiator -> responder   CONFIRM ok + HMAC(auth key, "initiator" | transcript), or refused

The auth key is derived from the cluster key (HKDF), so only holders of the key
can produce either MAC, and the MACs cover both ephemeral keys and nonces: a
modified transcript fails. Session keys come from HKDF over the X25519 shared
secret and key material from the cluster key, salted with both nonces; one key
per direction. Ephemeral keys give forward secrecy. Every rank is initiator on
its right link and responder on its left one, at the same time; sends never
block (see `mlxring.ring.transport`), so the ring cannot deadlock here.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import secrets
import struct
from dataclasses import dataclass

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from mlxring.crypto.link import Direction, RingCipher

VERSION = 1
_HELLO = struct.Struct("<B8sI32s32s")  # version, cluster tag, rank, public key, nonce
MAC_BYTES = 32
HELLO_BYTES = _HELLO.size
REPLY_BYTES = _HELLO.size + MAC_BYTES
CONFIRM_BYTES = 1 + MAC_BYTES
_OK, _REFUSED = 1, 0


class HandshakeError(ValueError):
    """A ring link could not be authenticated; the message names the peer and the fix."""


def _hkdf(ikm: bytes, info: bytes, length: int = 32, salt: bytes | None = None) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=salt, info=info).derive(ikm)


def cluster_tag(cluster: str) -> bytes:
    return hashlib.sha256(b"mlxring cluster " + cluster.encode()).digest()[:8]


@dataclass
class Hello:
    version: int
    tag: bytes
    rank: int
    public: bytes
    nonce: bytes

    def pack(self) -> bytes:
        return _HELLO.pack(self.version, self.tag, self.rank, self.public, self.nonce)

    @classmethod
    def unpack(cls, data: bytes) -> Hello:
        return cls(*_HELLO.unpack(data))


class LinkEnd:
    """One side of one link: our ephemeral key and nonce, then the peer's Hello."""

    def __init__(self, cluster: str, key: bytes, rank: int):
        self.cluster = cluster
        self.auth_key = _hkdf(key, b"mlxring v1 auth " + cluster.encode())
        self.psk = _hkdf(key, b"mlxring v1 psk " + cluster.encode())
        self.private = X25519PrivateKey.generate()
        public = self.private.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        self.hello = Hello(VERSION, cluster_tag(cluster), rank, public, secrets.token_bytes(32))

    def mac(self, role: bytes, initiator: Hello, responder: Hello) -> bytes:
        transcript = role + initiator.pack() + responder.pack()
        return hmac.new(self.auth_key, transcript, hashlib.sha256).digest()

    def check_peer(self, peer: Hello, expected_rank: int) -> None:
        if peer.version != VERSION:
            raise HandshakeError(
                f"rank {expected_rank} speaks protocol {peer.version}, this node {VERSION}: "
                "run the same mlxring everywhere"
            )
        if peer.tag != self.hello.tag or peer.rank != expected_rank:
            raise HandshakeError(
                f"the peer at rank {expected_rank}'s address is not rank {expected_rank} of "
                f"cluster {self.cluster!r} (check the cluster name and hostfile)"
            )

    def directions(self, initiator: Hello, responder: Hello) -> tuple[bytes, bytes]:
        """(initiator -> responder key, responder -> initiator key)."""
        peer = responder if initiator is self.hello else initiator
        shared = self.private.exchange(X25519PublicKey.from_public_bytes(peer.public))
        transcript = hashlib.sha256(initiator.pack() + responder.pack()).digest()
        okm = _hkdf(
            shared + self.psk,
            b"mlxring v1 session " + transcript,
            64,
            salt=initiator.nonce + responder.nonce,
        )
        return okm[:32], okm[32:]


def _refuse(transport, peer: int) -> None:
    transport.send(bytes([_REFUSED]) + bytes(MAC_BYTES), to=peer)
    with contextlib.suppress(Exception):  # the peer may have given up; our error says why
        transport.flush()


def secure_ring(transport, cluster: str, key: bytes) -> RingCipher:
    """Run the handshake on both of this rank's links; the cipher for its channel.

    `transport` has `rank`, `left`, `right`, `send(data, to=peer)`, `recv(n, peer=...)`.
    """
    rank, left, right = transport.rank, transport.left, transport.right
    init = LinkEnd(cluster, key, rank)  # our right link
    resp = LinkEnd(cluster, key, rank)  # our left link
    transport.send(init.hello.pack(), to=right)

    left_hello = Hello.unpack(bytes(transport.recv(HELLO_BYTES, peer=left)))
    resp.check_peer(left_hello, left)
    transport.send(resp.hello.pack() + resp.mac(b"responder", left_hello, resp.hello), to=left)

    reply = bytes(transport.recv(REPLY_BYTES, peer=right))
    right_hello = Hello.unpack(reply[:HELLO_BYTES])
    init.check_peer(right_hello, right)
    if not hmac.compare_digest(
        reply[HELLO_BYTES:], init.mac(b"responder", init.hello, right_hello)
    ):
        _refuse(transport, right)
        raise HandshakeError(
            f"rank {right} could not prove it holds the cluster key: its key differs from this "
            "node's (give every node the same key: mlxring keygen, cluster_key_file)"
        )
    confirm = bytes([_OK]) + init.mac(b"initiator", init.hello, right_hello)
    transport.send(confirm, to=right)

    confirm = bytes(transport.recv(CONFIRM_BYTES, peer=left))
    if confirm[0] != _OK:
        raise HandshakeError(
            f"rank {left} refused this node's proof of the cluster key: this node's key differs "
            f"from rank {left}'s"
        )
    if not hmac.compare_digest(confirm[1:], resp.mac(b"initiator", left_hello, resp.hello)):
        raise HandshakeError(
            f"rank {left} could not prove it holds the cluster key: its key differs from this "
            "node's (give every node the same key: mlxring keygen, cluster_key_file)"
        )
    forward_out, _ = init.directions(init.hello, right_hello)
    forward_in, _ = resp.directions(left_hello, resp.hello)
    return RingCipher(
        Direction(cluster, rank, right, forward_out), Direction(cluster, left, rank, forward_in)
    )
