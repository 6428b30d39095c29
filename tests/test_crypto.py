"""Handshake, sealing and codec: the protocol, byte by byte."""

from __future__ import annotations

import stat

import mlx.core as mx
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mlxring.crypto.handshake import HELLO_BYTES, HandshakeError, secure_ring
from mlxring.crypto.keys import ClusterKeyError, new_key, read_key_file, write_key
from mlxring.crypto.link import Direction, IntegrityError, RingCipher
from mlxring.ring import codec
from mlxring.ring.transport import Channel, ProtocolError
from tests.memring import MemoryRing, run_all

KEY = bytes(range(32))


def handshake(size: int, keys=None, tamper=None) -> tuple[MemoryRing, list]:
    ring = MemoryRing(size)
    ring.tamper = tamper
    keys = keys or [KEY] * size
    return ring, run_all(size, lambda r: secure_ring(ring.transport(r), "c1", keys[r]))


@pytest.mark.parametrize("size", [2, 3, 4])
def test_both_ends_of_every_link_derive_the_same_keys(size):
    _, ciphers = handshake(size)
    assert all(isinstance(c, RingCipher) for c in ciphers), ciphers
    for r, cipher in enumerate(ciphers):
        right = ciphers[(r + 1) % size]
        sealed = cipher.seal(b"hidden states", b"hdr")
        assert right.open(sealed, b"hdr") == b"hidden states"
        assert sealed[: len(b"hidden states")] != b"hidden states"
    # fresh ephemeral keys: another handshake gives other session keys
    _, again = handshake(size)
    assert again[0].seal(b"x", b"") != handshake(size)[1][0].seal(b"x", b"")


@pytest.mark.parametrize("size", [2, 3])
def test_a_peer_with_the_wrong_key_is_refused_on_both_sides(size):
    keys = [KEY] * size
    keys[1] = new_key()
    _, results = handshake(size, keys)
    assert all(isinstance(r, HandshakeError) for r in results), results
    assert "rank 1 could not prove it holds the cluster key" in str(results[0])
    messages = " ".join(str(r) for r in results[1:])
    assert "refused this node's proof" in messages or "could not prove" in messages


def test_the_wrong_key_peer_receives_no_model_data():
    keys = [KEY, new_key()]
    ring, results = handshake(2, keys)
    assert all(isinstance(r, HandshakeError) for r in results)
    sizes = {len(b) for q in ring.pipes.values() for b in list(q.queue)}
    assert not sizes or max(sizes) <= HELLO_BYTES + 32  # only handshake messages ever moved


TRANSCRIPT = [
    ("hello", 0),
    ("hello", 9),
    ("hello", 13),
    ("hello", 45),
    ("hello", 76),
    ("reply", 1),
    ("reply", 20),
    ("reply", 50),
    ("reply", 100),
    ("confirm", 5),
]


@pytest.mark.parametrize("message, offset", TRANSCRIPT)
def test_a_modified_transcript_fails(message, offset):
    """Rank 0's HELLO, rank 1's REPLY to it, or rank 0's CONFIRM, changed in flight."""
    where = {"hello": (0, 1, 0), "reply": (1, 0, 1), "confirm": (0, 1, 2)}[message]

    def tamper(src, dst, n, data):
        if (src, dst, n) == where:
            assert offset < len(data)
            data = bytearray(data)
            data[offset] ^= 0x01
        return bytes(data)

    _, results = handshake(2, tamper=tamper)
    assert any(isinstance(r, HandshakeError) for r in results), results


def test_a_different_cluster_name_is_refused():
    ring = MemoryRing(2)
    names = ["c1", "c2"]
    results = run_all(2, lambda r: secure_ring(ring.transport(r), names[r], KEY))
    assert all(isinstance(r, HandshakeError) for r in results)
    assert "not rank" in str(results[0]) and "cluster 'c1'" in str(results[0])


def channels():
    """A 2-rank in-memory ring whose channels are sealed with a real handshake."""
    ring = MemoryRing(2)
    ciphers = run_all(2, lambda r: secure_ring(ring.transport(r), "c1", KEY))
    return ring, [Channel(ring.transport(r), ciphers[r]) for r in range(2)]


def test_sealed_messages_round_trip_small_and_large():
    _, (a, b) = channels()
    for shape in [(1, 1, 64), (2, 600, 64)]:  # one slot, and a slot plus an overflow message
        x = mx.random.normal(shape)
        a.send({"op": "step", "n": 1}, {"h": x, "p": x[..., :3]}, micro_batch=3, layers=(0, 2))
        meta, y = b.recv()
        assert meta == {"op": "step", "n": 1} and mx.array_equal(x, y["h"]).item()
        assert mx.array_equal(x[..., :3], y["p"]).item()


