"""Continuous batching: the scheduler's decisions, and many requests through real rings."""

from __future__ import annotations

import json
import random
import subprocess
import sys

import mlx.core as mx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from mlx_lm import load as mlx_lm_load
from mlx_lm.generate import generate_step

from mlxring.engine.request import SamplingParams, Sequence
from mlxring.engine.scheduler import Scheduler


def seq(prompt_len: int, max_tokens: int = 4) -> Sequence:
    return Sequence(list(range(3, 3 + prompt_len)), SamplingParams(max_tokens=max_tokens))


def test_prefill_chunks_ride_along_with_decode_within_the_token_budget():
    s = Scheduler(max_batch=4, prefill_chunk=4, num_groups=1, token_budget=3)
    a, b = seq(3, max_tokens=10), seq(11)
    s.add(a)
    step = s.next_step()
    assert not step.seqs and step.prefill == [a] and step.prefill_inputs == [a.prompt[:2]]
    assert step.new == [a.id]
    s.complete(step, [])
    s.add(b)
    for i in range(5):  # each step: a's decode token and 2 of b's prompt tokens
        step = s.next_step()
        assert step.seqs == [a] and step.prefill == [b] and step.tokens == 3
        assert step.prefill_inputs == [b.prompt[2 * i : 2 * i + 2]]
        s.complete(step, [7])
    assert b.prefilled == 10 and len(a.tokens) == 5 and b.group == 0
    step = s.next_step()
    assert step.admit == [b.id] and step.seqs == [a, b] and not step.prefill


def test_steps_in_flight_share_the_prefill_evenly():
    """8 prompts of 32 tokens over 2 groups, budget 64: each step prefills two prompts
    together (62 tokens), so the two stages of a pipeline get equal work."""
    s = Scheduler(max_batch=8, prefill_chunk=512, num_groups=2, token_budget=64)
    prompts = [seq(32, max_tokens=2) for _ in range(8)]
    for p in prompts:
        s.add(p)
    first, second = s.next_step(), s.next_step()
    assert {first.group, second.group} == {0, 1} and s.next_step() is None
    for step in (first, second):
        assert len(step.prefill) == 2 and step.tokens == 62 and step.new
    # the share shrinks with what is left: never one big step and one empty one
    s = Scheduler(max_batch=8, prefill_chunk=512, num_groups=2, token_budget=512)
    for p in [seq(32) for _ in range(8)]:
        s.add(p)
    assert [s.next_step().tokens, s.next_step().tokens] == [124, 124]


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.tuples(st.integers(1, 40), st.integers(1, 6)), min_size=1, max_size=12),
    st.integers(1, 3),
    st.integers(1, 48),
    st.integers(1, 16),
)
def test_any_workload_is_prefilled_once_within_budget(requests, groups, budget, chunk):
    s = Scheduler(max_batch=5, prefill_chunk=chunk, num_groups=groups, token_budget=budget)
    seqs = [seq(p, m) for p, m in requests]
    for x in seqs:
        s.add(x)
    fed: dict[int, list[int]] = {x.id: [] for x in seqs}
    in_flight = []
    for _ in range(10_000):
        while (step := s.next_step()) is not None:
            assert step.tokens <= max(budget, len(step.seqs))
            members = {x.id for st in in_flight for x in [*st.seqs, *st.prefill]}
            assert not members & {x.id for x in [*step.seqs, *step.prefill]}
            for x, chunk_ in zip(step.prefill, step.prefill_inputs):
                fed[x.id] += chunk_
            in_flight.append(step)
        if not in_flight:
            break
        done = in_flight.pop(0)
        s.complete(done, [9] * len(done.seqs))
    assert s.idle and all(x.finish_reason == "length" for x in seqs)
    for x in seqs:  # every prompt token but the last, in order, once
        assert fed[x.id] == x.prompt[:-1]


