"""The OpenAI-compatible endpoints, over the head's engine.

POST /v1/chat/completions, POST /v1/completions (streamed over SSE or not),
GET /v1/models, GET /v1/status (the ring at a glance: status.py), GET /metrics
(Prometheus), GET /health (keyless liveness), GET / (the status page, keyless: it asks
for a key itself). Every error is OpenAI's error JSON (errors.py), and
`errors.Guard` checks Host, key, content type and body size before any route runs.
A client that disconnects cancels its request, streamed or not. Prompts are tokenized
off the event loop. No HTTP call makes a round trip of the ring: the engine keeps its
own status snapshot.

No `from __future__ import annotations` here: FastAPI reads the annotations of the
routes, whose request models `create_app` makes for the model's vocabulary.
"""

import asyncio
import json
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

from fastapi import FastAPI, Request
from fastapi.responses import PlainTextResponse, Response, StreamingResponse
from jinja2 import TemplateError
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from mlxring.engine.engine import Engine
from mlxring.engine.handle import EngineBusy, RequestTooLarge, RingDown
from mlxring.engine.request import SamplingParams
from mlxring.server.access import AccessLog
from mlxring.server.choices import Choice
from mlxring.server.errors import (
    HANDLED,
    INVALID,
    LOOPBACK,
    RETRY_BUSY,
    SERVER,
    ApiError,
    Guard,
    error_body,
    openai_error,
    ring_down,
)
from mlxring.server.metrics import Metrics
from mlxring.server.openapi import documented, openapi_document, sse
from mlxring.server.schemas import (
    ChatCompletion,
    Completion,
    Health,
    ModelList,
    Status,
    bias_of,
    request_models,
    template_message,
)
from mlxring.server.status import PAGE, PAGE_HEADERS, Recent, head_status, page_file

CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"
ENDPOINTS = {CHAT: "chat", COMPLETIONS: "completions"}  # the `endpoint` label of requests
PUBLIC = ("/health", *PAGE)  # everything else needs the key when keys are set


