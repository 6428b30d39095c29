"""The HTTP edge of the API on real 2-rank rings: every bad request is OpenAI's error JSON
with the right status before anything is queued, the limits hold, a client that goes
away cancels its generation, /openapi.json is true (and fuzzed), and after all of it
the ring still answers a greedy request exactly as mlx-lm does."""

from __future__ import annotations

import asyncio
import re
import socket
import subprocess
import sys
import threading
import time
from urllib.parse import urlsplit

import httpx
import mlx.core as mx
import openai
import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mlx_lm import load as mlx_lm_load
from mlx_lm.generate import generate_step

from mlxring.engine.detok import Detok
from mlxring.server import schemas
from mlxring.server.app import create_app
from mlxring.tiny import VOCAB_SIZE
from tests.ringutil import free_port, stop_launcher

KEY = "edge-key"
AUTH = {"authorization": f"Bearer {KEY}"}
JSON = {**AUTH, "content-type": "application/json"}
CONTEXT = 4096  # the tiny models' max_position_embeddings
GREEDY_PROMPT = [1, 264, 82, 379, 288, 305]


def launch(tiny_llama, directory, keys: bool) -> tuple[subprocess.Popen, str]:
    port = free_port()
    config = directory / "cluster.yaml"
    api = f"{{port: {port}, api_keys: [{KEY}]}}" if keys else f"{{port: {port}}}"
    config.write_text(
        f"name: edge-ring\napi: {api}\n"
        "batching: {max_batch: 16, prefill_chunk: 64}\nnodes:\n"
        "  - {name: head, host: localhost, memory_gb: 8}\n"
        "  - {name: tail, host: localhost, memory_gb: 8}\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlxring", "launch", str(config), "--model", str(tiny_llama)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    seen = ""
    while "serving" not in seen:
        line = proc.stderr.readline()
        if not line:
            stop_launcher(proc)
            raise AssertionError(f"launch ended: {seen}")
        seen += line
    # keep the pipe drained: a full stderr pipe would block the launcher
    threading.Thread(target=proc.stderr.read, daemon=True).start()
    return proc, f"http://127.0.0.1:{port}"


@pytest.fixture(scope="module")
def ring(tiny_llama, tmp_path_factory):
    """A ring with an API key (so every endpoint but /health needs it)."""
    proc = None
    try:
        proc, url = launch(tiny_llama, tmp_path_factory.mktemp("edge"), keys=True)
        yield url
    finally:
        if proc is not None:
            stop_launcher(proc)


@pytest.fixture(scope="module")
def open_ring(tiny_llama, tmp_path_factory):
    """A ring without API keys, on loopback: the browser-safety checks apply."""
    proc = None
    try:
        proc, url = launch(tiny_llama, tmp_path_factory.mktemp("edge-open"), keys=False)
        yield url
    finally:
        if proc is not None:
            stop_launcher(proc)


@pytest.fixture(scope="module")
def greedy(tiny_llama):
    """mlx-lm's own greedy text for GREEDY_PROMPT (12 tokens, or up to end-of-sequence)."""
    model, tokenizer = mlx_lm_load(str(tiny_llama))
    tokens = []
    for t, _ in generate_step(mx.array(GREEDY_PROMPT), model, max_tokens=12):
        tokens.append(int(t))
        if int(t) in tokenizer.eos_token_ids:
            break
    return tokenizer.decode([t for t in tokens if t not in tokenizer.eos_token_ids])


def client(url: str, key: str = KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0)


def assert_serves_greedy(url: str, model: str, want: str, key: str = KEY) -> None:
    """The ring still works, and exactly: the same text as mlx-lm's greedy decode."""
    comp = client(url, key).completions.create(
        model=model, prompt=GREEDY_PROMPT, max_tokens=12, temperature=0
    )
    assert comp.choices[0].text == want
    assert comp.usage.prompt_tokens == len(GREEDY_PROMPT)


def error_of(r: httpx.Response, status: int, code: str | None = ...) -> dict:
    """The body is OpenAI's error JSON, with status `status` (and `code` when given)."""
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    body = r.json()
    assert set(body) == {"error"}, body
    assert set(body["error"]) == {"message", "type", "param", "code"}, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    if code is not ...:
        assert body["error"]["code"] == code, body
    return body["error"]


def post(url: str, path: str, body: bytes | str, headers=None, **kwargs) -> httpx.Response:
    return httpx.post(
        f"{url}{path}",
        content=body.encode() if isinstance(body, str) else body,
        headers=JSON if headers is None else headers,
        timeout=60,
        **kwargs,
    )


def status_of(url: str) -> dict:
    r = httpx.get(f"{url}/v1/status", headers=AUTH, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()


def metric(url: str, name: str, headers=AUTH) -> float:
    """One sample of /metrics (0 when absent): NAME or NAME{LABELS} as Prometheus prints it."""
    text = httpx.get(f"{url}/metrics", headers=headers, timeout=30).text
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return 0.0


# 1. token ids ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "prompt",
    [
        "[1000000]",
        f"[{VOCAB_SIZE}]",
        "[-1]",
        "[9223372036854775808]",  # 2^63
        "[18446744073709551617]",  # 2^64 + 1
        "[1, 2, 1e3]",
        "[1.0]",
        '["1"]',
        "[true]",
        "[[1, 2]]",
        "[null]",
        "[]",
    ],
)
def test_token_ids_outside_the_vocabulary_are_400(ring, tiny_llama, greedy, prompt):
    queued = metric(ring, "mlxring_prompt_tokens_total")
    body = f'{{"model": "{tiny_llama.name}", "prompt": {prompt}, "max_tokens": 4}}'
    error = error_of(post(ring, "/v1/completions", body), 400)
    assert error["param"] == "prompt" and error["type"] == "invalid_request_error"
    assert metric(ring, "mlxring_prompt_tokens_total") == queued  # nothing was queued
    if prompt == "[1000000]":  # the official client too
        with pytest.raises(openai.BadRequestError):
            client(ring).completions.create(model=tiny_llama.name, prompt=[1000000], max_tokens=4)
    assert_serves_greedy(ring, tiny_llama.name, greedy)


def test_the_last_token_id_is_served(ring, tiny_llama):
    comp = client(ring).completions.create(
        model=tiny_llama.name, prompt=[0, VOCAB_SIZE - 1], max_tokens=2, temperature=0
    )
    assert comp.usage.prompt_tokens == 2 and comp.usage.completion_tokens >= 1


# 2. stop strings ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "stop, says",
    [
        ('["a", "b", "c", "d", "e"]', "at most 4"),
        (f'"{"x" * 257}"', "at most 256"),
        (f'["ok", "{"x" * 257}"]', "at most 256"),
        ("[1]", "string"),
        ("7", "string"),
    ],
)
def test_stop_strings_are_bounded(ring, tiny_llama, greedy, stop, says):
    body = f'{{"model": "{tiny_llama.name}", "prompt": "hi", "max_tokens": 4, "stop": {stop}}}'
    error = error_of(post(ring, "/v1/completions", body), 400)
    assert error["param"] == "stop" and says in error["message"]
    assert_serves_greedy(ring, tiny_llama.name, greedy)


