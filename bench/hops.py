"""Lean hops: latency and bytes on the wire of each way to size ring messages.

    python -m bench.hops [--trials 3] [--json]

Two ranks of a real `mlx.distributed` ring on loopback, links sealed after a
real handshake; ping-pong: rank 0 sends a message, rank 1 sends it back.

- fixed: the former wire format, every message a 16 KiB slot (+ a remainder).
- lenfirst: a small sealed length message first, then the exact body (2 messages).
- last: the next slot is sized like the last message on the link (size classes).
- max4: the next slot fits the largest of the last 4 messages on the link.
- next1: sized like the last message of the kind (micro-batch, tensors or not)
  that came after this kind the last time.
- lean: mlxring's `SlotRule`: the kind that came next most often among the last
  4, sized by its last 4 messages at the least cost (padding bytes, a remainder
  counted as 32 KiB).

Part 1, one decode message repeated (hidden 64..8192, fp16/fp32, batch 1/8/32;
last, max4 and next1 equal lean there): the median one-way time of a hop over
4 x --trials blocks of 8 per design, the designs' blocks in turn (other work on
the machine slows them alike), and its bytes. Part 2, sequences a serving ring
sends (hidden 4096 fp16): mean time per hop (the best of --trials runs),
messages per hop, padding (bytes beyond one exact sealed message), and bad hops
past the first 8: two messages where one slot could hold the message, or over
30% padding in a slot above the smallest.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import struct
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx

from mlxring.crypto.handshake import secure_ring
from mlxring.ring import codec
from mlxring.ring.transport import (
    HEADER,
    HEADROOM,
    MAGIC,
    MAX_SLOT,
    MIN_SLOT,
    Channel,
    RingTransport,
    SlotRule,
    slot_class,
)

ROOT = Path(__file__).resolve().parent.parent
HIDDENS, DTYPES, BATCHES = (64, 256, 1024, 4096, 8192), ("float16", "float32"), (1, 8, 32)
DESIGNS = ("fixed", "lenfirst", "last", "max4", "next1", "lean")
BLOCK, SKIP = 8, 8


def with_room(nbytes: int) -> int:
    return slot_class(nbytes + HEADROOM)  # as SlotRule


class Rule:
    """A slot rule that is a function of the sizes sent so far on the link."""

    def __init__(self, choose):
        self.choose, self.sent = choose, []

    def next_slot(self, kind, nbytes: int) -> int:
        self.sent.append(nbytes)
        return self.choose(self.sent)


class NextOnce:
    def __init__(self):
        self.size, self.after, self.previous = {}, {}, None

    def next_slot(self, kind, nbytes: int) -> int:
        self.size[kind] = nbytes
        if self.previous is not None:
            self.after[self.previous] = kind
        self.previous = kind
        return with_room(self.size[self.after.get(kind, kind)])


class LengthFirst:
    """The clear header, authenticated by a sealed empty body, then the exact body."""

    def __init__(self, transport: RingTransport, sealer):
        self.transport, self.sealer, self.sent = transport, sealer, 0

    def send(self, meta: dict, tensors=None, micro_batch: int = 0) -> None:
        meta_bytes = json.dumps(meta, separators=(",", ":")).encode()
        body = struct.pack("<I", len(meta_bytes)) + meta_bytes
        body += codec.encode_many(tensors) if tensors else b""
        sealed = len(body) + self.sealer.overhead
        header = HEADER.pack(MAGIC, self.sent, micro_batch, 0, 0, 0, sealed, 0)
        self.transport.send(header + self.sealer.seal(b"", header))
        self.transport.send(self.sealer.seal(body, header + b"+"))
        self.sent += 1

    def recv(self) -> tuple[dict, dict]:
        first = bytes(self.transport.recv(HEADER.size + self.sealer.overhead))
        header = first[: HEADER.size]
        self.sealer.open(first[HEADER.size :], header)
        body = self.sealer.open(bytes(self.transport.recv(HEADER.unpack(header)[6])), header + b"+")
        (n,) = struct.unpack_from("<I", body)
        rest = memoryview(body)[4 + n :]
        return json.loads(body[4 : 4 + n]), codec.decode_many(rest) if len(rest) else {}


def link_for(design: str, transport: RingTransport, cipher):
    if design == "lenfirst":
        return LengthFirst(transport, cipher)
    rule = {
        "fixed": lambda: Rule(lambda sent: 16384),
        "last": lambda: Rule(lambda sent: with_room(sent[-1])),
        "max4": lambda: Rule(lambda sent: with_room(max(sent[-4:]))),
        "next1": NextOnce,
    }.get(design, SlotRule)()
    channel = Channel(transport, cipher, rule)
    if design == "fixed":
        channel.slot_out = channel.slot_in = 16384
    return channel


def step(group: int, batch: int, hidden: int, dtype: str = "float16", chunk=(0, 0)):
    """A decode step of `batch` members of `group` (a step header's fields and hidden
    states), with a prefill chunk of (prompts, tokens) riding on it."""
    seqs, prompts = list(range(10 * group, 10 * group + batch)), list(range(100, 100 + chunk[0]))
    meta = {"op": "step", "seqs": seqs, "micro_batch": group, "prefill": prompts}
    meta |= {"new": prompts, "admit": [], "evict": [], "drop": []}
    shapes = {"h": (batch, 1, hidden), "p": (*chunk, hidden)}
    tensors = {n: mx.random.normal(s).astype(getattr(mx, dtype)) for n, s in shapes.items() if s[0]}
    return meta, tensors, group


PROBE = ({"op": "stats", "stages": []}, None, 0)


def sequences(hidden: int = 4096) -> dict[str, list]:
    """What a serving ring sends: decode groups, stats probes, prefill chunks."""

    def d(group: int, batch: int, chunk=(0, 0)):
        return step(group, batch, hidden, chunk=chunk)

    def probes(steps: list) -> list:  # a stats probe after every 16th step
        return [m for i, s in enumerate(steps) for m in (s, PROBE)[: 1 + (i % 16 == 15)]]

    return {
        "lockstep decode, batch 8": [d(0, 8)] * 48,
        "2 groups, batch 5 (3+2)": [d(0, 3), d(1, 2)] * 24,
        "3 groups, batch 8 (3+3+2), probes": probes([d(0, 3), d(1, 3), d(2, 2)] * 20),
        "2 groups (4+4), a 64-token prefill step of 2 prompts every 6, probes": probes(
            [d(5, 0, (2, 64)) if i % 6 == 5 else d(i % 2, 4) for i in range(60)]
        ),
        "2 groups (4+4), 64-token chunks riding on 4 of every 24 steps, probes": probes(
            [d(i % 2, 4, (1, 64) if i % 24 < 4 else (0, 0)) for i in range(60)]
        ),
        "2 groups (4+4), chunks riding on 16 of every 30 steps, one joins at 40": [
            d(i % 2, 4 + (i >= 40 and i % 2 == 0), (1, 64) if i % 30 < 16 else (0, 0))
            for i in range(60)
        ],
        "probe / 512-token prefill / decode b1, repeated": [PROBE, d(5, 0, (1, 512)), d(0, 1)] * 16,
    }


def needed(message, overhead: int) -> int:
    meta, tensors, _ = message
    body = 4 + len(json.dumps(meta, separators=(",", ":")))
    return HEADER.size + body + (len(codec.encode_many(tensors)) if tensors else 0) + overhead


def play(link, rank: int, messages: list, sends: list[int]) -> list[dict]:
    """Ping-pong every message once; per hop (rank 0's side): seconds, wire bytes, messages."""
    hops = []
    for meta, tensors, micro_batch in messages:
        before, started = len(sends), time.perf_counter()
        if rank == 0:
            link.send(meta, tensors, micro_batch)
            link.recv()
        else:
            meta, tensors = link.recv()
            link.send(meta, tensors or None, micro_batch)
        wire, seconds = sends[before:], (time.perf_counter() - started) / 2
        hops.append({"s": seconds, "wire": sum(wire), "msgs": len(wire)})
    return hops


def single_sizes(rank: int, link_to, sends: list[int], overhead: int, trials: int) -> list:
    rows = []
    for hidden in HIDDENS:
        for dtype in DTYPES:
            for batch in BATCHES:
                message = step(0, batch, hidden, dtype)
                need = needed(message, overhead)
                row, times = {"hidden": hidden, "dtype": dtype, "batch": batch, "need": need}, {}
                for _ in range(4 * trials):  # short blocks, designs in turn: a busy machine
                    for design in ("fixed", "lenfirst", "lean"):  # slows them all alike
                        hops = play(link_to(design), rank, [message] * (2 + BLOCK), sends)
                        times.setdefault(design, []).extend(h["s"] for h in hops[2:])
                        row[design] = {"wire": hops[-1]["wire"], "msgs": hops[-1]["msgs"]}
                for design, seconds in times.items():
                    row[design]["us"] = round(statistics.median(seconds) * 1e6, 1)
                rows.append(row)
    return rows


def is_bad(hop: dict) -> bool:
    two = hop["msgs"] > 1 and hop["need"] <= MAX_SLOT
    return two or (hop["wire"] > MIN_SLOT and hop["wire"] - hop["need"] > 0.3 * hop["wire"])


def sequence_runs(rank: int, link_to, sends: list[int], overhead: int, trials: int) -> list:
    rows = []
    for name, messages in sequences().items():
        row, times = {"sequence": name, "hops": len(messages)}, {}
        for _ in range(trials):
            for design in DESIGNS:
                play(link_to(design), rank, messages[:SKIP], sends)  # warm the code paths
                hops = play(link_to(design), rank, messages, sends)
                times.setdefault(design, []).append(sum(h["s"] for h in hops) / len(hops))
                for hop, message in zip(hops, messages):
                    hop["need"] = needed(message, overhead)
                wire, need = sum(h["wire"] for h in hops), sum(h["need"] for h in hops)
                row[design] = {
                    "msgs_per_hop": round(sum(h["msgs"] for h in hops) / len(hops), 3),
                    "wire_kb_per_hop": round(wire / len(hops) / 1024, 1),
                    "padding": round((wire - need) / wire, 4),
                    "bad_hops": sum(map(is_bad, hops[SKIP:])),
                }
        for design, per_hop in times.items():
            row[design]["us_per_hop"] = round(min(per_hop) * 1e6, 1)
        rows.append(row)
    return rows


def run_rank(trials: int) -> None:
    group = mx.distributed.init(backend="ring", strict=True)
    rank, transport = group.rank(), RingTransport(group)
    cipher = secure_ring(transport, "bench-hops", bytes(range(32)))
    sends: list[int] = []
    plain_send = transport.send
    transport.send = lambda data, to=None: (sends.append(len(data)), plain_send(data, to))[1]

    def link_to(design: str):
        return link_for(design, transport, cipher)

    play(link_to("lean"), rank, [step(0, 8, 1024)] * 200, sends)  # warm up
    result = {
        "single": single_sizes(rank, link_to, sends, cipher.overhead, trials),
        "sequences": sequence_runs(rank, link_to, sends, cipher.overhead, trials),
    }
    transport.flush()
    if rank == 0:
        print(json.dumps(result), flush=True)
    mx.clear_streams()  # the send threads' streams: left alive they abort the process at exit


def start_ring(trials: int) -> dict:
    """Run this file as the two ranks of a loopback ring; rank 0's JSON."""
    from mlxring.cluster.ranks import free_port  # lazy: only the launching side needs it

    hostfile = Path(f"/tmp/mlxring-hops-{os.getpid()}.json")
    hostfile.write_text(json.dumps([[f"127.0.0.1:{free_port()}"] for _ in range(2)]))
    env = {**os.environ, "MLX_HOSTFILE": str(hostfile), "PYTHONPATH": str(ROOT)}
    argv = [sys.executable, "-m", "bench.hops", "--trials", str(trials)]
    try:
        procs = [
            subprocess.Popen(argv, env=env | {"MLX_RANK": str(r)}, cwd=ROOT, stdout=subprocess.PIPE)
            for r in range(2)
        ]
        outs = [p.communicate(timeout=1800)[0] for p in procs]
    finally:
        hostfile.unlink(missing_ok=True)
    if any(p.returncode for p in procs):
        sys.exit(f"a rank failed: exit codes {[p.returncode for p in procs]}")
    return json.loads(outs[0].decode().strip().splitlines()[-1])


def report(result: dict) -> None:
    def cell(d: dict) -> str:
        return f"{d['us']:.0f} us, {d['wire']} B" + (" (2 msgs)" if d["msgs"] > 1 else "")

    print("| hidden | dtype | batch | exact message | fixed 16 KiB slot | length first | lean |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in result["single"]:
        cells = " | ".join(cell(r[d]) for d in ("fixed", "lenfirst", "lean"))
        print(f"| {r['hidden']} | {r['dtype']} | {r['batch']} | {r['need']} B | {cells} |")
    print("\nPer sequence and design: messages per hop, padding, bad hops, us per hop.\n")
    print("| sequence | " + " | ".join(DESIGNS) + " |")
    print("| --- " * (len(DESIGNS) + 1) + "|")
    for r in result["sequences"]:
        cells = [
            f"{s['msgs_per_hop']:.2f}, {s['padding']:.0%}, {s['bad_hops']}, {s['us_per_hop']:.0f}"
            for s in (r[d] for d in DESIGNS)
        ]
        print(f"| {r['sequence']} ({r['hops']} hops) | " + " | ".join(cells) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if "MLX_RANK" in os.environ:  # one of the two ranks start_ring starts
        run_rank(args.trials)
        return
    result = start_ring(args.trials)
    print(json.dumps(result)) if args.json else report(result)


if __name__ == "__main__":
    main()
