"""`mlxring generate`: one prompt through the model, on one node or through a ring."""

from __future__ import annotations

import argparse
import sys
from dataclasses import asdict
from pathlib import Path

from mlxring.cluster.config import DTYPES, EngineConfig
from mlxring.cluster.launch import launch_job
from mlxring.commands.checks import add_log_level, check_context, check_ranks, check_sampling
from mlxring.errors import UserError
from mlxring.server.access import info_enabled

DEFAULTS = EngineConfig()


def setup_arg_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        help="model directory (Hugging Face or mlx-community layout); with --config, "
        "default: the config's model",
    )
    parser.add_argument("--prompt", required=True, help="the prompt (a user message)")
    parser.add_argument(
        "--max-tokens",
        type=int,
        default=DEFAULTS.max_tokens,
        help="tokens to generate at most (the prompt and these fit the model's context)",
    )
    parser.add_argument("--temp", type=float, default=0.0, help="sampling temperature; 0 is greedy")
    parser.add_argument(
        "--top-p", type=float, default=1.0, help="nucleus sampling, in (0, 1]; 1 keeps every token"
    )
    parser.add_argument(
        "--seed", type=int, default=None, help="sampling seed in [0, 2**64) (default: random)"
    )
    parser.add_argument(
        "--prefill-chunk",
        type=int,
        default=DEFAULTS.prefill_chunk,
        help="prompt tokens per prefill step",
    )
    parser.add_argument("--raw", action="store_true", help="do not apply the chat template")
    parser.add_argument("--json", action="store_true", help="print one JSON object at the end")
    add_compute_args(parser)
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--ranks", type=int, help="run a local ring of N processes (even split)")
    where.add_argument("--config", help="run on the cluster this file defines")
    add_log_level(parser, "each node's loading progress, the speed and memory summary")


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
    check_sampling(args.temp, args.top_p, args.seed)
    check_ranks(args.ranks)
    compute = compute_options(args)
    check_context(args.model, args.max_tokens)  # a local directory; the head checks the rest
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
        generate(engine, args.model, opts, note=print_note)
    finally:
        engine.close()
    return 0


def print_note(line: str) -> None:
    """The job's lines for the user (the speed and memory after the text), on stderr."""
    if info_enabled():
        print(line, file=sys.stderr, flush=True)
