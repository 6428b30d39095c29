"""Pipeline decode through a real ring of processes on loopback.

Greedy tokens through 2, 3 and 4 ranks (even, uneven and explicit splits, one
with a one-layer node) equal single-node tokens and mlx-lm's own tokens.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import mlx.core as mx
import pytest
from chain import complete
from mlx_lm import load as mlx_lm_load
from mlx_lm.generate import generate_step

from mlxring.model import tokenizer as jobs
from mlxring.shards import load_shard
from tests.ringutil import alive, children, cmdline, free_port, stop_launcher

PROMPT = "Hidden states travel around the ring"
MAX_TOKENS = 20


def mlxring(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mlxring", *args], capture_output=True, text=True, timeout=timeout
    )


def write_config(tmp_path, spans: list[str], on_failure: str = "restart") -> str:
    nodes = "".join(
        f"  - {{name: n{i}, host: localhost, memory_gb: 8, reserve_gb: 1, layers: '{s}'}}\n"
        for i, s in enumerate(spans)
    )
    path = tmp_path / "cluster.yaml"
    path.write_text(f"name: test-ring\non_failure: {on_failure}\nnodes:\n{nodes}")
    return str(path)


@pytest.fixture(scope="module")
def reference(tiny_llama):
    """mlx-lm's greedy tokens and mlxring's single-node tokens for PROMPT."""
    model, tokenizer = mlx_lm_load(str(tiny_llama))
    prompt = jobs.encode_prompt(tokenizer, PROMPT)
    want = [int(t) for t, _ in generate_step(mx.array(prompt), model, max_tokens=MAX_TOKENS)]
    single = {
        "tokens": complete(
            [load_shard(tiny_llama, 0, 6, is_head=True)], tiny_llama, PROMPT, MAX_TOKENS
        )
    }
    assert single["tokens"] == want
    return want


CASES = {
    "2-even": ["--ranks", "2"],
    "3-even": ["--ranks", "3"],
    "4-even": ["--ranks", "4"],
    "2-uneven": ["0-4", "5"],
    "3-one-layer-node": ["0-1", "2", "3-5"],
    "4-explicit": ["0", "1-3", "4", "5"],
}


@pytest.mark.parametrize("case", CASES)
def test_ring_greedy_tokens_equal_single_node_and_mlx_lm(tiny_llama, reference, tmp_path, case):
    where = CASES[case]
    if where[0] != "--ranks":
        where = ["--config", write_config(tmp_path, where)]
    out = mlxring(
        "generate",
        "--model",
        str(tiny_llama),
        "--prompt",
        PROMPT,
        "--max-tokens",
        str(MAX_TOKENS),
        "--json",
        *where,
    )
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["tokens"] == reference


def start(*args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "mlxring", *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def rank_pids(proc: subprocess.Popen, size: int, timeout: float = 120) -> dict[str, int]:
    """Node name -> pid of the rank processes the launcher started."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pids = {
            cmdline(p).split("--name ")[1].split()[0]: p
            for p in children(proc.pid)
            if "mlxring.node" in cmdline(p)
        }
        if len(pids) == size:
            return pids
        time.sleep(0.1)
    raise TimeoutError("the ranks did not start")


def wait_for(proc, stream, text: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    seen = ""
    while text not in seen and time.monotonic() < deadline:
        seen += stream.read(1)
    assert text in seen, seen


@pytest.mark.parametrize("command", ["generate", "launch"])
def test_sigkilled_rank_stops_the_ring_with_a_clear_message(tiny_llama, tmp_path, command):
    if command == "generate":
        proc = start(
            "generate",
            "--model",
            str(tiny_llama),
            "--prompt",
            PROMPT,
            "--raw",
            "--max-tokens",
            "4000",  # within the context: still generating when the rank is killed
            "--ranks",
            "3",
        )
    else:
        config = write_config(tmp_path, ["0-1", "2-3", "4-5"], on_failure="exit")
        proc = start("launch", config, "--model", str(tiny_llama), "--port", str(free_port()))
    try:
        pids = rank_pids(proc, 3)
        if command == "generate":
            proc.stdout.read(1)  # the head is generating
        else:
            wait_for(proc, proc.stderr, "3 ranks ready")
        victim = sorted(pids)[1]
        killed_at = time.monotonic()
        os.kill(pids[victim], signal.SIGKILL)
        proc.wait(timeout=10)
        took = time.monotonic() - killed_at
        stderr = proc.stderr.read()
        assert proc.returncode != 0
        assert f"node '{victim}' (rank 1, localhost) was killed by SIGKILL" in stderr, stderr
        assert took < 10
        assert not any(alive(pid) for pid in pids.values()), "orphan rank processes remain"
    finally:
        stop_launcher(proc)


def test_rank_that_fails_to_start_is_named(tiny_llama, tmp_path):
    path = tmp_path / "cluster.yaml"
    path.write_text(
        "name: broken\nnodes:\n"
        "  - {name: good, host: localhost, memory_gb: 8}\n"
        "  - {name: bad, host: localhost, memory_gb: 8, python: /nonexistent/python3}\n"
    )
    out = mlxring("generate", "--model", str(tiny_llama), "--prompt", "x", "--config", str(path))
    assert out.returncode != 0
    assert "node 'bad' (rank 1, localhost) exited with code 127" in out.stderr, out.stderr
    assert "/nonexistent/python3" in out.stderr


def test_dry_run_prints_plan_hostfile_and_commands(tiny_llama):
    out = mlxring("launch", "configs/local-2.yaml", "--model", str(tiny_llama), "--dry-run")
    assert out.returncode == 0, out.stderr
    assert "0-2 (3)" in out.stdout and "3-5 (3)" in out.stdout
    assert "MLX_HOSTFILE:" in out.stdout and "127.0.0.1:" in out.stdout
    assert out.stdout.count("-m mlxring.node") == 2 and "export MLX_RANK=1" in out.stdout


def test_dry_run_for_a_jaccl_cluster(tiny_llama, tmp_path):
    """JACCL needs Thunderbolt 5 Macs: only the launch plan can be checked here (nothing starts,
    no traffic is sent; the addresses are only printed)."""
    path = tmp_path / "tb.yaml"
    path.write_text(
        "name: tb5\nbackend: jaccl\ncluster_key_file: ~/.mlxring/cluster.key\nnodes:\n"
        "  - {name: m1, host: 192.168.2.1, memory_gb: 64, ssh: m1.local, rdma: [null, rdma_en3]}\n"
        "  - {name: m2, host: 192.168.2.2, memory_gb: 64, ssh: m2.local, rdma: [rdma_en3, null]}\n"
    )
    out = mlxring("launch", str(path), "--model", str(tiny_llama), "--dry-run")
    assert out.returncode == 0, out.stderr
    assert "MLX_IBV_DEVICES:" in out.stdout and '"rdma_en3"' in out.stdout
    assert "export MLX_JACCL_COORDINATOR=192.168.2.1:40000" in out.stdout
    assert "export MLX_JACCL_RING=1" in out.stdout
    assert "over ssh to m2.local" in out.stdout and "--backend jaccl" in out.stdout
    assert "--key-file '~/.mlxring/cluster.key'" in out.stdout  # each node reads its own copy
