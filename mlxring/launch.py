"""Start every rank of a cluster: the hostfile, each node's exact command, supervision.

Local nodes (`localhost`) run as child processes; remote nodes are started over
ssh as `mlx.launch` does: a small shell script sets the working directory, the
mlx.distributed environment (`MLX_RANK`, `MLX_HOSTFILE`, or JACCL's variables,
whose files it writes on the node) and execs `python -m mlxring.node`.
"""

from __future__ import annotations

import json
import os
import shlex
import socket
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from mlxring.config import ClusterConfig, NodeConfig, load_config
from mlxring.errors import UserError
from mlxring.plan import Plan, keep_kv_pairs, split_layers

DEFAULT_PORT = 40000  # remote nodes without a port: DEFAULT_PORT + rank
SSH = os.environ.get("MLXRING_SSH", "ssh -o BatchMode=yes")
TORCH_THREADS_ENV = "MLXRING_TORCH_THREADS"  # threads of a torch rank (default: its share)


@dataclass(frozen=True)
class RankSpec:
    """How to start one rank: where, with which command, environment and files."""

    rank: int
    node: NodeConfig
    argv: tuple[str, ...]  # python -m mlxring.node ...
    env: dict[str, str]  # set on the node
    files: dict[str, str]  # env var -> content of a file written on the node
    cwd: str
    secret_env: dict[str, str] = field(default_factory=dict)  # local only; never printed

    @property
    def remote(self) -> bool:
        """Started over ssh: the node names an ssh target or is not this machine."""
        return self.node.ssh is not None or not self.node.is_local

    def script(self) -> str:
        """The shell script that starts this rank on its node (what ssh runs)."""
        lines = [f"cd {shlex.quote(self.cwd)} || exit 1"]
        lines += [f"export {k}={shlex.quote(v)}" for k, v in sorted(self.env.items())]
        for var, content in sorted(self.files.items()):
            # the node deletes these once mlx.distributed has read them (MLXRING_TEMP_FILES)
            lines.append(f"f=$(mktemp) && printf %s {shlex.quote(content)} > $f")
            lines.append(f'export {var}=$f MLXRING_TEMP_FILES="$MLXRING_TEMP_FILES $f"')
        lines.append("printf '\\036@mlxring pid %s\\n' $$ >&2")
        lines.append("exec " + shlex.join(self.argv))
        return "; ".join(lines)

    def command(self) -> list[str]:
        """The command the launcher runs: ssh for remote nodes, the script under bash locally."""
        if self.remote:
            return [*shlex.split(SSH), self.node.ssh or self.node.host, self.script()]
        return ["bash", "-c", self.script()]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ring_address(rank: int, node: NodeConfig) -> str:
    """`ip:port` of a rank for the ring hostfile (the ring backend wants IPs)."""
    if node.is_local:
        return f"127.0.0.1:{node.port or free_port()}"
    try:
        ip = socket.gethostbyname(node.host)
    except OSError as e:
        raise UserError(f"node {node.name!r}: cannot resolve host {node.host!r} ({e})") from e
    return f"{ip}:{node.port or DEFAULT_PORT + rank}"


