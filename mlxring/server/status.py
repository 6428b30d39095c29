"""The status JSON behind GET /v1/status (and the page at GET /, and `mlxring status`).

The head builds it from its engine's snapshot, the node facts the launcher hands it
(the plan: host, backend, layers, weight and usable bytes) and what its API saw lately
(`Recent`). The launcher's front (`RingWatch`) adds the restarts and failures it has
watched, keeps the tokens/s history across ring restarts, and answers alone while the
ring is down. Hop latency is not measured by the ring: it is estimated from what the API
sees, (median inter-token latency - the stages' step times) / hops, and says so.
"""

from __future__ import annotations

import collections
import itertools
import statistics
import time
from collections.abc import Callable
from importlib import resources

from mlxring.cluster.config import ClusterConfig
from mlxring.cluster.plan import Plan, layers_json
from mlxring.cluster.supervise import RingState

HISTORY_S = 300  # seconds of tokens/s history
WINDOW_S = 10  # seconds behind the tokens/s figure
LATENCY_S = 60  # seconds behind the TTFT and inter-token medians
EVENTS = 20  # ring events kept

# The page: public (no key: it holds nothing secret and asks for the key itself).
PAGE = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/ui/status.js": ("status.js", "text/javascript; charset=utf-8"),
    "/ui/status.css": ("status.css", "text/css; charset=utf-8"),
}
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; "
    "connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; "
    "frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


def page_file(path: str) -> tuple[bytes, str]:
    """The bytes and media type of one of the page's files (a key of PAGE)."""
    name, media = PAGE[path]
    return (resources.files("mlxring.server") / "static" / name).read_bytes(), media


def node_facts(cluster: ClusterConfig, plan: Plan) -> list[dict]:
    """What the launcher knows of each node, in ring order (JSON-ready: it travels to the
    head in its job options; layers inclusive, as everywhere in the status)."""
    return [
        {
            "name": a.name,
            "host": node.host,
            "backend": node.backend,
            "device": node.device,
            **layers_json(a.start, a.end),
            "weight_bytes": a.weight_bytes,
            "memory_bytes": a.usable_bytes,
        }
        for node, a in zip(cluster.nodes, plan.assignments)
    ]


class Timeline:
    """Generated tokens per whole unix second, over the last HISTORY_S seconds."""

    def __init__(self, clock: Callable[[], float] = time.time):
        self.clock = clock
        self.seconds: collections.Counter[int] = collections.Counter()

    def merge(self, history: dict) -> None:
        """Take another timeline's counts (a head's, seen by the front): the larger wins."""
        for i, n in enumerate(history["tokens"]):
            second = history["start"] + i
            self.seconds[second] = max(self.seconds[second], n)

    def history(self) -> dict:
        """{"start": unix second, "tokens": count per second} for the whole seconds past."""
        now = int(self.clock())
        start = now - HISTORY_S
        for second in [s for s in self.seconds if s < start]:
            del self.seconds[second]
        return {"start": start, "tokens": [self.seconds.get(s, 0) for s in range(start, now)]}

    def rate(self) -> float:
        """Tokens per second over the last WINDOW_S whole seconds."""
        now = int(self.clock())
        return sum(self.seconds.get(s, 0) for s in range(now - WINDOW_S, now)) / WINDOW_S


def _median_ms(samples: collections.deque, since: float) -> float | None:
    recent = [seconds for at, seconds in samples if at >= since]
    return round(statistics.median(recent) * 1000, 3) if recent else None


class Recent:
    """What the head's API saw lately: every generated token, each request's time to first
    token, and each finished request's mean gap between tokens (its tokens reach the API in
    bursts, so single gaps say more about the event loop than about the ring). Called from
    the event loop only."""

    def __init__(self, clock: Callable[[], float] = time.time):
        self.clock = clock
        self.timeline = Timeline(clock)
        self.ttfts: collections.deque[tuple[float, float]] = collections.deque(maxlen=2048)
        self.gaps: collections.deque[tuple[float, float]] = collections.deque(maxlen=8192)
        self.generated = 0

    def token(self, seconds: float, first: bool) -> None:
        """A generated token; `seconds` since the request came, for its first."""
        now = self.clock()
        self.generated += 1
        self.timeline.seconds[int(now)] += 1
        if first:
            self.ttfts.append((now, seconds))

    def spacing(self, seconds: float) -> None:
        """A finished request's mean time between its tokens."""
        self.gaps.append((self.clock(), seconds))

    def throughput(self, step_ms: list[float]) -> dict:
        since = self.clock() - LATENCY_S
        itl = _median_ms(self.gaps, since)
        hop = None  # N stages, N hops round the ring (it closes on the head)
        if itl is not None and len(step_ms) > 1:
            hop = round(max(0.0, itl - sum(step_ms)) / len(step_ms), 3)
        return {
            "tokens_per_second": round(self.timeline.rate(), 2),
            "window_s": WINDOW_S,
            "ttft_ms": _median_ms(self.ttfts, since),
            "itl_ms": itl,
            "hop_ms": hop,
            "generated_tokens": self.generated,
        }


