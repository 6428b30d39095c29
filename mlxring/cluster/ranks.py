"""How to start each rank of a cluster: the hostfile, each node's exact command and
environment, and the script that runs it there.

Local nodes (`localhost`) run as child processes; remote nodes are started over
ssh as `mlx.launch` does: a small shell script sets the working directory, the
mlx.distributed environment (`MLX_RANK`, `MLX_HOSTFILE`, or JACCL's variables,
whose files it writes on the node) and execs `python -m mlxring.node`. What a
rank is told, and how it answers, is the rank protocol (`mlxring.cluster.protocol`).

Secrets (the API keys of a head, the cluster key of a local ring without a key
file) are never in a command line or a script: a local rank gets them in its
process environment (`RankSpec.secret_env`), a rank started over ssh reads them
from its stdin (`RankSpec.stdin_secret`, which the launcher writes there).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import socket
import sys
from dataclasses import dataclass, field
from pathlib import Path

from mlxring.cluster import attach, protocol
from mlxring.cluster.config import ClusterConfig, NodeConfig
from mlxring.cluster.plan import Plan
from mlxring.crypto.keys import KEY_ENV, key_from_env, new_key
from mlxring.errors import UserError

DEFAULT_PORT = 40000  # remote nodes without a port: DEFAULT_PORT + rank
SSH = os.environ.get("MLXRING_SSH", "ssh -o BatchMode=yes")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def ssh_argv(target: str, command: str) -> list[str]:
    """The command that runs `command` (one shell line) on `target` over ssh.

    `--` ends ssh's options, so a target can never be taken for one (`-oProxyCommand=...`);
    config validation refuses such targets too."""
    return [*shlex.split(SSH), "--", target, command]


def _shell_error(message: str, code: int) -> str:
    """Shell that reports `message` as the rank's error control line and exits `code`."""
    line = protocol.control_shell(protocol.ERROR, shlex.quote(message))
    return f"{{ {line}; exit {code}; }}"


@dataclass(frozen=True)
class RankSpec:
    """How to start one rank: where, with which command, environment and files.

    Secrets are in `secret_env` (set in the environment of the process the launcher starts:
    local ranks) and `stdin_env` (read by the script from its stdin: ranks over ssh); neither
    appears in `argv`, `script()`, `command()` or the repr."""

    rank: int
    node: NodeConfig
    argv: tuple[str, ...]  # python -m mlxring.node ... (protocol.RankArgs.argv)
    env: dict[str, str]  # set on the node
    files: dict[str, str]  # env var -> content of a file written on the node
    cwd: str
    secret_env: dict[str, str] = field(default_factory=dict, repr=False)  # never printed
    stdin_env: dict[str, str] = field(default_factory=dict, repr=False)  # never printed

    def __post_init__(self) -> None:
        for name, value in self.stdin_env.items():
            if not _ENV_NAME.fullmatch(name) or "\n" in value or "\0" in value:
                raise ValueError(f"stdin secret {name!r}: a variable name, one line of text")

    @property
    def remote(self) -> bool:
        return self.node.remote

    @property
    def stdin_secret(self) -> bytes | None:
        """What the launcher writes to the started process's stdin, then closes it: one line
        per `stdin_env` variable, in sorted name order, each its UTF-8 value and b"\\n"; the
        script reads them before it execs the rank. None: nothing to write (stdin unused)."""
        if not self.stdin_env:
            return None
        return "".join(f"{self.stdin_env[k]}\n" for k in sorted(self.stdin_env)).encode()

    def script(self) -> str:
        """The shell script that starts this rank on its node (what ssh runs)."""
        lines = [f"cd {shlex.quote(self.cwd)} || exit 1"]
        lines += [f"export {k}={shlex.quote(v)}" for k, v in sorted(self.env.items())]
        for var, content in sorted(self.files.items()):
            # the node deletes these once mlx.distributed has read them
            temp = protocol.TEMP_FILES_ENV
            lines.append(f"f=$(mktemp) && printf %s {shlex.quote(content)} > $f")
            lines.append(f'export {var}=$f {temp}="${temp} $f"')
        lines.append(protocol.pid_line_shell())
        for var in sorted(self.stdin_env):  # the names only: the values come on stdin
            missing = _shell_error(
                f"no {var} on stdin (the launcher writes it there)", protocol.EXIT_USER_ERROR
            )
            lines.append(f"IFS= read -r {var} || {missing}")
            lines.append(f"export {var}")
        lines.append("exec " + shlex.join(self.argv))
        return "; ".join(lines)

    def command(self) -> list[str]:
        """The command the launcher runs: attach for a node on an mlxring worker, ssh for
        remote nodes, the script under bash locally."""
        if self.node.worker:
            return attach.command(self.node.worker, list(self.argv[3:]), self.env, self.files)
        if self.remote:
            return ssh_argv(self.node.ssh or self.node.host, self.script())
        return ["bash", "-c", self.script()]


