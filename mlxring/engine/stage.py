"""A stage of the ring: its caches for every live sequence, driven by the step headers.

Each stage (the head included) keeps, for its own layers only: single-sequence
caches for sequences in prefill, and one batched cache per decode group, built
with the batch caches' `merge`, `extend`, `filter` (mlx-lm's, or the torch
shards' own). A header is applied in the same order on every stage, so all
stages agree on every group's members.

`serve_stage` is the loop of every rank but the head: receive a step, run this
stage's layers, pass the result right. The ring closes on the head (see
`mlxring.engine.engine`), which applies the final norm and lm_head.
"""

from __future__ import annotations

import time

import mlx.core as mx

from mlxring.engine.header import PREFILL_PREFIX, StepHeader
from mlxring.ring.transport import Channel, ProtocolError
from mlxring.shards.base import Shard


class Group:
    """One decode micro-batch on this stage: its members and their batched caches. On a
    shard that allows it (`single_caches`: mlx), a group of one decodes on its sequence's
    own caches, as mlx-lm's single stream does (no left padding, no mask: about 3% faster
    a step on a CPU); a second member makes them a batch."""

    def __init__(self, single_caches: bool = False):
        self.seqs: list[int] = []
        self.caches: list | None = None  # one cache per local layer (batch caches if batched)
        self.batched = False
        self.single_caches = single_caches

    def admit(self, seq: int, singles: list) -> None:
        if self.caches is None and self.single_caches:
            self.caches, self.batched = singles, False
        elif self.caches is None:
            self.caches, self.batched = [c.merge([c]) for c in singles], True
        else:
            if not self.batched:
                self.caches, self.batched = [c.merge([c]) for c in self.caches], True
            for mine, theirs in zip(self.caches, singles):
                mine.extend(theirs.merge([theirs]))
        self.seqs.append(seq)

    def evict(self, seqs: tuple[int, ...]) -> None:
        keep = [i for i, s in enumerate(self.seqs) if s not in seqs]
        if len(keep) == len(self.seqs):
            return
        self.seqs = [self.seqs[i] for i in keep]
        if not keep:
            self.caches = None
        else:
            for c in self.caches:
                c.filter(mx.array(keep))


class StageState:
    """Applies step headers to one shard's layers and caches."""

    def __init__(self, shard: Shard):
        self.shard = shard
        self.singles: dict[int, list] = {}  # prefilling sequences' caches
        self.groups: dict[int, Group] = {}
        self.step_seconds = 0.0  # moving average of a step's compute (and send) here

    def record(self, seconds: float) -> None:
        self.step_seconds = (
            seconds if not self.step_seconds else 0.9 * self.step_seconds + 0.1 * seconds
        )

    def apply(self, header: StepHeader, x: dict | None, last: bool = False) -> dict | None:
        """Run this stage's layers for one step; None when nothing goes on. The prefill
        part's output goes on to the next stage, unless this stage is the `last`: the head
        needs no prefill output (a prompt's last token is fed by its first decode step)."""
        for seq in header.drop:
            self.singles.pop(seq, None)
        x = self.shard.arrive(x) if x else {}
        decode = {k: v for k, v in x.items() if not k.startswith(PREFILL_PREFIX)}
        out = {}
        if header.prefill:
            chunk = {k[len(PREFILL_PREFIX) :]: v for k, v in x.items() if k not in decode}
            done = self._prefill(header.prefill, header.new, chunk)
            if last:  # computed here, kept nowhere but in the caches
                mx.eval([v for v in done.values() if isinstance(v, mx.array)])
            else:
                out = {PREFILL_PREFIX + k: v for k, v in done.items()}
        if (seqs := self._decode(header, decode)) is not None:
            out.update(seqs)
        return out or None

    def _decode(self, header: StepHeader, x: dict) -> dict | None:
        group = self.groups.get(header.micro_batch)
        if group is None:
            single = getattr(self.shard, "single_caches", False)
            group = self.groups[header.micro_batch] = Group(single)
        if header.evict:
            group.evict(header.evict)
        for seq in header.admit:
            singles = self.singles.pop(seq, None)
            group.admit(seq, singles if singles is not None else self.shard.make_cache())
        if tuple(group.seqs) != header.seqs:
            raise ProtocolError(
                f"group {header.micro_batch} holds {group.seqs} but the step is for "
                f"{list(header.seqs)}"
            )
        if not group.seqs:
            return None
        return self.shard(x, group.caches)

    def _prefill(self, seqs: tuple[int, ...], new: tuple[int, ...], x: dict) -> dict:
        """One chunk of each of `seqs` (equal lengths, equal positions): one batch."""
        if not x:
            raise ProtocolError(f"a prefill of {list(seqs)} came without its hidden states")
        for seq in new:
            self.singles[seq] = self.shard.make_cache()
        if unknown := [s for s in seqs if s not in self.singles]:
            raise ProtocolError(f"prefill chunk for unknown sequences {unknown}")
        if len(seqs) == 1:
            return self.shard(x, self.singles[seqs[0]])
        per_layer = zip(*(self.singles[s] for s in seqs))
        batch = [layer[0].merge(list(layer)) for layer in per_layer]
        out = self.shard(x, batch)
        for i, seq in enumerate(seqs):
            self.singles[seq] = [c.extract(i) for c in batch]
        return out

    def stats(self) -> dict:
        """Live sequences and the bytes their caches hold on this stage."""
        nbytes = sum(c.nbytes for caches in self.singles.values() for c in caches)
        nbytes += sum(c.nbytes for g in self.groups.values() if g.caches for c in g.caches)
        live = sorted([*self.singles, *(s for g in self.groups.values() for s in g.seqs)])
        return {
            "layers": [self.shard.start, self.shard.end],
            "sequences": live,
            "cache_bytes": nbytes,
            "step_ms": round(self.step_seconds * 1000, 3),
        }


def serve_stage(shard: Shard, channel: Channel) -> None:
    """Serve steps until the head stops the ring: every rank but the head runs this."""
    state = StageState(shard)
    layers = (shard.start, shard.end)
    last = channel.transport.rank == channel.num_stages - 1  # the ring closes on the head
    while True:
        meta, x = channel.recv()
        op = meta.get("op")
        if op == "step":
            header = StepHeader.from_wire(meta)
            if header.micro_batch != channel.received_micro_batch:
                raise ProtocolError(
                    f"a step of micro-batch {header.micro_batch} came as micro-batch "
                    f"{channel.received_micro_batch}"
                )
            started = time.perf_counter()
            out = state.apply(header, x or None, last=last)
            out = out and shard.depart(out)  # to the host, in the wire form
            channel.send(meta, out, micro_batch=header.micro_batch, layers=layers)
            state.record(time.perf_counter() - started)  # send evaluates the step
        elif op == "stats":
            meta["stages"].append(state.stats())
            channel.send(meta, layers=layers)
        elif op == "stop":
            channel.send(meta)
            channel.flush()
            return
        else:
            raise ProtocolError(f"unknown ring message {meta}")
