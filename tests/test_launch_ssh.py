"""`launch` starting a rank over ssh, for real: a private sshd on loopback stands in for a
second machine (the rank runs here, but is started, watched and stopped through ssh)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mlxring.crypto.keys import new_key, write_key
from tests import sshd
from tests.ringutil import alive, free_port, stop_launcher

pytestmark = pytest.mark.skipif(not sshd.available(), reason="needs OpenSSH (ssh and sshd)")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = sshd.PrivateSshd(tmp_path_factory.mktemp("sshd"))
    yield s
    s.stop()


def cluster(tmp_path: Path, with_key: bool = True) -> str:
    key = write_key(tmp_path / "cluster.key", new_key(), force=True)
    path = tmp_path / "cluster.yaml"
    path.write_text(
        "name: ssh-ring\n" + (f"cluster_key_file: {key}\n" if with_key else "") + "nodes:\n"
        "  - {name: head, host: localhost, memory_gb: 8, layers: 0-2}\n"
        "  - {name: far, host: localhost, memory_gb: 8, layers: 3-5, ssh: root@127.0.0.1}\n"
    )
    return str(path)


def env(server) -> dict:
    return {**os.environ, "MLXRING_SSH": server.ssh_command()}


def node_pids(model: Path, name: str) -> list[int]:
    pids = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            cmd = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"mlxring.node" in cmd and str(model).encode() in cmd and name.encode() in cmd:
            pids.append(int(proc.name))
    return pids


def test_generate_over_ssh_equals_local_ring(tiny_llama, tmp_path, server):
    args = [
        "generate",
        "--model",
        str(tiny_llama),
        "--prompt",
        "hi",
        "--max-tokens",
        "12",
        "--json",
    ]
    ssh = subprocess.run(
        [sys.executable, "-m", "mlxring", *args, "--config", cluster(tmp_path)],
        env=env(server),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert ssh.returncode == 0, ssh.stderr
    local = subprocess.run(
        [sys.executable, "-m", "mlxring", *args, "--ranks", "2"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert json.loads(ssh.stdout)["tokens"] == json.loads(local.stdout)["tokens"]
    assert not node_pids(tiny_llama, "far")


def test_remote_rank_killed_is_reported_and_nothing_remains(tiny_llama, tmp_path, server):
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlxring",
            "launch",
            cluster(tmp_path),
            "--model",
            str(tiny_llama),
            "--port",
            str(free_port()),
        ],
        env=env(server),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        seen = ""
        while "2 ranks ready" not in seen:
            line = proc.stderr.readline()
            assert line, f"launch ended early: {seen}"
            seen += line
        far = node_pids(tiny_llama, "far")
        assert len(far) == 1
        os.kill(far[0], signal.SIGKILL)
        proc.wait(timeout=10)
        err = seen + proc.stderr.read()
        assert proc.returncode != 0
        assert "node 'far' (rank 1, localhost)" in err, err
        time.sleep(0.5)
        assert not any(alive(p) for p in node_pids(tiny_llama, "head") + far)
    finally:
        stop_launcher(proc)


def test_a_node_started_over_ssh_needs_a_key_file(tiny_llama, tmp_path, server):
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "mlxring",
            "generate",
            "--model",
            str(tiny_llama),
            "--prompt",
            "hi",
            "--config",
            cluster(tmp_path, with_key=False),
        ],
        env=env(server),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2
    assert "node 'far' is started over ssh and has no cluster key" in out.stderr