def flipped(data: bytes, index: int) -> bytes:
    data = bytearray(data)
    data[index] ^= 0x10
    return bytes(data)


@pytest.mark.parametrize("where", ["header", "ciphertext", "tag", "overflow"])
def test_a_flipped_bit_is_rejected(where):
    ring, (a, b) = channels()
    tensor = mx.random.normal((1, 600, 64)) if where == "overflow" else mx.ones((1, 4, 64))
    a.send({"op": "step"}, {"h": tensor})
    pipe = ring.pipes[(0, 1)]
    messages = list(pipe.queue)
    pipe.queue.clear()
    sealed_len = int.from_bytes(messages[0][24:28], "little")  # the header's inline size
    index = {"header": 9, "ciphertext": 40, "tag": 32 + sealed_len - 3, "overflow": 50}[where]
    target = 1 if where == "overflow" else 0
    messages[target] = flipped(messages[target], index)
    for m in messages:
        pipe.put(m)
    with pytest.raises((IntegrityError, ProtocolError)):
        b.recv()


def test_associated_data_binds_cluster_and_ranks():
    key = new_key()
    sealed = Direction("c1", 0, 1, key).seal(b"payload", b"header")
    assert Direction("c1", 0, 1, key).open(sealed, b"header") == b"payload"
    for other in [
        Direction("c2", 0, 1, key),
        Direction("c1", 2, 1, key),
        Direction("c1", 0, 2, key),
    ]:
        with pytest.raises(IntegrityError):
            other.open(sealed, b"header")
    with pytest.raises(IntegrityError):
        Direction("c1", 0, 1, key).open(sealed, b"headeR")


def test_replayed_and_reordered_messages_are_rejected():
    ring, (a, b) = channels()
    a.send({"n": 0}, {"h": mx.ones((1, 1, 8))})
    a.send({"n": 1}, {"h": mx.ones((1, 1, 8))})
    pipe = ring.pipes[(0, 1)]
    first, second = pipe.get(), pipe.get()
    pipe.put(second)  # reordered
    with pytest.raises(ProtocolError, match="out of order"):
        b.recv()

    ring, (a, b) = channels()
    a.send({"n": 0}, {"h": mx.ones((1, 1, 8))})
    pipe = ring.pipes[(0, 1)]
    first = pipe.get()
    pipe.put(first)
    assert b.recv()[0] == {"n": 0}
    pipe.put(first)  # replayed
    with pytest.raises(ProtocolError, match="out of order"):
        b.recv()


def test_a_replay_with_a_forged_sequence_number_fails_authentication():
    ring, (a, b) = channels()
    a.send({"n": 0}, {"h": mx.ones((1, 1, 8))})
    pipe = ring.pipes[(0, 1)]
    first = pipe.get()
    pipe.put(first)
    b.recv()
    forged = bytearray(first)
    forged[4:12] = (1).to_bytes(8, "little")  # claim to be message 1
    pipe.put(bytes(forged))
    with pytest.raises(IntegrityError):
        b.recv()


DTYPES = [mx.float32, mx.float16, mx.bfloat16]


@settings(deadline=None, max_examples=60)
@given(
    shape=st.lists(st.integers(0, 7), min_size=0, max_size=4),
    dtype=st.sampled_from(DTYPES),
    seed=st.integers(0, 2**16),
)
def test_codec_round_trips(shape, dtype, seed):
    x = (mx.random.normal(tuple(shape), key=mx.random.key(seed)) * 100).astype(dtype)
    y = codec.decode(codec.encode(x))
    assert y.dtype == dtype and y.shape == x.shape
    assert np.array_equal(np.array(x.astype(mx.float32)), np.array(y.astype(mx.float32)))


def test_codec_rejects_malformed_buffers():
    good = codec.encode(mx.ones((2, 3)))
    for bad in [good[:1], good[:-1], good + b"\0", bytes([9]) + good[1:]]:
        with pytest.raises(codec.CodecError):
            codec.decode(bad)


def test_keygen_file_is_private_and_readable(tmp_path):
    path = write_key(tmp_path / "sub" / "cluster.key", new_key())
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert len(read_key_file(path)) == 32
    with pytest.raises(ClusterKeyError, match="exists"):
        write_key(path, new_key())
    path.chmod(0o644)
    with pytest.raises(ClusterKeyError, match="readable by others"):
        read_key_file(path)
    bad = tmp_path / "bad.key"
    bad.write_text("not hex")
    bad.chmod(0o600)
    with pytest.raises(ClusterKeyError, match="64 hex digits"):
        read_key_file(bad)
