"""The OpenAI-compatible API on a real 2-rank ring, driven by the official `openai` client."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time

import httpx
import mlx.core as mx
import openai
import pytest
from mlx_lm import load as mlx_lm_load
from mlx_lm.generate import generate_step

from mlxring.model import tokenizer as jobs
from tests.ringutil import (
    children,
    cmdline,
    free_port,
    launch_serving,
    stop_launcher,
    two_node_config,
    wait_for_line,
)

KEY = "test-key"


@pytest.fixture(scope="module")
def server(tiny_llama, tmp_path_factory):
    port = free_port()
    header = (
        f"name: api-ring\napi: {{port: {port}, api_keys: [{KEY}]}}\n"
        "batching: {max_batch: 16, prefill_chunk: 16}\n"
    )
    config = two_node_config(tmp_path_factory.mktemp("api"), header)
    proc = launch_serving(config, tiny_llama, "--step-timeout", "4")
    try:
        yield proc, f"http://127.0.0.1:{port}"
    finally:
        stop_launcher(proc)


@pytest.fixture(scope="module")
def reference(tiny_llama):
    """mlx-lm's greedy tokens (and text) for a prompt given as token ids."""
    model, tokenizer = mlx_lm_load(str(tiny_llama))

    def solo(prompt_ids: list[int], max_tokens: int) -> tuple[list[int], str]:
        tokens = []
        for t, _ in generate_step(mx.array(prompt_ids), model, max_tokens=max_tokens):
            tokens.append(int(t))
            if int(t) in tokenizer.eos_token_ids:
                break
        return tokens, tokenizer.decode([t for t in tokens if t not in tokenizer.eos_token_ids])

    return tokenizer, solo


def client(url: str, key: str = KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0)


def mlxring_generate(model, prompt: str, *args: str) -> dict:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "mlxring",
            "generate",
            "--model",
            str(model),
            "--prompt",
            prompt,
            "--max-tokens",
            "12",
            "--json",
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_chat_and_completions_equal_mlxring_generate(server, tiny_llama):
    _, url = server
    c = client(url)
    want = mlxring_generate(tiny_llama, "Tell me about rings")
    chat = c.chat.completions.create(
        model=tiny_llama.name,
        max_tokens=12,
        temperature=0,
        messages=[{"role": "user", "content": "Tell me about rings"}],
    )
    assert chat.choices[0].message.content == want["text"]
    assert chat.usage.completion_tokens == len(want["tokens"])
    assert chat.usage.prompt_tokens == want["prompt_tokens"]
    stream = c.chat.completions.create(
        model=tiny_llama.name,
        max_tokens=12,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        messages=[{"role": "user", "content": "Tell me about rings"}],
    )
    chunks = list(stream)
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == want["text"]
    assert chunks[-1].usage.completion_tokens == len(want["tokens"])

    raw = mlxring_generate(tiny_llama, "Numbers like", "--raw")
    comp = c.completions.create(
        model=tiny_llama.name, prompt="Numbers like", max_tokens=12, temperature=0
    )
    assert comp.choices[0].text == raw["text"] and comp.usage.completion_tokens == 12
    streamed = c.completions.create(
        model=tiny_llama.name, prompt="Numbers like", max_tokens=12, temperature=0, stream=True
    )
    assert "".join(ch.choices[0].text for ch in streamed) == raw["text"]


def test_32_concurrent_streaming_clients(server, tiny_llama, reference):
    _, url = server
    tokenizer, solo = reference
    prompts = [f"request {i}: " + "ring " * (i % 7) for i in range(32)]
    limits = [4 + i % 9 for i in range(32)]

    async def one(c: openai.AsyncOpenAI, prompt: str, limit: int) -> str:
        stream = await c.chat.completions.create(
            model=tiny_llama.name,
            max_tokens=limit,
            temperature=0,
            stream=True,
            messages=[{"role": "user", "content": prompt}],
        )
        return "".join([ch.choices[0].delta.content or "" async for ch in stream if ch.choices])

    async def run() -> list[str]:
        async with openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0) as c:
            return await asyncio.gather(*(one(c, p, n) for p, n in zip(prompts, limits)))

    texts = asyncio.run(run())
    for prompt, limit, text in zip(prompts, limits, texts):
        ids = jobs.encode_prompt(tokenizer, prompt)
        assert text == solo(ids, limit)[1], prompt


def error_of(response: httpx.Response) -> dict:
    body = response.json()
    assert set(body) == {"error"} and {"message", "type", "code", "param"} <= set(body["error"])
    return body["error"]


@pytest.mark.parametrize(
    "body, status, code",
    [
        (b"{not json", 400, None),
        (b'{"model": "MODEL", "messages": "hello"}', 400, None),
        (
            b'{"model": "MODEL", "messages": [{"role": "user", "content": "x"}], '
            b'"temperature": "hot"}',
            400,
            None,
        ),
        (
            b'{"model": "MODEL", "messages": [{"role": "user", "content": "x"}], '
            b'"max_tokens": 5000}',
            400,
            "context_length_exceeded",
        ),
        (
            b'{"model": "other", "messages": [{"role": "user", "content": "x"}]}',
            404,
            "model_not_found",
        ),
    ],
)
def test_errors_have_status_and_openai_shape(server, tiny_llama, body, status, code):
    _, url = server
    body = body.replace(b"MODEL", tiny_llama.name.encode())
    r = httpx.post(
        f"{url}/v1/chat/completions",
        content=body,
        timeout=30,
        headers={"authorization": f"Bearer {KEY}", "content-type": "application/json"},
    )
    assert r.status_code == status, r.text
    assert error_of(r)["code"] == code


