"""`launch` starting a rank over ssh, for real: a private sshd on loopback stands in for a
second machine (the rank runs here, but is started, watched and stopped through ssh)."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from mlxring.cluster import ranks
from mlxring.cluster.config import NodeConfig, load_config
from mlxring.cluster.fit import cluster_plan, local_memory_bytes
from mlxring.cluster.launch import remote_memory_bytes
from mlxring.cluster.protocol import API_KEYS_ENV
from mlxring.cluster.ranks import RankSpec, rank_specs
from mlxring.crypto.keys import new_key, write_key
from tests import sshd
from tests.ringutil import alive, free_port, stop_launcher

pytestmark = pytest.mark.skipif(not sshd.available(), reason="needs OpenSSH (ssh and sshd)")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = sshd.PrivateSshd(tmp_path_factory.mktemp("sshd"))
    yield s
    s.stop()


def cluster(tmp_path: Path, with_key: bool = True, on_failure: str = "restart") -> str:
    key = write_key(tmp_path / "cluster.key", new_key(), force=True)
    path = tmp_path / "cluster.yaml"
    path.write_text(
        f"name: ssh-ring\non_failure: {on_failure}\n"
        + (f"cluster_key_file: {key}\n" if with_key else "")
        + "nodes:\n"
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
            cluster(tmp_path, on_failure="exit"),
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


def test_openssh_takes_double_dash_before_the_target(server, monkeypatch):
    monkeypatch.setattr(ranks, "SSH", server.ssh_command())
    out = subprocess.run(
        ranks.ssh_argv("root@127.0.0.1", "echo over-ssh"), capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout == "over-ssh\n"
    node = NodeConfig(name="far", host="127.0.0.2", memory_gb="auto", ssh="root@127.0.0.1")
    assert remote_memory_bytes(node) == local_memory_bytes()  # the same machine, here


API_KEYS = ("sk-over-ssh-1", "sk-over-ssh-2")


def ssh_head(tiny_llama: Path, tmp_path: Path) -> RankSpec:
    """The head of a cluster whose head is started over ssh and has API keys, running a
    python that prints the keys it was given in place of the rank."""
    path = tmp_path / "c.yaml"
    path.write_text(
        f"name: r\ncluster_key_file: {tmp_path / 'k'}\napi: {{api_keys: [{', '.join(API_KEYS)}]}}\n"
        "nodes: [{name: head, host: localhost, memory_gb: 8, ssh: root@127.0.0.1}]\n"
    )
    cluster = load_config(path)
    spec = rank_specs(cluster, cluster_plan(cluster, tiny_llama), str(tiny_llama), "serve", {})[0]
    code = f"import os; print('keys=' + os.environ['{API_KEYS_ENV}'])"
    return dataclasses.replace(spec, argv=(sys.executable, "-c", code))


def test_api_keys_reach_a_head_over_ssh_on_stdin(tiny_llama, tmp_path, server, monkeypatch):
    monkeypatch.setattr(ranks, "SSH", server.ssh_command())
    head = ssh_head(tiny_llama, tmp_path)
    cmd = head.command()
    assert cmd[-3:-1] == ["--", "root@127.0.0.1"]
    assert not any(key in part for key in API_KEYS for part in cmd)
    # what the supervisor does: write stdin_secret to the started process, then close stdin
    proc = subprocess.Popen(
        cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    out, err = proc.communicate(head.stdin_secret, timeout=60)
    assert proc.returncode == 0, err
    assert out.decode() == f"keys={','.join(API_KEYS)}\n"
    # with nothing on stdin the rank is not started, and says why
    proc = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, timeout=60)
    assert proc.returncode == 2 and proc.stdout == b""
    assert f"error no {API_KEYS_ENV} on stdin".encode() in proc.stderr


def test_a_launched_head_over_ssh_serves_with_its_api_keys(tiny_llama, tmp_path, server):
    """The whole path: the supervisor writes the keys on the head's stdin over ssh, and the
    API that head serves refuses a request without a key and answers one with it."""
    key = write_key(tmp_path / "cluster.key", new_key(), force=True)
    port = free_port()
    path = tmp_path / "cluster.yaml"
    path.write_text(
        f"name: ssh-head\ncluster_key_file: {key}\n"
        f"api: {{port: {port}, api_keys: [{API_KEYS[0]}]}}\nnodes:\n"
        "  - {name: head, host: localhost, memory_gb: 8, ssh: root@127.0.0.1}\n"
        "  - {name: tail, host: localhost, memory_gb: 8}\n"
    )
    argv = [sys.executable, "-m", "mlxring", "launch", str(path), "--model", str(tiny_llama)]
    proc = subprocess.Popen(
        argv,
        env=env(server),
        stdout=subprocess.DEVNULL,
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
        assert API_KEYS[0] not in seen
        url = f"http://127.0.0.1:{port}/v1/models"
        deadline = time.monotonic() + 30
        while True:
            try:
                anonymous = httpx.get(url, timeout=10)
                break
            except httpx.ConnectError:
                assert time.monotonic() < deadline
                time.sleep(0.2)
        assert anonymous.status_code == 401
        keyed = httpx.get(url, headers={"authorization": f"Bearer {API_KEYS[0]}"}, timeout=10)
        assert keyed.status_code == 200 and keyed.json()["data"][0]["id"] == tiny_llama.name
    finally:
        stop_launcher(proc)
    assert not node_pids(tiny_llama, "head")
