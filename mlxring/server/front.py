"""The API's front door, in the launcher: it outlives every restart of the ring.

mlx.distributed sets its group up once per process, so a ring is recovered by
starting new rank processes, the head's included. The public API port is
therefore served by the launcher: each request is forwarded to the current
head's API (on a loopback port of that ring), streamed back as it comes, and
cancelled upstream when the client goes away. While the ring is down or
restarting, the front answers 503 with Retry-After instead of refusing
connections. `GET /health` adds what the supervisor knows: restarts, and the
nodes that keep failing. The status page (`GET /`) is served here, and `GET /v1/status`
is the head's answer with the ring's story added (`status.RingWatch`), or, while no head
answers, the front's own: the plan's nodes, all down, the failed one named. The front
checks the key and Host of what it answers itself as the head would.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import sys
import threading
import time
from typing import Protocol

import httpx
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from mlxring.cluster.config import ClusterConfig
from mlxring.cluster.plan import Plan
from mlxring.cluster.ranks import RankSpec, api_keys, free_port, rank_specs
from mlxring.cluster.supervise import RingState, Supervisor
from mlxring.errors import UserError
from mlxring.server.errors import (
    LOOPBACK,
    RETRY_DOWN,
    SERVER,
    Guard,
    error_body,
    error_response,
)
from mlxring.server.status import PAGE, PAGE_HEADERS, RingWatch, node_facts, page_file

# hop-by-hop headers, and those the proxy recomputes, are not forwarded
_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "upgrade", "content-length"}
WATCH_EVERY = 0.25  # seconds between looks at the supervisor's state (for the event list)


def _down(message: str) -> Response:
    """503 with Retry-After while the ring (re)starts, in OpenAI's error JSON."""
    return error_response(503, message, SERVER, "ring_down", None, {"Retry-After": str(RETRY_DOWN)})