def create_app(
    engine: Engine,
    tokenizer,
    model_name: str,
    context_length: int,
    api_keys: tuple[str, ...] = (),
    *,
    vocab_size: int | None = None,
    max_body_bytes: int = 1 << 20,
    host: str = "127.0.0.1",
    allowed_hosts: tuple[str, ...] = (),
    nodes: list[dict] | None = None,
) -> FastAPI:
    """The app for one model served by `engine` (whose tokenizer renders prompts).

    `vocab_size` bounds the token ids a prompt may hold (the embedding's rows; by default
    the tokenizer's size); `host` is the address the API is bound to, which (with
    `allowed_hosts`, localhost and IP addresses) is the Host it answers without keys.
    `nodes`: what the launcher knows of each node, in ring order (`status.node_facts`).
    """
    app = FastAPI(
        title="mlxring",
        version="1",
        description="OpenAI-compatible API of an mlxring cluster.",
    )
    metrics = Metrics()
    recent = Recent()
    vocab = vocab_size or len(tokenizer.get_vocab())
    ChatRequest, CompletionRequest = request_models(vocab)
    # One thread: a fast tokenizer is not safe to call from several at once, and the
    # event loop must never wait for a long prompt's tokenizing or template.
    tokenize = ThreadPoolExecutor(1, thread_name_prefix="tokenize")

    for kind in HANDLED:
        app.add_exception_handler(kind, openai_error)

    def count(path: str, status: int) -> None:
        metrics.errors.labels(str(status)).inc()
        if path in ENDPOINTS:
            metrics.requests.labels(ENDPOINTS[path], str(status)).inc()

    app.add_middleware(
        Guard,
        keys=api_keys,
        public=PUBLIC,
        json_posts=tuple(ENDPOINTS),
        max_body_bytes=max_body_bytes,
        hosts=(*LOOPBACK, host, *allowed_hosts),
        count=count,
    )
    app.add_middleware(AccessLog, responses=metrics.responses, usage_paths=tuple(ENDPOINTS))

    def check_model(name: str) -> None:
        if name != model_name:
            raise ApiError(
                404,
                f"the model {name!r} does not exist; this server serves {model_name!r}",
                INVALID,
                "model_not_found",
                "model",
            )

    async def off_loop(fn, *args):
        return await asyncio.get_running_loop().run_in_executor(tokenize, fn, *args)

    def submit(prompt: list[int], body, max_tokens: int | None, chat: bool) -> list:
        """One handle per choice (all or none: a refused choice cancels the others)."""
        if len(prompt) + (max_tokens or 0) > context_length or len(prompt) >= context_length:
            message = (
                f"the prompt ({len(prompt)} tokens) plus max_tokens ({max_tokens or 0}) "
                f"exceeds the context length ({context_length})"
            )
            param = "messages" if chat else "prompt"
            raise ApiError(400, message, INVALID, "context_length_exceeded", param)
        if engine.error is not None:
            raise ring_down(engine.failure)
        temperature, top_p = body.sampling
        handles = []
        try:
            for i in range(body.choices):
                params = SamplingParams(
                    max_tokens=max_tokens
                    or min(engine.config.max_tokens, context_length - len(prompt)),
                    temperature=temperature,
                    top_p=top_p,
                    seed=body.seed_of(i),
                    stop=body.stops,
                    logprobs=body.top_count,
                    logit_bias=bias_of(body) or None,
                )
                handles.append(engine.submit(prompt, params, loop=asyncio.get_running_loop()))
        except EngineBusy as e:
            raise ApiError(
                429,
                "the server is busy (its queue is full); retry shortly",
                SERVER,
                "server_busy",
                headers={"Retry-After": str(RETRY_BUSY)},
            ) from e
        except RequestTooLarge as e:
            raise ApiError(400, str(e), INVALID, "kv_budget_exceeded", "max_tokens") from e
        except RingDown as e:
            raise ring_down(engine.failure) from e
        finally:
            if len(handles) < body.choices:  # refused: the choices already in go too
                for handle in handles:
                    handle.cancel()
        metrics.prompt_tokens.inc(len(prompt))
        return handles

    async def events(handle, request: Request):
        """The request's events; cancels it if the client goes away."""
        started = last = first_at = time.perf_counter()
        first, tokens = True, 0
        watch = asyncio.create_task(watch_disconnect(handle, request))
        try:
            async for event in handle:
                if event.finish_reason == "error":
                    raise ring_down(event.error or engine.failure)
                if event.token is not None:
                    now = time.perf_counter()
                    seconds = now - (started if first else last)
                    (metrics.ttft if first else metrics.token_latency).observe(seconds)
                    recent.token(seconds, first)
                    first_at = now if first else first_at
                    first, last, tokens = False, now, tokens + 1
                    metrics.generated_tokens.inc()
                yield event
        finally:
            watch.cancel()
            if tokens > 1:  # tokens reach this loop in bursts: the mean gap is what holds
                recent.spacing((last - first_at) / (tokens - 1))
            if not handle.seq.finished:
                handle.cancel()

    async def watch_disconnect(handle, request: Request) -> None:
        while not handle.seq.finished:
            if await request.is_disconnected():
                handle.cancel()
                return
            await asyncio.sleep(0.25)

    def usage(prompt_tokens: int, completion_tokens: int) -> dict:
        return {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        }

    async def merged(handles: list, request: Request):
        """(choice index, event) of every choice, as they come."""
        if len(handles) == 1:
            async for event in events(handles[0], request):
                yield 0, event
            return
        out: asyncio.Queue = asyncio.Queue()

        async def pump(i: int, handle) -> None:
            try:
                async for event in events(handle, request):
                    await out.put((i, event, None))
            except Exception as e:  # the ring went down: raised where the consumer is
                await out.put((i, None, e))

        tasks = [asyncio.create_task(pump(i, h)) for i, h in enumerate(handles)]
        try:
            done = 0
            while done < len(handles):
                i, event, error = await out.get()
                if error is not None:
                    raise error
                done += event.finish_reason is not None
                yield i, event
        finally:
            for task in tasks:
                task.cancel()
            for handle in handles:
                if not handle.seq.finished:
                    handle.cancel()

    async def respond(request: Request, body, prompt: list[int], max_tokens, chat: bool):
        handles = submit(prompt, body, max_tokens, chat)
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        created = int(time.time())
        kind = "chat.completion" if chat else "text_completion"
        endpoint = "chat" if chat else "completions"
        tools = body.template_tools()
        choices = [Choice(i, tokenizer, chat, tools, body.top_count) for i in range(len(handles))]

        if not body.stream:
            cancelled = False
            async for i, event in merged(handles, request):
                choices[i].add(event)
                cancelled |= event.finish_reason == "cancelled"
            metrics.requests.labels(endpoint, "cancelled" if cancelled else "200").inc()
            return {
                "id": rid,
                "object": kind,
                "created": created,
                "model": model_name,
                "choices": [c.whole() for c in choices],
                "usage": usage(len(prompt), sum(c.tokens for c in choices)),
            }

        async def stream():
            chunk_kind = "chat.completion.chunk" if chat else "text_completion"
            base = {"id": rid, "object": chunk_kind, "created": created, "model": model_name}
            try:
                async for i, event in merged(handles, request):
                    if (part := choices[i].delta(*choices[i].add(event))) is not None:
                        yield f"data: {json.dumps({**base, 'choices': [part]})}\n\n"
                if body.include_usage:
                    count = sum(c.tokens for c in choices)
                    data = {**base, "choices": [], "usage": usage(len(prompt), count)}
                    yield f"data: {json.dumps(data)}\n\n"
                yield "data: [DONE]\n\n"
                metrics.requests.labels(endpoint, "200").inc()
            except ApiError as e:
                yield f"data: {json.dumps(error_body(e.message, e.kind, e.code))}\n\n"
            except Exception as e:  # headers are sent: the error goes in the stream
                await openai_error(request, e)  # logs it
                err = error_body("internal server error", SERVER, "internal_error")
                yield f"data: {json.dumps(err)}\n\n"

        return StreamingResponse(stream(), media_type="text/event-stream")

    post_errors = (400, 401, 403, 404, 413, 415, 429, 500, 503)

    @app.post(
        CHAT,
        summary="Chat completion (streamed over SSE or not)",
        responses=documented(
            *post_errors,
            ok={
                "model": ChatCompletion,
                "description": "The completion, or with `stream: true` its chunks over SSE",
                "content": {"text/event-stream": sse("ChatCompletionChunk")},
            },
        ),
    )
    async def chat_completions(request: Request, body: ChatRequest):
        check_model(body.model)
        tools = body.template_tools()
        if tools and not getattr(tokenizer, "has_tool_calling", False):
            raise ApiError(
                400,
                f"the model {model_name!r} has no tool-call format (its chat template does "
                "not render tools): send the request without tools",
                INVALID,
                "tools_unsupported",
                "tools",
            )
        messages = [template_message(m) for m in body.messages]

        def render() -> list[int]:
            try:
                rendered = tokenizer.apply_chat_template(
                    messages, add_generation_prompt=True, **({"tools": tools} if tools else {})
                )
                return list(rendered)
            except TemplateError as e:  # the template's own complaint, for the client
                raise ApiError(
                    400, f"the chat template rejects the messages: {e}", INVALID, None, "messages"
                ) from e

        prompt = await off_loop(render)
        max_tokens = body.max_completion_tokens or body.max_tokens
        return await respond(request, body, prompt, max_tokens, chat=True)

    @app.post(
        COMPLETIONS,
        summary="Text completion (streamed over SSE or not)",
        responses=documented(
            *post_errors,
            ok={
                "model": Completion,
                "description": "The completion, or with `stream: true` its chunks over SSE",
                "content": {"text/event-stream": sse("CompletionChunk")},
            },
        ),
    )
    async def completions(request: Request, body: CompletionRequest):
        check_model(body.model)
        prompt = body.prompt
        if isinstance(prompt, str):
            prompt = await off_loop(tokenizer.encode, prompt)
        if not prompt:
            raise ApiError(400, "the prompt is empty", INVALID, None, "prompt")
        return await respond(request, body, list(prompt), body.max_tokens, chat=False)

    @app.get(
        "/v1/models",
        summary="The model this cluster serves",
        responses=documented(401, 403, 500, ok={"model": ModelList, "description": "The list"}),
    )
    async def models():
        return {
            "object": "list",
            "data": [{"id": model_name, "object": "model", "created": 0, "owned_by": "mlxring"}],
        }

    def snapshot() -> dict:
        return {"stages": [], "live": 0, "waiting": 0, **engine.status()}

    @app.get(
        "/v1/status",
        summary="The ring at a glance: nodes, layers, memory, step times, tokens/s, latency",
        responses=documented(
            401, 403, 500, ok={"model": Status, "description": "The ring's status"}
        ),
    )
    async def status():
        failure = None if engine.error is None else engine.failure or str(engine.error)
        return head_status(model_name, snapshot(), failure, list(nodes or ()), recent)

    async def page(request: Request):
        body, media = page_file(request.url.path)
        return Response(body, media_type=media, headers=PAGE_HEADERS)

    for path in PAGE:
        app.add_api_route(path, page, methods=["GET"], include_in_schema=False)

    @app.get(
        "/health",
        summary="Liveness (no key needed): 200 while the ring is up, 503 while it is down",
        responses=documented(403, 500, 503, ok={"model": Health, "description": "Up"}),
    )
    async def health():
        if engine.error is not None:
            raise ring_down()
        return {"status": "ok"}

    @app.get(
        "/metrics",
        summary="Prometheus metrics",
        response_class=PlainTextResponse,
        responses=documented(
            401,
            403,
            500,
            ok={
                "description": "Prometheus text format",
                "content": {"text/plain": {"schema": {"type": "string"}}},
            },
        ),
    )
    async def prometheus():
        snap = snapshot()
        for i, s in enumerate(snap["stages"]):
            layers = f"{s['layers'][0]}-{s['layers'][1] - 1}"
            metrics.step_time.labels(str(i), layers).set(s["step_ms"] / 1000)
            metrics.cache_bytes.labels(str(i), layers).set(s["cache_bytes"])
        metrics.queue_depth.set(snap["waiting"])
        metrics.live.set(snap["live"])
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    app.openapi = lambda: openapi_document(app, keyed=bool(api_keys), public=PUBLIC)
    app.state.metrics = metrics
    return app
