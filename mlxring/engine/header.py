"""The step header: what every stage needs to apply one step to its own caches.

The scheduler makes one per step; it travels the ring ahead of the hidden
states, sealed with them, and each stage's `StageState` applies it. Membership
changes ride on it, so every stage changes its caches in the same order.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Literal

from mlxring.ring.transport import ProtocolError

PREFILL_MICRO_BATCH = -1  # the micro-batch id of a prefill chunk (decode groups are 0..N-1)


@dataclass(frozen=True)
class StepHeader:
    """One step: a prefill chunk of `seqs`, or a decode step of group `micro_batch`."""

    kind: Literal["prefill", "decode"]
    seqs: tuple[int, ...]  # prefill: the batch (chunks of one length); decode: the group
    micro_batch: int = PREFILL_MICRO_BATCH
    new: tuple[int, ...] = ()  # prefill: sequences starting here (fresh caches)
    admit: tuple[int, ...] = ()  # decode: prefilled sequences joining the group
    evict: tuple[int, ...] = ()  # decode: finished or cancelled members leaving it
    drop: tuple[int, ...] = field(default=())  # sequences cancelled during prefill

    def to_wire(self) -> dict:
        """The JSON-ready message (op "step") that carries this header."""
        return {"op": "step", **asdict(self)}

    @classmethod
    def from_wire(cls, meta: dict) -> StepHeader:
        """The header of a step message; ProtocolError if it is not one."""
        try:
            header = cls(
                kind=meta["kind"],
                seqs=tuple(meta["seqs"]),
                micro_batch=int(meta["micro_batch"]),
                new=tuple(meta["new"]),
                admit=tuple(meta["admit"]),
                evict=tuple(meta["evict"]),
                drop=tuple(meta["drop"]),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise ProtocolError(f"malformed step header {meta} ({e})") from None
        if header.kind not in ("prefill", "decode"):
            raise ProtocolError(f"unknown step kind {header.kind!r}")
        return header
