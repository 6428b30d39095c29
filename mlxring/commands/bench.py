"""`mlxring bench`: throughput of one node, a lockstep ring, or a pipelined ring."""

from __future__ import annotations

import argparse
import io
import json
from dataclasses import asdict

from mlxring.cluster.config import EngineConfig
from mlxring.cluster.launch import launch_job
from mlxring.commands.generate import add_compute_args, compute_options
from mlxring.errors import UserError

MODES = ("single", "lockstep", "pipelined")


def setup_arg_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True)
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--ranks", type=int, help="a local ring of N processes")
    where.add_argument("--config", help="the cluster this file defines")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--gen-tokens", type=int, default=32)
    parser.add_argument(
        "--mode",
        choices=MODES,
        default="pipelined",
        help="single: the baseline on one node, mlx-lm's own BatchGenerator "
        "(--backend torch: transformers' own generate)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object, no bar")
    add_compute_args(parser)


def main(args: argparse.Namespace) -> int:
    if min(args.concurrency, args.prompt_tokens, args.gen_tokens) < 1:
        raise UserError("--concurrency, --prompt-tokens and --gen-tokens must be >= 1")
    opts = {
        "concurrency": args.concurrency,
        "prompt_tokens": args.prompt_tokens,
        "gen_tokens": args.gen_tokens,
        "mode": args.mode,
        "progress": not args.json,
    }
    compute = compute_options(args)
    if args.mode == "single":
        # lazy: mlx-lm or transformers load only for the baseline that needs them
        from mlxring.jobs import baselines

        if compute:
            device, dtype = compute["device"], compute["dtype"]
            summary = baselines.bench_single_torch(args.model, opts, device, dtype)
        else:
            summary = baselines.bench_single(args.model, opts)
        print_summary(summary, args.json)
        return 0
    opts["engine"] = asdict(EngineConfig(mode=args.mode, max_batch=max(16, args.concurrency)))
    captured = io.BytesIO()
    code = launch_job(args.config, args.ranks or 1, args.model, "bench", opts, captured, compute)
    if code:
        return code
    print_summary(json.loads(captured.getvalue().decode().strip().splitlines()[-1]), args.json)
    return 0


def print_summary(summary: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps(summary))
        return
    print(
        f"{summary['mode']}, concurrency {summary['concurrency']}: "
        f"aggregate {summary['aggregate_tok_s']:.2f} tok/s, per request "
        f"{summary['per_request_tok_s']} tok/s, TTFT p50 {summary['ttft_ms_p50']:.0f} ms "
        f"p95 {summary['ttft_ms_p95']:.0f} ms"
    )