def test_admission_is_fifo_up_to_max_batch_and_refills_on_finish():
    s = Scheduler(max_batch=2, prefill_chunk=64, num_groups=2)
    seqs = [seq(1, max_tokens=2) for _ in range(3)]  # one-token prompts: straight to decode
    for x in seqs:
        s.add(x)
    step = s.next_step()
    assert s.live == 2 and list(s.waiting) == [seqs[2]]
    assert not step.prefill and step.admit == [seqs[0].id]
    other = s.next_step()
    assert other.group != step.group and other.admit == [seqs[1].id]  # disjoint groups
    assert s.next_step() is None  # both groups in flight
    s.complete(step, [5])
    s.complete(other, [5])
    for _ in range(2):
        st = s.next_step()
        s.complete(st, [5] * len(st.seqs))
    assert seqs[0].finish_reason == "length" and seqs[2] not in s.waiting  # admitted on finish


def test_cancel_evicts_on_the_next_step_of_its_group():
    s = Scheduler(max_batch=4, prefill_chunk=64, num_groups=1)
    a, b = seq(1, 10), seq(1, 10)
    s.add(a)
    s.add(b)
    st = s.next_step()
    s.complete(st, [5, 5])
    s.cancel(a)
    st = s.next_step()
    assert st.evict == [a.id] and [x.id for x in st.seqs] == [b.id]
    assert a.finish_reason == "cancelled"


# --- through real rings --------------------------------------------------------


def launch(model, ranks: int, job: str, opts: dict) -> dict:
    code = (
        "import io, sys, json\nfrom mlxring.cluster.launch import launch_job\nbuf = io.BytesIO()\n"
        f"rc = launch_job(None, {ranks}, sys.argv[1], {job!r}, json.loads(sys.argv[2]), buf)\n"
        "sys.stdout.write(buf.getvalue().decode()); sys.exit(rc)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(model), json.dumps(opts)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def requests_and_solo(tiny_llama):
    """16 requests of different prompt lengths and max_tokens, and each one's solo tokens."""
    rng = random.Random(3)
    reqs = [
        {
            "prompt": [rng.randrange(3, 380) for _ in range(rng.randrange(1, 40))],
            "max_tokens": rng.randrange(3, 14),
        }
        for _ in range(16)
    ]
    model, _ = mlx_lm_load(str(tiny_llama))
    solo = []
    for r in reqs:
        steps = generate_step(mx.array(r["prompt"]), model, max_tokens=r["max_tokens"])
        tokens = []
        for t, _ in steps:
            tokens.append(int(t))
            if int(t) == 2:  # eos ends a request, as in the engine
                break
        solo.append(tokens)
    return reqs, solo


@pytest.mark.parametrize("ranks, mode", [(2, "pipelined"), (3, "pipelined"), (2, "lockstep")])
def test_16_concurrent_requests_equal_their_solo_runs(tiny_llama, requests_and_solo, ranks, mode):
    reqs, solo = requests_and_solo
    out = launch(
        tiny_llama, ranks, "batch", {"requests": reqs, "engine": {"mode": mode, "max_batch": 16}}
    )
    for i, (result, want) in enumerate(zip(out["results"], solo)):
        assert result["tokens"] == want, f"request {i} differs from its solo run"
    assert all(stage["sequences"] == [] for stage in out["stats"])  # everything freed


def test_admissions_happen_while_others_decode(tiny_llama, requests_and_solo):
    reqs, solo = requests_and_solo
    out = launch(tiny_llama, 2, "batch", {"requests": reqs, "engine": {"max_batch": 4}})
    results = out["results"]
    assert [r["tokens"] for r in results] == solo
    # a request admitted later got its first token while an earlier one was still decoding
    interleaved = [
        (i, j)
        for i, a in enumerate(results)
        for j, b in enumerate(results)
        if a["ticks"][0] < b["ticks"][0] < a["ticks"][-1] and j >= 4
    ]
    assert interleaved, "no admission happened while another request was decoding"


def test_a_cancelled_request_frees_its_cache_on_every_rank(tiny_llama):
    reqs = [{"prompt": list(range(5, 25)), "max_tokens": 40} for _ in range(3)]
    out = launch(tiny_llama, 3, "batch", {"requests": reqs, "cancel": {"1": 3}})
    cancelled = out["results"][1]
    assert cancelled["finish_reason"] == "cancelled" and 3 <= len(cancelled["tokens"]) < 40
    assert [r["finish_reason"] for r in out["results"][::2]] == ["length", "length"]
    assert len(out["stats"]) == 3  # one report per rank
    for stage in out["stats"]:
        assert stage["sequences"] == [] and stage["cache_bytes"] == 0
