"""`mlxring generate`: one prompt through the model, printed as it is generated."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from mlxring.errors import UserError
from mlxring.generate import DEFAULT_PREFILL_CHUNK

DEFAULT_MAX_TOKENS = 64


def setup_arg_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="model directory (HF or mlx-community)")
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--max-tokens", type=int, default=DEFAULT_MAX_TOKENS)
    parser.add_argument("--temp", type=float, default=0.0, help="0 is greedy")
    parser.add_argument("--top-p", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--prefill-chunk", type=int, default=DEFAULT_PREFILL_CHUNK)
    parser.add_argument("--raw", action="store_true", help="do not apply the chat template")
    parser.add_argument("--json", action="store_true", help="print one JSON object at the end")


def encode_prompt(tokenizer, prompt: str, raw: bool) -> list[int]:
    """Token ids of `prompt`, as a user turn of the chat template unless `raw`."""
    if not raw and getattr(tokenizer, "chat_template", None):
        messages = [{"role": "user", "content": prompt}]
        return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True))
    return list(tokenizer.encode(prompt))


def main(args: argparse.Namespace) -> int:
    from mlx_lm.utils import load_tokenizer

    from mlxring.generate import LocalChain, generate_tokens
    from mlxring.shards import load_shard, num_layers

    model_dir = Path(args.model)
    if not model_dir.is_dir():
        raise UserError(f"--model {args.model}: no such directory")
    if args.max_tokens < 1 or args.prefill_chunk < 1:
        raise UserError("--max-tokens and --prefill-chunk must be >= 1")
    tokenizer = load_tokenizer(model_dir)
    prompt = encode_prompt(tokenizer, args.prompt, args.raw)
    chain = LocalChain([load_shard(model_dir, 0, num_layers(model_dir), is_head=True)])
    detok = tokenizer.detokenizer
    detok.reset()
    tokens = []
    for token in generate_tokens(
        chain, chain.cache_state, prompt, args.max_tokens, args.temp, args.top_p,
        args.seed, tokenizer.eos_token_ids, args.prefill_chunk,
    ):  # fmt: skip
        tokens.append(token)
        detok.add_token(token)
        if not args.json:
            print(detok.last_segment, end="", flush=True)
    detok.finalize()
    if args.json:
        out = {"tokens": tokens, "text": detok.text, "prompt_tokens": len(prompt)}
        print(json.dumps(out))
    else:
        print(detok.last_segment, flush=True)
    sys.stdout.flush()
    return 0
