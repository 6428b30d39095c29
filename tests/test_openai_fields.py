"""OpenAI request fields on a real 2-rank ring, through the official `openai` client: tool
calls written by a model trained to make one (tests/toolmodel.py), logprobs against
mlx-lm's own log_softmax of the same checkpoint, n choices, logit_bias, and replies free
of end and special tokens."""

from __future__ import annotations

import json

import httpx
import mlx.core as mx
import numpy as np
import openai
import pytest
from mlx_lm import load as mlx_lm_load

from mlxring.cluster.config import EngineConfig
from mlxring.engine.detok import Detok
from mlxring.engine.engine import Engine
from mlxring.engine.request import SamplingParams
from mlxring.model.tokenizer import encode_prompt, hidden_ids, load_tokenizer
from mlxring.shards import load_shard
from mlxring.tiny.make import make_tiny
from tests.ringutil import free_port, launch_serving, stop_launcher, two_node_config
from tests.toolmodel import ANSWER, ARGUMENTS, QUESTION, RESULT, WEATHER, make_tool_model


@pytest.fixture(scope="module")
def tool_model(tmp_path_factory):
    return make_tool_model(tmp_path_factory.mktemp("tool-model") / "tiny-tools")


@pytest.fixture(scope="module")
def url(tool_model, tmp_path_factory):
    port = free_port()
    header = f"name: fields\napi: {{port: {port}}}\n"
    config = two_node_config(tmp_path_factory.mktemp("fields"), header)
    proc = launch_serving(config, tool_model)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        stop_launcher(proc)


@pytest.fixture()
def client(url):
    return openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)


ASK = [{"role": "user", "content": QUESTION}]
LAYERS = 4  # every family's tiny checkpoint (Gemma 4 shares KV from its last layers)


def test_a_tool_call_round_trip(client, tool_model):
    """The model writes the call's text for real; the server parses it into `tool_calls`;
    the tool's result goes back and the model answers from it."""
    first = client.chat.completions.create(
        model=tool_model.name, messages=ASK, tools=[WEATHER], max_tokens=64, temperature=0
    )
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == ARGUMENTS
    messages = [
        *ASK,
        choice.message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": RESULT},
    ]
    second = client.chat.completions.create(
        model=tool_model.name, messages=messages, tools=[WEATHER], max_tokens=64, temperature=0
    )
    assert second.choices[0].message.content == ANSWER
    assert second.choices[0].finish_reason == "stop"  # on <|end|>, which it never shows


