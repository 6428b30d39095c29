"""`mlxring make-tiny`: a tiny random-weight checkpoint of a real architecture."""

from __future__ import annotations

import argparse

from mlxring.errors import UserError
from mlxring.tiny import FAMILIES, LAYOUTS


def setup_arg_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--family", choices=list(FAMILIES), default="llama", help="the model architecture"
    )
    layouts = sorted({lay for options in LAYOUTS.values() for lay in options})
    parser.add_argument("--layout", choices=layouts, help="checkpoint layout (gpt_oss)")
    parser.add_argument("--out", required=True, help="directory to write (created)")
    parser.add_argument("--layers", type=int, default=6, help="transformer layers")
    parser.add_argument("--hidden", type=int, default=64, help="hidden size")
    parser.add_argument(
        "--intermediate", type=int, default=None, help="MLP size (default: 2 x hidden)"
    )
    parser.add_argument("--heads", type=int, default=4, help="attention heads")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights")


def main(args: argparse.Namespace) -> int:
    try:
        # lazy: the torch extra may be missing; then this command says how to install it
        from mlxring.tiny.make import make_tiny
    except ImportError as e:
        raise UserError(
            f"make-tiny needs the torch extra ({e}): pip install 'mlxring[torch]'"
        ) from e
    if args.layers < 1 or args.hidden % args.heads:
        raise UserError("--layers must be >= 1 and --hidden a multiple of --heads")
    try:
        out = make_tiny(
            args.family,
            args.out,
            args.layers,
            args.hidden,
            args.intermediate,
            args.heads,
            args.seed,
            layout=args.layout,
        )
    except ValueError as e:
        raise UserError(str(e)) from e
    print(f"wrote a tiny {args.family} model ({args.layers} layers) to {out}")
    return 0