def _node(i: int, fact: dict | None, stage: dict | None, state: str) -> dict:
    fact = fact or {}
    layers = stage["layers"] if stage else fact.get("layers")  # inclusive [first, last]
    return {
        "name": fact.get("name", f"rank {i}"),
        "rank": i,
        "host": fact.get("host"),
        "backend": fact.get("backend"),
        "device": fact.get("device"),
        "layers": layers,
        "layers_text": f"{layers[0]}-{layers[1]}" if layers else None,
        "weight_bytes": fact.get("weight_bytes"),
        "memory_bytes": fact.get("memory_bytes"),
        "cache_bytes": stage["cache_bytes"] if stage else None,
        "step_ms": stage["step_ms"] if stage else None,
        "sequences": len(stage["sequences"]) if stage else None,
        "state": state,
    }


def head_status(
    model: str, snapshot: dict, failure: str | None, facts: list[dict], recent: Recent
) -> dict:
    """The head's answer: the engine's `snapshot` (stages, live, waiting), the nodes (the
    launcher's `facts` joined with the stages by ring position) and `recent` throughput.
    The engine's half-open layer ranges become inclusive here, as the facts' are."""
    stages = [{**s, **layers_json(*s["layers"])} for s in snapshot["stages"]]
    state = "up" if failure is None else "down"
    pairs = itertools.zip_longest(facts, stages)
    nodes = [_node(i, fact, stage, state) for i, (fact, stage) in enumerate(pairs)]
    return {
        "model": model,
        "status": "ok" if failure is None else "down",
        "error": failure,
        **snapshot,
        "stages": stages,
        "nodes": nodes,
        "throughput": recent.throughput([s["step_ms"] for s in stages]),
        "history": recent.timeline.history(),
        "ring": None,
    }


class RingWatch:
    """The launcher front's memory of the ring across its restarts: what happened (failures,
    restarts, recoveries), the node the last failure named, and the tokens/s history.
    `poll` it often (a failure and the next start are seconds apart); event loop only."""

    def __init__(self, state: RingState, model: str, facts: list[dict], clock=time.time):
        self.state, self.model, self.facts, self.clock = state, model, facts, clock
        self.events: collections.deque[dict] = collections.deque(maxlen=EVENTS)
        self.timeline = Timeline(clock)
        self.failed: str | None = None  # the node the latest failure named, until up again
        self.last = {"up": False, "restarts": 0, "failures": {}}

    def _event(self, kind: str, message: str, node: str | None = None) -> None:
        event = {"time": self.clock(), "kind": kind, "message": message, "node": node}
        self.events.appendleft(event)

    def poll(self) -> dict:
        """The supervisor's snapshot, noting what changed since the last poll."""
        ring, last = self.state.snapshot(), self.last
        grown = [n for n, k in ring["failures"].items() if k > last["failures"].get(n, 0)]
        for node in grown:
            self.failed = node
            self._event("failure", ring["reason"] or f"node {node!r} failed", node)
        if last["up"] and not ring["up"] and not grown:
            self._event("down", ring["reason"] or "the ring went down")
        if ring["restarts"] > last["restarts"]:
            self._event("restart", f"restarting the ring (restart {ring['restarts']})")
        if ring["up"] and not last["up"]:
            self.failed = None
            self._event("up", "the ring is up" if ring["restarts"] else "the ring started")
        self.last = ring
        return ring

    def _ring(self, ring: dict) -> dict:
        keep = ("up", "reason", "restarts", "failures", "repeated")
        return {**{k: ring[k] for k in keep}, "events": list(self.events)}

    def merged(self, head: dict) -> dict:
        """The head's status with the ring's story, and the history kept across heads."""
        ring = self.poll()
        self.timeline.merge(head["history"])
        return {**head, "history": self.timeline.history(), "ring": self._ring(ring)}

    def down(self, reason: str | None = None) -> dict:
        """The status while no head answers: the plan's nodes, all down, the failed one named."""
        ring = self.poll()
        reason = reason or ring["reason"] or "the ring is down"
        nodes = [
            _node(i, fact, None, "failed" if fact["name"] == self.failed else "down")
            for i, fact in enumerate(self.facts)
        ]
        throughput = {
            "tokens_per_second": round(self.timeline.rate(), 2),
            "window_s": WINDOW_S,
            "ttft_ms": None,
            "itl_ms": None,
            "hop_ms": None,
            "generated_tokens": 0,
        }
        return {
            "model": self.model,
            "status": "down",
            "error": reason,
            "stages": [],
            "live": 0,
            "waiting": 0,
            "nodes": nodes,
            "throughput": throughput,
            "history": self.timeline.history(),
            "ring": self._ring(ring),
        }
