"""The head's scheduler: which step goes round the ring next, and what its results mean.

Every step belongs to one decode micro-batch ("group") and carries a token budget
(`token_budget`): one decode token for each member of the group, and prefill
chunks of waiting prompts in the rest (chunked prefill riding along with decode,
as Sarathi-Serve and vLLM's scheduler do). Prompts at the same offset whose next
chunks have the same length are prefilled as one batch. The prefill share of a
step is also capped at the prefill tokens pending divided by the groups, so the
steps in flight carry about equal work: with one group per stage, every stage is
busy at once (pipelining); one group is lockstep. Every prompt token but the last
is prefilled in chunks of at most `prefill_chunk`; the sequence then joins the
group with the fewest members, and its first decode step feeds the last prompt
token (as mlx-lm's generate_step does). A group has at most one step in flight.

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

from mlxring.engine.header import StepHeader
from mlxring.engine.request import Sequence


@dataclass
class Step:
    group: int  # the decode micro-batch this step belongs to (the id it travels under)
    seqs: list[Sequence]  # the group's members: one decode token each
    inputs: list[list[int]]  # the decode token fed per member
    prefill: list[Sequence] = field(default_factory=list)  # chunks of one length riding along
    prefill_inputs: list[list[int]] = field(default_factory=list)
    new: list[int] = field(default_factory=list)  # prefill: first chunks (fresh caches)
    admit: list[int] = field(default_factory=list)
    evict: list[int] = field(default_factory=list)
    drop: list[int] = field(default_factory=list)

    @property
    def micro_batch(self) -> int:
        return self.group

    @property
    def tokens(self) -> int:
        """Tokens this step computes: its decode tokens and its prefill chunks."""
        return len(self.seqs) + sum(len(c) for c in self.prefill_inputs)

    def header(self) -> StepHeader:
        """What every stage needs to apply this step to its own caches."""
        return StepHeader(
            tuple(s.id for s in self.seqs),
            self.group,
            prefill=tuple(s.id for s in self.prefill),
            new=tuple(self.new),
            admit=tuple(self.admit),
            evict=tuple(self.evict),
            drop=tuple(self.drop),
        )


class Scheduler:
    """FIFO admission up to `max_batch` live sequences and `max_kv_tokens` (prompt +
    max_tokens summed over them; None: no budget); steps of at most `token_budget` tokens,
    decode first, prefill chunks in the rest."""

    def __init__(
        self,
        max_batch: int,
        prefill_chunk: int,
        num_groups: int,
        token_budget: int = 512,
        max_kv_tokens: int | None = None,
    ):
        self.max_batch, self.prefill_chunk, self.num_groups = max_batch, prefill_chunk, num_groups
        self.token_budget = token_budget
        self.max_kv_tokens = max_kv_tokens
        self.kv_tokens = 0  # prompt + max_tokens summed over the live sequences
        self.left_waiting = 0  # sequences that ever left `waiting` (admitted or cancelled)
        self.waiting: deque[Sequence] = deque()
        self.prefilling: list[Sequence] = []
        self.groups: list[list[Sequence]] = [[] for _ in range(num_groups)]
        self.to_admit: list[list[Sequence]] = [[] for _ in range(num_groups)]
        self.to_evict: list[list[int]] = [[] for _ in range(num_groups)]
        self.to_drop: list[int] = []
        self.busy_groups: set[int] = set()
        self.busy_seqs: set[int] = set()
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
        prefill = self._prefill_ready()
        m = self._ready_group(prefill)
        if m is None:
            return None
        step = self._decode_step(m)
        if prefill:
            self._add_prefill(step)
        step.drop, self.to_drop = self.to_drop, []
        return step

    def _prefill_ready(self) -> list[Sequence]:
        return [s for s in self.prefilling if s.id not in self.busy_seqs]

    def _ready_group(self, prefill: list[Sequence]) -> int | None:
        """The next free group (round robin) with work: members, membership changes, or
        prefill chunks or drops to carry."""
        carry = bool(prefill or self.to_drop)
        for i in range(self.num_groups):
            m = (self._next_group + i) % self.num_groups
            if m in self.busy_groups:
                continue
            if carry or self.groups[m] or self.to_admit[m] or self.to_evict[m]:
                self._next_group = (m + 1) % self.num_groups
                return m
        return None

    def _chunk(self, seq: Sequence, limit: int) -> tuple[int, int]:
        """Where `seq`'s next prefill chunk starts and how long it is (at most `limit`)."""
        left = len(seq.prompt) - 1 - seq.prefilled
        return seq.prefilled, min(self.prefill_chunk, left, limit)

    def _add_prefill(self, step: Step) -> None:
        """Fill the step's budget left after its decode tokens with prefill chunks: one
        batch of prompts at the same offset, no more than an even share of the prefill
        pending over the groups (so that the steps in flight are alike)."""
        ready = self._prefill_ready()
        pending = sum(len(s.prompt) - 1 - s.prefilled for s in self.prefilling)  # in flight too
        share = min(self.token_budget - len(step.seqs), -(-pending // self.num_groups))
        if share < 1:
            return
        first = ready[0]
        start, length = self._chunk(first, share)
        alike = [s for s in ready[1:] if self._chunk(s, share) == (start, length)]
        batch = [first, *alike[: share // length - 1]]
        self.busy_seqs.update(s.id for s in batch)
        step.prefill = batch
        step.prefill_inputs = [s.prompt[start : start + length] for s in batch]
        step.new = [s.id for s in batch if start == 0]

    def _decode_step(self, m: int) -> Step:
        admit, self.to_admit[m] = self.to_admit[m], []
        evict, self.to_evict[m] = self.to_evict[m], []
        self.groups[m].extend(admit)
        members = self.groups[m]
        self.busy_groups.add(m)
        self.busy_seqs.update(s.id for s in members)
        step = Step(m, list(members), [[s.next_input] for s in members])
        step.admit, step.evict = [s.id for s in admit], evict
        return step

    def complete(self, step: Step, sampled: list[int]) -> list[Sequence]:
        """Apply a step's results; the sequences that got a new token."""
        self.busy_seqs.difference_update(s.id for s in [*step.seqs, *step.prefill])
        for seq, chunk in zip(step.prefill, step.prefill_inputs):
            seq.prefilled += len(chunk)
            if seq.finished:  # cancelled while in flight
                self.prefilling.remove(seq)
                self.to_drop.append(seq.id)
                self._release(seq)
            elif seq.prefill_done:
                self.prefilling.remove(seq)
                self._join_group(seq)
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
