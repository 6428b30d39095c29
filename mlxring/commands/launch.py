"""`mlxring launch`: start every rank of a cluster and run the head's prompt loop."""

from __future__ import annotations

import argparse
import json
import os
import sys


def setup_arg_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="cluster definition (YAML)")
    parser.add_argument("--model", help="model directory (overrides the config's model)")
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="print the plan, hostfile and commands; start nothing",
    )


def main(args: argparse.Namespace) -> int:
    from mlxring.cluster import api_warning, plan_table
    from mlxring.config import load_config
    from mlxring.launch import launch_job, rank_specs, resolve

    if warning := api_warning(load_config(args.config), os.environ.get("MLXRING_API_KEYS")):
        print(f"mlxring: warning: {warning}", file=sys.stderr)
    if not args.dry_run:
        return launch_job(args.config, None, args.model, "repl", {})
    cluster, model, plan = resolve(args.config, None, args.model)
    specs = rank_specs(cluster, plan, model, "repl", {})
    print(plan_table(cluster, plan, model))
    for var, content in sorted(specs[0].files.items()):
        print(f"\n{var}:\n{json.dumps(json.loads(content), indent=2)}")
    for spec in specs:
        where = (
            "local process" if not spec.remote else f"over ssh to {spec.node.ssh or spec.node.host}"
        )
        print(f"\nrank {spec.rank} ({spec.node.name}, {where}):\n  {spec.script()}")
    return 0
