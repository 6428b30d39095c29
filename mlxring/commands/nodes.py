"""`mlxring nodes`: the workers that discovery (mDNS) sees on this network."""

from __future__ import annotations

import argparse
import dataclasses
import json

from mlxring.cluster.discovery import Advert, browse
from mlxring.crypto.keys import KEY_ENV, key_from_env, read_key_file

DEFAULT_TIMEOUT = 3.0
NOTHING_FOUND = (
    "no mlxring worker answered in {timeout:g} s. Check that a worker is running, that it is "
    "on the same network (mDNS does not cross routers), and that mDNS is not blocked: macOS "
    "asks for Local Network permission, a firewall must let UDP 5353 through, VLANs split it. "
    "Otherwise list the nodes in a cluster config file."
)
KEY_COLUMN = {True: "matches", False: "other cluster", None: "unknown (no key given)"}


def setup_arg_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--cluster-key-file",
        help=f"the cluster key, to tell this cluster's workers from others (default: {KEY_ENV})",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT,
        help=f"seconds to listen (default {DEFAULT_TIMEOUT:g})",
    )
    parser.add_argument(
        "--interface",
        action="append",
        metavar="IP",
        help="browse only on the interface with this address (repeatable; default: all)",
    )
    parser.add_argument("--json", action="store_true", help='print {"nodes": [...]} as JSON')


def nodes_table(adverts: list[Advert]) -> str:
    rows = [("name", "address", "memory", "backend", "version", "key", "problem")]
    for a in adverts:
        host = a.addresses[0] if a.addresses else "?"
        rows.append(
            (
                a.name,
                f"[{host}]:{a.port}" if ":" in host else f"{host}:{a.port}",
                f"{a.memory_bytes / 1e9:.1f} GB",
                f"{a.backend}/{a.device}",
                a.version,
                KEY_COLUMN[a.key_matches],
                a.problem or "",
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def main(args: argparse.Namespace) -> int:
    key = read_key_file(args.cluster_key_file) if args.cluster_key_file else key_from_env()
    adverts = browse(key, args.timeout, args.interface)
    if args.json:
        print(json.dumps({"nodes": [dataclasses.asdict(a) for a in adverts]}))
    elif not adverts:
        print(NOTHING_FOUND.format(timeout=args.timeout))
    else:
        print(nodes_table(adverts))
    return 0
