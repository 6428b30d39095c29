"""A cluster definition meets a model: node budgets and the layer plan."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from mlxring.cluster.config import ClusterConfig, NodeConfig, is_local_host
from mlxring.cluster.plan import GIB, NodeBudget, Plan, PlanError, make_plan
from mlxring.model.weights import footprint


def local_memory_bytes() -> int:
    """Physical memory of this machine (macOS unified memory, Linux RAM)."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def node_budget(index: int, node: NodeConfig, detected_bytes: int | None) -> NodeBudget:
    """The plan's view of one node; `memory_gb: auto` uses `detected_bytes` (its own memory)."""
    if node.memory_gb == "auto":
        if detected_bytes is None:
            raise PlanError(
                f"nodes[{index}].memory_gb: 'auto' can only be detected on the node itself; "
                f"set a number of GB for {node.name!r} ({node.host}) to plan from here"
            )
        memory = detected_bytes
    else:
        memory = int(node.memory_gb * GIB)
    return NodeBudget(node.name, memory, int(node.reserve_gb * GIB), node.layers)


def cluster_plan(
    cluster: ClusterConfig,
    model_dir: str | Path,
    detect_remote: Callable[[NodeConfig], int] | None = None,
) -> Plan:
    """Split `model_dir`'s layers over the cluster's nodes.

    `memory_gb: auto` on a local node is this machine's memory; on a remote node
    it is `detect_remote(node)`, or an error when no detector is given.
    """

    def detected(node: NodeConfig) -> int | None:
        if node.memory_gb != "auto":
            return None
        if node.is_local:
            return local_memory_bytes()
        return detect_remote(node) if detect_remote else None

    budgets = [node_budget(i, node, detected(node)) for i, node in enumerate(cluster.nodes)]
    return make_plan(footprint(model_dir), budgets)


def api_warning(cluster: ClusterConfig, env_keys: str | None) -> str | None:
    """A warning when the API would listen beyond loopback without API keys."""
    if is_local_host(cluster.api.host) or cluster.api.api_keys or env_keys:
        return None
    return (
        f"the API will listen on {cluster.api.host}:{cluster.api.port} without API keys: anyone "
        "who can reach it can use the model; set api.api_keys or MLXRING_API_KEYS"
    )


def human_bytes(n: int) -> str:
    for unit, size in (("GB", GIB), ("MB", 2**20), ("KB", 2**10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


def plan_table(cluster: ClusterConfig, plan: Plan, model: str | Path) -> str:
    """A table per node: name, host, usable memory, layers, weight size, share of memory."""
    rows = [("node", "host", "memory", "layers", "weights", "share")]
    for node, a in zip(cluster.nodes, plan.assignments):
        rows.append(
            (
                a.name,
                node.host,
                f"{human_bytes(a.usable_bytes)} usable",
                f"{a.start}-{a.end - 1} ({a.num_layers})",
                human_bytes(a.weight_bytes),
                f"{a.share:.1%}",
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [f"{cluster.name}: {plan.num_layers} layers of {model} over {len(rows) - 1} nodes"]
    for r in rows:
        lines.append("  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip())
    return "\n".join(lines)
