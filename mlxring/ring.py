"""Pipeline decode around the ring: the head's side and every other stage's loop.

The head embeds, runs its own layers and sends the hidden states right; each
stage runs its range and passes them on; the ring closes on the head, which
applies the final norm and lm_head. Stages keep KV caches for their own layers
only; a `reset` flag on a step starts a new sequence on every stage.
"""

from __future__ import annotations

import mlx.core as mx

from mlxring.transport import Channel, ProtocolError


class RingHead:
    """The head stage; callable like `LocalChain` (tokens -> logits)."""

    def __init__(self, shard, channel: Channel | None):
        self.shard = shard
        self.channel = channel
        self.reset()

    def reset(self) -> None:
        """Start a new sequence: fresh caches here and, with the next step, on every stage."""
        self.cache = self.shard.make_cache()
        self._reset = True

    def hidden(self, tokens: mx.array) -> dict[str, mx.array]:
        x = self.shard(self.shard.embed(tokens), self.cache)
        if self.channel is not None:
            layers = (self.shard.start, self.shard.end)
            self.channel.send({"op": "step", "reset": self._reset}, x, layers=layers)
            meta, x = self.channel.recv()
            if meta.get("op") != "step" or not x:
                raise ProtocolError(f"expected the step back from the ring, got {meta}")
        self._reset = False
        return x

    def __call__(self, tokens: mx.array) -> mx.array:
        return self.shard.logits(self.hidden(tokens))

    def cache_state(self) -> list:
        return [c.state for c in self.cache]

    def stop(self) -> None:
        """Tell every stage to exit, and wait for the message to come round."""
        if self.channel is not None:
            self.channel.send({"op": "stop"})
            self.channel.recv()
            self.channel.transport.flush()


def serve_stage(shard, channel: Channel) -> None:
    """A non-head stage: apply each step to its own layers and caches, pass it on."""
    cache = shard.make_cache()
    while True:
        meta, x = channel.recv()
        op = meta.get("op")
        if op == "step":
            if meta.get("reset"):
                cache = shard.make_cache()
            channel.send(meta, shard(x, cache), layers=(shard.start, shard.end))
        elif op == "stop":
            channel.send(meta)
            channel.transport.flush()
            return
        else:
            raise ProtocolError(f"unknown ring message {meta}")
