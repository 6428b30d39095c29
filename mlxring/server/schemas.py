"""Request and response bodies of the OpenAI endpoints we serve.

Requests: unknown extra fields are ignored; everything we read is checked here, so a
bad value is a 400 before anything is queued: token ids inside the vocabulary (the
models are built per app by `request_models(vocab_size)`), a seed in [0, 2^64), `n` = 1,
text-only content parts, at most 4 stop strings of at most 256 characters, and no lone
surrogate in any string we use. Responses: what /openapi.json promises.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StrictInt, field_validator
from pydantic_core import PydanticCustomError

MAX_STOPS = 4  # as OpenAI
MAX_STOP_CHARS = 256
SEED_LIMIT = 2**64


def _whole_unicode(s: str) -> str:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError as e:
        raise PydanticCustomError(
            "lone_surrogate",
            "the string holds a lone surrogate ({escape} at {at}): not valid Unicode",
            {"escape": f"\\u{ord(s[e.start]):04x}", "at": e.start},
        ) from None
    return s


# A string we use (not merely carry): valid Unicode, so it can be tokenized and echoed.
Text = Annotated[str, AfterValidator(_whole_unicode)]
StopText = Annotated[Text, Field(max_length=MAX_STOP_CHARS)]
Seed = Annotated[StrictInt, Field(ge=0, lt=SEED_LIMIT)]


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")

    include_usage: bool | None = None


class _Body(BaseModel):
    model_config = ConfigDict(extra="allow", allow_inf_nan=False)

    model: Text
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2, description="default 1")
    top_p: float | None = Field(default=None, gt=0, le=1, description="default 1")
    stop: StopText | list[StopText] | None = Field(
        default=None,
        description=f"up to {MAX_STOPS} strings of at most {MAX_STOP_CHARS} characters",
    )
    seed: Seed | None = None
    n: int | None = Field(default=None, ge=1, le=1, description="only 1 is supported")
    stream: bool | None = False
    stream_options: StreamOptions | None = None

    @field_validator("stop", mode="before")
    @classmethod
    def _stops(cls, v: Any) -> Any:
        if isinstance(v, list):
            if len(v) > MAX_STOPS:
                raise PydanticCustomError(
                    "too_many_stops",
                    "at most {most} stop strings are allowed, got {got}",
                    {"most": MAX_STOPS, "got": len(v)},
                )
            if not all(isinstance(s, str) for s in v):
                raise PydanticCustomError("stop_type", "every stop must be a string")
        elif v is not None and not isinstance(v, str):
            raise PydanticCustomError("stop_type", "stop must be a string or a list of strings")
        for s in [v] if isinstance(v, str) else v or ():
            if len(s) > MAX_STOP_CHARS:
                raise PydanticCustomError(
                    "stop_length",
                    "a stop string is at most {most} characters, got {got}",
                    {"most": MAX_STOP_CHARS, "got": len(s)},
                )
            _whole_unicode(s)
        return v

    @field_validator("n", mode="before")
    @classmethod
    def _one_choice(cls, v: Any) -> Any:
        if v is not None and v != 1 or isinstance(v, bool):
            raise PydanticCustomError(
                "n_unsupported", "only n=1 is supported: one choice per request"
            )
        return v

    @property
    def stops(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        stops = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)
        return tuple(s for s in stops if s)  # an empty stop string stops nothing

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)

    @property
    def sampling(self) -> tuple[float, float]:
        """(temperature, top_p), OpenAI's defaults where not given."""
        return (
            1.0 if self.temperature is None else self.temperature,
            1.0 if self.top_p is None else self.top_p,
        )


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")

    type: Literal["text"]
    text: Text


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: Text | list[ContentPart] | None = None

    @field_validator("content", mode="before")
    @classmethod
    def _parts(cls, v: Any) -> Any:
        if v is None or isinstance(v, str):
            return v if v is None else _whole_unicode(v)
        if not isinstance(v, list):
            raise PydanticCustomError(
                "content_type", "content must be a string or a list of text parts"
            )
        for i, p in enumerate(v):
            if not (isinstance(p, dict) and p.get("type") == "text"):
                raise PydanticCustomError(
                    "content_part",
                    "content part {i} is not a text part (type 'text'): "
                    "this server takes text only",
                    {"i": i},
                )
            if not isinstance(p.get("text"), str):
                raise PydanticCustomError(
                    "content_part", "content part {i}: its text must be a string", {"i": i}
                )
            _whole_unicode(p["text"])
        return v

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""


class ChatRequest(_Body):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)


