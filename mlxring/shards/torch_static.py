"""Decode steps of a torch shard at fixed addresses: a static KV cache and CUDA graphs.

A decode group's caches move into an `Arena`: every local layer's keys and values
preallocated as [rows, kv heads, capacity, head dim] (rows and capacity rounded up
to buckets), plus the step's inputs (hidden states, the length so far, each row's
left padding). A step is one function of those buffers alone: positions, masks and
the K/V write position are computed on the device from them, and attention runs
over the whole capacity with the unused part masked. On CUDA that function is
captured once per arena as a CUDA graph and replayed for every later step of
whichever batch holds the arena, so a step costs one launch instead of hundreds.
By default the function is first compiled with `torch.compile` (elementwise work
fused into few kernels; compiled once per shape kind, not per arena), then captured.

Rows past the batch compute garbage that nothing reads. Arenas are pooled by size
(with their graphs) and reused by later batches; a batch operation on the caches
(admit, evict) moves them out, and the next step moves them into an arena again.

Modes: "compiled" (CUDA's default: torch.compile, then a CUDA graph), "graphs"
(the step captured as it is), "static" (the same step, launched op by op), "eager"
(CPU's default: exact-size caches, no arena). Each falls back to the next one that
works and says why once on stderr: compiled to graphs when compiling fails, graphs
to static on a CPU or when capture fails (an op that syncs with the host, such as
transformers' GPT-OSS experts). `MLXRING_TORCH_DECODE` sets the mode of every torch
shard.
"""

from __future__ import annotations

import os
import sys

import torch

DECODE_ENV = "MLXRING_TORCH_DECODE"
MODES = ("eager", "static", "graphs", "compiled")
GRAPHED = ("graphs", "compiled")
MIN_CAPACITY = 256  # positions: capacities are powers of two from here
FREE_ARENAS = 4  # arenas kept for reuse once no batch holds them
# inductor's options for the compiled step: coordinate descent tunes each kernel's block
# sizes (a batch-1 step on an H100: 1.85 -> 1.73 ms; compiling takes longer, bench/RESULTS.md)
COMPILE_OPTIONS = {"coordinate_descent_tuning": True}


def bucket(n: int, least: int = 1) -> int:
    """The power of two >= max(n, least)."""
    n = max(n, least)
    return 1 << (n - 1).bit_length()


def resolve_mode(requested: str | None, device: torch.device) -> tuple[str, str | None]:
    """The decode mode to run and, when it is not the one asked for, why."""
    requested = requested or os.environ.get(DECODE_ENV) or None
    if requested is None:
        return ("compiled" if device.type == "cuda" else "eager"), None
    if requested not in MODES:
        raise ValueError(f"decode mode {requested!r}: use one of {', '.join(MODES)}")
    if requested in GRAPHED and device.type != "cuda":
        where = device.type
        return "static", f"no CUDA graphs (they need a CUDA device; this stage runs on {where})"
    return requested, None


class Arena:
    """Fixed buffers for one decode batch of up to `rows` sequences and `capacity` positions."""

    def __init__(self, pool: ArenaPool, rows: int, capacity: int, shapes: list, dtype, device):
        self.pool, self.rows, self.capacity = pool, rows, capacity
        self.keys: list[torch.Tensor | None] = []
        self.values: list[torch.Tensor | None] = []
        for shape in shapes:  # per local layer: (kv heads, key dim, value dim); None: no K/V
            keys = values = None
            if shape is not None:
                heads, dk, dv = shape
                keys = torch.zeros(rows, heads, capacity, dk, dtype=dtype, device=device)
                values = torch.zeros(rows, heads, capacity, dv, dtype=dtype, device=device)
            self.keys.append(keys)
            self.values.append(values)
        self.length = torch.zeros(1, dtype=torch.long, device=device)  # positions before the step
        self.pad = torch.full((rows,), capacity, dtype=torch.long, device=device)  # spare: hidden
        self.kv = torch.arange(capacity, device=device)
        self.inputs: dict[str, torch.Tensor] = {}
        self.signature: tuple | None = None  # the inputs' names, shapes and dtypes
        self.graph = None  # the captured step
        self.graph_mode: str | None = None  # the mode that captured it
        self.outputs: dict[str, torch.Tensor] | None = None  # what the graph writes
        self.holders = 0  # layer caches in this arena

    def release_one(self) -> None:
        self.holders -= 1
        if self.holders == 0:
            self.pool.give_back(self)

    def bind(self, x: dict[str, torch.Tensor]) -> None:
        """Input buffers for tensors like `x`'s (new ones, and no graph, if they differ)."""
        signature = tuple((k, tuple(v.shape[1:]), v.dtype) for k, v in sorted(x.items()))
        if signature != self.signature:
            self.inputs = {
                k: torch.zeros(self.rows, *v.shape[1:], dtype=v.dtype, device=v.device)
                for k, v in x.items()
            }
            self.signature, self.graph, self.outputs = signature, None, None
        for k, v in x.items():
            self.inputs[k][: v.shape[0]].copy_(v)


