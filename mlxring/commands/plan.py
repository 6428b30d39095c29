"""`mlxring plan`: the layer split of a cluster and whether the model fits."""

from __future__ import annotations

import argparse
import json

from mlxring.errors import UserError
from mlxring.plan import GIB


def human_bytes(n: int) -> str:
    for unit, size in (("GB", GIB), ("MB", 2**20), ("KB", 2**10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


def setup_arg_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="cluster definition (YAML)")
    parser.add_argument("--model", help="model directory (overrides the config's model)")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")


def main(args: argparse.Namespace) -> int:
    from mlxring.cluster import cluster_plan
    from mlxring.config import load_config

    cluster = load_config(args.config)
    model = args.model or cluster.model
    if not model:
        raise UserError(f"{args.config}: no model; set 'model:' in the config or pass --model")
    plan = cluster_plan(cluster, model)
    if args.json:
        print(json.dumps(plan.to_json()))
        return 0
    rows = [("node", "host", "memory", "layers", "weights", "share")]
    for node, a in zip(cluster.nodes, plan.assignments):
        rows.append((
            a.name,
            node.host,
            f"{a.usable_bytes / GIB:.1f} GB usable",
            f"{a.start}-{a.end - 1} ({a.num_layers})",
            human_bytes(a.weight_bytes),
            f"{a.share:.1%}",
        ))  # fmt: skip
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    print(f"{cluster.name}: {plan.num_layers} layers of {model} over {len(rows) - 1} nodes")
    for r in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip())
    return 0
