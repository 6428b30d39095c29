"""The OpenAPI document of the API, made true: every status a route answers with
OpenAI's error JSON (400, never FastAPI's 422), the bearer scheme, the response bodies,
and the server-sent events of streamed answers."""

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic.json_schema import models_json_schema

from mlxring.server.schemas import ChatCompletionChunk, CompletionChunk, ErrorResponse

_ERRORS = {
    400: "Malformed JSON or an invalid field",
    401: "No API key, or a wrong one (when the server has keys)",
    403: "A Host the server does not answer (without API keys: its own address, IP "
    "addresses and localhost only)",
    404: "The model is not the one served",
    413: "The body is larger than the server's limit",
    415: "The body is not sent as application/json",
    429: "The queue is full: retry after Retry-After seconds",
    500: "An unexpected error (the message holds no internals)",
    503: "The ring is down: retry after Retry-After seconds",
}
_RETRY = {"Retry-After": {"description": "seconds to wait", "schema": {"type": "integer"}}}


def documented(*codes: int, ok: dict) -> dict:
    """A route's `responses`: `ok` for 200, the error JSON for each of `codes`."""
    out: dict = {200: ok}
    for code in codes:
        out[code] = {"model": ErrorResponse, "description": _ERRORS[code]}
        if code in (429, 503):
            out[code]["headers"] = _RETRY
    return out


def sse(chunk: str) -> dict:
    """The text/event-stream answer, described one event at a time."""
    ref = f"#/components/schemas/{chunk}"
    return {
        "schema": {
            "description": f"With `stream: true`: server-sent events, each `data: <{chunk} "
            "JSON>`, then `data: [DONE]`; a failure once streaming is a `data:` event with "
            "the error JSON.",
            "type": "object",
            "required": ["data"],
            "properties": {
                "data": {
                    "anyOf": [
                        {
                            "type": "string",
                            "contentMediaType": "application/json",
                            "contentSchema": {
                                "anyOf": [
                                    {"$ref": ref},
                                    {"$ref": "#/components/schemas/ErrorResponse"},
                                ]
                            },
                        },
                        {"const": "[DONE]"},
                    ]
                }
            },
        }
    }


def openapi_document(app: FastAPI, keyed: bool, public: tuple[str, ...]) -> dict:
    """FastAPI's document, made true: 400 not 422, the key, the streamed chunks (once)."""
    if app.openapi_schema is None:
        doc = get_openapi(
            title=app.title,
            version=app.version,
            description=app.description,
            routes=app.routes,
        )
        schemas = doc.setdefault("components", {}).setdefault("schemas", {})
        for name in ("HTTPValidationError", "ValidationError"):
            schemas.pop(name, None)
        _, defs = models_json_schema(
            [(ChatCompletionChunk, "serialization"), (CompletionChunk, "serialization")],
            ref_template="#/components/schemas/{model}",
        )
        schemas.update(defs.get("$defs", {}))
        doc["components"]["securitySchemes"] = {
            "bearer": {
                "type": "http",
                "scheme": "bearer",
                "description": "one of the server's API keys (when it has any)",
            }
        }
        error_json = {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}
        for path, item in doc["paths"].items():
            for op in item.values():
                op["responses"].pop("422", None)
                for code, answer in op["responses"].items():
                    if code != "200":  # every error is JSON (/metrics' 200 is not)
                        answer["content"] = {"application/json": error_json}
                if keyed and path not in public:
                    op["security"] = [{"bearer": []}]
        app.openapi_schema = doc
    return app.openapi_schema
