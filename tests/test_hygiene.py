"""What the launcher hands to ssh, to the shell and to the disk: no option injection
through a host name, a dry run that contacts no node, a key file written safely, and
API keys that reach a head over ssh without appearing in a command line, script or log."""

from __future__ import annotations

import dataclasses
import os
import shlex
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from mlxring.cluster import launch, ranks
from mlxring.cluster.config import ConfigError, NodeConfig, load_config, parse_config
from mlxring.cluster.fit import cluster_plan
from mlxring.cluster.protocol import API_KEYS_ENV, CONTROL, RankArgs
from mlxring.cluster.ranks import RankSpec, rank_specs
from mlxring.crypto import keys
from mlxring.crypto.keys import ClusterKeyError, read_key_file, write_key
from mlxring.errors import UserError

INJECT = "-oProxyCommand=touch /tmp/mlxring-pwned"
KEYS = ("sk-first-0f3a9c", "sk-second-77b2e1")


def node(**fields) -> dict:
    return {"name": "n", "host": "h", "memory_gb": 8, **fields}


# 1. a host or ssh target that ssh would read as an option ------------------------------


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("ssh", INJECT, f"nodes[1].ssh: expected an ssh target, got {INJECT!r}"),
        ("ssh", "-J evil me@host", "nodes[1].ssh: expected an ssh target, got '-J evil me@host'"),
        ("ssh", "me@host -oX=y", "nodes[1].ssh: expected an ssh target, got 'me@host -oX=y'"),
        ("host", INJECT, f"nodes[1].host: expected a host name or IP address, got {INJECT!r}"),
        ("host", "-p2222", "nodes[1].host: expected a host name or IP address, got '-p2222'"),
    ],
)
def test_dash_hosts_and_ssh_targets_are_refused(field, value, message):
    with pytest.raises(ConfigError) as info:
        parse_config({"name": "r", "nodes": [node(name="a"), node(**{field: value})]})
    assert str(info.value) == message


