"""Launching a cluster: resolve what to run (a config file or a local ring of N ranks),
plan it, start every rank and supervise them until the head's job ends."""

from __future__ import annotations

import os
import shlex
import subprocess

from mlxring.cluster.config import ClusterConfig, NodeConfig, load_config
from mlxring.cluster.fit import cluster_plan
from mlxring.cluster.gather import config_workers
from mlxring.cluster.plan import Plan, keep_kv_pairs, split_layers
from mlxring.cluster.ranks import RankSpec, rank_specs, ssh_argv
from mlxring.cluster.ship import worker_memory
from mlxring.cluster.supervise import Supervisor
from mlxring.errors import UserError
from mlxring.model.source import resolve_model
from mlxring.model.weights import footprint


def local_ring(ranks: int, model: str, compute: dict | None = None) -> ClusterConfig:
    """A cluster of `ranks` local processes with an even split of the model's layers
    (moved where a split would separate a KV-sharing pair); `compute` sets every node's
    backend, device and dtype (the mlx backend by default)."""
    fp = footprint(model)
    if not 1 <= ranks <= fp.num_layers:
        raise UserError(f"--ranks must be between 1 and the model's {fp.num_layers} layers")
    spans = keep_kv_pairs(split_layers(fp.num_layers, [1] * ranks), fp.kv_pairs)
    nodes = tuple(
        NodeConfig(
            name=f"rank{r}", host="localhost", memory_gb="auto", layers=span, **(compute or {})
        )
        for r, span in enumerate(spans)
    )
    return ClusterConfig(name=f"local-{ranks}", nodes=nodes)


def remote_memory_bytes(node: NodeConfig) -> int:
    """Ask a remote node for its physical memory over ssh (`memory_gb: auto`)."""
    code = "import os; print(os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES'))"
    cmd = ssh_argv(node.ssh or node.host, shlex.join([node.python or "python3", "-c", code]))
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=True)
        return int(out.stdout.strip())
    except (subprocess.SubprocessError, ValueError, OSError) as e:
        raise UserError(
            f"node {node.name!r}: cannot detect its memory over ssh ({e}); set memory_gb"
        ) from e


def not_asked(node: NodeConfig) -> int:
    """The memory detector of a dry run: it contacts no node, so `auto` on a remote node
    cannot be planned."""
    raise UserError(
        f"node {node.name!r}: memory_gb 'auto' is asked over ssh at launch, and a dry run "
        "contacts no node; set memory_gb (GB) to see the plan"
    )


def resolve(
    config: str | None,
    ranks: int | None,
    model: str | None,
    compute: dict | None = None,
    contact_nodes: bool = True,
) -> tuple[ClusterConfig, str, Plan]:
    """The cluster, model directory and plan a launch runs (`compute`: see `local_ring`).

    The model is `model`, else the config's, else (when every node names its own) the
    head's; a Hugging Face repo id is resolved to its snapshot in the local cache.

    `memory_gb: auto` of a remote node is asked over ssh; with `contact_nodes=False` (a dry
    run) it is a UserError instead."""
    cluster = load_config(config) if config else None
    model = model or (cluster.model if cluster else None)
    if model:
        model = resolve_model(model)  # a Hugging Face repo id -> its local snapshot
    elif cluster is not None and all(node.model for node in cluster.nodes):
        model = cluster.head.model  # every node names its own: plan with the head's
    else:
        raise UserError(
            "no model: pass --model (or set 'model:' in the cluster config, or on every node)"
        )
    if not os.path.isdir(model) and (cluster is None or cluster.head.is_local):
        raise UserError(f"model {model}: no such directory")
    if cluster is None:
        cluster = local_ring(1 if ranks is None else ranks, model, compute)
    fp = footprint(model)
    if cluster.head.layers is None and 0 in fp.layer_bytes and any(fp.layer_bytes):
        raise UserError(
            f"model {model} holds only some of the layers (a bundle of `mlxring split`?): "
            "set layers: on every node as split printed them, or pass the whole model"
        )

    def detect(node: NodeConfig) -> int:  # memory_gb: auto of a node elsewhere
        return worker_memory(node, cluster) if node.worker else remote_memory_bytes(node)

    plan = cluster_plan(cluster, model, detect if contact_nodes else not_asked)
    return cluster, model, plan


def launch_job(
    config: str | None,
    ranks: int | None,
    model: str | None,
    job: str,
    job_options: dict,
    head_output=None,
    compute: dict | None = None,
) -> int:
    """Start the ring, run `job` on the head, stop every rank; the exit code of the whole.

    The head's output goes to `head_output` (a binary stream; default stdout); `compute`
    sets the backend of a local ring's nodes (see `local_ring`)."""
    cluster, model, plan = resolve(config, ranks, model, compute)
    with config_workers(cluster, plan, model) as (cluster, workers):
        ring = workers.prepare(cluster) if workers else cluster
        specs = rank_specs(ring, plan, model, job, job_options)
        specs = workers.finish(specs) if workers else specs
        return run_specs(specs, job, job_options, head_output)


def run_specs(specs: list[RankSpec], job: str, job_options: dict, head_output=None) -> int:
    """Start and supervise ranks already planned; the exit code of the whole ring."""
    supervisor = Supervisor(
        specs,
        head_output_raw=job != "serve",
        head_output=head_output,
        progress=job_options.get("progress", False),
    )
    return supervisor.run()
