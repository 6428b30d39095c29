"""Shards loaded in this process, for tests: one forward pass through chained shards
(compared step by step with mlx-lm's full model), and generation through the engine
(the one generation path), with the later stages run in process by `LocalStages`."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path

import mlx.core as mx

from mlxring.cluster.config import EngineConfig
from mlxring.engine.engine import Engine
from mlxring.engine.local import LocalStages
from mlxring.engine.request import SamplingParams
from mlxring.model.tokenizer import encode_prompt, load_tokenizer


class Chain:
    """Shards in ring order called as one model: logits [B, T, vocab] for tokens [B, T]."""

    def __init__(self, shards: Sequence):
        self.shards = list(shards)
        self.caches = [shard.make_cache() for shard in self.shards]

    def __call__(self, tokens: mx.array) -> mx.array:
        head = self.shards[0]
        x = head.embed(tokens)
        for shard, cache in zip(self.shards, self.caches):
            x = shard.depart(shard(shard.arrive(x), cache))  # as on the ring: the wire form
        return head.logits(head.arrive(x))


@functools.cache
def tokenizer_of(model_dir: str):
    return load_tokenizer(model_dir)


def generate(
    shards: Sequence,
    model_dir: str | Path,
    prompt: list[int],
    max_tokens: int,
    stop_at_eos: bool = False,
    prefill_chunk: int = EngineConfig().prefill_chunk,
) -> list[int]:
    """Greedy tokens of `prompt` through the engine over `shards` (the first is the head)."""
    channel = LocalStages(shards[1:]) if len(shards) > 1 else None
    config = EngineConfig(prefill_chunk=prefill_chunk)
    engine = Engine(shards[0], channel, tokenizer_of(str(model_dir)), config)
    try:
        params = SamplingParams(max_tokens=max_tokens, ignore_eos=not stop_at_eos)
        return [e.token for e in engine.submit(prompt, params) if e.token is not None]
    finally:
        engine.close()


def complete(shards: Sequence, model_dir: str | Path, prompt: str, max_tokens: int) -> list[int]:
    """`mlxring generate`'s tokens for a text prompt (chat template, stop at eos)."""
    ids = encode_prompt(tokenizer_of(str(model_dir)), prompt)
    return generate(shards, model_dir, ids, max_tokens, stop_at_eos=True)