def test_dash_ssh_target_in_a_file_is_one_line(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(
        "name: r\nnodes:\n  - {name: a, host: h, memory_gb: 8}\n"
        "  - {name: b, host: h2, memory_gb: 8, ssh: '-oProxyCommand=sh -c id'}\n"
    )
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == (
        f"{path}: nodes[1].ssh: expected an ssh target, got '-oProxyCommand=sh -c id'"
    )


@pytest.mark.parametrize("target", ["me@studio.local", "studio", "me@10.0.0.2", "ssh://me@h:22"])
def test_ordinary_ssh_targets_pass(target):
    assert parse_config({"name": "r", "nodes": [node(ssh=target)]}).head.ssh == target


def remote_cluster(tmp_path: Path, head_ssh: bool = False, memory: str = "8", keys=KEYS):
    """A two-node cluster whose second node (and, with `head_ssh`, head) starts over ssh."""
    path = tmp_path / "remote.yaml"
    key_list = ", ".join(keys)
    head = ", ssh: root@127.0.0.1" if head_ssh else ""
    path.write_text(
        f"name: r\ncluster_key_file: {tmp_path / 'cluster.key'}\n"
        f"api: {{host: 0.0.0.0, api_keys: [{key_list}]}}\nnodes:\n"
        f"  - {{name: head, host: localhost, memory_gb: 8, reserve_gb: 1{head}}}\n"
        f"  - {{name: far, host: 192.0.2.10, memory_gb: {memory}, reserve_gb: 1, "
        "ssh: me@far.example}\n"
    )
    return path


def specs_for(tmp_path: Path, model: Path, **kw) -> list[RankSpec]:
    cluster = load_config(remote_cluster(tmp_path, **kw))
    return rank_specs(cluster, cluster_plan(cluster, model), str(model), "serve", {})


def test_rank_ssh_command_ends_options_before_the_target(tiny_llama, tmp_path):
    spec = specs_for(tmp_path, tiny_llama)[1]
    cmd = spec.command()
    assert cmd[: len(shlex.split(ranks.SSH))] == shlex.split(ranks.SSH)
    assert cmd[-3:] == ["--", "me@far.example", spec.script()]


def test_memory_probe_ends_options_before_the_target(monkeypatch):
    seen = []

    def run(cmd, **kw):
        seen.append(cmd)
        return subprocess.CompletedProcess(cmd, 0, stdout="68719476736\n")

    monkeypatch.setattr(launch.subprocess, "run", run)
    far = NodeConfig(name="far", host="192.0.2.10", memory_gb="auto", ssh="me@far")
    assert launch.remote_memory_bytes(far) == 64 * 2**30
    (cmd,) = seen
    assert cmd[-3] == "--" and cmd[-2] == "me@far" and cmd[-1].startswith("python3 -c ")


@pytest.mark.skipif(shutil.which("ssh") is None, reason="needs the OpenSSH client")
def test_after_double_dash_ssh_takes_an_option_like_target_as_a_host(tmp_path, monkeypatch):
    # defence in depth: even a target the config would refuse is never run as an option
    marker = tmp_path / "pwned"
    monkeypatch.setattr(ranks, "SSH", "ssh -o BatchMode=yes -o ConnectTimeout=5")
    cmd = ranks.ssh_argv(f"-oProxyCommand=touch {marker}", "true")
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert out.returncode == 255 and not marker.exists(), out.stderr
    bare = ["ssh", "-o", "BatchMode=yes", f"-oProxyCommand=touch {marker}", "true"]
    subprocess.run(bare, capture_output=True, timeout=60)  # without `--`: an option
    assert marker.exists()


# 2. a dry run contacts no node ---------------------------------------------------------


@pytest.fixture
def recorder(tmp_path):
    """An MLXRING_SSH that records every call (its argv) and fails."""
    record = tmp_path / "ssh-calls"
    script = tmp_path / "fake-ssh"
    script.write_text(f'#!/bin/sh\nprintf "%s\\n" "$*" >> {record}\nexit 1\n')
    script.chmod(0o755)
    return script, record


def mlxring(args: list[str], ssh: Path, **env) -> subprocess.CompletedProcess:
    env = {**os.environ, "MLXRING_SSH": str(ssh), **env}
    return subprocess.run(
        [sys.executable, "-m", "mlxring", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )


def test_dry_run_of_auto_remote_memory_contacts_nobody(tiny_llama, tmp_path, recorder):
    ssh, record = recorder
    config = remote_cluster(tmp_path, memory="auto")
    out = mlxring(["launch", str(config), "--model", str(tiny_llama), "--dry-run"], ssh)
    assert out.returncode == 2
    assert out.stderr.strip() == (
        "mlxring launch: error: node 'far': memory_gb 'auto' is asked over ssh at launch, "
        "and a dry run contacts no node; set memory_gb (GB) to see the plan"
    )
    assert not record.exists()
    # the same launch for real does ask (through the recorder, which fails): it is watched
    real = mlxring(["launch", str(config), "--model", str(tiny_llama)], ssh)
    assert real.returncode == 2 and "cannot detect its memory over ssh" in real.stderr
    (call,) = record.read_text().splitlines()
    assert call.startswith("-- me@far.example python3 -c ")


def test_dry_run_prints_every_rank_and_contacts_nobody(tiny_llama, tmp_path, recorder):
    ssh, record = recorder
    config = remote_cluster(tmp_path, head_ssh=True)
    out = mlxring(["launch", str(config), "--model", str(tiny_llama), "--dry-run"], ssh)
    assert out.returncode == 0, out.stderr
    assert "rank 0 (head, over ssh to root@127.0.0.1)" in out.stdout
    assert "rank 1 (far, over ssh to me@far.example)" in out.stdout
    assert f"IFS= read -r {API_KEYS_ENV}" in out.stdout
    assert f"not shown: {API_KEYS_ENV}" in out.stdout
    assert not record.exists()


def test_resolve_without_contacting_nodes_refuses_auto_remote(tiny_llama, tmp_path, monkeypatch):
    def never(*a, **kw):
        raise AssertionError("a dry run ran a command")

    monkeypatch.setattr(launch.subprocess, "run", never)
    config = remote_cluster(tmp_path, memory="auto")
    with pytest.raises(UserError, match="a dry run contacts no node"):
        launch.resolve(str(config), None, str(tiny_llama), contact_nodes=False)


# 3. keygen writes the key file safely --------------------------------------------------


def keygen(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mlxring", "keygen", *args],
        capture_output=True,
        text=True,
        timeout=60,
    )


def mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


def test_keygen_refuses_a_dangling_symlink_even_with_force(tmp_path):
    target = tmp_path / "elsewhere" / "stolen.key"
    target.parent.mkdir()
    link = tmp_path / "cluster.key"
    link.symlink_to(target)
    for force in ([], ["--force"]):
        out = keygen("--out", str(link), *force)
        assert out.returncode == 2
        assert out.stderr == (
            f"mlxring keygen: error: {link} is a symbolic link; refusing to write a key "
            "through it (remove it, or pass the real path with --out)\n"
        )
    assert not target.exists() and link.is_symlink()


def test_force_does_not_write_through_a_symlink_to_a_file(tmp_path):
    target = tmp_path / "precious"
    target.write_text("keep me\n")
    link = tmp_path / "cluster.key"
    link.symlink_to(target)
    with pytest.raises(ClusterKeyError, match="symbolic link"):
        write_key(link, bytes(32), force=True)
    assert target.read_text() == "keep me\n" and link.is_symlink()


def test_keygen_out_directory_is_one_line_error(tmp_path):
    out = keygen("--out", str(tmp_path))
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr == (
        f"mlxring keygen: error: {tmp_path} is a directory; pass a file path with --out "
        f"(e.g. {tmp_path / 'cluster.key'})\n"
    )
    assert keygen("--out", str(tmp_path), "--force").returncode == 2


def test_keygen_refuses_what_is_not_a_regular_file(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(ClusterKeyError, match="not a regular file"):
        write_key(fifo, bytes(32), force=True)


def test_force_replaces_a_regular_file_with_a_private_one(tmp_path):
    path = tmp_path / "cluster.key"
    path.write_text("old\n")
    path.chmod(0o644)
    with pytest.raises(ClusterKeyError, match="exists; pass --force"):
        write_key(path, bytes(32))
    assert path.read_text() == "old\n"
    write_key(path, bytes(range(32)), force=True)
    assert mode(path) == 0o600
    assert read_key_file(path) == bytes(range(32))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cluster.key"]  # no temp file left


def test_key_file_is_0600_from_its_creation_whatever_the_umask(tmp_path):
    old = os.umask(0)
    try:
        path = write_key(tmp_path / "new" / "cluster.key", bytes(32))
    finally:
        os.umask(old)
    assert mode(path) == 0o600 and mode(path.parent) == 0o700
    assert path.read_text() == "00" * 32 + "\n"


def test_a_name_taken_while_writing_is_not_replaced_without_force(tmp_path, monkeypatch):
    # the check before writing passes; someone creates the file meanwhile: link() refuses
    path = tmp_path / "cluster.key"
    real = keys._write_temp

    def racing(directory, text):
        temp = real(directory, text)
        path.write_text("theirs\n")
        return temp

    monkeypatch.setattr(keys, "_write_temp", racing)
    with pytest.raises(ClusterKeyError, match="exists"):
        write_key(path, bytes(32))
    assert path.read_text() == "theirs\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cluster.key"]


# 4. API keys of a head over ssh ----------------------------------------------------------


def test_remote_head_gets_api_keys_on_stdin_only(tiny_llama, tmp_path):
    head, far = specs_for(tmp_path, tiny_llama, head_ssh=True)
    assert head.remote and head.secret_env == {}
    assert head.stdin_env == {API_KEYS_ENV: ",".join(KEYS)}
    assert head.stdin_secret == (",".join(KEYS) + "\n").encode()
    assert far.stdin_secret is None and far.stdin_env == {} and far.secret_env == {}
    shown = [*head.command(), head.script(), repr(head), *head.argv]
    for key in KEYS:
        assert not any(key in text for text in shown)
    assert f"IFS= read -r {API_KEYS_ENV}" in head.script()
    assert f"read -r {API_KEYS_ENV}" not in far.script()


def test_local_head_keeps_keys_in_its_environment(tiny_llama, tmp_path):
    head = specs_for(tmp_path, tiny_llama)[0]
    assert not head.remote and head.stdin_secret is None
    assert head.secret_env[API_KEYS_ENV] == ",".join(KEYS)
    assert "read -r" not in head.script() and KEYS[0] not in head.script()


def test_launcher_env_keys_reach_a_remote_head_too(tiny_llama, tmp_path, monkeypatch):
    monkeypatch.setenv(API_KEYS_ENV, f" sk-env-1 ,{KEYS[0]},")
    head = specs_for(tmp_path, tiny_llama, head_ssh=True)[0]
    assert head.stdin_secret == f"{KEYS[0]},{KEYS[1]},sk-env-1\n".encode()


def test_dry_run_output_shows_no_key(tiny_llama, tmp_path, recorder):
    ssh, _ = recorder
    for head_ssh in (False, True):
        config = remote_cluster(tmp_path, head_ssh=head_ssh)
        out = mlxring(["launch", str(config), "--model", str(tiny_llama), "--dry-run"], ssh)
        assert out.returncode == 0, out.stderr
        assert API_KEYS_ENV in out.stdout  # named as not shown
        assert not any(key in out.stdout + out.stderr for key in KEYS)


def echo_spec(spec: RankSpec) -> RankSpec:
    """`spec` running a python that prints the API keys it was given, in place of the rank."""
    code = f"import os; print('keys=' + os.environ['{API_KEYS_ENV}'])"
    return dataclasses.replace(spec, argv=(sys.executable, "-c", code))


def test_the_script_reads_the_secret_from_stdin_and_exports_it(tiny_llama, tmp_path):
    head = echo_spec(specs_for(tmp_path, tiny_llama, head_ssh=True)[0])
    out = subprocess.run(
        ["bash", "-c", head.script()], input=head.stdin_secret, capture_output=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.decode() == f"keys={','.join(KEYS)}\n"


def test_the_script_fails_closed_without_the_secret(tiny_llama, tmp_path):
    head = echo_spec(specs_for(tmp_path, tiny_llama, head_ssh=True)[0])
    out = subprocess.run(
        ["bash", "-c", head.script()], stdin=subprocess.DEVNULL, capture_output=True, timeout=60
    )
    assert out.returncode == 2 and out.stdout == b""
    error = f"{CONTROL} error no {API_KEYS_ENV} on stdin (the launcher writes it there)\n"
    assert error.encode() in out.stderr


def test_a_secret_must_be_one_line(tmp_path):
    args = RankArgs(name="n", model="m", layers=(0, 1)).argv()
    with pytest.raises(ValueError, match="one line"):
        RankSpec(
            0,
            NodeConfig(name="n", host="h", memory_gb=8),
            tuple(args),
            {},
            {},
            "/",
            {},
            {API_KEYS_ENV: "a\nb"},
        )


def test_api_keys_that_cannot_travel_are_refused_without_echo():
    for key in ["a,b", "with space", "tab\tkey", "newline\nkey", "ключ"]:
        with pytest.raises(ConfigError) as info:
            parse_config({"name": "r", "api": {"api_keys": ["ok", key]}, "nodes": [node()]})
        assert str(info.value) == (
            "api.api_keys[1]: expected a key of visible ASCII characters other than ','"
        )


def test_config_repr_shows_no_api_key():
    config = parse_config({"name": "r", "api": {"api_keys": list(KEYS)}, "nodes": [node()]})
    assert config.api.api_keys == KEYS
    assert not any(key in repr(config) for key in KEYS)


def test_only_the_launch_scripts_pid_line_is_trusted():
    """`kill` over ssh targets the pid the launch script reported first, before the rank
    was ready; a later pid line (the rank's own output) cannot redirect it."""
    from types import SimpleNamespace

    from mlxring.cluster import protocol
    from mlxring.cluster.supervise import Supervisor

    supervisor = Supervisor.__new__(Supervisor)  # only its control-line handling is used
    supervisor.state, supervisor.progress, supervisor.respec = None, False, None
    rank = SimpleNamespace(ready=False, remote_pid=None, error=None)
    supervisor._on_control(rank, protocol.PID, "4242")
    supervisor._on_control(rank, protocol.PID, "1")  # a second line before ready
    assert rank.remote_pid == 4242
    supervisor._on_control(rank, protocol.READY, "1")
    supervisor._on_control(rank, protocol.PID, "99")  # and after ready
    assert rank.remote_pid == 4242 and rank.ready
    fresh = SimpleNamespace(ready=False, remote_pid=None, error=None)
    supervisor._on_control(fresh, protocol.PID, "1; rm -rf /")
    assert fresh.remote_pid is None
