"""A non-head stage of the ring: apply each step to its own layers and caches, pass it on.

The head embeds, runs its own layers and sends each step right (see
`mlxring.engine.engine`); every stage runs its range and forwards the result;
the ring closes on the head, which applies the final norm and lm_head. Stages
keep KV caches for their own layers only, driven by the step headers.
"""

from __future__ import annotations

import time

from mlxring.engine.stage import StageState
from mlxring.transport import Channel, ProtocolError


def serve_stage(shard, channel: Channel) -> None:
    """Serve steps until the head stops the ring."""
    state = StageState(shard)
    layers = (shard.start, shard.end)
    while True:
        header, x = channel.recv()
        op = header.get("op")
        if op == "step":
            started = time.perf_counter()
            channel.send(header, state.apply(header, x or None), layers=layers)
            state.record(time.perf_counter() - started)  # send evaluates the step
        elif op == "stats":
            header["stages"].append(state.stats())
            channel.send(header, layers=layers)
        elif op == "stop":
            channel.send(header)
            channel.transport.flush()
            return
        else:
            raise ProtocolError(f"unknown ring message {header}")
