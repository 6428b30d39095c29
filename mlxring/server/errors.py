"""OpenAI's error JSON for every failure, and the guard in front of every route.

Whatever goes wrong answers `{"error": {"message", "type", "param", "code"}}`: our own
`ApiError`s, a body that does not validate (400, never FastAPI's 422), unknown paths and
methods (404, 405), and anything unexpected (500, with no internals in the message).

`Guard` is a pure ASGI middleware (so a route still sees the client disconnect), and
answers before any route runs: the Host header when no API keys are set (DNS
rebinding), the bearer key, the content type of a JSON POST, and the body's size
(Content-Length and a chunked body alike). It also counts every error by status.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import logging
from collections.abc import Callable, Collection

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException
from starlette.responses import Response

log = logging.getLogger("mlxring.server")

# Seconds a client is asked to wait: the queue drains quickly, a ring restarts slowly.
RETRY_BUSY, RETRY_DOWN = 1, 5

INVALID, SERVER = "invalid_request_error", "server_error"
LOOPBACK = ("127.0.0.1", "::1", "localhost")  # Host names always answered


class ApiError(Exception):
    """An answer with OpenAI's error JSON; `headers` travel with it (Retry-After)."""

    def __init__(
        self,
        status: int,
        message: str,
        kind: str = INVALID,
        code: str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.kind = status, message, kind
        self.code, self.param, self.headers = code, param, headers


def error_body(message: str, kind: str, code: str | None = None, param: str | None = None):
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def error_response(
    status: int,
    message: str,
    kind: str = INVALID,
    code: str | None = None,
    param: str | None = None,
    headers: dict[str, str] | None = None,
) -> Response:
    """The error JSON, ASCII-escaped (a lone surrogate echoed back cannot break it)."""
    body = json.dumps(error_body(message, kind, code, param)).encode()
    return Response(body, status, headers, media_type="application/json")


def ring_down(detail: str | None = None) -> ApiError:
    """503: the ring is down (`detail`: why, for keyed endpoints; also on GET /v1/status)."""
    return ApiError(
        503,
        f"the ring is down: {detail}" if detail else "the ring is down",
        SERVER,
        "ring_down",
        headers={"Retry-After": str(RETRY_DOWN)},
    )


# Default codes and messages of the statuses Starlette raises itself.
_HTTP = {
    404: ("not_found", "no such endpoint"),
    405: ("method_not_allowed", "method not allowed on this endpoint"),
}


def _union_member(part: object) -> bool:
    return isinstance(part, str) and (
        part in ("str", "int", "float", "bool", "list", "dict", "none")
        or any(c in part for c in "[(<")
    )


def _validation_message(e: RequestValidationError) -> tuple[str, str | None, str | None]:
    errors = e.errors()
    first = errors[0] if errors else {}
    if first.get("type") == "json_invalid":
        return "the body is not valid JSON", None, None
    # the field's path, less "body" and the names pydantic gives the members of a union
    loc = [str(p) for p in first.get("loc", ()) if not _union_member(p)]
    where = ".".join(loc[1:] if loc[:1] == ["body"] else loc) or None
    text = str(first.get("msg", "invalid value"))
    if "ctx" in first and isinstance(first["ctx"].get("error"), ValueError):
        text = str(first["ctx"]["error"])  # our own validators' messages, without "Value error,"
    return f"invalid request: {where + ': ' if where else ''}{text}", where, None


async def openai_error(request: Request, e: Exception) -> Response:
    """The one exception handler: any exception becomes OpenAI's error JSON."""
    if isinstance(e, ApiError):
        return error_response(e.status, e.message, e.kind, e.code, e.param, e.headers)
    if isinstance(e, RequestValidationError):
        message, param, code = _validation_message(e)
        return error_response(400, message, INVALID, code, param)
    if isinstance(e, HTTPException):
        code, message = _HTTP.get(e.status_code, (None, None))
        message = message or (e.detail if isinstance(e.detail, str) else "error")
        kind = INVALID if e.status_code < 500 else SERVER
        return error_response(e.status_code, message, kind, code, None, e.headers)
    log.error("unexpected error on %s %s", request.method, request.url.path, exc_info=e)
    return error_response(500, "internal server error", SERVER, "internal_error")


HANDLED = (ApiError, RequestValidationError, HTTPException, Exception)


class Guard:
    """Pure ASGI middleware: Host, key, content type and body size, before any route."""

    def __init__(
        self,
        app,
        *,
        keys: Collection[str],
        public: Collection[str],
        json_posts: Collection[str],
        max_body_bytes: int,
        hosts: Collection[str],
        count: Callable[[str, int], None],
    ):
        self.app = app
        self.keys = [k.encode() for k in keys]
        self.public, self.json_posts = set(public), set(json_posts)
        self.max_body = max_body_bytes
        self.hosts = {h.lower().strip("[]") for h in hosts}
        self.count = count

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        status = 0

        async def counted(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                if status >= 400:
                    self.count(path, status)
            await send(message)

        rejection = self.reject(scope)
        if rejection is not None:
            return await rejection(scope, receive, counted)
        chunks, size = [], 0
        while True:  # the whole body, counted (chunked bodies have no Content-Length)
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_body:
                return await self.too_large()(scope, receive, counted)
            if not message.get("more_body", False):
                break
        body, replayed = b"".join(chunks), False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # then the client's disconnect, as the route expects

        try:
            await self.app(scope, replay, counted)
        except Exception:
            if not status:  # Starlette's ServerErrorMiddleware answers it with openai_error
                self.count(path, 500)
            raise

    def reject(self, scope) -> Response | None:
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        if not self.keys and not self.host_allowed(headers.get("host")):
            return error_response(
                403,
                "this Host is not served: a server without API keys answers its own "
                "address, IP addresses and localhost only",
                INVALID,
                "host_not_allowed",
            )
        if self.keys and scope["path"] not in self.public:
            given = headers.get("authorization", "")
            token = given[7:].strip().encode() if given[:7].lower() == "bearer " else b""
            # compare with every key, in constant time each, whatever matches
            if not any([hmac.compare_digest(token, k) for k in self.keys]):
                return error_response(
                    401,
                    "invalid API key: send 'Authorization: Bearer KEY'",
                    INVALID,
                    "invalid_api_key",
                    headers={"WWW-Authenticate": "Bearer"},
                )
        if scope["method"] == "POST" and scope["path"] in self.json_posts:
            kind = headers.get("content-type", "").split(";")[0].strip().lower()
            if kind != "application/json":
                return error_response(
                    415,
                    "the body must be JSON, sent with 'Content-Type: application/json'",
                    INVALID,
                    "unsupported_media_type",
                )
        length = headers.get("content-length", "0").strip()
        if not length.isdigit():
            return error_response(400, "Content-Length is not a number", INVALID, None)
        return self.too_large() if int(length) > self.max_body else None

    def too_large(self) -> Response:
        return error_response(
            413,
            f"the request body is larger than {self.max_body} bytes",
            INVALID,
            "request_too_large",
        )

    def host_allowed(self, host: str | None) -> bool:
        """No Host (not a browser), an IP address, localhost, or the names we bind to.

        DNS rebinding points an attacker's name at 127.0.0.1; a browser then sends that
        name as Host, which no IP address or localhost name can be."""
        if host is None:
            return True
        name = host.strip().lower()
        if name.startswith("["):  # [v6]:port
            name = name[1 : name.find("]")] if "]" in name else name
        elif name.count(":") == 1:
            name = name.split(":")[0]
        if name == "localhost" or name.endswith(".localhost") or name in self.hosts:
            return True
        try:
            ipaddress.ip_address(name)
        except ValueError:
            return False
        return True
