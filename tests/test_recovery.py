"""A ring that fails is recovered, not latched: real launched rings on loopback, real faults
(SIGKILL, SIGSTOP), the API's port open with 503 + Retry-After while the ring restarts."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from typing import NamedTuple

import httpx

from mlxring.cluster.supervise import REPEATED, RingState
from tests.ringutil import alive, children, cmdline, free_port, stop_launcher

PROMPT = "The ring splits the model"
MAX_TOKENS = 12


class Ring(NamedTuple):
    url: str  # the launcher's API
    model: str  # the served model's name (its directory's)


def launch(tiny_llama, tmp_path, on_failure: str = "restart"):
    """`mlxring launch` of a 2-rank ring (head, tail) with a 4 s step timeout; (proc, ring, log)."""
    port = free_port()
    config = tmp_path / "cluster.yaml"
    config.write_text(
        f"name: rec\non_failure: {on_failure}\napi: {{port: {port}}}\n"
        "batching: {step_timeout: 4}\nnodes:\n"
        "  - {name: head, host: localhost, memory_gb: 8}\n"
        "  - {name: tail, host: localhost, memory_gb: 8}\n"
    )
    argv = [sys.executable, "-m", "mlxring", "launch", str(config), "--model", str(tiny_llama)]
    proc = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    log: list[str] = []
    threading.Thread(target=lambda: log.extend(proc.stderr), daemon=True).start()
    threading.Thread(target=lambda: proc.stdout.read(), daemon=True).start()
    ring = Ring(f"http://127.0.0.1:{port}", tiny_llama.name)
    wait_for_answer(ring, 180)
    return proc, ring, log


def complete(ring: Ring, timeout: float = 60) -> httpx.Response:
    body = {"model": ring.model, "prompt": PROMPT, "max_tokens": MAX_TOKENS, "temperature": 0}
    return httpx.post(f"{ring.url}/v1/completions", json=body, timeout=timeout)


def wait_for_answer(ring: Ring, within: float) -> str:
    """Poll until a completion succeeds; its text. Every answer meanwhile is a 503 with
    Retry-After in OpenAI's shape, never a refused connection."""
    deadline = time.monotonic() + within
    while True:
        try:
            r = complete(ring)
        except httpx.ConnectError:
            r = None  # only before the launcher has bound the port
        if r is not None and r.status_code == 200:
            body = r.json()
            return body["choices"][0]["text"] if "choices" in body else body
        if r is not None:
            assert r.status_code == 503, r.text
            assert r.headers["retry-after"] and r.json()["error"]["code"] == "ring_down"
        assert time.monotonic() < deadline, f"no answer within {within} s"
        time.sleep(0.5)


def rank_pid(proc: subprocess.Popen, name: str) -> int:
    return next(p for p in children(proc.pid) if f"--name {name}" in cmdline(p))


def stream_until_end(ring: Ring, out: dict, i: int) -> None:
    """One streaming request; records how it ended ("done", "error" or an exception)."""
    body = {
        "model": ring.model,
        "prompt": PROMPT,
        "max_tokens": 3000,
        "temperature": 0,
        "stream": True,
    }
    try:
        with httpx.stream("POST", f"{ring.url}/v1/completions", json=body, timeout=60) as r:
            for line in r.iter_lines():
                if '"error"' in line:
                    out[i] = ("error", line, time.monotonic())
                    return
                if line == "data: [DONE]":
                    out[i] = ("done", line, time.monotonic())
                    return
        out[i] = ("closed", "", time.monotonic())
    except httpx.HTTPError as e:
        out[i] = ("exception", repr(e), time.monotonic())


