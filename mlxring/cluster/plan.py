"""Layer plan: which contiguous layer range each ring node holds, and whether it fits.

Pure functions and frozen dataclasses: no I/O, no mlx.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from itertools import pairwise
from typing import Literal

from mlxring.errors import UserError

GIB = 2**30


class PlanError(UserError, ValueError):
    """A layer plan that cannot work; the message is one sentence for the user."""


@dataclass(frozen=True)
class ModelFootprint:
    """Weight bytes of a model: one entry per transformer layer, plus the head's tensors."""

    layer_bytes: tuple[int, ...]  # index = absolute layer
    head_bytes: int  # embedding + final norm + lm_head, held by the head node
    # (source, sharer): layer `sharer` reuses layer `source`'s K/V (gemma 4), so both
    # must be on one stage
    kv_pairs: tuple[tuple[int, int], ...] = ()

    @property
    def num_layers(self) -> int:
        return len(self.layer_bytes)


@dataclass(frozen=True)
class NodeBudget:
    """One node's memory budget, and its explicit half-open layer range if the config gives one."""

    name: str
    memory_bytes: int
    reserve_bytes: int
    layers: tuple[int, int] | None = None

    @property
    def usable_bytes(self) -> int:
        return self.memory_bytes - self.reserve_bytes


@dataclass(frozen=True)
class Assignment:
    """The half-open layer range [start, end) one node holds, and what it weighs."""

    name: str
    start: int
    end: int
    weight_bytes: int  # the node's layers, plus head_bytes on the head
    usable_bytes: int

    @property
    def num_layers(self) -> int:
        return self.end - self.start

    @property
    def share(self) -> float:
        return self.weight_bytes / self.usable_bytes


@dataclass(frozen=True)
class Plan:
    """Assignments in ring order; the first node is the head."""

    num_layers: int
    assignments: tuple[Assignment, ...]

    def to_json(self) -> dict:
        """A JSON-ready dict: the layer count and each node's range (inclusive, as configs
        and the plan table write it: [0, 2] and "0-2" for layers 0, 1 and 2) and bytes."""
        return {
            "num_layers": self.num_layers,
            "nodes": [
                {
                    "name": a.name,
                    **layers_json(a.start, a.end),
                    "weight_bytes": a.weight_bytes,
                    "usable_bytes": a.usable_bytes,
                }
                for a in self.assignments
            ],
        }


def split_layers(num_layers: int, weights: Sequence[float]) -> list[tuple[int, int]]:
    """Split layers into contiguous half-open ranges, in ring order, proportional to weights.

    Largest remainder over water-filled shares: every node gets at least one layer and
    is within one layer of its ideal share; ties go to the earlier ring position.
    """
    n = len(weights)
    if n == 0:
        raise PlanError("cannot split layers over no nodes; the cluster needs at least one node")
    for i, w in enumerate(weights):
        if not w > 0 or w == math.inf:
            raise PlanError(
                f"the weight at ring position {i} is {w}; every node's weight must be "
                "positive and finite"
            )
    if num_layers < n:
        raise PlanError(
            f"cannot split {num_layers} layers over {n} nodes; every node needs at least one "
            f"layer, so use at most {num_layers} nodes"
        )
    ideal = _ideal_shares(num_layers, [Fraction(w) for w in weights])
    counts = [math.floor(x) for x in ideal]
    left = num_layers - sum(counts)
    by_remainder = sorted(range(n), key=lambda i: (counts[i] - ideal[i], i))
    for i in by_remainder[:left]:
        counts[i] += 1
    return _ranges(counts)


def _ideal_shares(num_layers: int, weights: list[Fraction]) -> list[Fraction]:
    # Water-filling: a node whose share is below one layer gets exactly one, and the
    # rest is re-split among the others; fixing a node only lowers the others' shares.
    n = len(weights)
    fixed = [False] * n
    while True:
        active = [i for i in range(n) if not fixed[i]]
        rest = num_layers - (n - len(active))
        total = sum(weights[i] for i in active)
        low = [i for i in active if rest * weights[i] < total]
        if not low:
            break
        for i in low:
            fixed[i] = True
    return [Fraction(1) if fixed[i] else rest * weights[i] / total for i in range(n)]


def _ranges(counts: list[int]) -> list[tuple[int, int]]:
    ranges, start = [], 0
    for c in counts:
        ranges.append((start, start + c))
        start += c
    return ranges


