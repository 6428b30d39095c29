"""Load held: 64 concurrent clients on a real launched 2-rank ring (through the launcher's
front), streaming and not, completions and chat, a quarter disconnecting early."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
import time

import httpx
import mlx.core as mx
from mlx_lm import load as mlx_lm_load
from mlx_lm.generate import generate_step

from mlxring.model.tokenizer import encode_prompt
from tests.ringutil import free_port, stop_launcher

KEY = "load-key"
CLIENTS = 64
MAX_TOKENS = 8
WORDS = ["ring", "model", "layer", "token", "cache", "node", "head", "tail", "stage", "batch"]


def launch(tiny_llama, tmp_path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    config = tmp_path / "cluster.yaml"
    config.write_text(
        f"name: load\napi: {{port: {port}, api_keys: [{KEY}]}}\n"
        "batching: {max_batch: 16, prefill_chunk: 64}\nnodes:\n"
        "  - {name: head, host: localhost, memory_gb: 8}\n"
        "  - {name: tail, host: localhost, memory_gb: 8}\n"
    )
    argv = [sys.executable, "-m", "mlxring", "launch", str(config), "--model", str(tiny_llama)]
    proc = subprocess.Popen(
        argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    seen = ""
    while "serving" not in seen:
        line = proc.stderr.readline()
        assert line, f"launch ended: {seen}"
        seen += line
    threading.Thread(target=lambda: proc.stderr.read(), daemon=True).start()
    return proc, f"http://127.0.0.1:{port}"


def requests_of(i: int) -> dict:
    """Client i's request: chat or completion, streamed or not, disconnecting early or not."""
    text = " ".join(WORDS[(i * 7 + k) % len(WORDS)] for k in range(3 + i % 5))
    return {
        "chat": i % 2 == 0,
        "stream": i % 4 < 2,
        "leave": i % 4 == 3,  # a quarter disconnect after a moment
        "text": text,
    }


async def run_client(client: httpx.AsyncClient, model: str, i: int) -> dict:
    spec = requests_of(i)
    body = {"model": model, "temperature": 0, "stream": spec["stream"]}
    body["max_tokens"] = 2000 if spec["leave"] else MAX_TOKENS
    if spec["chat"]:
        body["messages"] = [{"role": "user", "content": spec["text"]}]
        path = "/v1/chat/completions"
    else:
        body["prompt"] = spec["text"]
        path = "/v1/completions"
    if spec["leave"]:
        try:
            await asyncio.wait_for(client.post(path, json=body), timeout=1.5)
        except asyncio.TimeoutError:
            return {"left": True}
        raise AssertionError(f"client {i} should still be generating")
    if not spec["stream"]:
        r = await client.post(path, json=body)
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        return {"text": choice["message"]["content"] if spec["chat"] else choice["text"]}
    texts = []
    async with client.stream("POST", path, json=body) as r:
        assert r.status_code == 200, await r.aread()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            assert '"error"' not in line, line
            chunk = httpx.Response(200, content=line[6:]).json()
            for choice in chunk["choices"]:
                delta = choice.get("delta", {}).get("content") if spec["chat"] else choice["text"]
                texts.append(delta or "")
    return {"text": "".join(texts)}


def solo_text(model, tokenizer, spec: dict) -> str:
    """mlx-lm's greedy text for one client's request, alone."""
    if spec["chat"]:
        ids = encode_prompt(tokenizer, spec["text"])
    else:
        ids = list(tokenizer.encode(spec["text"]))
    tokens = []
    for t, _ in generate_step(mx.array(ids), model, max_tokens=MAX_TOKENS):
        if int(t) in tokenizer.eos_token_ids:
            break
        tokens.append(int(t))
    detok = tokenizer.detokenizer  # mlx-lm's streaming text, as an API client receives it
    detok.reset()
    for token in tokens:
        detok.add_token(token)
    detok.finalize()
    return detok.text


def test_64_clients_no_5xx_solo_outputs_and_everything_freed(tiny_llama, tmp_path):
    proc, url = launch(tiny_llama, tmp_path)
    try:
        headers = {"authorization": f"Bearer {KEY}"}

        async def main() -> list:
            limits = httpx.Limits(max_connections=CLIENTS + 8)
            async with httpx.AsyncClient(
                base_url=url, headers=headers, timeout=300, limits=limits
            ) as client:
                jobs = [run_client(client, tiny_llama.name, i) for i in range(CLIENTS)]
                return await asyncio.gather(*jobs)

        results = asyncio.run(main())
        model, tokenizer = mlx_lm_load(str(tiny_llama))
        finished = 0
        for i, result in enumerate(results):
            if result.get("left"):
                continue
            want = solo_text(model, tokenizer, requests_of(i))
            assert result["text"] == want, f"client {i}: {requests_of(i)}"
            finished += 1
        assert finished == CLIENTS * 3 // 4
        deadline = time.monotonic() + 30  # the disconnected ones are cancelled everywhere
        while time.monotonic() < deadline:
            status = httpx.get(f"{url}/v1/status", headers=headers, timeout=10).json()
            stages = status["stages"]
            if all(not s["sequences"] and s["cache_bytes"] == 0 for s in stages):
                break
            time.sleep(0.5)
        assert [s["sequences"] for s in stages] == [[], []], status
        assert [s["cache_bytes"] for s in stages] == [0, 0]
        metrics = httpx.get(f"{url}/metrics", headers=headers, timeout=10).text
        assert 'status="5' not in metrics  # no 5xx was answered
    finally:
        stop_launcher(proc)