def test_a_stop_string_still_stops(ring, tiny_llama, greedy):
    cut = len(greedy) // 2
    stop = greedy[cut : cut + 3]
    assert len(stop) == 3 and stop.strip(), greedy
    comp = client(ring).completions.create(
        model=tiny_llama.name, prompt=GREEDY_PROMPT, max_tokens=12, temperature=0, stop=[stop]
    )
    assert comp.choices[0].text == greedy[: greedy.find(stop)]
    assert comp.choices[0].finish_reason == "stop"
    streamed = client(ring).completions.create(
        model=tiny_llama.name,
        prompt=GREEDY_PROMPT,
        max_tokens=12,
        temperature=0,
        stop=[stop, "\x00never"],
        stream=True,
    )
    assert "".join(ch.choices[0].text for ch in streamed) == greedy[: greedy.find(stop)]


class Watched(str):
    """The text a fake detokenizer hands out: it records how much each find() scans."""

    scanned: list[int] = []

    def find(self, sub, start=0, end=None):
        Watched.scanned.append(len(self) - start)
        return super().find(sub, start, len(self) if end is None else end)


class FakeDetokenizer:
    def __init__(self, pieces: list[str]):
        self.pieces, self.text = pieces, Watched("")

    def add_token(self, token: int) -> None:
        self.text = Watched(self.text + self.pieces[token])

    def finalize(self) -> None:
        pass


class FakeTokenizer:
    def __init__(self, pieces: list[str]):
        self.pieces = pieces

    @property
    def detokenizer(self) -> FakeDetokenizer:
        return FakeDetokenizer(self.pieces)


