"""Request and response bodies of the OpenAI endpoints we serve.

Requests: unknown extra fields are ignored; everything we read is checked here, so a
bad value is a 400 before anything is queued: token ids inside the vocabulary (the
models are built per app by `request_models(vocab_size)`: prompts and `logit_bias`), a
seed in [0, 2^64), `n` in [1, 16], `top_logprobs` in [0, 20] (with `logprobs`),
`tool_choice` "auto" or "none", text-only content parts, at most 4 stop strings of at
most 256 characters, and no lone surrogate in any string we use. docs/clustering.md
has the table of every field: served, refused with a 400, or ignored on purpose.
Responses: what /openapi.json promises.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StrictInt, field_validator
from pydantic_core import PydanticCustomError

from mlxring.engine.limits import SEED_LIMIT

MAX_STOPS = 4  # as OpenAI
MAX_CHOICES = 16  # n: each choice is one more sequence in the batch
MAX_TOP_LOGPROBS = 20  # as OpenAI's chat API (its completions API: 5)
MAX_BIAS = 100  # logit_bias values, as OpenAI
MAX_STOP_CHARS = 256


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
    n: int | None = Field(
        default=None,
        ge=1,
        le=MAX_CHOICES,
        description=f"choices, each an independent sequence (at most {MAX_CHOICES}); "
        "with a seed, choice i samples with seed + i",
    )
    logit_bias: dict[str, float] | None = Field(
        default=None,
        description=f"token id -> bias in [-{MAX_BIAS}, {MAX_BIAS}] added to its logit",
    )
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    frequency_penalty: float | None = Field(default=None, description="0 only")
    presence_penalty: float | None = Field(default=None, description="0 only")
    response_format: Any = Field(default=None, description='{"type": "text"} only')

    @field_validator("frequency_penalty", "presence_penalty")
    @classmethod
    def _no_penalty(cls, v: float | None) -> float | None:
        if v:
            raise PydanticCustomError(
                "penalty_unsupported",
                "penalties are not applied by this server: send 0 or leave them out",
            )
        return v

    @field_validator("response_format", mode="before")
    @classmethod
    def _text_only(cls, v: Any) -> Any:
        if v is None or v == {"type": "text"}:
            return v
        raise PydanticCustomError(
            "response_format_unsupported",
            'only response_format {"type": "text"} is served: JSON output needs '
            "constrained decoding, which this server does not do",
        )

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
    def _whole_n(cls, v: Any) -> Any:
        if isinstance(v, bool) or v is not None and not isinstance(v, int):
            raise PydanticCustomError("n_type", "n must be a whole number of choices")
        return v

    @property
    def choices(self) -> int:
        return self.n or 1

    def seed_of(self, choice: int) -> int | None:
        """Choice i's seed: the request's plus i (choices differ, and repeat)."""
        return None if self.seed is None else (self.seed + choice) % SEED_LIMIT

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


def template_message(m: Message) -> dict:
    """A message as chat templates take it: its text, and a turn's tool calls, tool call id
    and name where it has them."""
    out = {"role": m.role, "content": m.text()}
    for key in ("tool_calls", "tool_call_id", "name"):
        if (value := getattr(m, key, None)) is not None:
            out[key] = value
    return out


class FunctionDef(BaseModel):
    model_config = ConfigDict(extra="allow")

    name: Text
    description: Text | None = None
    parameters: dict[str, Any] | None = None


class Tool(BaseModel):
    model_config = ConfigDict(extra="allow")

    type: Literal["function"]
    function: FunctionDef


class ChatRequest(_Body):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    tools: list[Tool] | None = Field(
        default=None, description="functions the model may call (its chat template must take them)"
    )
    tool_choice: Any = Field(default=None, description='"auto" (the default) or "none"')
    logprobs: bool | None = Field(default=None, description="each token's log probability")
    top_logprobs: int | None = Field(
        default=None,
        ge=0,
        le=MAX_TOP_LOGPROBS,
        description=f"with logprobs: the {MAX_TOP_LOGPROBS} most likely tokens at most, per token",
    )

    @field_validator("tool_choice", mode="before")
    @classmethod
    def _auto_or_none(cls, v: Any) -> Any:
        if v is None or v in ("auto", "none"):
            return v
        raise PydanticCustomError(
            "tool_choice_unsupported",
            'tool_choice must be "auto" or "none": forcing a call ("required" or a named '
            "function) needs constrained decoding, which this server does not do",
        )

    @field_validator("top_logprobs")
    @classmethod
    def _with_logprobs(cls, v: int | None, info) -> int | None:
        if v is not None and not info.data.get("logprobs"):
            raise PydanticCustomError("top_logprobs", "top_logprobs needs logprobs: true")
        return v

    @property
    def top_count(self) -> int | None:
        """None: no logprobs; else how many top alternatives each token reports."""
        return (self.top_logprobs or 0) if self.logprobs else None

    def template_tools(self) -> list[dict] | None:
        """The tools as the chat template takes them (none with tool_choice "none")."""
        if not self.tools or self.tool_choice == "none":
            return None
        return [t.model_dump(exclude_none=True) for t in self.tools]


def _bias_checker(vocab_size: int):
    def check(v: Any) -> Any:
        if v is None:
            return v
        if not isinstance(v, dict):
            raise PydanticCustomError("logit_bias", "logit_bias maps token ids to biases")
        for key, bias in v.items():
            if not (isinstance(key, str) and key.isdigit() and int(key) < vocab_size):
                raise PydanticCustomError(
                    "logit_bias",
                    "logit_bias key '{key}' is not a token id in [0, {vocab})",
                    {"key": key, "vocab": vocab_size},
                )
            if isinstance(bias, bool) or not isinstance(bias, (int, float)):
                raise PydanticCustomError("logit_bias", "logit_bias values must be numbers")
            if not -MAX_BIAS <= bias <= MAX_BIAS:
                raise PydanticCustomError(
                    "logit_bias",
                    "logit_bias values are in [-{most}, {most}], got {got}",
                    {"most": MAX_BIAS, "got": bias},
                )
        return v

    return check


def bias_of(body: _Body) -> dict[int, float]:
    """The request's logit_bias as {token id: bias}."""
    return {int(k): float(v) for k, v in (body.logit_bias or {}).items()}


