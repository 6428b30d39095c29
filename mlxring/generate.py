"""One prompt through a chain of stages: chunked prefill, then token-by-token decode.

`LocalChain` runs every stage in this process (single node, or shards chained
in ring order for tests); the ring runs the same loop with remote stages.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import mlx.core as mx

DEFAULT_PREFILL_CHUNK = 512


class LocalChain:
    """Stages in ring order in one process; the first is the head (embed, norm, lm_head)."""

    def __init__(self, stages: Sequence):
        self.stages = list(stages)
        self.reset()

    def reset(self) -> None:
        """Start a new sequence: fresh caches on every stage."""
        self.caches = [stage.make_cache() for stage in self.stages]

    @property
    def head(self):
        return self.stages[0]

    def hidden(self, tokens: mx.array) -> dict[str, mx.array]:
        """The last stage's output for `tokens` [B, T], advancing every stage's cache."""
        x = self.head.embed(tokens)
        for stage, cache in zip(self.stages, self.caches):
            x = stage(stage.arrive(x), cache)  # as on the ring: converted on arrival
        return x

    def __call__(self, tokens: mx.array) -> mx.array:
        """Logits [B, T, vocab] for `tokens` [B, T]."""
        return self.head.logits(self.head.arrive(self.hidden(tokens)))

    def cache_state(self) -> list:
        return [c.state for caches in self.caches for c in caches]


def generate_tokens(
    model: Callable[[mx.array], mx.array],
    cache_state: Callable[[], list],
    prompt: Sequence[int],
    max_tokens: int,
    temp: float = 0.0,
    top_p: float = 0.0,
    seed: int | None = None,
    stop_ids: Sequence[int] = (),
    prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
) -> Iterator[int]:
    """Yield generated token ids; temperature 0 is greedy.

    As mlx-lm's `generate_step`, every prompt token but the last is prefilled in
    chunks and the last one is the first decode step.
    """
    from mlx_lm.sample_utils import make_sampler  # mlx_lm imports transformers: load on use

    if not prompt:
        raise ValueError("the prompt is empty")
    if seed is not None:
        mx.random.seed(seed)
    sampler = make_sampler(temp=temp, top_p=top_p)
    prompt = list(prompt)
    while len(prompt) > 1:
        n = min(prefill_chunk, len(prompt) - 1)
        model(mx.array([prompt[:n]]))
        mx.eval(cache_state())
        prompt = prompt[n:]
    token = mx.array([prompt])
    for _ in range(max_tokens):
        logits = model(token)[:, -1, :]
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        token = sampler(logprobs)
        next_id = int(token.item())
        yield next_id
        if next_id in stop_ids:
            return
        token = token.reshape(1, 1)