class ArenaPool:
    """Arenas no batch holds, by size, for the next batch of that size."""

    def __init__(self):
        self.free: list[Arena] = []

    def take(self, rows: int, capacity: int) -> Arena | None:
        for arena in reversed(self.free):
            if (arena.rows, arena.capacity) == (rows, capacity):
                self.free.remove(arena)
                return arena
        return None

    def give_back(self, arena: Arena) -> None:
        self.free.append(arena)
        del self.free[:-FREE_ARENAS]  # the oldest go (their memory, their graphs)


class StaticView:
    """`past_key_values` for a step in an arena: this step's K/V written at `length`,
    the whole capacity returned (the mask hides what is not in use)."""

    def __init__(self, length: torch.Tensor, keys: list, values: list, index: dict[int, int]):
        self.length, self.keys, self.values = length, keys, values
        self.index = index  # absolute layer -> local index

    def update(self, keys, values, layer_idx: int, *args, **kwargs):
        i = self.index[layer_idx]
        k, v = self.keys[i], self.values[i]
        k[:, :, self.length] = keys  # in place, at a position the device holds
        v[:, :, self.length] = values
        return k, v


class StaticDecoder:
    """A torch shard's decode steps in arenas, eagerly or as CUDA graphs."""

    def __init__(self, shard, mode: str | None = None):
        self.shard = shard
        self.pool = ArenaPool()
        self.shapes: list | None = None  # per local layer (kv heads, dk, dv), from a probe
        self.graph_pool = None
        self.compiled = None  # torch.compile of `forward`, made on first use
        self.set_mode(mode)

    def set_mode(self, mode: str | None) -> None:
        """Decode "eager" | "static" | "graphs" | "compiled" (None: the environment's, else
        the device's default)."""
        self.mode, self.fallback = resolve_mode(mode, self.shard.device)
        if self.fallback and mode is not None:
            self.say(self.fallback)

    def fall_back(self, mode: str, reason: str) -> None:
        self.mode, self.fallback = mode, reason
        self.say(reason)

    def say(self, reason: str) -> None:
        s = self.shard
        what = {
            "graphs": "CUDA graphs of the uncompiled step",
            "static": "decoding op by op with the static cache",
        }.get(self.mode, f"decoding in mode {self.mode}")
        print(
            f"mlxring: torch layers {s.start}-{s.end - 1}: {reason}; {what}",
            file=sys.stderr,
            flush=True,
        )

    def applies(self, x: dict, cache: list) -> bool:
        """Whether this call is a decode step of a group that an arena serves."""
        return (
            self.mode != "eager"
            and x["h"].shape[1] == 1
            and bool(cache)
            and getattr(cache[0], "batched", False)
        )

    # the step -----------------------------------------------------------------
    def __call__(self, x: dict[str, torch.Tensor], cache: list) -> dict[str, torch.Tensor]:
        batch, length = cache[0].batch, cache[0].length
        arena = self.arena_for(x, cache, batch, length)
        arena.bind(x)
        arena.length.fill_(length)
        if self.mode in GRAPHED and (arena.graph is None or arena.graph_mode != self.mode):
            self.capture(arena)
        if self.mode in GRAPHED:
            arena.graph.replay()
            out = arena.outputs
        else:
            out = self.step(arena)
        for c in cache:
            c.length += 1
        return {k: v[:batch].clone() for k, v in out.items()}

    def step(self, arena: Arena, forward=None) -> dict[str, torch.Tensor]:
        """One decode step of every row, from the arena's buffers alone (what is captured)."""
        forward = forward or self.forward
        return forward(arena.inputs, arena.length, arena.pad, arena.kv, arena.keys, arena.values)

    def forward(self, x: dict, length, pad, kv, keys: list, values: list) -> dict:
        """The step on tensors alone: inputs [rows, 1, ...], the length so far [1], each
        row's left padding [rows], key indices [capacity], the layers' K/V buffers."""
        shard = self.shard
        h = x["h"]
        pos = (length - pad)[:, None]  # [rows, 1]
        visible = (kv[None, :] >= pad[:, None]) & (kv[None, :] <= length)  # [rows, capacity]
        masks = {}
        for kind, window in shard.windows.items():
            seen = visible if window is None else visible & (length - kv < window)[None, :]
            mask = torch.zeros(seen.shape, dtype=h.dtype, device=h.device)
            masks[kind] = mask.masked_fill_(~seen, torch.finfo(h.dtype).min)[:, None, None, :]
        view = StaticView(length, keys, values, {layer: i for i, layer in enumerate(shard.layers)})
        out = shard.run(x, shard.layer_kwargs(h, pos, masks, view))
        if shard.is_head and shard.end == shard.num_layers:  # the whole model: nothing departs
            out["logits"] = shard.head_logits(out["h"][:, -1])  # for `sample`, in the same step
        return out

    # arenas -------------------------------------------------------------------
    def arena_for(self, x: dict, cache: list, batch: int, length: int) -> Arena:
        """The arena `cache` is in, if it fits this step; else one it is moved into."""
        arena = cache[0].arena
        if (
            arena is not None
            and batch <= arena.rows
            and length < arena.capacity
            and all(c.arena is arena for c in cache)
        ):
            return arena
        if self.shapes is None:
            self.shapes = self.probe(x)
        rows, capacity = bucket(batch), bucket(length + 1, MIN_CAPACITY)
        arena = self.pool.take(rows, capacity) or self.new_arena(rows, capacity)
        for i, c in enumerate(cache):
            c.enter(arena, i)
        pads = cache[0].pad + [capacity] * (rows - batch)
        arena.pad.copy_(torch.tensor(pads, dtype=torch.long))
        return arena

    def new_arena(self, rows: int, capacity: int) -> Arena:
        s = self.shard
        try:
            return Arena(self.pool, rows, capacity, self.shapes, s.dtype, s.device)
        except torch.OutOfMemoryError:  # free arenas first, then try once more
            self.pool.free.clear()
            torch.cuda.empty_cache()
            return Arena(self.pool, rows, capacity, self.shapes, s.dtype, s.device)

    def probe(self, x: dict) -> list:
        """Each local layer's K/V shape: one eager step of one row on fresh caches."""
        s = self.shard
        caches = s.make_cache()
        one = {k: v[:1] for k, v in x.items()}
        s.run(one, s.layer_inputs(one["h"], caches))
        return [
            None if c.keys is None else (c.keys.shape[1], c.keys.shape[3], c.values.shape[3])
            for c in caches
        ]

    # CUDA graphs --------------------------------------------------------------
    def capture(self, arena: Arena) -> None:
        """Capture the arena's step, compiled first in mode "compiled"; what fails falls
        back (compiled -> graphs -> static) and says why, once."""
        if self.mode == "compiled":
            try:
                if self.compiled is None:
                    self.compiled = torch.compile(self.forward, options=COMPILE_OPTIONS)
                self.capture_with(arena, self.compiled)
                return
            except Exception as e:  # compile or capture of the compiled step: go uncompiled
                self.recover()
                self.fall_back("graphs", f"no compiled step ({type(e).__name__}: {e})")
        try:
            self.capture_with(arena, self.forward)
        except Exception as e:  # an op that cannot be captured: go on without graphs
            self.recover()
            self.fall_back("static", f"no CUDA graphs (capture failed: {type(e).__name__}: {e})")

    def capture_with(self, arena: Arena, forward) -> None:
        """One warm-up run (compiles; its K/V writes are the step's own, so repeating them
        is harmless), then the capture."""
        if self.shard.device.type != "cuda":
            raise RuntimeError("CUDA graphs need a CUDA device")
        if self.graph_pool is None:
            self.graph_pool = torch.cuda.graph_pool_handle()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self.step(arena, forward)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.graph_pool):
            outputs = self.step(arena, forward)
        arena.graph, arena.outputs, arena.graph_mode = graph, outputs, self.mode

    def recover(self) -> None:
        """After a failed capture: wait for the device; no arena keeps a graph of the
        mode given up."""
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        for a in self.pool.free:
            a.graph = a.outputs = None
