"""Security through the real ring: a wrong key stops launch fast, tampering stops a request."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

from mlxring.crypto.keys import new_key, write_key
from tests.ringutil import ROOT, free_port, kill_group
from tests.tamper_proxy import TamperProxy


def test_a_rank_with_a_different_key_stops_launch_within_5s_naming_it(tiny_llama, tmp_path):
    good = write_key(tmp_path / "good.key", new_key())
    other = write_key(tmp_path / "other.key", new_key())
    config = tmp_path / "cluster.yaml"
    config.write_text(
        f"name: keys\ncluster_key_file: {good}\nnodes:\n"
        "  - {name: n0, host: localhost, memory_gb: 8}\n"
        f"  - {{name: n1, host: localhost, memory_gb: 8, cluster_key_file: {other}}}\n"
        "  - {name: n2, host: localhost, memory_gb: 8}\n"
    )
    started = time.monotonic()
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "mlxring",
            "launch",
            str(config),
            "--model",
            str(tiny_llama),
            "--port",
            str(free_port()),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )
    took = time.monotonic() - started
    assert out.returncode != 0
    assert "node 'n1' (rank 1, localhost) does not hold the cluster key" in out.stderr, out.stderr
    assert took < 5, f"took {took:.1f} s"
    assert "ranks ready" not in out.stderr  # no model was loaded, no data sent


def start_rank(rank: int, hostfile: str, model, key_hex: str, job_args: dict):
    layers = ["0", "3"] if rank == 0 else ["3", "6"]
    argv = [
        sys.executable,
        "-m",
        "mlxring.node",
        "--name",
        f"r{rank}",
        "--cluster",
        "tamper",
        "--model",
        str(model),
        "--layers",
        *layers,
    ]
    if rank == 0:
        argv += ["--job", "generate", "--job-args", json.dumps(job_args)]
    env = {
        **os.environ,
        "MLX_RANK": str(rank),
        "MLX_HOSTFILE": hostfile,
        "MLXRING_CLUSTER_KEY": key_hex,
        "PYTHONPATH": str(ROOT),
    }
    return subprocess.Popen(
        argv,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def test_a_flipped_byte_on_the_wire_fails_the_request_with_an_integrity_error(tiny_llama, tmp_path):
    """Each rank reaches the other through a TCP proxy (per-rank hostfiles) that flips one
    byte of the first data message: the receiver must refuse it, not hang or answer wrong."""
    real = [free_port(), free_port()]
    flipped = threading.Event()
    proxies = [TamperProxy(port, flipped) for port in real]
    hostfiles = []
    for rank in range(2):
        entries = [f"127.0.0.1:{real[r] if r == rank else proxies[r].port}" for r in range(2)]
        path = tmp_path / f"hosts{rank}.json"
        path.write_text(json.dumps([[e] for e in entries]))
        hostfiles.append(str(path))
    key = new_key().hex()
    job = {"prompt": "tamper", "max_tokens": 8, "json": True}
    procs = [start_rank(r, hostfiles[r], tiny_llama, key, job) for r in range(2)]
    try:
        outs = [p.communicate(timeout=120) for p in procs]
    finally:
        for p in procs:
            kill_group(p.pid)
        for proxy in proxies:
            proxy.close()
    assert flipped.is_set(), "the proxy saw no data message"
    stderr = outs[0][1] + outs[1][1]
    assert "failed authentication" in stderr, stderr
    assert procs[1].returncode == 5  # EXIT_INTEGRITY on the receiving rank
    assert procs[0].returncode != 0 and '"tokens"' not in outs[0][0]  # no answer at all
