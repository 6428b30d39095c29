"""Lean hops on a real sealed ring: rank 0 sends decode-like steps around, every other rank
forwards them as a stage does. Each rank counts what its `Channel.send` put on the wire
(calls to the transport's send and their bytes) against the exact sealed message; for
messages marked steady it prints any hop that took more than one message or was more than
30% padding. Rank 0 checks that everything came back intact."""

import json
import sys

import mlx.core as mx
import numpy as np

from mlxring.crypto.handshake import secure_ring
from mlxring.ring import codec
from mlxring.ring.transport import HEADER, Channel, RingTransport

group = mx.distributed.init(backend="ring", strict=True)
rank, transport = group.rank(), RingTransport(group)
channel = Channel(transport, secure_ring(transport, "hops", bytes(range(32))))
sends: list[int] = []
plain_send = transport.send


def counted(data, to=None):
    sends.append(len(data))
    plain_send(data, to)


transport.send = counted
checked, problems = 0, []


def send(meta: dict, tensors: dict | None, micro_batch: int) -> None:
    global checked
    before = len(sends)
    channel.send(meta, tensors, micro_batch=micro_batch)
    body = (
        4
        + len(json.dumps(meta, separators=(",", ":")))
        + (len(codec.encode_many(tensors)) if tensors else 0)
    )
    exact, wire = HEADER.size + body + channel.sealer.overhead, sends[before:]
    if meta.get("steady"):
        checked += 1
        if len(wire) != 1 or sum(wire) - exact > 0.3 * sum(wire):
            problems.append(f"{meta['what']}: {exact} bytes went as {wire}")


def step(what: str, batch: int, hidden: int, dtype, group: int = 0, steady: bool = False):
    """A decode step of `batch` members of `group`: a step header's fields, hidden states."""
    seqs = list(range(100 * group, 100 * group + batch))
    meta = {"op": "step", "seqs": seqs, "micro_batch": group, "prefill": [], "new": []}
    meta |= {"admit": [], "evict": [], "drop": [], "what": what, "steady": steady}
    return meta, {"h": mx.random.normal((batch, 1, hidden)).astype(dtype)}, group


def steady():
    """Decode at every size, then pipelined groups of different sizes taking turns; each
    pattern is steady once the sender's slot rule has seen 4 messages of each kind."""
    for hidden in (64, 512, 4096, 8192):
        for dtype in (mx.float16, mx.float32):
            for batch in (1, 8, 32):
                if dtype == mx.float32 and batch == 32:
                    continue
                what = f"hidden {hidden} {dtype} batch {batch}"
                for i in range(6):
                    yield step(what, batch, hidden, dtype, steady=i >= 4)
    for i in range(16):  # batch 5 in two groups: 3 and 2 members
        yield step("groups 3+2", 3 - i % 2, 8192, mx.float16, group=i % 2, steady=i >= 8)


def jumps():
    """Sizes that jump, predictably or not: small, large (over a slot: a remainder), small."""
    probe = ({"op": "stats", "stages": []}, None, 0)
    chunk = {"op": "step", "seqs": [], "micro_batch": 5, "prefill": [7], "new": [7]}
    big = (chunk, {"p": mx.random.normal((1, 300, 4096))}, 5)  # 4.9 MB
    mid = step("mid", 64, 4096, mx.float16)  # 512 KiB
    tiny = step("tiny", 1, 64, mx.float16)
    yield from (probe, big, tiny, big, probe, big, probe, mid, tiny, mid, tiny, probe)
    yield from (tiny, mid, big, tiny, tiny, mid, mid, probe, probe, big, big, tiny) * 2


if rank == 0:
    for meta, tensors, micro_batch in {"steady": steady, "jumps": jumps}[sys.argv[1]]():
        send(meta, tensors, micro_batch)
        back, got = channel.recv()
        assert back == meta and channel.received_micro_batch == micro_batch, (back, meta)
        assert got.keys() == (tensors or {}).keys()
        for name, x in got.items():
            assert x.dtype == tensors[name].dtype
            assert np.array_equal(np.asarray(x), np.asarray(tensors[name])), meta
    send({"op": "stop"}, None, 0)
    channel.recv()
else:
    while True:
        meta, tensors = channel.recv()
        send(meta, tensors or None, channel.received_micro_batch)
        if meta.get("op") == "stop":
            break
channel.flush()
print(f"rank {rank}: {checked} steady hops checked", flush=True)
for problem in problems:
    print(f"rank {rank}: not lean: {problem}", flush=True)
mx.clear_streams()
