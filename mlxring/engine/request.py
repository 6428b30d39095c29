"""A request and its sequence: sampling parameters, generated tokens, stop conditions."""

from __future__ import annotations

import itertools
import secrets
from dataclasses import dataclass, field

import mlx.core as mx

from mlxring.engine.limits import SEED_LIMIT

_ids = itertools.count(1)


@dataclass
class SamplingParams:
    max_tokens: int | None = None  # None: the engine's default (EngineConfig.max_tokens)
    temperature: float = 0.0  # 0 is greedy
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None  # None: a fresh random seed per request; a given one repeats
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False  # benchmarks: always generate max_tokens
    # None: no log probabilities; k: each token's log probability and its k likeliest
    logprobs: int | None = None
    logit_bias: dict[int, float] | None = None  # added to those tokens' logits first

    def __post_init__(self):
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ValueError("max_tokens must be >= 1")
        if self.temperature < 0 or not 0 < self.top_p <= 1 or self.top_k < 0:
            raise ValueError("temperature >= 0, 0 < top_p <= 1 and top_k >= 0 are required")
        if self.seed is not None and (
            not isinstance(self.seed, int)
            or isinstance(self.seed, bool)
            or not 0 <= self.seed < SEED_LIMIT
        ):
            raise ValueError(f"seed must be an integer in [0, 2**64), got {self.seed!r}")
        if self.logprobs is not None and self.logprobs < 0:
            raise ValueError("logprobs must be >= 0 (the likeliest tokens to report)")


@dataclass
class Sequence:
    """One request as the scheduler sees it."""

    prompt: list[int]
    params: SamplingParams
    stop_ids: frozenset[int] = frozenset()
    id: int = field(default_factory=lambda: next(_ids))
    tokens: list[int] = field(default_factory=list)  # generated so far
    prefilled: int = 0  # prompt tokens already through every stage
    group: int | None = None  # decode micro-batch, once prefilled
    finish_reason: str | None = None  # "stop" | "length" | "cancelled"
    key: mx.array | None = None  # per-request PRNG state (seeded sampling)
    # with params.logprobs: the last token's log probability and the likeliest (id, lp)
    last_logprobs: tuple[float, list[tuple[int, float]]] | None = None

    def __post_init__(self):
        if not self.prompt:
            raise ValueError("the prompt is empty")
        if self.params.temperature > 0:
            seed = self.params.seed
            if seed is None:  # unpredictable: one request's samples say nothing of another's
                seed = secrets.randbits(64)
            self.key = mx.random.key(seed)

    @property
    def prefill_done(self) -> bool:
        return self.prefilled >= len(self.prompt) - 1  # the last prompt token decodes first

    @property
    def kv_tokens(self) -> int:
        """The most cache positions it can take: its prompt plus max_tokens."""
        return len(self.prompt) + (self.params.max_tokens or 0)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def next_input(self) -> int:
        """The token the next decode step feeds (the last prompt token, then the last sample)."""
        return self.tokens[-1] if self.tokens else self.prompt[-1]

    def append(self, token: int) -> None:
        self.tokens.append(token)
        if token in self.stop_ids:
            self.finish_reason = "stop"
        elif len(self.tokens) >= self.params.max_tokens:
            self.finish_reason = "length"
