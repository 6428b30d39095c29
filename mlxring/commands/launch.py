"""`mlxring launch`: start every rank of a cluster and serve the OpenAI API on the head."""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict, replace

from mlxring.cluster.config import ClusterConfig, api_options
from mlxring.cluster.fit import api_warning, plan_table
from mlxring.cluster.gather import config_workers
from mlxring.cluster.launch import resolve
from mlxring.cluster.protocol import API_KEYS_ENV
from mlxring.cluster.ranks import rank_specs
from mlxring.commands.checks import add_log_level, check_port
from mlxring.server.front import serve_cluster


def setup_arg_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="cluster definition (YAML)")
    parser.add_argument("--model", help="model directory (overrides the config's model)")
    parser.add_argument("--host", help="API address (overrides api.host; default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="API port (overrides api.port; default 8000)")
    parser.add_argument(
        "--mode",
        choices=("pipelined", "lockstep"),
        help="micro-batch pipelining across the stages, or one batch at a time "
        "(overrides batching.mode; default pipelined)",
    )
    parser.add_argument(
        "--step-timeout",
        type=float,
        help="seconds without an answer before the ring is declared down, answering 503 "
        "(overrides batching.step_timeout; default 60)",
    )
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="print the plan, hostfile and each rank's script; start nothing and contact no "
        "node (a remote node with memory_gb: auto cannot be planned then: its memory is "
        "asked over ssh at launch; set memory_gb to see the plan); API keys are not shown",
    )
    add_log_level(parser, "each node's loading progress, one line per API request")


def serve_options(cluster: ClusterConfig, model: str, args: argparse.Namespace) -> dict:
    """The head's `serve` job options (API keys travel in the environment, not here)."""
    engine = cluster.batching
    if args.mode:
        engine = replace(engine, mode=args.mode)
    if args.step_timeout is not None:
        engine = replace(engine, step_timeout=args.step_timeout)
    return {
        "host": args.host or cluster.api.host,
        "max_body_bytes": cluster.api.max_body_bytes,
        "port": args.port or cluster.api.port,
        "model_name": os.path.basename(os.path.normpath(model)),
        "engine": asdict(engine),
        "log_level": getattr(args, "log_level", "info"),  # the head's request log
    }


def main(args: argparse.Namespace) -> int:
    check_port(args.port)
    # a dry run contacts no node: `auto` memory of a remote node is only asked at launch
    cluster, model, plan = resolve(args.config, None, args.model, contact_nodes=not args.dry_run)
    if args.host:
        cluster = replace(cluster, api=api_options(cluster.api, host=args.host))
    if warning := api_warning(cluster, os.environ.get(API_KEYS_ENV)):
        print(f"mlxring: warning: {warning}", file=sys.stderr)
    opts = serve_options(cluster, model, args)
    if not args.dry_run:  # plan once: `auto` memory of remote nodes is asked over ssh
        with config_workers(cluster, plan, model) as (cluster, workers):
            return serve_cluster(cluster, plan, model, opts, workers)
    specs = rank_specs(cluster, plan, model, "serve", opts)
    print(plan_table(cluster, plan, model))
    for var, content in sorted(specs[0].files.items()):
        print(f"\n{var}:\n{json.dumps(json.loads(content), indent=2)}")
    for spec in specs:
        if spec.node.worker:
            where = f"on the mlxring worker at {spec.node.worker}, from the bundle it is sent"
        elif spec.remote:
            where = f"over ssh to {spec.node.ssh or spec.node.host}"
        else:
            where = "local process"
        print(f"\nrank {spec.rank} ({spec.node.name}, {where}):\n  {spec.script()}")
        if secrets := sorted({*spec.secret_env, *spec.stdin_env}):
            how = "on its stdin" if spec.stdin_env else "in its environment"
            print(f"  (secrets given {how} at start, not shown: {', '.join(secrets)})")
    return 0
