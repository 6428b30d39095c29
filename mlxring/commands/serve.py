"""`mlxring serve`: a zero-config cluster. Find this cluster's workers over mDNS, admit
them with the cluster key, split the model over them, ship each its layers, serve the API."""

from __future__ import annotations

import argparse
import os
import sys

from mlxring.cluster.config import NodeConfig, api_options, check_name
from mlxring.cluster.fit import api_warning, plan_table
from mlxring.cluster.gather import (
    WorkerRing,
    cache_home,
    default_name,
    gather,
    head_address,
    ship_all,
    zeroconf_cluster,
)
from mlxring.cluster.protocol import API_KEYS_ENV
from mlxring.commands.checks import add_log_level, check_port
from mlxring.commands.generate import add_compute_args, compute_options
from mlxring.commands.launch import serve_options
from mlxring.commands.worker import add_key_arg, cluster_key
from mlxring.errors import UserError
from mlxring.model.source import resolve_model
from mlxring.server.front import serve_cluster


def setup_arg_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="model directory or Hugging Face repo id")
    add_key_arg(parser)
    parser.add_argument(
        "--min-workers",
        type=int,
        default=1,
        help="workers to wait for (0: serve alone if none is found; default 1)",
    )
    parser.add_argument(
        "--discovery-timeout",
        type=float,
        default=30.0,
        help="seconds to wait for --min-workers workers (default 30)",
    )
    parser.add_argument("--host", default="127.0.0.1", help="API address (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="API port (default 8000)")
    parser.add_argument(
        "--interface",
        action="append",
        metavar="IP",
        help="discover workers and run the ring on this address (repeatable; default: all)",
    )
    parser.add_argument("--name", help="this head's node name (default: the host name)")
    parser.add_argument(
        "--cache-dir", help=f"where weight manifests are cached (default {cache_home()}/head)"
    )
    parser.add_argument("--mode", choices=("pipelined", "lockstep"), help="default pipelined")
    parser.add_argument(
        "--step-timeout", type=float, help="seconds without an answer before a restart (60)"
    )
    add_compute_args(parser)
    add_log_level(parser, "each node's loading progress, one line per API request")


def main(args: argparse.Namespace) -> int:
    key = cluster_key(args)
    if args.min_workers < 0 or args.discovery_timeout <= 0:
        raise UserError("--min-workers must be >= 0 and --discovery-timeout > 0")
    check_port(args.port)
    name = check_name(args.name, "--name") if args.name else default_name()
    model = resolve_model(args.model)
    compute = compute_options(args) or {}
    api = api_options(host=args.host, port=args.port)
    links = gather(key, args.min_workers, args.discovery_timeout, args.interface)
    hooks = WorkerRing(links, key)
    try:
        head = NodeConfig(
            name=name,
            host=head_address(links, args.interface),
            memory_gb="auto",
            **compute,
        )
        cluster, plan = zeroconf_cluster(
            model, links, head, args.cluster_key_file, api=api, on_failure="restart"
        )
        print(plan_table(cluster, plan, model), flush=True)
        if warning := api_warning(cluster, os.environ.get(API_KEYS_ENV)):
            print(f"mlxring: warning: {warning}", file=sys.stderr)
        cluster = ship_all(cluster, plan, model, links, args.cache_dir or f"{cache_home()}/head")
        opts = serve_options(cluster, model, args)
        if not os.path.isdir(args.model):
            opts["model_name"] = args.model  # a repo id names the model as users know it
        return serve_cluster(cluster, plan, model, opts, hooks)
    finally:
        hooks.close()
