"""The head's engine over real shards (2 stages, the second run in process by LocalStages):
its cached status, the bounded queue and KV budget, the failure path, sampling seeds."""

from __future__ import annotations

import threading
import time

import mlx.core as mx
import pytest
from chain import tokenizer_of
from mlx_lm import load as mlx_lm_load
from mlx_lm.generate import generate_step

from mlxring.cluster.config import EngineConfig
from mlxring.crypto.link import IntegrityError
from mlxring.engine.engine import Engine, _Probe
from mlxring.engine.handle import EngineBusy, RequestTooLarge, RingDown
from mlxring.engine.local import LocalStages
from mlxring.engine.request import SamplingParams, Sequence
from mlxring.engine.scheduler import Scheduler
from mlxring.ring.transport import PeerLost
from mlxring.shards import load_shard

NODES = ["head", "tail"]
SPLIT = 3  # head: layers [0, 3), tail: [3, 6)


@pytest.fixture(scope="module")
def shards(tiny_llama):
    return load_shard(tiny_llama, 0, SPLIT, True), load_shard(tiny_llama, SPLIT, 6, False)


@pytest.fixture(scope="module")
def oracle(tiny_llama):
    """Greedy tokens of mlx-lm's full model: what every request must equal."""
    model, _ = mlx_lm_load(str(tiny_llama))

    def solo(prompt: list[int], max_tokens: int) -> list[int]:
        steps = generate_step(mx.array(prompt), model, max_tokens=max_tokens)
        return [int(t) for t, _ in steps]

    return solo


def engine_over(shards, tiny_llama, stages: LocalStages | None = None, **config) -> Engine:
    head, tail = shards
    stages = stages if stages is not None else LocalStages([tail])
    tokenizer = tokenizer_of(str(tiny_llama))
    engine = Engine(head, stages, tokenizer, EngineConfig(**config), node_names=NODES)
    stages.engine = engine
    return engine


def drain(handles, timeout: float = 60) -> list[list]:
    """Every handle's events, each consumed on its own thread; fails if any hangs."""
    events: list[list] = [[] for _ in handles]

    def consume(i: int) -> None:
        events[i].extend(handles[i])

    threads = [
        threading.Thread(target=consume, args=(i,), daemon=True) for i in range(len(handles))
    ]
    for t in threads:
        t.start()
    deadline = time.monotonic() + timeout
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    hung = [i for i, t in enumerate(threads) if t.is_alive()]
    assert not hung, f"requests {hung} got no final event within {timeout} s"
    return events


def tokens(events) -> list[int]:
    return [e.token for e in events if e.token is not None]


