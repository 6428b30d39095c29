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
    def from_wire(cls, meta: object) -> StepHeader:
        """The header of a step message; ProtocolError if it is not one (whatever `meta` is:
        it comes off the wire)."""
        if not isinstance(meta, dict):
            raise ProtocolError(f"malformed step header: expected an object, got {_kind(meta)}")
        kind = meta.get("kind")
        if kind not in ("prefill", "decode"):
            shown = repr(kind)[:40] if isinstance(kind, str) else _kind(kind)
            raise ProtocolError(f"unknown step kind {shown}")
        return cls(
            kind=kind,
            seqs=_ids(meta, "seqs"),
            micro_batch=_int(meta, "micro_batch"),
            new=_ids(meta, "new"),
            admit=_ids(meta, "admit"),
            evict=_ids(meta, "evict"),
            drop=_ids(meta, "drop"),
        )


def _kind(value: object) -> str:
    """What a malformed field holds, named by its type (never its possibly huge value)."""
    return "nothing" if value is None else type(value).__name__


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and -(2**63) <= value < 2**63


def _int(meta: dict, name: str) -> int:
    value = meta.get(name)
    if not _is_int(value):
        raise ProtocolError(f"malformed step header: {name} is {_kind(value)}, not an integer")
    return value


def _ids(meta: dict, name: str) -> tuple[int, ...]:
    value = meta.get(name)
    if not isinstance(value, (list, tuple)) or not all(_is_int(v) for v in value):
        raise ProtocolError(
            f"malformed step header: {name} is {_kind(value)}, not a list of integers"
        )
    return tuple(value)