def old_detok(pieces: list[str], tokens: list[int], stop: tuple[str, ...]) -> tuple[str, bool]:
    """Detok before the rework (whole-text search, quadratic), with the earliest match
    winning: what the text must stay."""
    text, sent = "", 0
    out = []
    for i, t in enumerate(tokens):
        text += pieces[t]
        final = i == len(tokens) - 1
        found = [at for s in stop if s and (at := text.find(s)) >= 0]
        if found:
            out.append(text[sent : min(found)])
            return "".join(out), True
        hold = (
            0
            if final
            else max(
                (k for s in stop if s for k in range(1, len(s)) if text.endswith(s[:k])),
                default=0,
            )
        )
        safe = len(text) - hold
        out.append(text[sent:safe])
        sent = max(sent, safe)
    return "".join(out), False


def run_detok(pieces, tokens, stop) -> tuple[str, bool]:
    detok = Detok(FakeTokenizer(pieces), stop)
    out = []
    for i, t in enumerate(tokens):
        text, stopped = detok.add(t, i == len(tokens) - 1)
        out.append(text)
        if stopped:
            return "".join(out), True
    return "".join(out), False


PIECES = ["a", "b", "ab", "ba", "aab", " ", "c", "abc", "", "bca"]


@settings(max_examples=400, deadline=None)
@given(
    tokens=st.lists(st.integers(0, len(PIECES) - 1), min_size=1, max_size=40),
    stop=st.lists(st.text("abc ", max_size=6), max_size=4).map(tuple),
)
def test_detok_keeps_its_text(tokens, stop):
    assert run_detok(PIECES, tokens, stop) == old_detok(PIECES, tokens, stop)


def test_detok_costs_are_bounded_per_token():
    """Each token's stop search scans the last `longest` characters and the new text,
    never the text so far: 20,000 tokens against 4 stop strings of 256 characters that
    keep almost matching take a fraction of a second (the old search: several seconds,
    growing with the square of the length)."""
    pieces = ["ab", "a", "b", "ba"]
    stops = ("ab" * 128, "a" * 255 + "z", "b" * 256, "ba" * 127 + "x")
    tokens = [i % 4 for i in range(20_000)]
    Watched.scanned = []
    started = time.perf_counter()
    text, stopped = run_detok(pieces, tokens, stops)
    elapsed = time.perf_counter() - started
    assert not stopped and len(text) == sum(len(pieces[t]) for t in tokens)
    assert len(Watched.scanned) == 4 * len(tokens)
    assert max(Watched.scanned) <= 256 + 2  # the longest stop, and one token's text
    assert elapsed < 3, elapsed


# 3. body size, off-loop tokenizing ------------------------------------------------------