def test_a_streamed_tool_call_comes_whole_in_one_delta(client, tool_model):
    chunks = list(
        client.chat.completions.create(
            model=tool_model.name,
            messages=ASK,
            tools=[WEATHER],
            max_tokens=64,
            stream=True,
            temperature=0,
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    calls = [tc for c in chunks if c.choices for tc in c.choices[0].delta.tool_calls or ()]
    assert text == "" and "<tool_call>" not in text
    assert [tc.function.name for tc in calls] == ["get_weather"]
    assert json.loads(calls[0].function.arguments) == ARGUMENTS
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_without_tools_the_call_is_plain_text_and_tool_choice_none_hides_them(client, tool_model):
    bare = client.chat.completions.create(model=tool_model.name, messages=ASK, max_tokens=64)
    assert bare.choices[0].message.tool_calls is None
    none = client.chat.completions.create(
        model=tool_model.name, messages=ASK, tools=[WEATHER], tool_choice="none", max_tokens=64
    )
    assert none.choices[0].message.tool_calls is None
    assert none.choices[0].finish_reason in ("stop", "length")


@pytest.fixture(scope="module")
def oracle(tool_model):
    """mlx-lm's own model of the checkpoint: greedy tokens and each step's log_softmax."""
    model, _ = mlx_lm_load(str(tool_model))
    tokenizer = load_tokenizer(tool_model)

    def run(prompt: list[int], steps: int) -> tuple[list[int], list[np.ndarray]]:
        tokens, rows = [], []
        for _ in range(steps):
            logits = model(mx.array([prompt + tokens]))[0, -1].astype(mx.float32)
            row = np.array(logits - mx.logsumexp(logits))
            rows.append(row)
            tokens.append(int(row.argmax()))
        return tokens, rows

    return tokenizer, run


def test_logprobs_equal_mlx_lm_log_softmax(client, tool_model, oracle):
    tokenizer, run = oracle
    prompt = tokenizer.encode("the weather", add_special_tokens=False)
    reply = client.completions.create(
        model=tool_model.name, prompt=prompt, max_tokens=6, temperature=0, logprobs=3
    )
    chat = client.chat.completions.create(
        model=tool_model.name,
        messages=ASK,
        max_tokens=5,
        temperature=0,
        logprobs=True,
        top_logprobs=4,
    )
    tokens, rows = run(prompt, 6)
    got = reply.choices[0].logprobs
    assert len(got.token_logprobs) == 6
    for step, (token, row) in enumerate(zip(tokens, rows)):
        assert got.tokens[step] == tokenizer.decode([token])
        assert abs(got.token_logprobs[step] - row[token]) < 1e-4
        top = sorted(got.top_logprobs[step].values(), reverse=True)
        assert np.allclose(top, np.sort(row)[::-1][: len(top)], atol=1e-4)
    chat_prompt = list(tokenizer.apply_chat_template(ASK, add_generation_prompt=True))
    tokens, rows = run(chat_prompt, 5)
    content = chat.choices[0].logprobs.content
    assert len(content) == 5
    for entry, token, row in zip(content, tokens, rows):
        assert entry.token == tokenizer.decode([token])
        assert abs(entry.logprob - row[token]) < 1e-4
        assert len(entry.top_logprobs) == 4
        assert abs(entry.top_logprobs[0].logprob - row.max()) < 1e-4
        assert bytes(entry.bytes).decode() == entry.token


def test_n_choices_are_independent_sequences(client, tool_model):
    greedy = client.chat.completions.create(
        model=tool_model.name, messages=ASK, max_tokens=8, temperature=0, n=3
    )
    assert [c.index for c in greedy.choices] == [0, 1, 2]
    assert len({c.message.content for c in greedy.choices}) == 1
    # the greedy reply (the tool call's text) is longer than 8 tokens: 8 each
    assert [c.finish_reason for c in greedy.choices] == ["length"] * 3
    assert greedy.usage.completion_tokens == 3 * 8

    def sampled():
        return client.chat.completions.create(
            model=tool_model.name,
            messages=[{"role": "user", "content": "tell"}],
            max_tokens=12,
            temperature=1.5,
            n=4,
            seed=7,
        )

    first, again = sampled(), sampled()
    texts = [c.message.content for c in first.choices]
    assert texts == [c.message.content for c in again.choices]  # seed + i repeats
    assert len(set(texts)) > 1  # the choices differ
    streamed = client.chat.completions.create(
        model=tool_model.name, messages=ASK, max_tokens=8, temperature=0, n=2, stream=True
    )
    by_index: dict[int, str] = {}
    for chunk in streamed:
        for c in chunk.choices:
            by_index[c.index] = by_index.get(c.index, "") + (c.delta.content or "")
    assert by_index == {0: greedy.choices[0].message.content, 1: greedy.choices[0].message.content}


def test_logit_bias_moves_the_greedy_choice(client, tool_model):
    tokenizer = load_tokenizer(tool_model)
    forced = tokenizer.encode(" sunny", add_special_tokens=False)[0]
    reply = client.completions.create(
        model=tool_model.name,
        prompt="x",
        max_tokens=4,
        temperature=0,
        logit_bias={str(forced): 100},
        logprobs=0,
    )
    assert reply.choices[0].logprobs.tokens == [tokenizer.decode([forced])] * 4
    # greedy: a sampled first token may be one that shows no text (an end token)
    plain = client.completions.create(
        model=tool_model.name, prompt="x", max_tokens=1, temperature=0
    )
    assert plain.choices[0].text, "the greedy first token shows no text: pick another prompt"
    first = tokenizer.encode(plain.choices[0].text, add_special_tokens=False)[0]
    banned = client.completions.create(
        model=tool_model.name,
        prompt="x",
        max_tokens=1,
        temperature=0,
        logit_bias={str(first): -100},
    )
    assert banned.choices[0].text != plain.choices[0].text


def test_context_length_on_completions_names_the_prompt(url, tool_model):
    r = httpx.post(
        f"{url}/v1/completions",
        json={"model": tool_model.name, "prompt": "x", "max_tokens": 100_000},
        timeout=30,
    )
    assert r.status_code == 400
    assert r.json()["error"]["param"] == "prompt"
    assert r.json()["error"]["code"] == "context_length_exceeded"


def test_tools_for_a_model_without_a_tool_format_are_400(tiny_llama):
    """The tiny Llama's template renders no tools: a clear 400, not a silent drop."""
    from fastapi.testclient import TestClient

    from mlxring.server.app import create_app
    from tests.test_api_edge import StubEngine

    tokenizer = load_tokenizer(tiny_llama)
    app = create_app(StubEngine(tokenizer), tokenizer, "m", 512)
    with TestClient(app, base_url="http://127.0.0.1") as c:
        r = c.post("/v1/chat/completions", json={"model": "m", "messages": ASK, "tools": [WEATHER]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "tools"


@pytest.mark.parametrize("family", ["llama", "gpt_oss", "gemma3", "gemma4"])
def test_end_and_special_tokens_never_reach_the_text(family, tmp_path):
    """Each family's checkpoint: its special and end tokens among the ids add no text, and
    a real generation through the engine shows none of them."""
    model = make_tiny(family, tmp_path / family, layers=LAYERS)
    tokenizer = load_tokenizer(model)
    hidden = hidden_ids(tokenizer)
    specials = [t for t in tokenizer.all_special_tokens if t]
    assert {tokenizer.convert_tokens_to_ids(t) for t in specials} <= hidden
    plain = tokenizer.encode("hello world", add_special_tokens=False)
    detok = Detok(tokenizer, ())
    text = ""
    for token in [plain[0], *sorted(hidden), *plain[1:]]:
        text += detok.add(token, False)[0]
    text += detok.add(min(tokenizer.eos_token_ids), True)[0]
    assert text == "hello world"
    engine = Engine(load_shard(model, 0, LAYERS, True), None, tokenizer, EngineConfig())
    try:
        prompt = encode_prompt(tokenizer, "hello")
        events = list(engine.submit(prompt, SamplingParams(max_tokens=24)))
    finally:
        engine.close()
    reply = "".join(e.text for e in events)
    assert not any(s in reply for s in specials), reply


def test_generation_config_end_tokens_stop_generation(tool_model):
    """generation_config.json lists <|end|> beside </s>: both stop."""
    tokenizer = load_tokenizer(tool_model)
    end = tokenizer.convert_tokens_to_ids("<|end|>")
    assert {tokenizer.eos_token_id, end} <= set(tokenizer.eos_token_ids)
