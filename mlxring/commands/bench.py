"""`mlxring bench`: throughput of one node, a lockstep ring, or a pipelined ring; with
`--compare`, all of them next to mlx-lm's (or transformers') own generation."""

from __future__ import annotations

import argparse
import io
import json
from dataclasses import asdict
from pathlib import Path

from mlxring.cluster.config import EngineConfig
from mlxring.cluster.launch import launch_job
from mlxring.commands.checks import check_ranks
from mlxring.commands.generate import add_compute_args, compute_options
from mlxring.errors import UserError
from mlxring.model.source import resolve_model

DEFAULTS = EngineConfig()
MODES = ("single", "lockstep", "pipelined")
REFERENCES = {"mlx-lm": "mlx", "transformers": "torch"}  # --compare: the backend it needs
COMPARE_RANKS = 2


def setup_arg_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="model directory or Hugging Face repo id")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--ranks", type=int, help="a local ring of N processes")
    where.add_argument("--config", help="the cluster this file defines")
    parser.add_argument(
        "--concurrency", default="8", help="requests at once; --compare: a list, e.g. 1,8"
    )
    parser.add_argument(
        "--prompt-tokens", type=int, default=32, help="random prompt tokens of each request"
    )
    parser.add_argument("--gen-tokens", type=int, default=32, help="tokens each request generates")
    parser.add_argument(
        "--mode",
        choices=MODES,
        default="pipelined",
        help="single: the baseline on one node, mlx-lm's own BatchGenerator "
        "(--backend torch: transformers' own generate)",
    )
    parser.add_argument(
        "--compare",
        metavar="LIBRARY",
        help="mlx-lm: its generate_step and BatchGenerator next to mlxring single, lockstep "
        "and pipelined (a local ring of --ranks, default 2), at each --concurrency; with "
        "--backend torch, transformers' generate",
    )
    parser.add_argument("--plot", metavar="FILE.png", help="--compare: draw the figures")
    parser.add_argument(
        "--token-budget",
        type=int,
        default=DEFAULTS.token_budget,
        help="tokens per engine step: decode tokens + prefill chunks (batching.token_budget; "
        f"default {DEFAULTS.token_budget}; a CPU wants a small one, e.g. 64)",
    )
    parser.add_argument(
        "--json", action="store_true", help="print one JSON object (--compare: bar on stderr)"
    )
    add_compute_args(parser)


def main(args: argparse.Namespace) -> int:
    if min(args.prompt_tokens, args.gen_tokens, args.token_budget) < 1:
        raise UserError("--prompt-tokens, --gen-tokens and --token-budget must be >= 1")
    check_ranks(args.ranks)
    if args.compare is not None:
        return compare(args)
    if args.plot:
        raise UserError("--plot draws a comparison: add --compare mlx-lm")
    if not args.concurrency.isdigit() or int(args.concurrency) < 1:
        raise UserError(
            f"--concurrency {args.concurrency!r}: one number >= 1 (a list needs --compare)"
        )
    opts = {
        "concurrency": int(args.concurrency),
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
    engine = EngineConfig(
        mode=args.mode, max_batch=max(16, opts["concurrency"]), token_budget=args.token_budget
    )
    opts["engine"] = asdict(engine)
    captured = io.BytesIO()
    code = launch_job(args.config, args.ranks or 1, args.model, "bench", opts, captured, compute)
    if code:
        return code
    print_summary(json.loads(captured.getvalue().decode().strip().splitlines()[-1]), args.json)
    return 0


def compare(args: argparse.Namespace) -> int:
    """`--compare`: every system at every concurrency; a table, or one JSON line."""
    # lazy: mlxring.jobs brings the engine and the server, which other commands never need
    from mlxring.jobs import plot
    from mlxring.jobs.compare import Workload, parse_levels, run_compare, table

    compute = compute_options(args)
    backend = (compute or {}).get("backend", "mlx")
    if args.compare not in REFERENCES:
        raise UserError(f"--compare {args.compare}: the choices are {', '.join(REFERENCES)}")
    if args.compare == "transformers" and backend != "torch":
        raise UserError("--compare transformers needs --backend torch")
    if args.config:
        raise UserError("--compare runs a local ring of --ranks, not --config")
    ranks = COMPARE_RANKS if args.ranks is None else args.ranks
    if ranks < 2:
        raise UserError("--ranks must be >= 2 with --compare (mlxring-single is the 1-rank run)")
    model = resolve_model(args.model)
    if not Path(model, "config.json").is_file():
        raise UserError(f"--model {args.model}: no model directory (config.json) there")
    if args.plot:
        plot.require()
    work = Workload(
        model,
        ranks,
        parse_levels(args.concurrency),
        args.prompt_tokens,
        args.gen_tokens,
        compute,
        args.token_budget,
    )
    report = run_compare(work)
    if args.plot:
        title = (
            f"{Path(args.model).name}: {backend} backend, {ranks}-rank ring, "
            f"{args.prompt_tokens} prompt + {args.gen_tokens} generated tokens per request"
        )
        plot.draw(report, args.plot, title)
    print(json.dumps(report) if args.json else table(report))
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
