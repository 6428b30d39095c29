"""The engine on the head: the loop that keeps the ring busy, and its request API.

    engine = Engine(head_shard, channel, tokenizer, EngineConfig(mode="pipelined"))
    handle = engine.submit(prompt_ids, SamplingParams(max_tokens=32))
    for event in handle: ...            # or `async for event in handle` (submit from a loop)
    handle.cancel()

The loop runs on its own thread: it asks the scheduler for steps while fewer than
`depth` are in flight (one per stage in pipelined mode, 1 in lockstep), runs the
head's own layers, sends each step round the ring, and when one comes back
samples and streams the new tokens. Other threads talk to it through a command
queue. Without a channel the head's shard is the whole model (a single node).
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, replace

import mlx.core as mx

from mlxring.cluster.config import EngineConfig
from mlxring.engine.detok import Detok
from mlxring.engine.request import SamplingParams, Sequence, sample
from mlxring.engine.scheduler import Scheduler, Step
from mlxring.engine.stage import StageState
from mlxring.ring.transport import Channel, ProtocolError
from mlxring.shards.base import Shard


@dataclass
class Event:
    token: int | None  # None on the final event of a cancelled request
    text: str  # new text (held back while it could be the start of a stop string)
    finish_reason: str | None = None  # set on the last event: "stop" | "length" | "cancelled"


class Handle:
    """A submitted request: iterate (sync or async) over its events; cancel() stops it."""

    def __init__(self, engine: Engine, seq: Sequence, loop: asyncio.AbstractEventLoop | None):
        self.engine, self.seq, self.loop = engine, seq, loop
        self._queue: queue.Queue | asyncio.Queue = asyncio.Queue() if loop else queue.Queue()

    def push(self, event: Event) -> None:
        if self.loop is not None:
            self.loop.call_soon_threadsafe(self._queue.put_nowait, event)
        else:
            self._queue.put(event)

    def cancel(self) -> None:
        self.engine.commands.put(("cancel", self.seq))

    def __iter__(self):
        while True:
            event = self._queue.get()
            yield event
            if event.finish_reason:
                return

    async def __aiter__(self):
        while True:
            event = await self._queue.get()
            yield event
            if event.finish_reason:
                return


class Engine:
    """The head's loop over the ring: `submit` requests from any thread, `close` to stop.

    `channel` leads to the other stages (a `Channel` over the ring, or `LocalStages`
    in this process); None when the head's shard holds every layer.
    """

    def __init__(
        self,
        shard: Shard,
        channel: Channel | None,
        tokenizer,
        config: EngineConfig | None = None,
    ):
        self.shard, self.channel, self.tokenizer = shard, channel, tokenizer
        self.config = config = config or EngineConfig()
        self.state = StageState(shard)
        stages = channel.num_stages if channel is not None else 1
        self.depth = stages if config.mode == "pipelined" else 1
        self.scheduler = Scheduler(
            config.max_batch, config.prefill_chunk, self.depth, config.prefill_batch
        )
        self.commands: queue.Queue = queue.Queue()
        self.handles: dict[int, Handle] = {}
        self.detoks: dict[int, Detok] = {}
        self.error: BaseException | None = None
        self.in_flight: deque = deque()
        self.steps_done = 0
        self.step_timeout = config.step_timeout
        self.last_progress = time.monotonic()
        self.thread = threading.Thread(target=self._run, name="engine", daemon=True)
        self.thread.start()
        if channel is not None:
            threading.Thread(target=self._watchdog, name="watchdog", daemon=True).start()

    def _watchdog(self) -> None:
        """A rank that stops answering (frozen, SIGSTOP) blocks the ring's receive forever,
        which cannot be interrupted: after `step_timeout` the ring is declared down and every
        request fails (the API answers 503) instead of hanging."""
        while self.error is None and self.thread.is_alive():
            time.sleep(min(1.0, self.step_timeout / 4))
            stalled = time.monotonic() - self.last_progress
            if self.in_flight and stalled > self.step_timeout:
                self._fail(
                    TimeoutError(
                        f"no answer from the ring for {stalled:.0f} s "
                        "(a rank is frozen or unreachable)"
                    )
                )

    def _fail(self, error: BaseException) -> None:
        self.error = error
        for handle in list(self.handles.values()):
            handle.push(Event(None, "", "error"))

    # API (any thread) -------------------------------------------------------
    def submit(
        self,
        prompt: list[int],
        params: SamplingParams | None = None,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> Handle:
        """Queue a request; with `loop`, its events are for `async for` on that loop."""
        if self.error is not None:
            raise RuntimeError(f"the ring is down: {self.error}")
        params = params or SamplingParams()
        if params.max_tokens is None:
            params = replace(params, max_tokens=self.config.max_tokens)
        stop_ids = frozenset() if params.ignore_eos else frozenset(self.tokenizer.eos_token_ids)
        seq = Sequence(list(prompt), params, stop_ids)
        handle = Handle(self, seq, loop)
        self.commands.put(("add", handle))
        return handle

    def stats(self, timeout: float = 30) -> list[dict]:
        """Every stage's live sequences and cache bytes, head first (a message round the ring)."""
        future: Future = Future()
        self.commands.put(("stats", future))
        return future.result(timeout)

    def close(self) -> None:
        """Finish what is in flight, stop every stage, end the loop."""
        self.commands.put(("close", None))
        self.thread.join()

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
        elif kind == "stats":
            self._send_stats(arg)
        elif kind == "close":
            return False
        return True

    def _run(self) -> None:
        try:
            running = True
            while running or self.in_flight:
                while running:  # take commands; wait for one only when there is no work
                    idle = not self.in_flight and self.scheduler.idle
                    if self.commands.empty() and not idle:
                        break
                    running = self._command(block=idle)
                if not self.in_flight:
                    self.last_progress = time.monotonic()
                while len(self.in_flight) < self.depth and (step := self.scheduler.next_step()):
                    self._launch(step)
                if self.in_flight:  # the oldest step comes back first (the ring is FIFO)
                    self._land(self.in_flight[0])
                    self.in_flight.popleft()
            if self.channel is not None:
                self.channel.send({"op": "stop"})
                self.channel.recv()
                self.channel.flush()
        except BaseException as e:  # the ring is down: fail every request, loudly
            self._fail(e)
            raise
        finally:
            mx.clear_streams()  # this thread's streams: left alive they abort the process at exit

    def _inputs(self, step: Step) -> dict[str, mx.array] | None:
        if not step.seqs:
            return None
        return self.shard.embed(mx.array(step.inputs))

    def _launch(self, step: Step) -> None:
        header = step.header()
        started = time.perf_counter()
        x = self.state.apply(header, self._inputs(step))
        if self.channel is None:
            self._finish_step(step, x)
            self.state.record(time.perf_counter() - started)
            return
        layers = (self.shard.start, self.shard.end)
        self.channel.send(header.to_wire(), x, micro_batch=header.micro_batch, layers=layers)
        self.state.record(time.perf_counter() - started)
        self.in_flight.append(step)

    def _land(self, pending: Step | Future) -> None:
        meta, x = self.channel.recv()
        self.last_progress = time.monotonic()
        if isinstance(pending, Future):
            if meta.get("op") != "stats":
                raise ProtocolError(f"expected stats back, got {meta.get('op')}")
            pending.set_result([self.state.stats(), *meta["stages"]])
            return
        if meta.get("op") != "step" or self.channel.received_micro_batch != pending.micro_batch:
            raise ProtocolError(f"expected step {pending.micro_batch} back, got {meta}")
        self._finish_step(pending, x or None)

    def _finish_step(self, step: Step, x) -> None:
        sampled = []
        if step.kind == "decode" and step.seqs:
            sampled = sample(self.shard.logits(self.shard.arrive(x))[:, -1, :], step.seqs)
        self.steps_done += 1
        advanced = self.scheduler.complete(step, sampled)
        for seq in advanced:
            text, stopped = self.detoks[seq.id].add(seq.tokens[-1], seq.finished)
            if stopped and not seq.finished:
                self.scheduler.cancel(seq, "stop")
            reason = seq.finish_reason if seq.finished else None
            self.handles[seq.id].push(Event(seq.tokens[-1], text, reason))
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

    def _send_stats(self, future: Future) -> None:
        if self.channel is None:
            future.set_result([self.state.stats()])
            return
        self.channel.send({"op": "stats", "stages": []})
        self.in_flight.append(future)