def free_port(host: str = "127.0.0.1") -> int:
    """A port free on `host` now (an IP of this machine, or localhost)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1" if host == "localhost" else host, 0))
        return s.getsockname()[1]


def ring_address(rank: int, node: NodeConfig) -> str:
    """`ip:port` of a rank for the ring hostfile (the ring backend wants IPs)."""
    if node.is_local:  # this machine: by loopback, or by the address it was given
        ip = "127.0.0.1" if node.host == "localhost" else node.host
        return f"{ip}:{node.port or free_port(ip)}"
    try:
        ip = socket.gethostbyname(node.host)
    except OSError as e:
        raise UserError(f"node {node.name!r}: cannot resolve host {node.host!r} ({e})") from e
    return f"{ip}:{node.port or DEFAULT_PORT + rank}"


def key_sources(cluster: ClusterConfig) -> tuple[list[str | None], dict[str, str]]:
    """Per node, the key file it reads (or None), and the env that carries the key to local
    nodes without one. The key itself never crosses the network: a node started over ssh
    must have a key file of its own."""
    files = [node.cluster_key_file or cluster.cluster_key_file for node in cluster.nodes]
    for node, file in zip(cluster.nodes, files):
        if node.remote and not node.worker and file is None:
            raise UserError(
                f"node {node.name!r} is started over ssh and has no cluster key: set "
                "cluster_key_file (the same key on every node; make one with `mlxring keygen` "
                "and copy it to each node); the key is never sent over the network"
            )
    if all(files):
        return files, {}
    key = key_from_env() or new_key()  # an all-local ring may use a key made for this launch
    return files, {KEY_ENV: key.hex()}


def rank_specs(
    cluster: ClusterConfig, plan: Plan, model: str, job: str, job_options: dict
) -> list[RankSpec]:
    """One RankSpec per node, in ring order; rank 0 (the head) runs `job`."""
    size = len(cluster.nodes)
    key_files, key_env = key_sources(cluster)
    env_all = {"PYTHONUNBUFFERED": "1", protocol.WATCH_PARENT_ENV: "1"}
    files: dict[str, str] = {}
    if size > 1 and cluster.backend == "ring":
        hostfile = [[ring_address(r, n)] for r, n in enumerate(cluster.nodes)]
        files[protocol.MLX_HOSTFILE] = json.dumps(hostfile)
    elif size > 1:  # jaccl: a coordinator on the head, RDMA devices per rank
        env_all[protocol.JACCL_COORDINATOR] = ring_address(0, cluster.head)
        env_all[protocol.JACCL_RING] = "1"  # each rank cabled to its two ring neighbours
        files[protocol.JACCL_DEVICES] = json.dumps([list(n.rdma or ()) for n in cluster.nodes])
    # ranks sharing this machine share its cores: torch would start a thread per core in each
    on_this_machine = sum(1 for n in cluster.nodes if not n.remote)
    torch_threads = str(max(1, (os.cpu_count() or 1) // max(1, on_this_machine)))
    specs = []
    for rank, (node, a) in enumerate(zip(cluster.nodes, plan.assignments)):
        args = protocol.RankArgs(
            name=node.name,
            model=node.model or model,
            layers=(a.start, a.end),
            cluster=cluster.name,
            backend=cluster.backend,
            compute=node.backend,
            # mlx computes on its default device (the GPU on a Mac) unless told "cpu"
            device=node.device if node.backend == "torch" or node.device == "cpu" else None,
            dtype=node.dtype,
            key_file=None if node.worker else key_files[rank],  # a worker gives its own
            job=job if rank == 0 else None,
            job_options=job_options if rank == 0 else {},
        )
        python = node.python or (sys.executable if node.is_local else "python3")
        argv = (python, "-m", protocol.RANK_MODULE, *args.argv())
        env = {**env_all, protocol.MLX_RANK: str(rank)}
        if node.backend == "torch" and not node.remote:
            threads = protocol.TORCH_THREADS_ENV
            env[threads] = os.environ.get(threads, torch_threads)
        if node.is_local:  # run this very mlxring, installed or not
            paths = [str(Path(__file__).resolve().parents[2]), os.environ.get("PYTHONPATH")]
            env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
        secret = key_env if not key_files[rank] else {}
        if rank == 0 and (keys := api_keys(cluster)):
            secret = {**secret, protocol.API_KEYS_ENV: keys}
        cwd = node.cwd or os.getcwd()
        # a local rank gets its secrets in its environment, a rank over ssh on its stdin
        over_ssh = node.remote and not node.worker  # a worker's rank: attach runs here
        local_secret, stdin_secret = ({}, secret) if over_ssh else (secret, {})
        specs.append(RankSpec(rank, node, argv, env, files, cwd, local_secret, stdin_secret))
    return specs


def api_keys(cluster: ClusterConfig) -> str:
    """The head's API keys, comma-separated (MLXRING_API_KEYS): the configured ones and
    those of the launcher's own MLXRING_API_KEYS, which a head over ssh would not see."""
    env = os.environ.get(protocol.API_KEYS_ENV, "").split(",")
    keys = [*cluster.api.api_keys, *(k.strip() for k in env)]
    return ",".join(dict.fromkeys(k for k in keys if k))
