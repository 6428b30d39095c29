"""`mlxring generate`: one prompt through the model, on one node or through a ring."""

from __future__ import annotations

import argparse
from dataclasses import asdict
from pathlib import Path

from mlxring.cluster.config import DTYPES, EngineConfig
from mlxring.cluster.launch import launch_job
from mlxring.errors import UserError

DEFAULTS = EngineConfig()


def setup_arg_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="model directory (HF or mlx-community)")
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--max-tokens", type=int, default=DEFAULTS.max_tokens)
    parser.add_argument("--temp", type=float, default=0.0, help="0 is greedy")
    parser.add_argument("--top-p", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--prefill-chunk", type=int, default=DEFAULTS.prefill_chunk)
    parser.add_argument("--raw", action="store_true", help="do not apply the chat template")
    parser.add_argument("--json", action="store_true", help="print one JSON object at the end")
    add_compute_args(parser)
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--ranks", type=int, help="run a local ring of N processes (even split)")
    where.add_argument("--config", help="run on the cluster this file defines")


def add_compute_args(parser: argparse.ArgumentParser) -> None:
    """--backend/--device/--dtype: how this node (or every rank of --ranks) computes."""
    parser.add_argument(
        "--backend",
        choices=("mlx", "torch"),
        default="mlx",
        help="compute backend (a --config sets it per node)",
    )
    parser.add_argument(
        "--device", choices=("cpu", "cuda"), default=None, help="torch device (default cpu)"
    )
    parser.add_argument(
        "--dtype", choices=DTYPES, default="auto", help="torch dtype (default: the checkpoint's)"
    )


def compute_options(args: argparse.Namespace) -> dict | None:
    """The compute settings of a local ring's nodes; None for the default (mlx)."""
    if args.backend == "mlx":
        if args.device or args.dtype != "auto":
            raise UserError("--device and --dtype need --backend torch")
        return None
    if getattr(args, "config", None):
        raise UserError("--backend comes from the cluster config (backend: per node)")
    return {"backend": "torch", "device": args.device or "cpu", "dtype": args.dtype}


def job_options(args: argparse.Namespace, engine: EngineConfig) -> dict:
    keys = ("prompt", "max_tokens", "temp", "top_p", "seed", "raw", "json")
    return {**{k: getattr(args, k) for k in keys}, "engine": asdict(engine)}


def main(args: argparse.Namespace) -> int:
    if args.max_tokens < 1 or args.prefill_chunk < 1:
        raise UserError("--max-tokens and --prefill-chunk must be >= 1")
    compute = compute_options(args)
    # one request: the KV budget is whatever it needs (its prompt is counted on top)
    budget = DEFAULTS.max_kv_tokens + args.max_tokens
    engine_config = EngineConfig(
        prefill_chunk=args.prefill_chunk, max_tokens=args.max_tokens, max_kv_tokens=budget
    )
    opts = job_options(args, engine_config)
    if args.ranks is not None or args.config:
        return launch_job(args.config, args.ranks, args.model, "generate", opts, compute=compute)
    if not args.model:
        raise UserError("--model is required (or --config with a model)")
    if not Path(args.model).is_dir():
        raise UserError(f"--model {args.model}: no such directory")
    # lazy: mlx, mlx-lm and transformers load when a model runs here, not for every command
    from mlxring.engine.engine import Engine
    from mlxring.jobs.prompt import generate
    from mlxring.model.facts import ModelFacts
    from mlxring.model.tokenizer import load_tokenizer
    from mlxring.shards import load_shard

    layers = ModelFacts.read(args.model).num_layers
    shard = load_shard(args.model, 0, layers, is_head=True, **(compute or {}))
    engine = Engine(shard, None, load_tokenizer(args.model), engine_config)
    try:
        generate(engine, args.model, opts)
    finally:
        engine.close()
    return 0
