"""The step header: what every stage needs to apply one step to its own caches.

The scheduler makes one per step; it travels the ring ahead of the hidden
states, sealed with them, and each stage's `StageState` applies it. Membership
changes ride on it, so every stage changes its caches in the same order.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from mlxring.ring.transport import ProtocolError

PREFILL_PREFIX = "p:"  # the tensors of a step's prefill part travel under "p:<name>"


@dataclass(frozen=True)
class StepHeader:
    """One step of decode group `micro_batch`: a token for each of `seqs` (its members),
    and a prefill chunk of each of `prefill` (chunks of one length, at one offset)."""

    seqs: tuple[int, ...]  # the group's members, in order
    micro_batch: int
    prefill: tuple[int, ...] = ()  # sequences prefilled in this step
    new: tuple[int, ...] = ()  # of them, those starting here (fresh caches)
    admit: tuple[int, ...] = ()  # prefilled sequences joining the group
    evict: tuple[int, ...] = ()  # finished or cancelled members leaving it
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
        return cls(
            seqs=_ids(meta, "seqs"),
            micro_batch=_int(meta, "micro_batch"),
            prefill=_ids(meta, "prefill"),
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
