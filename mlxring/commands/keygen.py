"""`mlxring keygen`: a new cluster key (32 random bytes, hex, file mode 0600)."""

from __future__ import annotations

import argparse
import os

from mlxring.crypto.keys import DEFAULT_KEY_FILE, new_key, write_key
from mlxring.errors import UserError


def setup_arg_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--out",
        default=DEFAULT_KEY_FILE,
        help=f"the key file to write, mode 0600 (default {DEFAULT_KEY_FILE}); a symlink or a "
        "directory there is refused",
    )
    parser.add_argument(
        "--force", action="store_true", help="replace an existing key file (a regular file only)"
    )


def main(args: argparse.Namespace) -> int:
    out = str(args.out)
    if out.endswith(("/", os.sep)) and not os.path.isdir(out):  # a directory meant: no file
        name = os.path.join(out, "cluster.key")
        raise UserError(f"--out {out} names a directory; pass a file path (e.g. {name})")
    path = write_key(args.out, new_key(), force=args.force)
    print(
        f"wrote a new cluster key to {path} (mode 0600); copy it to every node of the "
        "cluster and set cluster_key_file (or MLXRING_CLUSTER_KEY)"
    )
    return 0