def make_plan(footprint: ModelFootprint, nodes: Sequence[NodeBudget]) -> Plan:
    """Assign layer ranges to nodes in ring order (nodes[0] is the head) and check they fit.

    Explicit ranges are used when every node has one; otherwise layers are split in
    proportion to usable memory, less the head's embedding and lm_head on the head.
    """
    if not nodes:
        raise PlanError("the cluster has no nodes; define at least one node")
    for node in nodes:
        if node.usable_bytes <= 0:
            raise PlanError(
                f"node {node.name!r} has no usable memory ({_size(node.memory_bytes)} with a "
                f"{_size(node.reserve_bytes)} reserve); add memory or lower its reserve_gb"
            )
    head = nodes[0]
    if head.usable_bytes <= footprint.head_bytes:
        raise PlanError(
            f"head node {head.name!r} cannot even hold the embedding and lm_head: they need "
            f"{_size(footprint.head_bytes)} and it has {_size(head.usable_bytes)} usable; "
            "put a node with more memory first, or lower its reserve_gb"
        )
    ranges = _explicit_ranges(footprint.num_layers, nodes)
    if ranges is not None:
        _check_kv_pairs(ranges, footprint.kv_pairs, [n.name for n in nodes])
    else:
        weights = [n.usable_bytes for n in nodes]
        weights[0] -= footprint.head_bytes
        ranges = keep_kv_pairs(split_layers(footprint.num_layers, weights), footprint.kv_pairs)
    assignments = tuple(
        Assignment(
            name=node.name,
            start=start,
            end=end,
            weight_bytes=sum(footprint.layer_bytes[start:end])
            + (footprint.head_bytes if i == 0 else 0),
            usable_bytes=node.usable_bytes,
        )
        for i, (node, (start, end)) in enumerate(zip(nodes, ranges, strict=True))
    )
    _check_fit(assignments)
    return Plan(num_layers=footprint.num_layers, assignments=assignments)


@dataclass(frozen=True)
class RangeProblem:
    """The first way explicit layer ranges fail to tile the model, found at ring position `index`.

    kind: "mixed" (some nodes give a range, some do not), "empty", "beyond" (past the model's
    last layer), "head" (the head does not start at layer 0); between nodes `index - 1` and
    `index`: "order" (listed out of ring order), "overlap", "gap"; "short" (the last node
    stops before the model's last layer).
    """

    kind: Literal["mixed", "empty", "beyond", "head", "order", "overlap", "gap", "short"]
    index: int
    # the half-open layers at issue: the node's range, the overlap, the gap; (0, 0) if mixed
    layers: tuple[int, int] = (0, 0)


def range_problem(
    spans: Sequence[tuple[int, int] | None], num_layers: int | None = None
) -> RangeProblem | None:
    """Check each node's half-open layer range, in ring order, None where a node gives none.

    Fine (None) when no node gives a range, or every node does and they tile the model;
    `num_layers=None` skips the checks that need the model.
    """
    given = [span is not None for span in spans]
    if not any(given):
        return None
    if not all(given):
        return RangeProblem("mixed", given.index(not given[0]))
    ranges = [span for span in spans if span is not None]
    for i, (start, end) in enumerate(ranges):
        if end <= start:
            return RangeProblem("empty", i, (start, end))
        if num_layers is not None and (start < 0 or end > num_layers):
            return RangeProblem("beyond", i, (start, end))
    if ranges[0][0] != 0:
        return RangeProblem("head", 0, ranges[0])
    for i, ((prev_start, prev_end), (start, end)) in enumerate(pairwise(ranges), 1):
        if start < prev_end:
            kind = "order" if start < prev_start else "overlap"
            return RangeProblem(kind, i, (start, min(prev_end, end)))
        if start > prev_end:
            return RangeProblem("gap", i, (prev_end, start))
    last_end = ranges[-1][1]
    if num_layers is not None and last_end != num_layers:
        return RangeProblem("short", len(ranges) - 1, (last_end, num_layers))
    return None


def _explicit_ranges(num_layers: int, nodes: Sequence[NodeBudget]) -> list[tuple[int, int]] | None:
    # None when no node gives layers; the ranges when every node does and they tile the model.
    spans = [n.layers for n in nodes]
    if problem := range_problem(spans, num_layers):
        raise PlanError(_range_message(problem, nodes, num_layers))
    return None if spans[0] is None else spans


