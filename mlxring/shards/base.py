"""What the engine and the stages use of a shard, whatever computes it (mlx or torch).

A shard holds layers [start, end) of a model; the head (`is_head`) also holds
the embedding, final norm and lm_head. What travels the ring between stages is
a dict of mx arrays: the hidden states "h" [B, T, D], plus whatever else the
family sends along (Gemma 4's "per_layer" inputs). A shard computes on its own
tensors (mx arrays, or torch tensors on its device): `arrive` takes the wire form
in, `depart` makes it only where tensors leave the node, and the head samples
where its logits are (`sample`), so a single torch node never copies hidden
states or logits to the host.
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
        """Run the local layers on arrived `x`, updating `cache`; returns this shard's own
        tensors (`depart` makes them the wire form).

        The same keys go out as came in, less those only these layers consumed.
        """
        ...

    def depart(self, x: dict) -> dict[str, mx.array]:
        """This shard's output as it goes on the wire: mx arrays on the host, in the dtype
        this shard computes in."""
        ...

    def logits(self, x: dict) -> mx.array:
        """Head only: final norm and lm_head on the last stage's arrived output, [B, T, vocab]."""
        ...

    def sample(self, x: dict, seqs: list) -> list[int]:
        """Head only: a token per sequence from the last position's logits of the arrived
        output, with each sequence's sampling parameters (temperature 0: argmax)."""
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