def chunked(model: str, size: int):
    """A completion body of about `size` bytes, sent in pieces without a Content-Length."""
    yield b'{"model": "%s", "prompt": "' % model.encode()
    for _ in range(size // 32768 + 1):
        yield b"y" * 32768
    yield b'"}'


def test_a_body_over_the_cap_is_413(ring, tiny_llama, greedy):
    """(Behind the launcher's front the front may answer first: any 413 in OpenAI's shape.)"""
    big = b'{"model": "%s", "prompt": "%s"}' % (tiny_llama.name.encode(), b"x" * (1 << 20))
    error_of(post(ring, "/v1/completions", big), 413)
    error_of(post(ring, "/v1/completions", chunked(tiny_llama.name, 1 << 20)), 413)
    assert_serves_greedy(ring, tiny_llama.name, greedy)


def test_the_app_itself_caps_bodies(tokenizer):
    """The head's own cap (a remote head serves the public port without a front)."""
    app = create_app(StubEngine(tokenizer), tokenizer, "m", CONTEXT, (KEY,), max_body_bytes=4096)
    with TestClient(app) as c:
        for body in (b"x" * 5000, chunked("m", 5000)):
            r = c.post("/v1/completions", content=body, headers=JSON)
            error_of(r, 413, "request_too_large")
            assert "4096" in r.json()["error"]["message"]
        r = c.post("/v1/completions", content=b"{" + b" " * 4000 + b"}", headers=JSON)
        error_of(r, 400)  # under the cap: on to validation
        metrics = c.get("/metrics", headers=AUTH).text
        assert 'mlxring_error_responses_total{status="413"} 2.0' in metrics


def test_a_big_prompt_does_not_stall_other_clients(ring, tiny_llama, greedy):
    """~1 MB of text takes seconds to tokenize: on the event loop it would stall every
    client; off it, /v1/models keeps answering at once."""
    text = "The quick brown fox jumps over the lazy dog. " * 22_000
    body = {"model": tiny_llama.name, "messages": [{"role": "user", "content": text}]}
    result = {}

    def big() -> None:
        started = time.monotonic()
        result["response"] = httpx.post(
            f"{ring}/v1/chat/completions", json=body, headers=AUTH, timeout=120
        )
        result["seconds"] = time.monotonic() - started

    worker = threading.Thread(target=big)
    worker.start()
    time.sleep(0.3)  # the body is in and tokenizing
    latencies = []
    while worker.is_alive():
        started = time.monotonic()
        r = httpx.get(f"{ring}/v1/models", headers=AUTH, timeout=30)
        latencies.append(time.monotonic() - started)
        assert r.status_code == 200
        time.sleep(0.05)
    worker.join()
    error_of(result["response"], 400, "context_length_exceeded")
    assert result["seconds"] > 1, "too small to show anything"
    # on the loop, one of them would have waited for the whole tokenizing
    assert len(latencies) >= 5 and max(latencies) < max(0.5, result["seconds"] / 3), latencies
    assert_serves_greedy(ring, tiny_llama.name, greedy)


# 4. a non-streaming client that disconnects ---------------------------------------------


def test_a_non_streaming_client_that_disconnects_cancels_its_request(ring, tiny_llama, greedy):
    max_tokens = CONTEXT - 64
    body = (
        f'{{"model": "{tiny_llama.name}", "max_tokens": {max_tokens}, "temperature": 0, '
        '"messages": [{"role": "user", "content": "go on and on"}]}'
    ).encode()
    cancelled = 'mlxring_requests_total{endpoint="chat",status="cancelled"}'
    cancelled_before = metric(ring, cancelled)
    generated_before = metric(ring, "mlxring_generated_tokens_total")
    host = urlsplit(ring)
    sock = socket.create_connection((host.hostname, host.port))
    try:
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\n"
            + f"Host: {host.netloc}\r\nAuthorization: Bearer {KEY}\r\n".encode()
            + b"Content-Type: application/json\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        deadline = time.monotonic() + 20
        while status_of(ring)["live"] == 0:  # admitted and generating
            assert time.monotonic() < deadline, "the request never went live"
            time.sleep(0.1)
        time.sleep(1.0)
    finally:
        sock.close()  # the client goes away without reading anything
    closed = time.monotonic()
    while status_of(ring)["live"] or any(s["sequences"] for s in status_of(ring)["stages"]):
        assert time.monotonic() - closed < 10, "the sequence outlived its client"
        time.sleep(0.2)
    freed_after = time.monotonic() - closed
    deadline = time.monotonic() + 10
    while metric(ring, cancelled) == cancelled_before:  # it ended by cancellation
        assert time.monotonic() < deadline
        time.sleep(0.2)
    generated = metric(ring, "mlxring_generated_tokens_total") - generated_before
    assert 0 < generated < max_tokens / 2, generated  # far from done when it was freed
    assert freed_after < 5
    assert_serves_greedy(ring, tiny_llama.name, greedy)


# 5. every error is OpenAI's JSON --------------------------------------------------------


def chat(model: str, extra: str = "", content: str = '"hi"') -> str:
    return (
        f'{{"model": "{model}", "max_tokens": 2, '
        f'"messages": [{{"role": "user", "content": {content}}}]{extra}}}'
    )


@pytest.mark.parametrize(
    "make, param",
    [
        (lambda m: chat(m, ', "seed": -1'), "seed"),
        (lambda m: chat(m, ', "seed": 18446744073709551616, "temperature": 0'), "seed"),
        (lambda m: chat(m, ', "seed": 18446744073709551616, "temperature": 1'), "seed"),
        (lambda m: chat(m, ', "seed": 1.5'), "seed"),
        (lambda m: chat(m, content='[{"type": "text", "text": 5}]'), "messages.0.content"),
        (lambda m: chat(m, content="[5]"), "messages.0.content"),
        (lambda m: chat(m, content='[{"type": "image_url"}]'), "messages.0.content"),
        (lambda m: chat(m, content='"bad \\ud800 text"'), "messages.0.content"),
        (lambda m: chat(m, ', "stop": "\\udfff"'), "stop"),
        (lambda m: chat(m, ', "n": 17'), "n"),
        (lambda m: chat(m, ', "n": 0'), "n"),
        (lambda m: chat(m, ', "tool_choice": "required"'), "tool_choice"),
        (lambda m: chat(m, ', "top_logprobs": 2'), "top_logprobs"),
        (lambda m: chat(m, ', "logprobs": true, "top_logprobs": 21'), "top_logprobs"),
        (lambda m: chat(m, ', "logit_bias": {"99999999": 1}'), "logit_bias"),
        (lambda m: chat(m, ', "logit_bias": {"1": 101}'), "logit_bias"),
        (lambda m: chat(m, ', "frequency_penalty": 0.5'), "frequency_penalty"),
        (lambda m: chat(m, ', "response_format": {"type": "json_object"}'), "response_format"),
        (lambda m: chat(m)[:-3], None),  # malformed JSON
        (lambda m: "[1, 2]", None),
        (lambda m: chat(m, ', "temperature": NaN'), "temperature"),
    ],
)
def test_bad_fields_are_400_with_openai_json(ring, tiny_llama, greedy, make, param):
    error = error_of(post(ring, "/v1/chat/completions", make(tiny_llama.name)), 400)
    assert error["type"] == "invalid_request_error" and error["param"] == param
    assert_serves_greedy(ring, tiny_llama.name, greedy)


def test_more_than_16_choices_says_so(ring, tiny_llama):
    error = error_of(post(ring, "/v1/chat/completions", chat(tiny_llama.name, ', "n": 17')), 400)
    assert "16" in error["message"]
    with pytest.raises(openai.BadRequestError):
        client(ring).chat.completions.create(
            model=tiny_llama.name, n=17, messages=[{"role": "user", "content": "x"}]
        )


def test_unknown_paths_and_methods_are_openai_json(ring, tiny_llama, greedy):
    error_of(httpx.get(f"{ring}/v1/nothing", headers=AUTH, timeout=10), 404, "not_found")
    r = httpx.delete(f"{ring}/v1/models", headers=AUTH, timeout=10)
    error_of(r, 405, "method_not_allowed")
    assert "GET" in r.headers["allow"]
    error_of(httpx.get(f"{ring}/v1/completions", headers=AUTH, timeout=10), 405)
    error_of(post(ring, "/v1/chat/completions", chat("other")), 404, "model_not_found")
    assert_serves_greedy(ring, tiny_llama.name, greedy)


class StubEngine:
    """What the app needs of an engine, to make it fail on purpose (no ring can)."""

    def __init__(self, tokenizer, fail: BaseException | None = None, down: bool = False):
        self.tokenizer, self.fail = tokenizer, fail
        self.error = RuntimeError("rank 1 stopped") if down else None
        self.failure = "node 'tail' (rank 1) stopped" if down else None
        self.config = type("Config", (), {"max_tokens": 8})()

    def status(self) -> dict:
        return {"stages": [], "live": 0, "waiting": 0}

    def submit(self, *args, **kwargs):
        raise self.fail


@pytest.fixture(scope="module")
def tokenizer(tiny_llama):
    from mlxring.model.tokenizer import load_tokenizer  # lazy: only the stub tests need it

    return load_tokenizer(tiny_llama)


def test_the_unexpected_is_500_without_internals(tokenizer):
    secret = "/secret/path/engine.py line 42: KeyError 'kv'"
    app = create_app(StubEngine(tokenizer, KeyError(secret)), tokenizer, "m", CONTEXT, (KEY,))
    with TestClient(app, raise_server_exceptions=False) as c:
        r = c.post("/v1/completions", json={"model": "m", "prompt": "hi"}, headers=AUTH)
        error = error_of(r, 500, "internal_error")
        assert "secret" not in r.text and "KeyError" not in r.text
        assert error["type"] == "server_error"
        metrics = c.get("/metrics", headers=AUTH).text
        assert 'mlxring_error_responses_total{status="500"} 1.0' in metrics


def test_busy_is_429_and_down_is_503_with_retry_after(tokenizer):
    from mlxring.engine.handle import EngineBusy, RingDown  # lazy: only here

    app = create_app(StubEngine(tokenizer, EngineBusy("full")), tokenizer, "m", CONTEXT, (KEY,))
    with TestClient(app) as c:
        r = c.post("/v1/completions", json={"model": "m", "prompt": "hi"}, headers=AUTH)
        error_of(r, 429, "server_busy")
        assert int(r.headers["retry-after"]) > 0
    app = create_app(StubEngine(tokenizer, RingDown("gone")), tokenizer, "m", CONTEXT, (KEY,))
    with TestClient(app) as c:
        r = c.post("/v1/completions", json={"model": "m", "prompt": "hi"}, headers=AUTH)
        error_of(r, 503, "ring_down")
        assert int(r.headers["retry-after"]) > 0
    app = create_app(StubEngine(tokenizer, down=True), tokenizer, "m", CONTEXT, (KEY,))
    with TestClient(app) as c:
        r = c.get("/health")  # no key: a liveness probe
        error_of(r, 503, "ring_down")
        assert int(r.headers["retry-after"]) > 0 and "tail" not in r.text
        status = c.get("/v1/status", headers=AUTH).json()
        assert status["status"] == "down" and "tail" in status["error"]


# 6. /openapi.json -----------------------------------------------------------------------

ERRORS = {"400", "401", "403", "404", "413", "415", "429", "500", "503"}


def test_openapi_is_true(ring, tiny_llama):
    r = httpx.get(f"{ring}/openapi.json", headers=AUTH, timeout=10)
    assert r.status_code == 200
    doc = r.json()
    assert "422" not in r.text and "HTTPValidationError" not in r.text
    assert doc["components"]["securitySchemes"]["bearer"] == {
        "type": "http",
        "scheme": "bearer",
        "description": doc["components"]["securitySchemes"]["bearer"]["description"],
    }
    paths = doc["paths"]
    assert set(paths) == {
        "/v1/chat/completions",
        "/v1/completions",
        "/v1/models",
        "/v1/status",
        "/health",
        "/metrics",
    }
    error_ref = {"$ref": "#/components/schemas/ErrorResponse"}
    for path, item in paths.items():
        for method, op in item.items():
            codes = set(op["responses"]) - {"200"}
            for code in codes:
                assert op["responses"][code]["content"]["application/json"]["schema"] == error_ref
            if path == "/health":
                assert "security" not in op and {"503", "500"} <= codes
            else:
                assert op["security"] == [{"bearer": []}] and "401" in codes
            if method == "post":
                assert codes == ERRORS, (path, codes)
                content = op["responses"]["200"]["content"]
                assert set(content) == {"application/json", "text/event-stream"}
                event = content["text/event-stream"]["schema"]
                assert "[DONE]" in event["description"] and event["required"] == ["data"]
                assert "Retry-After" in op["responses"]["429"]["headers"]
    ok = {
        "/v1/chat/completions": "ChatCompletion",
        "/v1/completions": "Completion",
        "/v1/models": "ModelList",
        "/v1/status": "Status",
        "/health": "Health",
    }
    for path, name in ok.items():
        op = next(iter(paths[path].values()))
        schema = op["responses"]["200"]["content"]["application/json"]["schema"]
        assert schema == {"$ref": f"#/components/schemas/{name}"}
    assert "text/plain" in paths["/metrics"]["get"]["responses"]["200"]["content"]
    for name in ("ChatCompletionChunk", "CompletionChunk", "ErrorResponse"):
        assert name in doc["components"]["schemas"]
    ids = doc["components"]["schemas"]["CompletionRequest"]["properties"]["prompt"]["anyOf"][1]
    assert ids["items"]["exclusiveMaximum"] == VOCAB_SIZE and ids["items"]["minimum"] == 0
    # and the answers are what it says
    c = client(ring)
    messages = [{"role": "user", "content": "hi"}]
    chat_body = {"model": tiny_llama.name, "messages": messages, "max_tokens": 3}
    r = httpx.post(f"{ring}/v1/chat/completions", json=chat_body, headers=AUTH, timeout=60)
    schemas.ChatCompletion.model_validate(r.json())
    comp_body = {"model": tiny_llama.name, "prompt": "hi", "max_tokens": 3}
    r = httpx.post(f"{ring}/v1/completions", json=comp_body, headers=AUTH, timeout=60)
    schemas.Completion.model_validate(r.json())
    for chunk in c.chat.completions.create(**chat_body, stream=True):
        schemas.ChatCompletionChunk.model_validate(chunk.model_dump(exclude_unset=True))
    with httpx.stream(
        "POST", f"{ring}/v1/completions", json={**comp_body, "stream": True}, headers=AUTH
    ) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    for line in lines[:-1]:
        schemas.CompletionChunk.model_validate_json(line)
    schemas.ModelList.model_validate(httpx.get(f"{ring}/v1/models", headers=AUTH).json())
    schemas.Status.model_validate(status_of(ring))


# 7. /health, /v1/status, /metrics -------------------------------------------------------


def test_health_is_keyless_and_minimal_everything_else_is_keyed(ring, tiny_llama, greedy):
    r = httpx.get(f"{ring}/health", timeout=10)
    assert r.status_code == 200 and r.json()["status"] == "ok"
    # (the launcher's front may add its restarts) but nothing of the ring's insides
    assert not {"ranks", "stages", "sequences", "layers", "model"} & set(r.json()), r.json()
    for path in ("/metrics", "/v1/status", "/v1/models", "/openapi.json", "/docs"):
        error_of(httpx.get(f"{ring}{path}", timeout=10), 401, "invalid_api_key")
        bad = {"authorization": "Bearer nope"}
        error_of(httpx.get(f"{ring}{path}", headers=bad, timeout=10), 401, "invalid_api_key")
    deadline = time.monotonic() + 10  # the snapshot may still show an earlier request
    while (status := status_of(ring))["live"] and time.monotonic() < deadline:
        time.sleep(0.2)
    assert status["model"] == tiny_llama.name and status["status"] == "ok"
    assert status["error"] is None and status["live"] == 0 and status["waiting"] == 0
    layers = [s["layers"] for s in status["stages"]]
    assert layers[0][0] == 0 and layers[-1][1] == 5 and len(layers) == 2  # inclusive
    assert all(layers[i][1] + 1 == layers[i + 1][0] for i in range(len(layers) - 1))
    text = httpx.get(f"{ring}/metrics", headers=AUTH, timeout=10).text
    assert 'mlxring_rank_step_seconds{layers="0-' in text and "mlxring_live_sequences" in text
    assert_serves_greedy(ring, tiny_llama.name, greedy)


def test_status_follows_the_ring_without_asking_it(ring, tiny_llama):
    """/v1/status and /metrics read the engine's snapshot: many calls cost no ring trip
    each (they stay fast while a request is generating)."""

    async def run() -> list[float]:
        async with httpx.AsyncClient(headers=AUTH, timeout=30) as c:
            started = time.monotonic()
            await asyncio.gather(*(c.get(f"{ring}/v1/status") for _ in range(50)))
            await asyncio.gather(*(c.get(f"{ring}/metrics") for _ in range(50)))
            return time.monotonic() - started

    assert asyncio.run(run()) < 10


# 8. browser safety ----------------------------------------------------------------------


@pytest.mark.parametrize("kind", [None, "text/plain", "application/x-www-form-urlencoded"])
def test_posts_need_a_json_content_type(ring, tiny_llama, greedy, kind):
    headers = dict(AUTH) if kind is None else {**AUTH, "content-type": kind}
    body = chat(tiny_llama.name).encode()
    for path in ("/v1/chat/completions", "/v1/completions"):
        r = httpx.post(f"{ring}{path}", content=body, headers=headers, timeout=30)
        error_of(r, 415, "unsupported_media_type")
    ok = {**AUTH, "content-type": "application/json; charset=utf-8"}
    r = httpx.post(f"{ring}/v1/chat/completions", content=body, headers=ok, timeout=60)
    assert r.status_code == 200, r.text
    assert_serves_greedy(ring, tiny_llama.name, greedy)


def test_a_keyless_server_answers_only_its_own_host_names(open_ring, tiny_llama, greedy):
    port = urlsplit(open_ring).port
    for host in ("evil.example", f"evil.example:{port}", "127.0.0.1.nip.io", "localhost.evil"):
        for path in ("/v1/models", "/metrics", "/v1/status"):
            r = httpx.get(f"{open_ring}{path}", headers={"host": host}, timeout=10)
            error_of(r, 403, "host_not_allowed")
        body = chat(tiny_llama.name)
        r = post(open_ring, "/v1/chat/completions", body, {"host": host, **JSON})
        error_of(r, 403, "host_not_allowed")
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", "localhost", f"[::1]:{port}"):
        r = httpx.get(f"{open_ring}/v1/models", headers={"host": host}, timeout=10)
        assert r.status_code == 200, (host, r.text)
    # no key needed here, but still JSON only
    r = httpx.post(f"{open_ring}/v1/completions", content=b"{}", timeout=10)
    error_of(r, 415, "unsupported_media_type")
    assert_serves_greedy(open_ring, tiny_llama.name, greedy, key="unused")


# 9. /metrics counts errors --------------------------------------------------------------


def test_metrics_count_error_responses_by_status(ring, tiny_llama):
    def count(status: int) -> float:
        return metric(ring, f'mlxring_error_responses_total{{status="{status}"}}')

    before = {s: count(s) for s in (400, 401, 404, 405, 415)}
    httpx.get(f"{ring}/nowhere", headers=AUTH, timeout=10)
    httpx.get(f"{ring}/nowhere", headers=AUTH, timeout=10)
    httpx.get(f"{ring}/v1/models", timeout=10)
    httpx.put(f"{ring}/v1/models", headers=AUTH, timeout=10)
    post(ring, "/v1/chat/completions", "{bad")
    post(ring, "/v1/chat/completions", chat(tiny_llama.name), headers=AUTH)
    after = {s: count(s) for s in before}
    assert {s: after[s] - before[s] for s in before} == {400: 1, 401: 1, 404: 2, 405: 1, 415: 1}
    # (413 is counted too: test_the_app_itself_caps_bodies; a 500: test_the_unexpected_...)
    chat_400 = 'mlxring_requests_total{endpoint="chat",status="400"}'
    assert metric(ring, chat_400) >= 1


# 10. fuzzing ----------------------------------------------------------------------------


def test_fuzzing_finds_no_5xx_and_no_undocumented_status(ring, tiny_llama, greedy):
    """schemathesis against /openapi.json: valid and broken bodies for every operation,
    the model pinned so that they reach the engine, generations kept short. Every answer
    must be documented (status, content type, schema) and none a 5xx."""
    schemathesis = pytest.importorskip("schemathesis")
    from schemathesis.checks import not_a_server_error  # lazy: an optional dev tool
    from schemathesis.generation import GenerationMode
    from schemathesis.specs.openapi.checks import (
        content_type_conformance,
        response_schema_conformance,
        status_code_conformance,
    )

    schema = schemathesis.openapi.from_url(f"{ring}/openapi.json", headers=AUTH)
    checks = [
        not_a_server_error,
        status_code_conformance,
        content_type_conformance,
        response_schema_conformance,
    ]
    seen: dict[str, list[int]] = {}

    def pin(body):
        """The served model, so that requests reach the engine; short generations."""
        if isinstance(body, dict):
            body = {**body, "model": tiny_llama.name}
            for field in ("max_tokens", "max_completion_tokens"):
                n = body.get(field)  # 8 at most where the server would take it
                if n is None:
                    body[field] = 8  # not the server's default of 256
                elif type(n) in (int, float) and 0 < n < CONTEXT:
                    body[field] = min(n, 8)
        return body

    def fuzz(operation, mode, examples: int) -> None:
        @settings(
            max_examples=examples,
            deadline=None,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        @given(case=operation.as_strategy(generation_mode=mode))
        def one(case):
            if case.body is not None and not isinstance(case.body, bytes):
                case.body = pin(case.body)
            response = case.call(base_url=ring, headers=AUTH, timeout=60)
            seen.setdefault(operation.label, []).append(response.status_code)
            case.validate_response(response, checks=checks)

        one()

    started = time.monotonic()
    for result in schema.get_all_operations():
        operation = result.ok()
        if operation.method.upper() == "POST":  # bodies: valid ones and broken ones
            for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
                fuzz(operation, mode, 150)
        else:  # nothing to vary but the key
            fuzz(operation, GenerationMode.POSITIVE, 3)
    assert time.monotonic() - started < 240
    for label in ("POST /v1/chat/completions", "POST /v1/completions"):
        assert seen[label].count(200) >= 10, seen[label]  # many reached the engine
        assert seen[label].count(400) >= 10, seen[label]
    for label, codes in seen.items():
        assert all(re.fullmatch(r"[2-4]\d\d", str(c)) for c in codes), (label, codes)
    assert_serves_greedy(ring, tiny_llama.name, greedy)
