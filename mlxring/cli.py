"""`mlxring` command line: one dispatcher, each command a module in `mlxring.commands`."""

from __future__ import annotations

import argparse
import importlib
import sys

from mlxring.errors import UserError

COMMANDS = {
    "plan": "Show how a cluster splits a model's layers, before starting anything.",
    "generate": "Generate from one prompt (single node, a local ring, or a cluster).",
    "launch": "Start every rank of a cluster defined in a YAML file.",
    "split": "Write each node's share of a model (only its layers' tensors) to a directory.",
    "serve": "Zero-config: find this cluster's workers (mDNS), ship their layers, serve the API.",
    "worker": "Zero-config: offer this machine to a cluster's head (found by mDNS).",
    "bench": "Throughput: one node (mlx-lm), a lockstep ring, or a pipelined ring.",
    "keygen": "Write a new cluster key (every node of a cluster needs the same one).",
    "nodes": "List the mlxring workers that discovery (mDNS) sees on this network.",
    "status": "Show a running cluster's ring, throughput and failures (its API's /v1/status).",
    "make-tiny": "Write a tiny random-weight model of a real architecture (tests, demo).",
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mlxring", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    modules = {}
    for name, help_text in COMMANDS.items():
        module = importlib.import_module(f"mlxring.commands.{name.replace('-', '_')}")
        module.setup_arg_parser(sub.add_parser(name, help=help_text, description=help_text))
        modules[name] = module
    args = parser.parse_args(argv)
    try:
        return modules[args.command].main(args) or 0
    except UserError as e:
        print(f"mlxring {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
