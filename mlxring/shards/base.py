"""What the engine and the stages use of a shard, whatever computes it (mlx or torch).

A shard holds layers [start, end) of a model; the head (`is_head`) also holds
the embedding, final norm and lm_head. What travels the ring between stages is
a dict of mx arrays: the hidden states "h" [B, T, D], plus whatever else the
family sends along (Gemma 4's "per_layer" inputs).
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import mlx.core as mx


@runtime_checkable
class Shard(Protocol):
    """One stage's share of a model; `MlxShard` and `TorchShard` implement it."""

    start: int  # the first layer held (absolute index)
    end: int  # one past the last layer held
    is_head: bool  # holds the embedding, final norm and lm_head too

    def embed(self, tokens: mx.array) -> dict:
        """Head only: the ring input for token ids [B, T] ("h", and what the family adds)."""
        ...

    def __call__(self, x: dict, cache: list) -> dict:
        """Run the local layers on arrived `x`, updating `cache`; returns mx arrays for the ring.

        The same keys go out as came in, less those only these layers consumed.
        """
        ...

    def logits(self, x: dict) -> mx.array:
        """Head only: final norm and lm_head on the last stage's arrived output, [B, T, vocab]."""
        ...

    def make_cache(self) -> list:
        """Fresh caches for one sequence: one per local layer that stores keys and values."""
        ...

    def arrive(self, x: dict) -> dict:
        """Tensors from the ring, in whatever dtype the sender computed in, as this shard
        computes: its own dtype (and, on torch, its device)."""
        ...

    @property
    def nbytes(self) -> int:
        """Bytes of the weights this shard holds."""
        ...