def test_a_bad_api_key_is_401(server, tiny_llama):
    _, url = server
    with pytest.raises(openai.AuthenticationError) as info:
        client(url, "wrong").models.list()
    assert info.value.status_code == 401
    r = httpx.get(f"{url}/v1/models", timeout=10)
    assert r.status_code == 401 and error_of(r)["code"] == "invalid_api_key"


AUTH = {"authorization": f"Bearer {KEY}"}


def live_sequences(url: str) -> list[list[int]]:
    """Each stage's live sequences, from the engine's snapshot (refreshed about once a second)."""
    status = httpx.get(f"{url}/v1/status", headers=AUTH, timeout=30).json()
    return [stage["sequences"] for stage in status["stages"]]


def test_a_client_that_disconnects_frees_its_sequence(server, tiny_llama):
    _, url = server
    body = {
        "model": tiny_llama.name,
        "max_tokens": 3000,
        "temperature": 0,
        "stream": True,
        "messages": [{"role": "user", "content": "go on and on"}],
    }
    with httpx.stream(
        "POST",
        f"{url}/v1/chat/completions",
        json=body,
        timeout=30,
        headers={"authorization": f"Bearer {KEY}"},
    ) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")
        deadline = time.monotonic() + 15  # the snapshot is up to a second old
        while not all(live_sequences(url)) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert all(live_sequences(url))  # generating on every rank
    deadline = time.monotonic() + 15
    while any(live_sequences(url)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert live_sequences(url) == [[], []]


def test_openapi_documents_every_endpoint(server):
    _, url = server
    paths = httpx.get(f"{url}/openapi.json", headers=AUTH, timeout=10).json()["paths"]
    for path in ["/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics"]:
        assert path in paths


def test_metrics_are_prometheus_text(server):
    _, url = server
    text = httpx.get(f"{url}/metrics", headers=AUTH, timeout=30).text
    for name in [
        "mlxring_requests_total",
        "mlxring_generated_tokens_total",
        "mlxring_time_to_first_token_seconds_bucket",
        "mlxring_rank_step_seconds",
        "mlxring_queue_depth",
        "mlxring_inter_token_latency_seconds_bucket",
    ]:
        assert name in text


def test_the_launcher_tells_each_node_loading_then_serving_once(server, tiny_llama):
    proc, url = server
    log = "".join(proc.lines)
    assert "node 'head': loading layers 0-2 (" in log and "node 'tail': loading layers 3-5 (" in log
    assert re.search(r"node 'head': loaded layers 0-2 in [0-9.]+ s", log), log
    assert re.search(r"node 'tail': loaded layers 3-5 in [0-9.]+ s", log), log
    serving = [line for line in proc.lines if "serving" in line]
    assert serving == [
        f"mlxring: serving {tiny_llama.name} at {url}/v1 (OpenAI API); Ctrl-C stops every rank\n"
    ]
    # announced only once the front answers there
    assert httpx.get(f"{url}/health", timeout=10).status_code == 200


def test_every_request_is_logged_and_counted_by_status(server, tiny_llama):
    proc, url = server

    def responses(code: int) -> float:
        text = httpx.get(f"{url}/metrics", headers=AUTH, timeout=10).text
        found = re.search(rf'^mlxring_http_responses_total{{code="{code}"}} (\S+)$', text, re.M)
        return float(found[1]) if found else 0.0

    before = {code: responses(code) for code in (401, 404)}
    httpx.get(f"{url}/v1/nowhere-{os.getpid()}", headers=AUTH, timeout=10)
    httpx.get(f"{url}/v1/models", timeout=10)  # no key: 401
    after = {code: responses(code) for code in (401, 404)}
    assert {c: after[c] - before[c] for c in before} == {401: 1, 404: 1}
    assert responses(200) >= 1  # the /metrics answers themselves
    line = wait_for_line(proc, f"GET /v1/nowhere-{os.getpid()} 404 ")
    assert line.startswith("head | ") and line.rstrip().endswith(" ms")
    body = {"model": tiny_llama.name, "prompt": "hi", "max_tokens": 3, "temperature": 0}
    seen = len(proc.lines)  # the lines of earlier requests: this one's comes after
    r = httpx.post(f"{url}/v1/completions", json=body, headers=AUTH, timeout=60)
    assert r.status_code == 200
    line = wait_for_line(proc, "POST /v1/completions 200 ", after=seen)
    usage = r.json()["usage"]
    assert (
        f"{usage['prompt_tokens']} prompt + {usage['completion_tokens']} completion tokens" in line
    )


def test_a_frozen_rank_makes_the_api_answer_503(server, tiny_llama):
    """Last: it breaks the ring. SIGSTOP leaves the connection open, so only the watchdog
    (--step-timeout 4) can notice; requests then fail with 503 instead of hanging."""
    proc, url = server
    tail = next(p for p in children(proc.pid) if "--name tail" in cmdline(p))
    os.kill(tail, signal.SIGSTOP)
    try:
        started = time.monotonic()
        with pytest.raises(openai.APIStatusError) as info:
            client(url).chat.completions.create(
                model=tiny_llama.name,
                max_tokens=4,
                messages=[{"role": "user", "content": "anyone there?"}],
            )
        assert info.value.status_code == 503 and time.monotonic() - started < 30
        r = httpx.get(f"{url}/health", timeout=30)
        assert r.status_code == 503 and error_of(r)["code"] == "ring_down"
    finally:
        os.kill(tail, signal.SIGCONT)
