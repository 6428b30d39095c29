"""The engine on the head: the loop that keeps the ring busy, and its request API.

    engine = Engine(head_shard, channel, tokenizer, EngineConfig(mode="pipelined"))
    handle = engine.submit(prompt_ids, SamplingParams(max_tokens=32))
    for event in handle: ...            # or `async for event in handle` (submit from a loop)
    handle.cancel()
    engine.status()                     # the cached snapshot: every stage, live, waiting

The loop runs on its own thread: it asks the scheduler for steps while fewer than
`depth` are in flight (one per stage in pipelined mode, 1 in lockstep), runs the
head's own layers, sends each step round the ring, and when one comes back
samples and streams the new tokens. Other threads talk to it through a command
queue. Without a channel the head's shard is the whole model (a single node).

About once a second the loop sends a stats probe round the ring behind the steps
in flight (it takes none of the `depth` places) and keeps what comes back as `status()`; no
caller waits on the ring for it.

Limits: `submit` refuses with `EngineBusy` when `max_waiting` requests already
wait, and with `RequestTooLarge` a request larger than the whole KV budget; the
scheduler admits while prompt + max_tokens summed over live sequences fits
`max_kv_tokens`. When the ring fails, every submitted request gets exactly one
final event (finish_reason "error") and later calls raise `RingDown`.
"""

from __future__ import annotations

import asyncio
import copy
import queue
import re
import sys
import threading
import time
from collections import deque
from dataclasses import replace

import mlx.core as mx

from mlxring.cluster.config import EngineConfig
from mlxring.crypto.link import IntegrityError
from mlxring.engine.detok import Detok
from mlxring.engine.handle import EngineBusy, Event, Handle, RequestTooLarge, RingDown
from mlxring.engine.header import PREFILL_PREFIX
from mlxring.engine.request import SamplingParams, Sequence
from mlxring.engine.scheduler import Scheduler, Step
from mlxring.engine.stage import StageState
from mlxring.ring.transport import Channel, PeerLost, ProtocolError
from mlxring.shards.base import Shard

STATUS_INTERVAL = 1.0  # seconds between the engine's own stats probes


class _Probe:
    """A stats message in flight; `covers`: the stats() requests its answer serves."""

    def __init__(self, covers: int):
        self.covers = covers