def key_sources(cluster: ClusterConfig) -> tuple[list[str | None], dict[str, str]]:
    """Per node, the key file it reads (or None), and the env that carries the key to local
    nodes without one. The key itself never crosses the network: a node started over ssh
    must have a key file of its own."""
    from mlxring.crypto.keys import KEY_ENV, key_from_env, new_key

    files = [node.cluster_key_file or cluster.cluster_key_file for node in cluster.nodes]
    specs_remote = [node.ssh is not None or not node.is_local for node in cluster.nodes]
    for node, file, remote in zip(cluster.nodes, files, specs_remote):
        if remote and file is None:
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
    env_all: dict[str, str] = {"PYTHONUNBUFFERED": "1", "MLXRING_WATCH_PARENT": "1"}
    files: dict[str, str] = {}
    if size > 1 and cluster.backend == "ring":
        hostfile = [[ring_address(r, n)] for r, n in enumerate(cluster.nodes)]
        files["MLX_HOSTFILE"] = json.dumps(hostfile)
    elif size > 1:  # jaccl: a coordinator on the head, RDMA devices per rank
        head = ring_address(0, cluster.head)
        env_all["MLX_JACCL_COORDINATOR"] = head
        env_all["MLX_JACCL_RING"] = "1"  # each rank cabled to its two ring neighbours
        files["MLX_IBV_DEVICES"] = json.dumps([list(n.rdma or ()) for n in cluster.nodes])
    # ranks sharing this machine share its cores: torch would start a thread per core in each
    on_this_machine = sum(1 for n in cluster.nodes if n.is_local and not n.ssh)
    torch_threads = str(max(1, (os.cpu_count() or 1) // max(1, on_this_machine)))
    specs = []
    for rank, (node, a) in enumerate(zip(cluster.nodes, plan.assignments)):
        python = node.python or (sys.executable if node.is_local else "python3")
        argv = [python, "-m", "mlxring.node", "--name", node.name, "--cluster", cluster.name,
                "--model", model, "--layers", str(a.start), str(a.end),
                "--backend", cluster.backend]  # fmt: skip
        if node.backend == "torch":
            argv += ["--compute", "torch", "--device", node.device, "--dtype", node.dtype]
        if key_files[rank]:
            argv += ["--key-file", key_files[rank]]
        if rank == 0:
            argv += ["--job", job, "--job-args", json.dumps(job_options)]
        env = {**env_all, "MLX_RANK": str(rank)}
        if node.backend == "torch" and node.is_local and not node.ssh:
            env[TORCH_THREADS_ENV] = os.environ.get(TORCH_THREADS_ENV, torch_threads)
        if node.is_local:  # run this very mlxring, installed or not
            paths = [str(Path(__file__).resolve().parent.parent), os.environ.get("PYTHONPATH")]
            env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
        secret = key_env if not key_files[rank] else {}
        if rank == 0 and node.is_local and cluster.api.api_keys and not node.ssh:
            # API keys reach a local head through its environment, not its command line
            secret = {**secret, "MLXRING_API_KEYS": ",".join(cluster.api.api_keys)}
        specs.append(RankSpec(rank, node, tuple(argv), env, files, node.cwd or os.getcwd(), secret))
    return specs


def local_ring(ranks: int, model: str, compute: dict | None = None) -> ClusterConfig:
    """A cluster of `ranks` local processes with an even split of the model's layers
    (moved where a split would separate a KV-sharing pair); `compute` sets every node's
    backend, device and dtype (the mlx backend by default)."""
    from mlxring.weights import footprint

    fp = footprint(model)
    if not 1 <= ranks <= fp.num_layers:
        raise UserError(f"--ranks must be between 1 and the model's {fp.num_layers} layers")
    spans = keep_kv_pairs(split_layers(fp.num_layers, [1] * ranks), fp.kv_pairs)
    nodes = tuple(
        NodeConfig(
            name=f"rank{r}", host="localhost", memory_gb="auto", layers=span, **(compute or {})
        )  # fmt: skip
        for r, span in enumerate(spans)
    )
    return ClusterConfig(name=f"local-{ranks}", nodes=nodes)


def remote_memory_bytes(node: NodeConfig) -> int:
    """Ask a remote node for its physical memory over ssh (`memory_gb: auto`)."""
    code = "import os; print(os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES'))"
    cmd = [
        *shlex.split(SSH),
        node.ssh or node.host,
        shlex.join([node.python or "python3", "-c", code]),
    ]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=True)
        return int(out.stdout.strip())
    except (subprocess.SubprocessError, ValueError, OSError) as e:
        raise UserError(
            f"node {node.name!r}: cannot detect its memory over ssh ({e}); set memory_gb"
        ) from e


def resolve(
    config: str | None, ranks: int | None, model: str | None, compute: dict | None = None
) -> tuple[ClusterConfig, str, Plan]:
    """The cluster, model directory and plan a launch runs (`compute`: see `local_ring`)."""
    from mlxring.cluster import cluster_plan

    cluster = load_config(config) if config else None
    model = model or (cluster.model if cluster else None)
    if not model:
        raise UserError("no model: pass --model (or set 'model:' in the cluster config)")
    if not os.path.isdir(model) and (cluster is None or cluster.head.is_local):
        raise UserError(f"model {model}: no such directory")
    if cluster is None:
        cluster = local_ring(ranks or 1, model, compute)
    plan = cluster_plan(cluster, model, remote_memory_bytes)
    return cluster, model, plan


def launch_job(config: str | None, ranks: int | None, model: str | None, job: str,
               job_options: dict, head_output=None,
               compute: dict | None = None) -> int:  # fmt: skip
    """Start the ring, run `job` on the head, stop every rank; the exit code of the whole.

    The head's output goes to `head_output` (a binary stream; default stdout); `compute`
    sets the backend of a local ring's nodes (see `local_ring`)."""
    cluster, model, plan = resolve(config, ranks, model, compute)
    specs = rank_specs(cluster, plan, model, job, job_options)
    return run_specs(specs, job, job_options, head_output)


def run_specs(specs: list[RankSpec], job: str, job_options: dict, head_output=None) -> int:
    """Start and supervise ranks already planned; the exit code of the whole ring."""
    from mlxring.supervise import Supervisor

    supervisor = Supervisor(specs, head_output_raw=job != "serve", head_output=head_output,
                            progress=job_options.get("progress", False))  # fmt: skip
    return supervisor.run()
