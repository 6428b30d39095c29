"""A cluster definition meets a model: node budgets and the layer plan."""

from __future__ import annotations

import os
from pathlib import Path

from mlxring.config import ClusterConfig, NodeConfig
from mlxring.plan import GIB, NodeBudget, Plan, PlanError, make_plan


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


def cluster_plan(cluster: ClusterConfig, model_dir: str | Path) -> Plan:
    """Split `model_dir`'s layers over the cluster's nodes; local `auto` nodes use this machine."""
    from mlxring.weights import footprint

    local = local_memory_bytes()
    budgets = [
        node_budget(i, node, local if node.is_local else None)
        for i, node in enumerate(cluster.nodes)
    ]
    return make_plan(footprint(model_dir), budgets)