def wait_for(condition, timeout: float = 30, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        assert time.monotonic() < deadline, f"no {what} within {timeout} s"
        time.sleep(0.01)
    return value


def prompts(count: int, length: int, first: int = 5) -> list[list[int]]:
    return [[(first + 7 * i + j) % 300 + 3 for j in range(length)] for i in range(count)]


class Recording(LocalStages):
    """LocalStages that records, at every send, the message and the engine's state."""

    engine: Engine | None = None

    def __init__(self, shards):
        super().__init__(shards)
        self.ops: list[str] = []
        self.in_flight: list[int] = []  # steps in flight when one more step was sent
        self.probes: list[int] = []  # probes in flight (this one too) when one was sent
        self.kv: list[int] = []  # the scheduler's KV tokens at each step
        self.live: list[int] = []

    def send(self, meta, tensors=None, micro_batch=0, layers=(0, 0)):
        self.ops.append(meta.get("op"))
        if self.engine is not None:
            probes = sum(1 for p in self.engine.in_flight if isinstance(p, _Probe))
            if meta.get("op") == "stats":
                self.probes.append(probes + 1)
            else:
                self.in_flight.append(len(self.engine.in_flight) - probes)
            if meta.get("op") == "step":
                self.kv.append(self.engine.scheduler.kv_tokens)
                self.live.append(self.engine.scheduler.live)
        super().send(meta, tensors, micro_batch, layers)


# --- status --------------------------------------------------------------------------


def test_status_is_a_cached_snapshot_the_engine_refreshes(shards, tiny_llama):
    stages = Recording([shards[1]])
    engine = engine_over(shards, tiny_llama, stages)
    engine.status_interval = 0.3
    try:
        first = wait_for(lambda: engine.status()["stages"] and engine.status(), what="snapshot")
        assert [s["layers"] for s in first["stages"]] == [[0, SPLIT], [SPLIT, 6]]  # head first
        assert first["live"] == 0 and first["waiting"] == 0 and first["updated"] > 0
        probes = stages.ops.count("stats")
        started = time.monotonic()
        snapshots = [engine.status() for _ in range(500)]
        elapsed = time.monotonic() - started
        # one probe per interval at most, however many callers: none of these asked the ring
        assert stages.ops.count("stats") - probes <= 1 + elapsed / 0.3
        assert len({s["updated"] for s in snapshots}) <= 2 + elapsed / 0.3
        snapshots[0]["stages"][0]["layers"] = "changed"  # a copy: the cache is the engine's
        assert engine.status()["stages"][0]["layers"] == [0, SPLIT]
        # it refreshes by itself
        wait_for(lambda: engine.status()["updated"] > first["updated"], 5, what="refresh")
        # a request shows up in a later snapshot
        handle = engine.submit([5, 6, 7, 8], SamplingParams(max_tokens=400, ignore_eos=True))

        def decoding() -> dict | None:
            status = engine.status()
            stages_hold_it = all(stage["sequences"] for stage in status["stages"])
            return status if status["live"] == 1 and stages_hold_it else None

        busy = wait_for(decoding, 10, what="live request in the snapshot")
        assert busy["stages"][1]["cache_bytes"] > 0
        handle.cancel()
        assert drain([handle])[0][-1].finish_reason == "cancelled"
        # stats() waits for a snapshot taken after the cleanup of what finished before it
        after = engine.stats(10)
        assert [s["sequences"] for s in after] == [[], []]
        assert [s["cache_bytes"] for s in after] == [0, 0]
        assert all(n < engine.depth for n in stages.in_flight)  # steps: never beyond the depth
        assert max(stages.probes) == 1  # and at most one probe besides them
    finally:
        engine.close()
    with pytest.raises(RingDown, match="closed"):
        engine.submit([5, 6], SamplingParams(max_tokens=2))


@pytest.mark.parametrize("mode", ["pipelined", "lockstep"])
def test_probes_ride_behind_the_steps_and_outputs_equal_solo_runs(shards, tiny_llama, oracle, mode):
    """A probe takes no step's place (a long step would idle the head): steps fill the
    depth, and at most one probe rides behind them."""
    stages = Recording([shards[1]])
    engine = engine_over(shards, tiny_llama, stages, mode=mode, max_batch=4)
    engine.status_interval = 0.0  # a probe as often as the pipeline lets one go
    try:
        ps = prompts(8, 9)
        handles = [engine.submit(p, SamplingParams(max_tokens=6, ignore_eos=True)) for p in ps]
        results = drain(handles)
        stats = engine.stats(10)
    finally:
        engine.close()
    assert [tokens(r) for r in results] == [oracle(p, 6) for p in ps]
    assert stages.ops.count("stats") > 3 and stages.ops.count("step") > 3
    assert max(stages.in_flight) == engine.depth - 1  # the pipeline filled, never beyond
    assert max(stages.probes) == 1
    assert [s["sequences"] for s in stats] == [[], []]


# --- the bounded queue and the KV budget ---------------------------------------------


class Gated(LocalStages):
    """LocalStages whose sends wait for `gate`: the engine stays busy while it is shut."""

    def __init__(self, shards):
        super().__init__(shards)
        self.gate = threading.Event()

    def send(self, meta, tensors=None, micro_batch=0, layers=(0, 0)):
        assert self.gate.wait(60)
        super().send(meta, tensors, micro_batch, layers)


def test_submit_past_max_waiting_raises_engine_busy(shards, tiny_llama):
    stages = Gated([shards[1]])
    engine = engine_over(shards, tiny_llama, stages, max_waiting=3)
    try:
        params = SamplingParams(max_tokens=3, ignore_eos=True)
        handles = [engine.submit([5, 6, 7], params) for _ in range(3)]  # the loop is held
        assert engine.waiting == 3
        with pytest.raises(EngineBusy, match="queue is full.*retry"):
            engine.submit([5, 6, 7], params)
        stages.gate.set()
        results = drain(handles)
        assert [e[-1].finish_reason for e in results] == ["length"] * 3
        assert engine.waiting == 0
        assert tokens(drain([engine.submit([5, 6, 7], params)])[0]) == tokens(results[0])
    finally:
        stages.gate.set()
        engine.close()


def test_the_kv_budget_holds_admissions_and_everything_finishes(shards, tiny_llama, oracle):
    stages = Recording([shards[1]])
    # each request needs 10 + 6 = 16 KV tokens: the budget holds two live at once
    engine = engine_over(shards, tiny_llama, stages, max_batch=16, max_kv_tokens=40)
    try:
        ps = prompts(6, 10, first=11)
        handles = [engine.submit(p, SamplingParams(max_tokens=6, ignore_eos=True)) for p in ps]
        results = drain(handles)
    finally:
        engine.close()
    assert [tokens(r) for r in results] == [oracle(p, 6) for p in ps]
    assert max(stages.kv) <= 40 and max(stages.live) == 2  # the budget, not max_batch, held
    assert engine.scheduler.kv_tokens == 0 and engine.waiting == 0


def test_a_request_larger_than_the_whole_budget_is_refused(shards, tiny_llama, oracle):
    engine = engine_over(shards, tiny_llama, max_kv_tokens=40)
    try:
        with pytest.raises(RequestTooLarge, match=r"needs 50 KV tokens.*max_kv_tokens") as err:
            engine.submit(list(range(3, 33)), SamplingParams(max_tokens=20))
        assert isinstance(err.value, ValueError)  # the API answers 400
        with pytest.raises(RequestTooLarge):  # the engine's default max_tokens counts too
            engine.submit([5, 6, 7], SamplingParams())
        ok = engine.submit(list(range(3, 23)), SamplingParams(max_tokens=20, ignore_eos=True))
        assert tokens(drain([ok])[0]) == oracle(list(range(3, 23)), 20)  # exactly the budget
    finally:
        engine.close()


def test_scheduler_budget_and_lone_drops():
    s = Scheduler(max_batch=8, prefill_chunk=4, num_groups=2, max_kv_tokens=30)
    a, b = (Sequence(list(range(3, 13)), SamplingParams(max_tokens=10)) for _ in range(2))
    with pytest.raises(ValueError, match="whole budget"):
        s.add(Sequence(list(range(3, 30)), SamplingParams(max_tokens=10)))
    s.add(a)
    s.add(b)
    step = s.next_step()
    assert s.live == 1 and list(s.waiting) == [b] and s.kv_tokens == 20  # b waits: 40 > 30
    s.cancel(a)  # in flight: freed when its chunk comes back
    s.complete(step, [])
    assert s.kv_tokens == 0 and s.to_drop == [a.id]
    step = s.next_step()  # b is admitted, and a's drop rides on its first chunk
    assert step.prefill == [b] and not step.seqs and step.drop == [a.id] and s.kv_tokens == 20
    s.complete(step, [])
    s.cancel(b)  # alone, between chunks: its drop still goes, on an empty step
    drop = s.next_step()
    assert drop.drop == [b.id] and drop.seqs == [] and s.idle and s.kv_tokens == 0


# --- the failure path ----------------------------------------------------------------


class Failing(LocalStages):
    """LocalStages that loses the tail (rank 1) at step `after`."""

    def __init__(self, shards, after: int):
        super().__init__(shards)
        self.after, self.steps = after, 0

    def send(self, meta, tensors=None, micro_batch=0, layers=(0, 0)):
        if meta.get("op") == "step":
            self.steps += 1
            if self.steps == self.after:
                raise PeerLost("lost the connection to rank 1 (connection to a peer was lost)")
        super().send(meta, tensors, micro_batch, layers)


def check_failed(results, what: str) -> None:
    for i, events in enumerate(results):
        finals = [e for e in events if e.finish_reason]
        assert len(finals) == 1 and events[-1] is finals[0], f"request {i}: {events[-3:]}"
        assert finals[0].finish_reason == "error" and what in finals[0].error, finals[0]


def test_every_request_fails_once_when_a_stage_fails_mid_run(shards, tiny_llama):
    engine = engine_over(shards, tiny_llama, Failing([shards[1]], after=40), max_batch=8)
    params = SamplingParams(max_tokens=200, ignore_eos=True)
    handles = [engine.submit(p, params) for p in prompts(12, 7)]
    late, refused = [], []
    lock = threading.Lock()

    def keep_submitting() -> None:  # concurrent submits while the engine dies
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                handle = engine.submit([5, 6, 7, 8, 9], params)
            except EngineBusy:
                time.sleep(0.01)
                continue
            except RingDown as e:
                with lock:
                    refused.append(str(e))
                return
            with lock:
                late.append(handle)
            time.sleep(0.002)

    submitters = [threading.Thread(target=keep_submitting) for _ in range(4)]
    for t in submitters:
        t.start()
    for t in submitters:
        t.join(60)
    try:
        results = drain(handles + late, timeout=30)
        named = "node 'tail' (rank 1)"
        check_failed(results, named)
        assert len(refused) == 4 and all(named in r for r in refused)  # every submitter's
        assert late  # and some got in before the failure: they failed like the others
        with pytest.raises(RingDown, match=r"the ring is down: lost the connection to node 'tail'"):
            engine.submit([5, 6, 7], params)
        with pytest.raises(RuntimeError):  # RingDown is a RuntimeError for older callers
            engine.submit([5, 6, 7], params)
        with pytest.raises(RingDown, match="node 'tail'"):
            engine.stats(5)
        assert isinstance(engine.error, PeerLost) and named in engine.failure
        time.sleep(0.1)
        assert all(h._queue.empty() for h in handles + late)  # nothing after the final event
    finally:
        engine.close()


class Frozen(LocalStages):
    """LocalStages whose answers wait for `gate`: a frozen rank, the head stuck receiving."""

    def __init__(self, shards):
        super().__init__(shards)
        self.gate = threading.Event()

    def recv(self):
        assert self.gate.wait(60)
        return super().recv()


def test_a_frozen_stage_fails_every_request_after_the_step_timeout(shards, tiny_llama):
    stages = Frozen([shards[1]])
    stages.gate.set()
    engine = engine_over(shards, tiny_llama, stages, step_timeout=1.0)
    try:
        params = SamplingParams(max_tokens=300, ignore_eos=True)
        first = engine.submit([5, 6, 7, 8], params)
        wait_for(lambda: engine.steps_done > 3, what="steps")
        stages.gate.clear()  # the tail freezes: the engine thread blocks receiving
        more = [engine.submit(p, params) for p in prompts(3, 4)]
        started = time.monotonic()
        results = drain([first, *more], timeout=30)
        assert time.monotonic() - started < 15
        check_failed(results, "no answer from the ring")
        with pytest.raises(RingDown, match="frozen or unreachable"):
            engine.submit([5, 6], params)
        assert tokens(results[0])  # it had streamed tokens before the ring froze
        stages.gate.set()  # the stuck send goes through: nothing more reaches the handles
        engine.thread.join(10)
        assert not engine.thread.is_alive()
        assert all(h._queue.empty() for h in [first, *more])
    finally:
        stages.gate.set()
        engine.close()


def test_close_finishes_every_submitted_request(shards, tiny_llama, oracle):
    engine = engine_over(shards, tiny_llama, mode="lockstep", max_batch=2)
    ps = prompts(4, 6)
    handles = [engine.submit(p, SamplingParams(max_tokens=5, ignore_eos=True)) for p in ps]
    engine.close()
    results = drain(handles, timeout=10)
    assert [tokens(r) for r in results] == [oracle(p, 5) for p in ps]
    assert [r[-1].finish_reason for r in results] == ["length"] * 4


# --- sampling seeds ------------------------------------------------------------------


def test_seeds_given_repeat_and_unseeded_runs_differ(shards, tiny_llama):
    engine = engine_over(shards, tiny_llama)
    prompt = [5, 9, 14, 22, 31]
    try:

        def run(**params) -> list[int]:
            sp = SamplingParams(max_tokens=12, temperature=1.0, ignore_eos=True, **params)
            return tokens(drain([engine.submit(prompt, sp)])[0])

        unseeded = [run() for _ in range(3)]
        assert len({tuple(t) for t in unseeded}) == 3  # a fresh random seed each time
        assert run(seed=1234) == run(seed=1234)
        assert run(seed=2**64 - 1) == run(seed=2**64 - 1)
        assert run(seed=0) != run(seed=1)
    finally:
        engine.close()
    # not derived from the request's id (ids are sequential: seeds from them are guessable)
    seq = Sequence([5, 6], SamplingParams(temperature=1.0))
    assert not mx.array_equal(seq.key, mx.random.key(seq.id * 7919))
    for bad in (-1, 2**64, 1.5, "7", True):
        with pytest.raises(ValueError, match="seed"):
            SamplingParams(seed=bad)


class Tampered(LocalStages):
    """LocalStages whose answer to step `after` fails authentication, as a flipped byte on
    the head's inbound link does (the channel raises IntegrityError on receive)."""

    def __init__(self, shards, after: int):
        super().__init__(shards)
        self.after, self.received = after, 0

    def recv(self):
        self.received += 1
        if self.received == self.after:
            raise IntegrityError("a message from rank 1 failed authentication (tampered)")
        return super().recv()


def test_an_integrity_error_fails_the_engine_instead_of_latching(shards, tiny_llama):
    """The head's loop ends on a tampered message: requests get the error, `submit` says
    the ring is down, and the serve job can then exit so that the launcher restarts it."""
    engine = engine_over(shards, tiny_llama, Tampered([shards[1]], after=5), max_batch=4)
    params = SamplingParams(max_tokens=50, ignore_eos=True)
    handles = [engine.submit(p, params) for p in prompts(3, 6)]
    try:
        check_failed(drain(handles, timeout=30), "failed authentication")
        assert isinstance(engine.error, IntegrityError)
        with pytest.raises(RingDown, match="failed authentication"):
            engine.submit([5, 6, 7], params)
        engine.thread.join(timeout=10)
        assert not engine.thread.is_alive()  # the loop ended; nothing keeps waiting on it
    finally:
        engine.close()