def create_front(
    state: RingState,
    head: str,
    watch: RingWatch | None = None,
    guard: Guard | None = None,
    max_body_bytes: int = 1 << 20,
) -> Starlette:
    """The front app over `state` (the supervisor's view of the ring; `head` names rank 0);
    bodies over `max_body_bytes` get 413 here already. `watch` answers the status while the
    ring is down, `guard` checks the key and Host of what the front answers itself."""
    client = httpx.AsyncClient(timeout=httpx.Timeout(None, connect=5.0))
    watch = watch or RingWatch(state, "", [])
    guard = guard or Guard(
        None,
        keys=(),
        public=(),
        json_posts=(),
        max_body_bytes=max_body_bytes,
        hosts=LOOPBACK,
        count=lambda *_: None,
    )

    async def page(request: Request) -> Response:
        if (rejected := guard.reject(request.scope)) is not None:
            return rejected
        body, media = page_file(request.url.path)
        return Response(body, media_type=media, headers=PAGE_HEADERS)

    async def status(request: Request) -> Response:
        ring = watch.poll()
        if ring["up"]:
            headers = [(k, v) for k, v in request.headers.items() if k.lower() not in _HOP]
            url = f"{ring['url'].removesuffix('/v1')}/v1/status"
            try:
                upstream = await client.get(url, headers=headers, timeout=10)
            except httpx.HTTPError:
                upstream = None
            if upstream is not None and upstream.status_code != 200:  # the head's 401, 403
                return Response(upstream.content, upstream.status_code, _headers(upstream.headers))
            if upstream is not None:
                return JSONResponse(watch.merged(upstream.json()))
        if (rejected := guard.reject(request.scope)) is not None:
            return rejected
        reason = None if not ring["up"] else f"the head node {head!r} does not answer"
        return JSONResponse(watch.down(reason))

    async def health(request: Request) -> Response:
        ring = state.snapshot()
        if not ring["up"]:
            return _down(f"the ring is down: {ring['reason']}")
        try:
            upstream = await client.get(f"{ring['url'].removesuffix('/v1')}/health", timeout=10)
        except httpx.HTTPError:
            return _down(f"the head node {head!r} does not answer")
        if upstream.status_code != 200:
            return Response(upstream.content, upstream.status_code, _headers(upstream.headers))
        body = {"status": "ok", "restarts": ring["restarts"]}
        if ring["repeated"]:
            failing = ", ".join(f"{n!r} ({ring['failures'][n]} times)" for n in ring["repeated"])
            body["warning"] = f"nodes that keep failing: {failing}"
        return JSONResponse(body)

    async def forward(request: Request) -> Response:
        ring = state.snapshot()
        if not ring["up"]:
            return _down(f"the ring is down: {ring['reason']}")
        base = ring["url"].removesuffix("/v1")
        url = httpx.URL(base + request.url.path, query=request.url.query.encode())
        headers = [(k, v) for k, v in request.headers.items() if k.lower() not in _HOP]
        body = bytearray()
        async for chunk in request.stream():  # whole, so that a disconnect can be watched
            body += chunk
            if len(body) > max_body_bytes:
                message = f"the request body exceeds {max_body_bytes} bytes"
                return error_response(413, message, code="request_too_large")
        upstream_request = client.build_request(
            request.method, url, headers=headers, content=bytes(body)
        )
        sending = asyncio.ensure_future(client.send(upstream_request, stream=True))
        while not sending.done():  # a plain request answers only when done: watch the client
            await asyncio.wait({sending}, timeout=0.25)
            if not sending.done() and await request.is_disconnected():
                sending.cancel()  # closes the upstream connection: the head cancels the request
                return Response(status_code=499)
        try:
            upstream = sending.result()
        except httpx.HTTPError:
            return _down(f"the head node {head!r} does not answer")
        event_stream = upstream.headers.get("content-type", "").startswith("text/event-stream")

        async def relay():
            try:
                async for chunk in upstream.aiter_raw():
                    yield chunk
            except httpx.HTTPError:  # the head went away mid-answer
                if event_stream:
                    message = f"the ring failed: the head node {head!r} went away"
                    yield f"data: {json.dumps(error_body(message, SERVER, 'ring_down'))}\n\n"
            finally:
                await upstream.aclose()

        return StreamingResponse(relay(), upstream.status_code, _headers(upstream.headers))

    methods = ["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "HEAD"]
    routes = [
        Route("/health", health, methods=["GET"]),
        *(Route(path, page, methods=["GET"]) for path in PAGE),
        Route("/v1/status", status, methods=["GET"]),
        Route("/{path:path}", forward, methods=methods),
    ]

    async def watching() -> None:
        while True:
            watch.poll()
            await asyncio.sleep(WATCH_EVERY)

    @contextlib.asynccontextmanager
    async def lifespan(_: Starlette):
        task = asyncio.create_task(watching())
        yield
        task.cancel()
        await client.aclose()

    return Starlette(routes=routes, lifespan=lifespan)


def _headers(headers: httpx.Headers) -> dict[str, str]:
    return {k: v for k, v in headers.items() if k.lower() not in _HOP}


def listen(host: str, port: int) -> socket.socket:
    """The API's listening socket, bound now so that a port in use is a clear error."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise UserError(
            f"cannot listen on {host}:{port} ({e.strerror}); pick another --port"
        ) from e
    sock.listen(2048)
    sock.set_inheritable(False)
    return sock


def serve_ring(
    supervisor: Supervisor,
    host: str,
    port: int,
    model: str,
    max_body_bytes: int = 1 << 20,
    nodes: list[dict] | None = None,
    keys: tuple[str, ...] = (),
) -> int:
    """Serve the API at host:port in front of the supervised ring; its exit code. `nodes`
    (`status.node_facts`) and the API `keys` serve the status while the ring is down."""
    sock = listen(host, port)
    url = f"http://{host}:{port}/v1"

    def announce(_: str) -> None:
        print(
            f"mlxring: serving {model} at {url} (OpenAI API); Ctrl-C stops every rank",
            file=sys.stderr,
            flush=True,
        )

    supervisor.state.announce = announce
    guard = Guard(
        None,
        keys=keys,
        public=("/health", *PAGE),
        json_posts=(),
        max_body_bytes=max_body_bytes,
        hosts=(*LOOPBACK, host),
        count=lambda *_: None,
    )
    watch = RingWatch(supervisor.state, model, list(nodes or ()))
    head = supervisor.specs[0].node.name
    app = create_front(supervisor.state, head, watch, guard, max_body_bytes)
    config = uvicorn.Config(app, log_level="warning", lifespan="on", timeout_graceful_shutdown=3)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    # "serving at URL" (announce) only once the front answers there, never before
    while not server.started and thread.is_alive():
        time.sleep(0.02)
    if not server.started:
        sock.close()
        raise UserError(f"cannot serve the API on {host}:{port} (see the error above)")
    try:
        return supervisor.run()
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


class RingHooks(Protocol):
    """What a ring needs at each start beyond its definition (`cluster.gather.WorkerRing`)."""

    def prepare(self, cluster: ClusterConfig) -> ClusterConfig: ...  # e.g. fresh ports

    def finish(self, specs: list[RankSpec]) -> list[RankSpec]: ...  # e.g. secrets


def serve_cluster(
    cluster: ClusterConfig, plan: Plan, model: str, opts: dict, hooks: RingHooks | None = None
) -> int:
    """Run the cluster's ranks and serve its API at opts' host and port, restarting a failed
    ring when the cluster says `on_failure: restart`; the launcher's exit code.

    A local head serves on a loopback port of each ring, behind the front; a remote
    head serves the public port itself (closed while its ring restarts).
    """
    restart = cluster.on_failure == "restart"
    local_head = not cluster.head.remote
    facts = node_facts(cluster, plan)

    def specs() -> list[RankSpec]:
        head = {"host": "127.0.0.1", "port": free_port(), "public_host": opts["host"]}
        head = head if local_head else {}
        names = [node.name for node in cluster.nodes]
        job = {**opts, **head, "exit_on_failure": True, "nodes": names, "node_facts": facts}
        ring = hooks.prepare(cluster) if hooks else cluster
        made = rank_specs(ring, plan, model, "serve", job)
        return hooks.finish(made) if hooks else made

    supervisor = Supervisor(specs(), respec=specs if restart else None)
    if not local_head:
        return supervisor.run()
    limit = cluster.api.max_body_bytes
    keys = tuple(k for k in api_keys(cluster).split(",") if k)
    model_name = opts["model_name"]
    return serve_ring(supervisor, opts["host"], opts["port"], model_name, limit, facts, keys)