def request_models(vocab_size: int) -> tuple[type[ChatRequest], type[_Body]]:
    """The request bodies of one model: token ids are checked against its vocabulary."""
    token = Annotated[StrictInt, Field(ge=0, lt=vocab_size)]

    class CompletionRequest(_Body):
        prompt: Text | list[token] = Field(  # type: ignore[valid-type]
            description=f"a text, or token ids in [0, {vocab_size})"
        )

        @field_validator("prompt", mode="before")
        @classmethod
        def _ids(cls, v: Any) -> Any:
            if isinstance(v, str):
                return _whole_unicode(v)
            if not isinstance(v, list):
                raise PydanticCustomError(
                    "prompt_type", "the prompt must be a string or a list of token ids"
                )
            if not v:
                raise PydanticCustomError("prompt_empty", "the prompt is empty")
            for i, t in enumerate(v):
                if not (type(t) is int and 0 <= t < vocab_size):
                    raise PydanticCustomError(
                        "token_id",
                        "item {i} is not a token id: ids are integers in [0, {vocab})",
                        {"i": i, "vocab": vocab_size},
                    )
            return v

    return ChatRequest, CompletionRequest


# Responses ---------------------------------------------------------------------------


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    """OpenAI's error JSON."""

    error: ErrorDetail


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


Finish = Literal["stop", "length"]


class AssistantMessage(BaseModel):
    role: Literal["assistant"]
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: Finish


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ChatChunkChoice(BaseModel):
    index: int
    delta: AssistantMessage
    finish_reason: Finish | None


class ChatCompletionChunk(BaseModel):
    """One `data:` event of a streamed chat completion."""

    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: Finish | None
    logprobs: None = None


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class CompletionChunk(BaseModel):
    """One `data:` event of a streamed completion."""

    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelCard]


class Health(BaseModel):
    status: Literal["ok"]


class StageStatus(BaseModel):
    model_config = ConfigDict(extra="allow")

    layers: list[int]
    sequences: list[int]
    cache_bytes: int
    step_ms: float


class NodeStatus(BaseModel):
    """One node of the ring, in ring order: what the plan says and what its stage reports."""

    name: str
    rank: int
    host: str | None = Field(description="its address in the cluster config")
    backend: str | None = Field(description="mlx or torch")
    device: str | None = Field(description="gpu, cpu or cuda")
    layers: list[int] | None = Field(description="its half-open layer range [start, end)")
    weight_bytes: int | None = Field(description="the plan's weight bytes (the head's tensors too)")
    memory_bytes: int | None = Field(description="its usable memory (memory_gb - reserve_gb)")
    cache_bytes: int | None = Field(description="KV cache bytes now (null while down)")
    step_ms: float | None = Field(description="moving average of a step's compute and send")
    sequences: int | None = Field(description="live sequences in its caches")
    state: Literal["up", "down", "failed"] = Field(
        description="failed: the node the last failure named; down: the ring is down"
    )


class Throughput(BaseModel):
    """What the API saw lately (since this head started)."""

    tokens_per_second: float = Field(description="generated tokens over the last window_s")
    window_s: int
    ttft_ms: float | None = Field(description="median time to first token, last minute")
    itl_ms: float | None = Field(
        description="inter-token latency: the median over the requests finished in the last "
        "minute of each one's mean time between tokens"
    )
    hop_ms: float | None = Field(
        description="estimated hop latency: (itl_ms - sum of the stages' step_ms) / hops; "
        "null without recent tokens"
    )
    generated_tokens: int


class History(BaseModel):
    """Generated tokens per whole second, oldest first, from `start` (unix seconds)."""

    start: int
    tokens: list[int]


class RingEvent(BaseModel):
    time: float = Field(description="unix time")
    kind: Literal["up", "failure", "down", "restart"]
    message: str
    node: str | None


class RingInfo(BaseModel):
    """The launcher's view across ring restarts (absent without the launcher's front)."""

    up: bool
    reason: str | None = Field(description="why the ring is down")
    restarts: int
    failures: dict[str, int] = Field(description="failures so far, per node")
    repeated: list[str] = Field(description="nodes that keep failing")
    events: list[RingEvent] = Field(description="recent events, newest first")


class Status(BaseModel):
    """The ring at a glance: the engine's snapshot (refreshed about once a second), the
    nodes in ring order, recent throughput and latency, and (behind the launcher's front)
    restarts and failures. While the ring is down the front answers it itself."""

    model_config = ConfigDict(extra="allow")

    model: str
    status: Literal["ok", "down"]
    error: str | None
    stages: list[StageStatus]
    live: int
    waiting: int
    nodes: list[NodeStatus]
    throughput: Throughput
    history: History
    ring: RingInfo | None = None
