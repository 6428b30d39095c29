"""The request log and the response counter: one line per HTTP request on stderr (method,
path, status, latency, tokens where the answer says), every response counted by status
code in /metrics. Also how mlxring's loggers print (`configure_logging`, --log-level)."""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Collection

from prometheus_client import Counter

LOG_LEVELS = ("debug", "info", "warning", "error")
CLIENT_GONE = 499  # the client went away before an answer started (nginx's code)
_USAGE_BODY_LIMIT = 1 << 20  # bytes of a plain JSON answer read for its usage

log = logging.getLogger("mlxring.access")


class _Stderr(logging.StreamHandler):
    """A handler on whatever sys.stderr is when a record comes (not when it was made)."""

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stderr
        super().emit(record)


def configure_logging(level: str = "info") -> None:
    """Print mlxring's log records at `level` and above on stderr, one line each."""
    logger = logging.getLogger("mlxring")
    logger.setLevel(level.upper())
    if not any(isinstance(h, _Stderr) for h in logger.handlers):
        handler = _Stderr()
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
        logger.propagate = False  # printed once, here, whatever the root logger does


def info_enabled() -> bool:
    """Whether --log-level lets info lines (loading progress, requests) through."""
    return logging.getLogger("mlxring").isEnabledFor(logging.INFO)


class Usage:
    """The token counts an answer reports (its `usage`), read from the body as it goes by:
    a plain JSON answer whole, an SSE stream from the chunk that carries them."""

    def __init__(self):
        self.body = bytearray()
        self.stream = False
        self.prompt: int | None = None
        self.completion: int | None = None

    def feed(self, chunk: bytes) -> None:
        if self.stream:
            if b'"usage"' in chunk:
                for line in chunk.split(b"\n"):
                    if line.startswith(b"data: {"):
                        self._take(line[6:])
        elif len(self.body) + len(chunk) <= _USAGE_BODY_LIMIT:
            self.body += chunk

    def done(self) -> None:
        if not self.stream and self.body:
            self._take(bytes(self.body))

    def _take(self, data: bytes) -> None:
        try:
            usage = json.loads(data).get("usage")
        except (ValueError, AttributeError):
            return
        if isinstance(usage, dict):
            self.prompt = usage.get("prompt_tokens")
            self.completion = usage.get("completion_tokens")

    def describe(self) -> str:
        if self.prompt is None:
            return ""
        return f", {self.prompt} prompt + {self.completion} completion tokens"


class AccessLog:
    """Pure ASGI middleware, outside every other: a log line per request when its answer
    ends, and `responses` counted by status code (499: the client left before an answer)."""

    def __init__(self, app, *, responses: Counter, usage_paths: Collection[str] = ()):
        self.app = app
        self.responses = responses
        self.usage_paths = set(usage_paths)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        status = 0
        usage = Usage() if scope["path"] in self.usage_paths else None
        if log.isEnabledFor(logging.DEBUG):  # --log-level debug: a request that hangs shows
            client = ":".join(map(str, scope.get("client") or ("?",)))
            log.debug("%s %s from %s: started", scope["method"], scope["path"], client)

        async def sending(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                if usage is not None:
                    headers = dict(message.get("headers", ()))
                    usage.stream = headers.get(b"content-type", b"").startswith(
                        b"text/event-stream"
                    )
            elif message["type"] == "http.response.body" and usage is not None and status < 300:
                usage.feed(message.get("body", b""))
            await send(message)

        failed = False
        try:
            await self.app(scope, receive, sending)
        except Exception:
            failed = True  # Starlette's outermost handler answers it: 500
            raise
        finally:
            code = status or (500 if failed else CLIENT_GONE)
            self.responses.labels(str(code)).inc()
            if usage is not None:
                usage.done()
            ms = (time.perf_counter() - started) * 1000
            tokens = usage.describe() if usage is not None else ""
            level = logging.WARNING if code >= 500 else logging.INFO
            log.log(level, "%s %s %d %.1f ms%s", scope["method"], scope["path"], code, ms, tokens)
