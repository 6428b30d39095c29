"""`mlxring plan`: the layer split of a cluster and whether the model fits."""

from __future__ import annotations

import argparse
import json

from mlxring.cluster.config import load_config
from mlxring.cluster.fit import cluster_plan, plan_table
from mlxring.errors import UserError


def setup_arg_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="cluster definition (YAML)")
    parser.add_argument("--model", help="model directory (overrides the config's model)")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")


def main(args: argparse.Namespace) -> int:
    cluster = load_config(args.config)
    model = args.model or cluster.model
    if not model:
        raise UserError(f"{args.config}: no model; set 'model:' in the config or pass --model")
    plan = cluster_plan(cluster, model)
    if args.json:
        print(json.dumps(plan.to_json()))
        return 0
    print(plan_table(cluster, plan, model))
    return 0