def test_a_killed_rank_ends_streams_and_the_ring_comes_back(tiny_llama, tmp_path):
    proc, ring, log = launch(tiny_llama, tmp_path)
    try:
        want = wait_for_answer(ring, 30)
        ended: dict[int, tuple] = {}
        streams = [
            threading.Thread(target=stream_until_end, args=(ring, ended, i)) for i in range(4)
        ]
        for t in streams:
            t.start()
        time.sleep(2)
        tail = rank_pid(proc, "tail")
        killed = time.monotonic()
        os.kill(tail, signal.SIGKILL)
        for t in streams:
            t.join(timeout=30)
        assert len(ended) == 4 and all(how == "error" for how, _, _ in ended.values()), ended
        assert max(at for _, _, at in ended.values()) - killed < 10
        assert any("node 'tail'" in line or "rank 1" in line for _, line, _ in ended.values())
        r = httpx.get(f"{ring.url}/health", timeout=10)  # the port stays open meanwhile
        assert r.status_code in (200, 503)
        assert wait_for_answer(ring, 90) == want  # the same greedy text as before the fault
        assert time.monotonic() - killed < 90
        health = httpx.get(f"{ring.url}/health", timeout=10).json()
        assert health["status"] == "ok" and health["restarts"] == 1
        assert not alive(tail)
        assert any("node 'tail' (rank 1, localhost) was killed by SIGKILL" in s for s in log)
        ranks = [p for p in children(proc.pid) if "mlxring.node" in cmdline(p)]
        assert len(ranks) == 2  # the new ring's
        proc.send_signal(signal.SIGINT)  # Ctrl-C: the launcher stops the restarted ring too
        assert proc.wait(timeout=20) == 130
        assert not any(alive(p) for p in ranks), "a rank of the restarted ring was left behind"
    finally:
        stop_launcher(proc)


def test_a_frozen_rank_is_restarted_and_the_ring_comes_back(tiny_llama, tmp_path):
    proc, ring, log = launch(tiny_llama, tmp_path)
    try:
        want = wait_for_answer(ring, 30)
        ended: dict[int, tuple] = {}
        stream = threading.Thread(target=stream_until_end, args=(ring, ended, 0))
        stream.start()
        time.sleep(2)
        tail = rank_pid(proc, "tail")
        os.kill(tail, signal.SIGSTOP)
        stopped = time.monotonic()
        stream.join(timeout=30)
        assert ended[0][0] == "error" and ended[0][2] - stopped < 4 + 10  # the step timeout
        time.sleep(max(0.0, 20 - (time.monotonic() - stopped)))
        with contextlib.suppress(ProcessLookupError):  # the recovery may have killed it
            os.kill(tail, signal.SIGCONT)
        assert wait_for_answer(ring, 90) == want
        assert time.monotonic() - stopped < 20 + 90
        assert any("restarting the ring" in s for s in log)
        assert not alive(tail)  # the frozen rank was replaced, not left behind
    finally:
        stop_launcher(proc)


def test_on_failure_exit_stops_the_launcher_naming_the_node(tiny_llama, tmp_path):
    proc, ring, log = launch(tiny_llama, tmp_path, on_failure="exit")
    try:
        ranks = [p for p in children(proc.pid) if "mlxring.node" in cmdline(p)]
        os.kill(rank_pid(proc, "tail"), signal.SIGKILL)
        assert proc.wait(timeout=30) == 1
        assert any("node 'tail' (rank 1, localhost) was killed by SIGKILL" in s for s in log)
        assert not any("restarting" in s for s in log)
        deadline = time.monotonic() + 10
        while any(alive(p) for p in ranks) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(alive(p) for p in ranks), "a rank was left behind"
    finally:
        stop_launcher(proc)


def test_repeated_failures_of_a_node_are_pointed_out():
    state = RingState()
    for _ in range(REPEATED - 1):
        state.down("node 'tail' (rank 1) was killed", "tail")
    state.down("the ring stalled")  # no node to blame
    assert state.snapshot()["repeated"] == []
    state.down("node 'tail' (rank 1) was killed", "tail")
    snap = state.snapshot()
    assert snap["repeated"] == ["tail"] and snap["failures"] == {"tail": REPEATED}
    assert not snap["up"] and snap["reason"] == "node 'tail' (rank 1) was killed"
    state.up("http://127.0.0.1:1/v1")
    assert state.snapshot()["up"] and state.snapshot()["reason"] is None
