"""What a caller of the engine holds: a submitted request's handle and its events, and
the errors `Engine.submit` raises."""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
from dataclasses import dataclass

from mlxring.engine.request import Sequence


class EngineBusy(Exception):
    """The queue of waiting requests is full (`max_waiting`): retry later (HTTP 429)."""


class RequestTooLarge(ValueError):
    """One request needs more KV tokens than the whole budget (`max_kv_tokens`): HTTP 400."""


class RingDown(RuntimeError):
    """The ring failed (or the engine was closed): no request can be served."""


@dataclass
class Event:
    token: int | None  # None on the final event of a cancelled or failed request
    text: str  # new text (held back while it could be the start of a stop string)
    # set on the last event: "stop" | "length" | "cancelled" | "error"
    finish_reason: str | None = None
    error: str | None = None  # with "error": what went down (names the node where known)
    # with SamplingParams.logprobs: the token's log probability, and the likeliest
    # tokens' (id, log probability), most likely first
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None


class Handle:
    """A submitted request: iterate (sync or async) over its events; cancel() stops it.

    It gets exactly one final event (one with a finish_reason); nothing comes after it.
    """

    def __init__(
        self,
        commands: queue.Queue,
        seq: Sequence,
        loop: asyncio.AbstractEventLoop | None,
    ):
        self.commands, self.seq, self.loop = commands, seq, loop
        self._queue: queue.Queue | asyncio.Queue = asyncio.Queue() if loop else queue.Queue()
        self._lock = threading.Lock()
        self.done = False  # the final event is pushed
        self._cancelled = False

    def push(self, event: Event) -> bool:
        """Queue `event` for the consumer; False (dropped) once the final event is out."""
        with self._lock:  # queued under the lock: nothing can slip in after the final event
            if self.done:
                return False
            self.done = event.finish_reason is not None
            if self.loop is None:
                self._queue.put(event)
            else:  # a closed loop: nobody is listening any more
                with contextlib.suppress(RuntimeError):
                    self.loop.call_soon_threadsafe(self._queue.put_nowait, event)
        return True

    def cancel(self) -> None:
        if self._cancelled or self.done:
            return
        self._cancelled = True
        self.commands.put(("cancel", self.seq))  # the engine's command queue

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
