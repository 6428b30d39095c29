"""Continuous batching: the scheduler's decisions, and many requests through real rings."""

from __future__ import annotations

import json
import random
import subprocess
import sys

import mlx.core as mx
import pytest
from mlx_lm import load as mlx_lm_load
from mlx_lm.generate import generate_step

from mlxring.engine.request import SamplingParams, Sequence
from mlxring.engine.scheduler import Scheduler


def seq(prompt_len: int, max_tokens: int = 4) -> Sequence:
    return Sequence(list(range(3, 3 + prompt_len)), SamplingParams(max_tokens=max_tokens))


def test_prefill_is_chunked_and_interleaved_with_decode():
    s = Scheduler(max_batch=4, prefill_chunk=4, num_groups=1)
    a, b = seq(3), seq(11)
    s.add(a)
    step = s.next_step()
    assert step.kind == "prefill" and step.inputs == [a.prompt[:2]] and step.new
    s.complete(step, [])
    s.add(b)
    kinds = []
    for _ in range(6):
        step = s.next_step()
        kinds.append(step.kind)
        s.complete(step, [7] * len(step.seqs))
    assert kinds[:4] == ["decode", "prefill", "decode", "prefill"]  # b chunks between a steps
    assert b.prefilled == 10 and len(a.tokens) >= 2


def test_admission_is_fifo_up_to_max_batch_and_refills_on_finish():
    s = Scheduler(max_batch=2, prefill_chunk=64, num_groups=2)
    seqs = [seq(1, max_tokens=2) for _ in range(3)]  # one-token prompts: straight to decode
    for x in seqs:
        s.add(x)
    step = s.next_step()
    assert s.live == 2 and list(s.waiting) == [seqs[2]]
    assert step.kind == "decode" and step.admit == [seqs[0].id]
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
