"""`mlxring split`: each node's share of a model (only its layers' tensors, the head's
also the embedding, norm and lm_head), one directory per node, to copy to the nodes."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from tqdm import tqdm

from mlxring.cluster.launch import resolve
from mlxring.cluster.plan import inclusive
from mlxring.errors import UserError
from mlxring.model.bundle import plan_bundle, write_bundle
from mlxring.model.source import resolve_model


def setup_arg_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="model directory or Hugging Face repo id (org/name)")
    parser.add_argument(
        "--config", required=True, help="cluster definition (YAML); memory_gb or layers as numbers"
    )
    parser.add_argument("--out", required=True, help="where to write one directory per node")
    parser.add_argument(
        "--force",
        action="store_true",
        help="write into non-empty node directories (files of the same name are replaced)",
    )


def main(args: argparse.Namespace) -> int:
    model = resolve_model(args.model)
    if not os.path.isdir(model):
        raise UserError(f"model {args.model}: no such directory; pass a model directory")
    cluster, model, plan = resolve(args.config, None, model, contact_nodes=False)
    targets = [Path(args.out) / node.name for node in cluster.nodes]
    for target in targets:
        if target.exists() and not target.is_dir():
            raise UserError(f"{target}: is not a directory; remove it or choose another --out")
        if target.is_dir() and any(target.iterdir()) and not args.force:
            raise UserError(f"{target}: is not empty; pass --force or choose another --out")
    bundles = [
        plan_bundle(model, a.start, a.end, is_head=rank == 0)
        for rank, a in enumerate(plan.assignments)
    ]
    total = sum(b.size for b in bundles)
    with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, disable=None) as bar:
        for bundle, target in zip(bundles, targets):
            write_bundle(bundle, target, bar.update)
    rows = [("node", "layers", "files", "MB")]
    for node, bundle in zip(cluster.nodes, bundles):
        layers = inclusive(*bundle.layers)
        rows.append((node.name, layers, str(len(bundle.files)), f"{bundle.size / 2**20:.1f}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    print(f"{cluster.name}: {plan.num_layers} layers of {model} written to {args.out}")
    for r in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip())
    print(
        "copy each directory to its node, then set `model:` (its path there) and `layers:` "
        "(as above) on that node in the config"
    )
    return 0
