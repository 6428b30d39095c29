"""Checks of command-line values that several commands share, each a one-line UserError
(never a traceback from deep inside a rank), and the --log-level option."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from mlxring.engine.limits import SEED_LIMIT
from mlxring.errors import UserError
from mlxring.model.facts import ModelFacts
from mlxring.server.access import LOG_LEVELS


def add_log_level(parser: argparse.ArgumentParser, info: str) -> None:
    """--log-level: what the launcher and the head print besides results and errors;
    `info` says what the default level adds."""
    parser.add_argument(
        "--log-level",
        choices=LOG_LEVELS,
        default="info",
        help=f"info: {info}; warning: warnings and errors only; debug: info, and a line "
        "when each API request arrives",
    )


def check_port(port: int | None, flag: str = "--port") -> None:
    if port is not None and not 1 <= port <= 65535:
        raise UserError(f"{flag} {port}: a port is a number from 1 to 65535")


def check_ranks(ranks: int | None) -> None:
    if ranks is not None and ranks < 1:
        raise UserError(f"--ranks {ranks}: a ring needs at least 1 rank")


def check_sampling(temp: float, top_p: float, seed: int | None) -> None:
    """--temp >= 0, --top-p in (0, 1], --seed in [0, 2**64)."""
    if not (math.isfinite(temp) and temp >= 0):
        raise UserError(f"--temp {temp:g}: the temperature must be >= 0 (0 is greedy)")
    if not 0 < top_p <= 1:
        raise UserError(f"--top-p {top_p:g}: must be in (0, 1] (1 keeps every token)")
    if seed is not None and not 0 <= seed < SEED_LIMIT:
        raise UserError(f"--seed {seed}: must be in [0, 2**64)")


def check_context(model: str | None, max_tokens: int) -> None:
    """--max-tokens against the context length of `model`, where it is a local directory
    (a remote node's path is checked by the head when it runs the prompt)."""
    if not model or not (Path(model) / "config.json").is_file():
        return
    context = ModelFacts.read(model).context_length
    if max_tokens >= context:
        raise UserError(
            f"--max-tokens {max_tokens}: the model's context length is {context} tokens, "
            f"the prompt included; ask for fewer than {context}"
        )