def _range_message(problem: RangeProblem, nodes: Sequence[NodeBudget], num_layers: int) -> str:
    if problem.kind == "mixed":
        missing = ", ".join(repr(n.name) for n in nodes if n.layers is None)
        return (
            f"some nodes give explicit layers and some do not (missing on {missing}); "
            "give layers on every node or on none"
        )
    node, prev = nodes[problem.index], nodes[problem.index - 1]
    start, end = problem.layers
    model = f"the model has {num_layers} layers (0-{num_layers - 1})"
    if problem.kind == "empty":
        return (
            f"node {node.name!r} has the empty layer range [{start}, {end}); "
            "every node needs at least one layer"
        )
    if problem.kind == "beyond":
        return f"node {node.name!r} has layers {inclusive(start, end)} but {model}"
    if problem.kind == "head":
        return (
            f"the head node {node.name!r} has layers {inclusive(start, end)} but the first "
            "node in the ring must start at layer 0"
        )
    if problem.kind == "order":
        return (
            f"node {node.name!r} (layers {inclusive(*node.layers)}) comes after node "
            f"{prev.name!r} (layers {inclusive(*prev.layers)}) in the ring; "
            "list layer ranges in ring order"
        )
    if problem.kind == "overlap":
        return (
            f"nodes {prev.name!r} and {node.name!r} both hold layers {inclusive(start, end)}; "
            "layer ranges must not overlap"
        )
    if problem.kind == "gap":
        return (
            f"layers {inclusive(start, end)} are held by no node (a gap between node "
            f"{prev.name!r} and node {node.name!r}); ranges must be contiguous"
        )
    return (  # short
        f"layers {inclusive(start, end)} are held by no node: the last node {node.name!r} "
        f"ends at layer {start - 1} but {model}"
    )


def splits_pair(boundary: int, pairs: Sequence[tuple[int, int]]) -> tuple[int, int] | None:
    """The KV-sharing pair (source, sharer) a stage boundary at `boundary` separates, if any:
    source < boundary <= sharer. The one check of pairs (plans and shards use it)."""
    return next(((s, t) for s, t in pairs if s < boundary <= t), None)


def keep_kv_pairs(
    ranges: list[tuple[int, int]], pairs: Sequence[tuple[int, int]]
) -> list[tuple[int, int]]:
    """Move each stage boundary that would separate a KV-sharing pair to the nearest
    boundary that does not, keeping every stage at least one layer long."""
    if not pairs:
        return ranges
    num_layers = ranges[-1][1]
    bounds = [start for start, _ in ranges[1:]]
    allowed = [c for c in range(1, num_layers) if splits_pair(c, pairs) is None]
    if len(allowed) < len(bounds):
        raise PlanError(
            f"cannot split {num_layers} layers over {len(ranges)} nodes without separating "
            "a layer from the layer whose K/V it reuses; use fewer nodes"
        )
    picked: list[int] = []  # indices into `allowed`, increasing
    for i, b in enumerate(bounds):
        first = picked[-1] + 1 if picked else 0
        last = len(allowed) - (len(bounds) - i)  # leave room for the boundaries after this
        picked.append(min(range(first, last + 1), key=lambda j: (abs(allowed[j] - b), j)))
    return list(pairwise([0, *(allowed[j] for j in picked), num_layers]))


def _check_kv_pairs(
    ranges: Sequence[tuple[int, int]], pairs: Sequence[tuple[int, int]], names: list[str]
) -> None:
    for (start, _), name in zip(ranges[1:], names[1:]):
        if pair := splits_pair(start, pairs):
            source, sharer = pair
            raise PlanError(
                f"node {name!r} starts at layer {start}, which separates layer {sharer} from "
                f"layer {source} whose K/V it reuses (KV sharing); keep layers "
                f"{inclusive(source, sharer + 1)} on one node"
            )


def _check_fit(assignments: Sequence[Assignment]) -> None:
    short = [
        f"node {a.name!r} is short by {_size(a.weight_bytes - a.usable_bytes)} "
        f"(needs {_size(a.weight_bytes)}, has {_size(a.usable_bytes)} usable)"
        for a in assignments
        if a.weight_bytes > a.usable_bytes
    ]
    if short:
        raise PlanError(
            f"model does not fit: {'; '.join(short)}; add memory, lower reserve_gb, or add nodes"
        )


def _size(num_bytes: int) -> str:
    """GB (of 2^30 bytes) to one decimal; MB below 0.1 GB, where GB would read "0.0 GB"."""
    if abs(num_bytes) >= GIB // 10:
        return f"{num_bytes / GIB:.1f} GB"
    return f"{num_bytes / 2**20:.1f} MB"


def layers_json(start: int, end: int) -> dict:
    """Half-open [start, end) as JSON answers give it: inclusive, as configs and tables
    write it ({"layers": [0, 2], "layers_text": "0-2"} for layers 0, 1 and 2)."""
    return {"layers": [start, end - 1], "layers_text": f"{start}-{end - 1}"}


def inclusive(start: int, end: int) -> str:
    """Half-open [start, end) as the inclusive numbers users write: "30-40", or "7" alone."""
    return str(start) if end - start == 1 else f"{start}-{end - 1}"
