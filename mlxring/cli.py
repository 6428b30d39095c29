"""`mlxring` command line: one dispatcher, each command a module in `mlxring.commands`."""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import sys

import mlxring
from mlxring.errors import UserError
from mlxring.server.access import configure_logging

DESCRIPTION = """\
Run one large language model across a ring of machines (Apple-Silicon Macs over
Thunderbolt, Linux boxes with torch) as if it were one: each node holds a contiguous
range of the model's layers, hidden states go round the ring sealed on every hop, and
the head serves an OpenAI-compatible API."""

EPILOG = """\
start here:
  mlxring plan CONFIG --model MODEL     the layer split and memory fit, nothing started
  mlxring launch CONFIG                 start every rank and serve the API
  mlxring generate --model MODEL --prompt TEXT [--ranks N]

`mlxring COMMAND --help` shows a command's options; docs/clustering.md says how to
define a cluster."""

COMMANDS = {
    "plan": "Show how a cluster splits a model's layers, before starting anything.",
    "generate": "Generate from one prompt (single node, a local ring, or a cluster).",
    "launch": "Start every rank of a cluster defined in a YAML file and serve the API.",
    "split": "Write each node's share of a model (only its layers' tensors) to a directory.",
    "serve": "Zero-config: find this cluster's workers (mDNS), ship their layers, serve the API.",
    "worker": "Zero-config: offer this machine to a cluster's head (found by mDNS).",
    "bench": "Throughput: one node (mlx-lm), a lockstep ring, or a pipelined ring.",
    "keygen": "Write a new cluster key (every node of a cluster needs the same one).",
    "nodes": "List the mlxring workers that discovery (mDNS) sees on this network.",
    "status": "Show a running cluster's ring, throughput and failures (its API's /v1/status).",
    "make-tiny": "Write a tiny random-weight model of a real architecture (tests, demo).",
}


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions as written; an option's default after its help, where it has one the
    help does not already give (no "(default: None)" on options without one)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (
            not action.option_strings
            or default is None
            or default is False
            or default is argparse.SUPPRESS
            or "default" in text
            or "%(default)" in text
        ):
            return text
        return f"{text} (default: %(default)s)"


def version() -> str:
    """The installed package's version (mlxring.__version__ when run from a checkout)."""
    try:
        return importlib.metadata.version("mlxring")
    except importlib.metadata.PackageNotFoundError:
        return mlxring.__version__


def build_parser() -> tuple[argparse.ArgumentParser, dict]:
    """The parser of every command, and the command modules by name."""
    parser = argparse.ArgumentParser(
        prog="mlxring", description=DESCRIPTION, epilog=EPILOG, formatter_class=HelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"mlxring {version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", title="commands")
    modules = {}
    for name, help_text in COMMANDS.items():
        module = importlib.import_module(f"mlxring.commands.{name.replace('-', '_')}")
        command = sub.add_parser(
            name, help=help_text, description=help_text, formatter_class=HelpFormatter
        )
        module.setup_arg_parser(command)
        modules[name] = module
    return parser, modules


def main(argv: list[str] | None = None) -> int:
    parser, modules = build_parser()
    args = parser.parse_args(argv)
    configure_logging(getattr(args, "log_level", "info"))
    try:
        return modules[args.command].main(args) or 0
    except UserError as e:
        print(f"mlxring {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
