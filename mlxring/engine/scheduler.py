"""The head's scheduler: which step goes round the ring next, and what its results mean.

A step is either one prefill chunk of one or more sequences, or one decode step
of a micro-batch ("group"). Every prompt token but the last is prefilled in chunks;
with `prefill_batch` > 1, up to that many sequences at the same point of their
prompts with chunks of the same length are prefilled together (at most
`prefill_chunk` tokens), split among the steps that can be in flight;
the sequence then joins the group with the fewest members, and its first decode
step feeds the last prompt token (as mlx-lm's generate_step does). Groups are
disjoint and have at most one step in flight, so with one group per stage every
stage can work on a different group at once (pipelining); one group is lockstep.

Admission is FIFO and holds while `max_batch` sequences are live, or while the
next one's prompt + max_tokens would take the live sequences' sum past
`max_kv_tokens` (the KV budget); the head of the queue is never skipped.

Membership changes ride on the step headers, so every stage applies them to its
own caches in the same order: `admit` (prefilled sequences joining a group),
`evict` (finished or cancelled members), `drop` (cancelled during prefill).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from mlxring.engine.header import PREFILL_MICRO_BATCH, StepHeader
from mlxring.engine.request import Sequence


@dataclass
class Step:
    kind: str  # "prefill" | "decode"
    seqs: list[Sequence]  # prefill: the batch (chunks of one length); decode: the group
    inputs: list[list[int]]  # token ids fed per sequence
    group: int | None = None
    new: list[int] = field(default_factory=list)  # prefill: first chunks (fresh caches)
    admit: list[int] = field(default_factory=list)
    evict: list[int] = field(default_factory=list)
    drop: list[int] = field(default_factory=list)

    @property
    def micro_batch(self) -> int:
        """The id the step travels under: its decode group, or the prefill id."""
        return self.group if self.kind == "decode" else PREFILL_MICRO_BATCH

    def header(self) -> StepHeader:
        """What every stage needs to apply this step to its own caches."""
        ids, drop = tuple(s.id for s in self.seqs), tuple(self.drop)
        if self.kind == "prefill":
            return StepHeader("prefill", ids, new=tuple(self.new), drop=drop)
        admit, evict = tuple(self.admit), tuple(self.evict)
        return StepHeader("decode", ids, self.micro_batch, admit=admit, evict=evict, drop=drop)


class Scheduler:
    """FIFO admission up to `max_batch` live sequences and `max_kv_tokens` (prompt +
    max_tokens summed over them; None: no budget); chunked prefill between decode steps."""

    def __init__(
        self,
        max_batch: int,
        prefill_chunk: int,
        num_groups: int,
        prefill_batch: int = 1,
        max_kv_tokens: int | None = None,
    ):
        self.max_batch, self.prefill_chunk, self.num_groups = max_batch, prefill_chunk, num_groups
        self.max_kv_tokens = max_kv_tokens
        self.kv_tokens = 0  # prompt + max_tokens summed over the live sequences
        self.left_waiting = 0  # sequences that ever left `waiting` (admitted or cancelled)
        # sequences prefilled together at most: batching prompts at the same point sped up the
        # torch CPU ring but slowed the MLX CPU ring (bench/RESULTS.md), so it is off by default
        self.prefill_batch = prefill_batch
        self.waiting: deque[Sequence] = deque()
        self.prefilling: list[Sequence] = []
        self.groups: list[list[Sequence]] = [[] for _ in range(num_groups)]
        self.to_admit: list[list[Sequence]] = [[] for _ in range(num_groups)]
        self.to_evict: list[list[int]] = [[] for _ in range(num_groups)]
        self.to_drop: list[int] = []
        self.busy_groups: set[int] = set()
        self.busy_seqs: set[int] = set()
        self._last_prefill = False
        self._next_group = 0

    @property
    def live(self) -> int:
        members = sum(len(g) for g in self.groups) + sum(len(a) for a in self.to_admit)
        return len(self.prefilling) + members

    def add(self, seq: Sequence) -> None:
        if self.max_kv_tokens is not None and seq.kv_tokens > self.max_kv_tokens:
            raise ValueError(
                f"sequence {seq.id} needs {seq.kv_tokens} KV tokens, "
                f"more than the whole budget ({self.max_kv_tokens})"
            )
        self.waiting.append(seq)

    def cancel(self, seq: Sequence, reason: str = "cancelled") -> None:
        """Stop `seq`; its caches are freed on every stage by the next step that can say so."""
        if seq.finished:
            return
        seq.finish_reason = reason
        if seq in self.waiting:
            self.waiting.remove(seq)
            self.left_waiting += 1
        elif seq in self.prefilling and seq.id not in self.busy_seqs:
            self.prefilling.remove(seq)
            self.to_drop.append(seq.id)
            self._release(seq)
        elif seq.group is not None and seq.id not in self.busy_seqs:
            self._leave_group(seq)
        # in flight: complete() finishes the job

    def _leave_group(self, seq: Sequence) -> None:
        pending = self.to_admit[seq.group]
        if seq in pending:  # never reached the stages' group: drop its prefill caches
            pending.remove(seq)
            self.to_drop.append(seq.id)
            self._release(seq)
        elif seq in self.groups[seq.group]:
            self.groups[seq.group].remove(seq)
            self.to_evict[seq.group].append(seq.id)
            self._release(seq)

    def _release(self, seq: Sequence) -> None:
        """`seq` is no longer live: its share of the KV budget is free again."""
        self.kv_tokens -= seq.kv_tokens

    def _join_group(self, seq: Sequence) -> None:
        sizes = [len(g) + len(a) for g, a in zip(self.groups, self.to_admit)]
        seq.group = min(range(self.num_groups), key=lambda m: (sizes[m], m))
        self.to_admit[seq.group].append(seq)

    def _fits(self, seq: Sequence) -> bool:
        budget = self.max_kv_tokens
        return budget is None or self.kv_tokens + seq.kv_tokens <= budget

    def _admit_waiting(self) -> None:
        while self.waiting and self.live < self.max_batch and self._fits(self.waiting[0]):
            seq = self.waiting.popleft()
            self.left_waiting += 1
            self.kv_tokens += seq.kv_tokens
            if seq.prefill_done:  # a one-token prompt: nothing to prefill
                self._join_group(seq)
            else:
                self.prefilling.append(seq)

    def next_step(self) -> Step | None:
        """The next step to send, or None when nothing can go now; marks it in flight."""
        self._admit_waiting()
        prefill = next((s for s in self.prefilling if s.id not in self.busy_seqs), None)
        decode = self._ready_group()
        if prefill is not None and (decode is None or not self._last_prefill):
            step = self._prefill_step(prefill)
        elif decode is not None:
            step = self._decode_step(decode)
        elif self.to_drop and len(self.busy_groups) < self.num_groups:
            # drops ride on any step; with none to send, on an empty step of a free group
            free = next(m for m in range(self.num_groups) if m not in self.busy_groups)
            step = self._decode_step(free)
        else:
            return None
        self._last_prefill = step.kind == "prefill"
        step.drop, self.to_drop = self.to_drop, []
        return step

    def _ready_group(self) -> int | None:
        for i in range(self.num_groups):
            m = (self._next_group + i) % self.num_groups
            if m not in self.busy_groups and (
                self.groups[m] or self.to_admit[m] or self.to_evict[m]
            ):
                self._next_group = (m + 1) % self.num_groups
                return m
        return None

    def _chunk(self, seq: Sequence) -> tuple[int, int]:
        """Where `seq`'s next prefill chunk starts and how long it is."""
        return seq.prefilled, min(self.prefill_chunk, len(seq.prompt) - 1 - seq.prefilled)

    def _prefill_step(self, first: Sequence) -> Step:
        start, length = self._chunk(first)
        alike = [
            s
            for s in self.prefilling  # at the same point: one batch, no padding
            if s.id not in self.busy_seqs and self._chunk(s) == (start, length)
        ]
        # split among the steps that can be in flight at once, so that stages overlap
        size = min(
            -(-len(alike) // self.num_groups),
            max(1, self.prefill_chunk // length),
            self.prefill_batch,
        )
        batch = [first, *[s for s in alike if s is not first][: size - 1]]
        self.busy_seqs.update(s.id for s in batch)
        inputs = [s.prompt[start : start + length] for s in batch]
        return Step("prefill", batch, inputs, new=[s.id for s in batch if start == 0])

    def _decode_step(self, m: int) -> Step:
        admit, self.to_admit[m] = self.to_admit[m], []
        evict, self.to_evict[m] = self.to_evict[m], []
        self.groups[m].extend(admit)
        members = self.groups[m]
        self.busy_groups.add(m)
        self.busy_seqs.update(s.id for s in members)
        step = Step("decode", list(members), [[s.next_input] for s in members], group=m)
        step.admit, step.evict = [s.id for s in admit], evict
        return step

    def complete(self, step: Step, sampled: list[int]) -> list[Sequence]:
        """Apply a step's results; the sequences that got a new token."""
        self.busy_seqs.difference_update(s.id for s in step.seqs)
        if step.kind == "prefill":
            for seq, chunk in zip(step.seqs, step.inputs):
                seq.prefilled += len(chunk)
                if seq.finished:  # cancelled while in flight
                    self.prefilling.remove(seq)
                    self.to_drop.append(seq.id)
                    self._release(seq)
                elif seq.prefill_done:
                    self.prefilling.remove(seq)
                    self._join_group(seq)
            return []
        self.busy_groups.discard(step.group)
        advanced = []
        for seq, token in zip(step.seqs, sampled):
            if not seq.finished:
                seq.append(token)
                advanced.append(seq)
            if seq.finished:
                self._leave_group(seq)
        return advanced

    @property
    def idle(self) -> bool:
        return self.live == 0 and not self.waiting and not any(self.to_evict) and not self.to_drop