def request_models(vocab_size: int) -> tuple[type[ChatRequest], type[_Body]]:
    """The request bodies of one model: token ids are checked against its vocabulary."""
    token = Annotated[StrictInt, Field(ge=0, lt=vocab_size)]
    bias_check = _bias_checker(vocab_size)

    class VocabChatRequest(ChatRequest):
        _bias = field_validator("logit_bias", mode="before")(lambda cls, v: bias_check(v))

    class CompletionRequest(_Body):
        prompt: Text | list[token] = Field(  # type: ignore[valid-type]
            description=f"a text, or token ids in [0, {vocab_size})"
        )
        logprobs: int | None = Field(
            default=None, ge=0, le=5, description="the most likely tokens to report (0-5)"
        )
        _bias = field_validator("logit_bias", mode="before")(lambda cls, v: bias_check(v))

        @property
        def top_count(self) -> int | None:
            return self.logprobs

        def template_tools(self) -> None:
            return None

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

    VocabChatRequest.__name__ = "ChatRequest"
    return VocabChatRequest, CompletionRequest


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


Finish = Literal["stop", "length", "tool_calls"]


class FunctionCall(BaseModel):
    name: str
    arguments: str = Field(description="a JSON object, as text")


class ToolCall(BaseModel):
    id: str
    type: Literal["function"]
    function: FunctionCall


class ToolCallDelta(ToolCall):
    index: int


class TokenLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class ContentLogprob(TokenLogprob):
    top_logprobs: list[TokenLogprob]


class ChatLogprobs(BaseModel):
    content: list[ContentLogprob]


class CompletionLogprobs(BaseModel):
    """The completions API's (legacy) shape."""

    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int]


class AssistantMessage(BaseModel):
    role: Literal["assistant"]
    content: str | None = Field(description="null when the reply is tool calls only")
    tool_calls: list[ToolCall] | None = None


class AssistantDelta(BaseModel):
    role: Literal["assistant"]
    content: str
    tool_calls: list[ToolCallDelta] | None = None


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: Finish
    logprobs: ChatLogprobs | None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ChatChunkChoice(BaseModel):
    index: int
    delta: AssistantDelta
    finish_reason: Finish | None
    logprobs: ChatLogprobs | None = None


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
    logprobs: CompletionLogprobs | None = None


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

    layers: list[int] = Field(description="its layers, inclusive: [first, last]")
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
    layers: list[int] | None = Field(
        description="its layers, inclusive: [first, last] ([0, 2] holds 0, 1 and 2)"
    )
    layers_text: str | None = Field(description='the same as written in configs: "0-2"')
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