class Engine:
    """The head's loop over the ring: `submit` requests from any thread, `close` to stop.

    `channel` leads to the other stages (a `Channel` over the ring, or `LocalStages`
    in this process); None when the head's shard holds every layer. `node_names`
    (ring order, head first) lets failures name the node instead of its rank.
    """

    def __init__(
        self,
        shard: Shard,
        channel: Channel | None,
        tokenizer,
        config: EngineConfig | None = None,
        node_names: list[str] | None = None,
        status_interval: float = STATUS_INTERVAL,
    ):
        self.shard, self.channel, self.tokenizer = shard, channel, tokenizer
        self.config = config = config or EngineConfig()
        self.node_names = list(node_names or [])
        self.status_interval = status_interval
        self.state = StageState(shard)
        stages = channel.num_stages if channel is not None else 1
        self.depth = stages if config.mode == "pipelined" else 1
        self.scheduler = Scheduler(
            config.max_batch,
            config.prefill_chunk,
            self.depth,
            config.token_budget,
            max_kv_tokens=config.max_kv_tokens,
        )
        self.commands: queue.Queue = queue.Queue()
        # shared with other threads, under _lock: the error, the requests not yet finished,
        # the stats snapshot and the stats() requests it serves
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self.error: BaseException | None = None
        self.failure: str | None = None  # the error in words, naming the node where known
        self._closing = False
        self._stopped = False
        self._open: dict[int, Handle] = {}
        self._submitted = 0
        self._status = {"stages": [], "live": 0, "waiting": 0, "updated": 0.0}
        self._stats_asked = 0  # stats() requests so far
        self._stats_served = 0  # of them, those a landed probe has answered
        # the engine thread's own
        self.handles: dict[int, Handle] = {}
        self.detoks: dict[int, Detok] = {}
        self.in_flight: deque[Step | _Probe] = deque()
        self.steps_done = 0
        self._probe_out = False  # a probe is in flight (at most one)
        self._probe_covers = 0  # stats() requests covered by the probes launched so far
        self._probe_due_since = 0  # steps launched ahead of a due probe
        self._asked_seen = 0  # stats() requests the loop has seen
        self._last_probe = -float("inf")  # monotonic time the last probe landed
        self.step_timeout = config.step_timeout
        self.last_progress = time.monotonic()
        self.thread = threading.Thread(target=self._run, name="engine", daemon=True)
        self.thread.start()
        if channel is not None:
            threading.Thread(target=self._watchdog, name="watchdog", daemon=True).start()

    def _watchdog(self) -> None:
        """A rank that stops answering (frozen, SIGSTOP) blocks the ring's receive forever,
        which cannot be interrupted: after `step_timeout` with requests waiting on the ring
        it is declared down and every request fails (the API answers 503) instead of
        hanging. A stats probe alone (an idle ring, ranks still loading) fails nothing."""
        while self.error is None and self.thread.is_alive():
            time.sleep(min(1.0, self.step_timeout / 4))
            stalled = time.monotonic() - self.last_progress
            if self.in_flight and self._open and stalled > self.step_timeout:
                self._fail(
                    TimeoutError(
                        f"no answer from the ring for {stalled:.0f} s "
                        "(a rank is frozen or unreachable)"
                    )
                )

    def describe(self, error: BaseException) -> str:
        """`error` in words, with "rank N" turned into "node 'name' (rank N)"."""
        text = str(error) or type(error).__name__
        if not isinstance(error, (ConnectionError, TimeoutError, ProtocolError)):
            text = f"{type(error).__name__}: {text}"

        def name(match: re.Match) -> str:
            rank = int(match[1])
            if rank < len(self.node_names):
                return f"node {self.node_names[rank]!r} (rank {rank})"
            return match[0]

        return re.sub(r"\brank (\d+)\b", name, text)

    def _fail(self, error: BaseException) -> None:
        """The ring is down: every open request gets its error event, every waiter wakes."""
        with self._changed:
            if self.error is None:
                self.error, self.failure = error, self.describe(error)
            handles = list(self._open.values())
            self._open.clear()
            self._changed.notify_all()
        for handle in handles:
            handle.push(Event(None, "", "error", self.failure))

    def _down(self) -> RingDown:
        """What calls raise once the engine cannot serve: under `_lock`."""
        if self.error is not None:
            return RingDown(f"the ring is down: {self.failure}")
        return RingDown("the engine is closed")

    # API (any thread) -------------------------------------------------------
    def submit(
        self,
        prompt: list[int],
        params: SamplingParams | None = None,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> Handle:
        """Queue a request; with `loop`, its events are for `async for` on that loop.

        Raises RingDown (the ring failed, or the engine is closed), RequestTooLarge
        (prompt + max_tokens exceed the whole KV budget), EngineBusy (`max_waiting`
        requests wait already: retry later), ValueError (an empty prompt).
        """
        params = params or SamplingParams()
        if params.max_tokens is None:
            params = replace(params, max_tokens=self.config.max_tokens)
        stop_ids = frozenset() if params.ignore_eos else frozenset(self.tokenizer.eos_token_ids)
        seq = Sequence(list(prompt), params, stop_ids)
        budget = self.config.max_kv_tokens
        if seq.kv_tokens > budget:
            raise RequestTooLarge(
                f"the request needs {seq.kv_tokens} KV tokens (a {len(seq.prompt)}-token prompt "
                f"+ max_tokens {params.max_tokens}), more than the engine's whole KV budget "
                f"({budget}, batching.max_kv_tokens): shorten the prompt or lower max_tokens"
            )
        handle = Handle(self.commands, seq, loop)
        with self._lock:
            if self.error is not None or self._closing:
                raise self._down()
            if self.waiting >= self.config.max_waiting:
                raise EngineBusy(
                    f"the queue is full ({self.config.max_waiting} requests waiting): retry later"
                )
            if not self._open:  # the watchdog times the ring from the first request on
                self.last_progress = time.monotonic()
            self._open[seq.id] = handle
            self._submitted += 1
            self.commands.put(("add", handle))
        return handle

    @property
    def waiting(self) -> int:
        """Requests submitted and not yet admitted into the batch (any thread)."""
        return self._submitted - self.scheduler.left_waiting

    def status(self) -> dict:
        """The engine's latest snapshot, from its own cache (never a ring round trip):
        {"stages": [StageState.stats() of every stage, head first], "live": sequences in
        the batch, "waiting": requests queued, "updated": unix time of the snapshot}.
        Refreshed about once a second while the engine runs; "stages" is [] until the
        first answer, and "updated" stops moving while the ring does not answer."""
        with self._lock:
            return copy.deepcopy(self._status)

    def stats(self, timeout: float = 30) -> list[dict]:
        """Every stage's stats, head first, from a snapshot taken after this call (once the
        cleanup of every request finished before it has gone round). Raises RingDown if
        the ring fails or the engine stops, TimeoutError if no snapshot comes in time."""
        with self._changed:
            if self.error is not None or self._stopped:
                raise self._down()
            self._stats_asked += 1
            ticket = self._stats_asked
            self.commands.put(("wake", None))
            answered = self._changed.wait_for(
                lambda: self._stats_served >= ticket or self.error is not None or self._stopped,
                timeout,
            )
            if self._stats_served >= ticket:
                return copy.deepcopy(self._status["stages"])
            if not answered:
                raise TimeoutError(f"the ring sent no stats within {timeout:g} s")
            raise self._down()

    def close(self) -> None:
        """Finish every request submitted (cancel them first to stop sooner), stop every
        stage, end the loop; later submits raise RingDown. With the ring down the loop may
        be stuck in a receive: it is not waited for."""
        with self._lock:
            self._closing = True
            self.commands.put(("close", None))
        self.thread.join(None if self.error is None else 5.0)

    # the loop (engine thread) ----------------------------------------------
    def _command(self, block: bool) -> bool:
        try:
            kind, arg = self.commands.get(block=block, timeout=0.5 if block else None)
        except queue.Empty:
            return True
        if kind == "add":
            self.handles[arg.seq.id] = arg
            self.detoks[arg.seq.id] = Detok(self.tokenizer, arg.seq.params.stop)
            self.scheduler.add(arg.seq)
        elif kind == "cancel":
            self.scheduler.cancel(arg)
            if arg.finished and arg.id in self.handles and arg.id not in self.scheduler.busy_seqs:
                self._finish(arg)
        elif kind == "close":
            return False
        return True  # "wake": a stats() request, seen by _probe_wanted

    def _run(self) -> None:
        try:
            running = True
            while running or self.in_flight or not self.scheduler.idle:  # close drains
                while running:  # take commands; wait for one only when there is no work
                    idle = not self.in_flight and self.scheduler.idle and not self._probe_wanted()
                    if self.commands.empty() and not idle:
                        break
                    running = self._command(block=idle)
                if self.error is not None:  # declared down (watchdog): the ring is not ours
                    return
                if not self.in_flight:
                    self.last_progress = time.monotonic()
                self._fill(running)
                if self.in_flight:  # the oldest message comes back first (the ring is FIFO)
                    self._land(self.in_flight[0])
                    self.in_flight.popleft()
            if self.channel is not None:
                self.channel.send({"op": "stop"})
                self.channel.recv()
                self.channel.flush()
        except (PeerLost, IntegrityError, ProtocolError) as e:  # the ring failed: say so, once
            self._fail(e)
            print(f"mlxring: the ring failed: {self.failure}", file=sys.stderr, flush=True)
        except BaseException as e:  # a bug: fail every request, loudly
            self._fail(e)
            raise
        finally:
            with self._changed:
                self._stopped = True
                self._changed.notify_all()
            mx.clear_streams()  # this thread's streams: left alive they abort the process at exit

    def _probe_wanted(self, running: bool = True) -> bool:
        """A stats probe should go: stats() asked for one, or the snapshot is a second old."""
        if self._probe_out:
            return False
        if self._stats_asked > self._probe_covers:
            return True
        return running and time.monotonic() - self._last_probe >= self.status_interval

    def _fill(self, running: bool) -> None:
        """Launch steps while fewer than `depth` are in flight, and a probe when one is due.
        A probe takes no step's place: it rides behind the steps in flight (with steps of
        seconds, as long prefills on a CPU, holding a place would idle the head for one).
        A due probe goes when the scheduler has nothing to send (so the cleanup of finished
        requests goes first), or once `depth` steps went ahead of it (so a busy ring still
        reports)."""
        while True:
            steps = sum(1 for p in self.in_flight if not isinstance(p, _Probe))
            wanted = self._probe_wanted(running)
            if not wanted or self._asked_seen != self._stats_asked:
                self._probe_due_since = 0  # a new stats() request: cleanup goes first
                self._asked_seen = self._stats_asked
            if wanted and self._probe_due_since >= self.depth:
                self._send_probe()
            elif steps < self.depth and (step := self.scheduler.next_step()):
                if steps == 0:
                    self.last_progress = time.monotonic()  # time this step, not a stuck probe
                self._launch(step)
                self._probe_due_since += wanted
            elif wanted and steps < self.depth:
                self._send_probe()
            else:
                return
            if self.channel is None:  # one step at a time: commands are taken between steps
                return

    def _inputs(self, step: Step) -> dict[str, mx.array] | None:
        x = self.shard.embed(mx.array(step.inputs)) if step.seqs else {}
        if step.prefill:
            chunk = self.shard.embed(mx.array(step.prefill_inputs))
            x.update((PREFILL_PREFIX + k, v) for k, v in chunk.items())
        return x or None

    def _launch(self, step: Step) -> None:
        header = step.header()
        started = time.perf_counter()
        x = self.state.apply(header, self._inputs(step), last=self.channel is None)
        if self.channel is None:
            self._finish_step(step, x)
            self.state.record(time.perf_counter() - started)
            return
        layers = (self.shard.start, self.shard.end)
        wire = x and self.shard.depart(x)  # to the host, in the wire form
        self.channel.send(header.to_wire(), wire, micro_batch=header.micro_batch, layers=layers)
        self.state.record(time.perf_counter() - started)
        self.in_flight.append(step)

    def _send_probe(self) -> None:
        with self._lock:
            probe = _Probe(self._stats_asked)
        self._probe_covers, self._probe_due_since = probe.covers, 0
        if self.channel is None:
            self._snapshot(probe, [])
            return
        self._probe_out = True
        self.channel.send({"op": "stats", "stages": []})
        self.in_flight.append(probe)

    def _snapshot(self, probe: _Probe, later_stages: list[dict]) -> None:
        status = {
            "stages": [self.state.stats(), *later_stages],
            "live": self.scheduler.live,
            "waiting": self.waiting,
            "updated": time.time(),
        }
        self._last_probe = time.monotonic()
        with self._changed:
            self._status = status
            self._stats_served = max(self._stats_served, probe.covers)
            self._changed.notify_all()

    def _land(self, pending: Step | _Probe) -> None:
        meta, x = self.channel.recv()
        self.last_progress = time.monotonic()
        if isinstance(pending, _Probe):
            if meta.get("op") != "stats":
                raise ProtocolError(f"expected stats back, got {meta.get('op')}")
            self._probe_out = False
            self._snapshot(pending, meta["stages"])
            return
        if meta.get("op") != "step" or self.channel.received_micro_batch != pending.micro_batch:
            raise ProtocolError(f"expected step {pending.micro_batch} back, got {meta}")
        self._finish_step(pending, x or None)

    def _finish_step(self, step: Step, x) -> None:
        sampled = []
        if step.seqs:
            sampled = self.shard.sample(self.shard.arrive(x), step.seqs)
        self.steps_done += 1
        advanced = self.scheduler.complete(step, sampled)
        for seq in advanced:
            text, stopped = self.detoks[seq.id].add(seq.tokens[-1], seq.finished)
            if stopped and not seq.finished:
                self.scheduler.cancel(seq, "stop")
            reason = seq.finish_reason if seq.finished else None
            logprob, top = seq.last_logprobs or (None, None)
            self.handles[seq.id].push(Event(seq.tokens[-1], text, reason, None, logprob, top))
            if seq.finished:
                self._forget(seq)
        for seq in step.seqs:  # cancelled while in flight
            if seq.finish_reason == "cancelled" and seq.id in self.handles:
                self._finish(seq)

    def _finish(self, seq: Sequence) -> None:
        self.handles[seq.id].push(Event(None, "", seq.finish_reason))
        self._forget(seq)

    def _forget(self, seq: Sequence) -> None:
        self.handles.pop(seq.id, None)
        self.detoks.pop(seq.id, None)
        with self._lock:
            self._open.pop(seq.id, None)
