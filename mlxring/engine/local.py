"""The stages after the head, in this process: what the engine sends to instead of a ring.

`LocalStages(shards)` speaks the head's side of a `Channel` (send a step, receive
it back): each step is applied by every later stage in ring order, each stage's
output leaving it in the wire form (`Shard.depart`) and converted on arrival, as
over the wire. It runs a split model (for example an mlx head followed by torch
stages) on one machine through the same engine and scheduler as the ring; with
no later stage the engine needs no channel at all.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence

import mlx.core as mx

from mlxring.engine.header import StepHeader
from mlxring.engine.stage import StageState
from mlxring.ring.transport import ProtocolError
from mlxring.shards.base import Shard


class LocalStages:
    """Stages [1, N) of a ring, run in this process on the head's behalf."""

    def __init__(self, shards: Sequence[Shard]):
        self.states = [StageState(shard) for shard in shards]
        self.pending: deque[tuple[dict, dict, int]] = deque()
        self.received_micro_batch = 0

    @property
    def num_stages(self) -> int:
        return len(self.states) + 1

    def send(
        self,
        meta: dict,
        tensors: dict | None = None,
        micro_batch: int = 0,
        layers: tuple[int, int] = (0, 0),
    ) -> None:
        """Run `meta`'s step (or stats request) through every later stage."""
        op = meta.get("op")
        if op == "step":
            header = StepHeader.from_wire(meta)
            x = tensors or None
            for i, state in enumerate(self.states):
                x = state.apply(header, x, last=i == len(self.states) - 1)
                x = x and state.shard.depart(x)  # as over the wire: whatever the next backend
            if x:  # as the wire would: the step is computed before it comes back
                mx.eval([v for v in x.values() if isinstance(v, mx.array)])
            tensors = x or {}
        elif op == "stats":
            meta["stages"].extend(state.stats() for state in self.states)
        elif op != "stop":
            raise ProtocolError(f"unknown ring message {meta}")
        self.pending.append((meta, tensors or {}, micro_batch))

    def recv(self) -> tuple[dict, dict]:
        meta, tensors, self.received_micro_batch = self.pending.popleft()
        return meta, tensors

    def flush(self) -> None:
        """Nothing is in flight between processes."""
