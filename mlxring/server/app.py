"""The OpenAI-compatible endpoints, over the head's engine.

POST /v1/chat/completions, POST /v1/completions (streamed over SSE or not),
GET /v1/models, GET /health (each rank's state), GET /metrics (Prometheus).
Errors use OpenAI's JSON shape. A client that disconnects cancels its request.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from mlxring.engine.engine import Engine
from mlxring.engine.request import SamplingParams
from mlxring.server.metrics import Metrics
from mlxring.server.schemas import ChatRequest, CompletionRequest


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        kind: str,
        code: str | None = None,
        param: str | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.kind, self.code, self.param = (
            status,
            message,
            kind,
            code,
            param,
        )


def error_body(message: str, kind: str, code: str | None = None, param: str | None = None):
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def create_app(
    engine: Engine, tokenizer, model_name: str, context_length: int, api_keys: tuple[str, ...] = ()
) -> FastAPI:
    """The app for one model served by `engine` (whose tokenizer renders prompts)."""
    app = FastAPI(title="mlxring", description="OpenAI-compatible API of an mlxring cluster.")
    metrics = Metrics()
    keys = [k.encode() for k in api_keys]

    @app.exception_handler(ApiError)
    async def api_error(_: Request, e: ApiError):
        return JSONResponse(error_body(e.message, e.kind, e.code, e.param), status_code=e.status)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, e: RequestValidationError):
        first = e.errors()[0] if e.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
        message = f"invalid request: {where + ': ' if where else ''}{first.get('msg', e)}"
        return JSONResponse(error_body(message, "invalid_request_error", None, where), 400)

    @app.middleware("http")
    async def authenticate(request: Request, call_next):
        if keys and request.url.path.startswith("/v1/"):
            given = request.headers.get("authorization", "")
            token = given[7:].encode() if given.lower().startswith("bearer ") else b""
            # compare with every key, in constant time each, whatever matches
            if not any([hmac.compare_digest(token, k) for k in keys]):
                body = error_body("invalid API key", "invalid_request_error", "invalid_api_key")
                return JSONResponse(body, status_code=401)
        return await call_next(request)

    def check_model(name: str) -> None:
        if name != model_name:
            raise ApiError(
                404,
                f"the model {name!r} does not exist; this server serves {model_name!r}",
                "invalid_request_error",
                "model_not_found",
                "model",
            )

    def submit(prompt: list[int], body, max_tokens: int | None):
        if len(prompt) + (max_tokens or 0) > context_length or len(prompt) >= context_length:
            message = (
                f"the prompt ({len(prompt)} tokens) plus max_tokens ({max_tokens or 0}) "
                f"exceeds the context length ({context_length})"
            )
            raise ApiError(
                400, message, "invalid_request_error", "context_length_exceeded", "messages"
            )
        if engine.error is not None:
            raise ApiError(503, f"the ring is down: {engine.error}", "server_error", "ring_down")
        params = SamplingParams(
            max_tokens=max_tokens or min(engine.config.max_tokens, context_length - len(prompt)),
            temperature=body.temperature,
            top_p=body.top_p,
            seed=body.seed,
            stop=body.stops,
        )
        metrics.prompt_tokens.inc(len(prompt))
        return engine.submit(prompt, params, loop=asyncio.get_running_loop())

    async def events(handle, request: Request):
        """The request's events; cancels it if the client goes away."""
        started = last = time.perf_counter()
        first = True
        watch = asyncio.create_task(watch_disconnect(handle, request))
        try:
            async for event in handle:
                if event.finish_reason == "error":
                    raise ApiError(
                        503, f"the ring is down: {engine.error}", "server_error", "ring_down"
                    )
                if event.token is not None:
                    now = time.perf_counter()
                    (metrics.ttft if first else metrics.token_latency).observe(
                        now - (started if first else last)
                    )
                    first, last = False, now
                    metrics.generated_tokens.inc()
                yield event
        finally:
            watch.cancel()
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

    async def respond(request: Request, body, prompt: list[int], max_tokens, chat: bool):
        check_model(body.model)
        handle = submit(prompt, body, max_tokens)
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        created = int(time.time())
        kind = "chat.completion" if chat else "text_completion"
        endpoint = "chat" if chat else "completions"

        def choice(text: str, reason: str | None, delta: bool) -> dict:
            if not chat:
                return {"index": 0, "text": text, "finish_reason": reason, "logprobs": None}
            content = {"role": "assistant", "content": text}
            return {"index": 0, "finish_reason": reason, ("delta" if delta else "message"): content}

        def finish(reason: str) -> str:
            return {"cancelled": "stop", "error": "stop"}.get(reason, reason)

        if not body.stream:
            texts, count, reason = [], 0, "stop"
            async for event in events(handle, request):
                texts.append(event.text)
                count += event.token is not None
                reason = event.finish_reason or reason
            metrics.requests.labels(endpoint, "200").inc()
            return {
                "id": rid,
                "object": kind,
                "created": created,
                "model": model_name,
                "choices": [choice("".join(texts), finish(reason), False)],
                "usage": usage(len(prompt), count),
            }

        async def stream():
            count = 0
            chunk_kind = "chat.completion.chunk" if chat else "text_completion"
            base = {"id": rid, "object": chunk_kind, "created": created, "model": model_name}
            try:
                async for event in events(handle, request):
                    count += event.token is not None
                    reason = finish(event.finish_reason) if event.finish_reason else None
                    if event.text or reason:
                        data = {**base, "choices": [choice(event.text, reason, True)]}
                        yield f"data: {json.dumps(data)}\n\n"
                if body.include_usage:
                    data = {**base, "choices": [], "usage": usage(len(prompt), count)}
                    yield f"data: {json.dumps(data)}\n\n"
                yield "data: [DONE]\n\n"
                metrics.requests.labels(endpoint, "200").inc()
            except ApiError as e:
                yield f"data: {json.dumps(error_body(e.message, e.kind, e.code))}\n\n"

        return StreamingResponse(stream(), media_type="text/event-stream")

    @app.post("/v1/chat/completions", summary="Chat completion (streamed over SSE or not)")
    async def chat_completions(request: Request, body: ChatRequest):
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        prompt = list(tokenizer.apply_chat_template(messages, add_generation_prompt=True))
        max_tokens = body.max_completion_tokens or body.max_tokens
        return await respond(request, body, prompt, max_tokens, chat=True)

    @app.post("/v1/completions", summary="Text completion (streamed over SSE or not)")
    async def completions(request: Request, body: CompletionRequest):
        prompt = body.prompt if isinstance(body.prompt, list) else tokenizer.encode(body.prompt)
        if not prompt:
            raise ApiError(400, "the prompt is empty", "invalid_request_error", None, "prompt")
        return await respond(request, body, list(prompt), body.max_tokens, chat=False)

    @app.get("/v1/models", summary="The model this cluster serves")
    async def models():
        return {
            "object": "list",
            "data": [{"id": model_name, "object": "model", "created": 0, "owned_by": "mlxring"}],
        }

    async def ring_stats() -> list[dict]:
        if engine.error is not None:
            raise ApiError(503, f"the ring is down: {engine.error}", "server_error", "ring_down")
        try:
            return await asyncio.get_running_loop().run_in_executor(None, engine.stats, 10)
        except Exception as e:
            raise ApiError(
                503, f"the ring does not answer: {e}", "server_error", "ring_down"
            ) from e

    @app.get("/health", summary="Each rank's state")
    async def health():
        stages = await ring_stats()
        ranks = [{"rank": i, **s, "state": "ok"} for i, s in enumerate(stages)]
        return {
            "status": "ok",
            "model": model_name,
            "ranks": ranks,
            "queue_depth": len(engine.scheduler.waiting),
        }

    @app.get("/metrics", summary="Prometheus metrics")
    async def prometheus():
        if engine.error is None:
            for i, s in enumerate(await ring_stats()):
                layers = f"{s['layers'][0]}-{s['layers'][1] - 1}"
                metrics.step_time.labels(str(i), layers).set(s["step_ms"] / 1000)
                metrics.cache_bytes.labels(str(i), layers).set(s["cache_bytes"])
        metrics.queue_depth.set(len(engine.scheduler.waiting))
        metrics.live.set(engine.scheduler.live)
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app
