"""KV caches of the torch shards, and the positions and masks a step needs.

One `TorchKVCache` per local layer holds keys and values [B, heads, T, head_dim]
for B sequences, right-aligned: a sequence shorter than the longest one has
left padding (`pad`), which the masks hide and the positions skip. The batch
operations the stage state drives (`merge`, `extend`, `filter`) are those of
mlx-lm's batch caches, so `mlxring.engine.stage` treats both backends alike.
Sliding-window layers keep every key; their mask hides what is out of the window.

A decode group's cache may live in an arena of `mlxring.shards.torch_static`
(fixed buffers a CUDA graph replays against): `enter` moves it in; any batch
operation moves it out again to exact-size tensors, and the arena goes back to
its pool once no layer's cache holds it.
"""

from __future__ import annotations

import weakref

import numpy as np
import torch

STEP = 256  # capacity grows in steps of this many positions


class TorchKVCache:
    def __init__(self, pad: list[int] | None = None):
        self.keys: torch.Tensor | None = None  # [rows, H, capacity, D]; rows > B in an arena
        self.values: torch.Tensor | None = None
        self.length = 0  # positions used (padding included)
        self.pad = list(pad) if pad is not None else [0]  # left padding per sequence
        self.batched = False  # a batch cache (merge's), as decode groups hold
        self.arena = None  # the static arena holding keys/values, if any
        self._release = None  # gives the arena back (once), also when this cache is dropped

    @property
    def batch(self) -> int:
        return len(self.pad)

    # the layer's view ---------------------------------------------------------
    def update(self, keys: torch.Tensor, values: torch.Tensor):
        """Append this step's keys/values; all of them so far come back."""
        if self.arena is not None:  # arena steps write through the arena; this is eager
            self._leave()
        new = keys.shape[2]
        end = self.length + new
        if self.keys is None or end > self.keys.shape[2]:
            self._grow(keys, values, end)
        self.keys[:, :, self.length : end] = keys
        self.values[:, :, self.length : end] = values
        self.length = end
        return self.keys[:, :, :end], self.values[:, :, :end]

    def _grow(self, keys: torch.Tensor, values: torch.Tensor, needed: int) -> None:
        capacity = (needed + STEP - 1) // STEP * STEP
        batch, heads, _, dk = keys.shape
        new_k = keys.new_zeros(batch, heads, capacity, dk)
        new_v = values.new_zeros(batch, heads, capacity, values.shape[3])
        if self.keys is not None:
            new_k[:, :, : self.length] = self.keys[:, :, : self.length]
            new_v[:, :, : self.length] = self.values[:, :, : self.length]
        self.keys, self.values = new_k, new_v

    # the static arena --------------------------------------------------------
    def enter(self, arena, layer: int) -> None:
        """Move this cache's sequences into `arena`'s buffers of local layer `layer` (rows
        beyond the batch and positions beyond the length are zeroed)."""
        keys, values = arena.keys[layer], arena.values[layer]
        if keys is not None:
            keys.zero_()
            values.zero_()
            if self.keys is not None and self.length:
                b, n = self.batch, self.length
                keys[:b, :, :n] = self.keys[:b, :, :n]
                values[:b, :, :n] = self.values[:b, :, :n]
        self._detach()
        self.keys, self.values, self.arena = keys, values, arena
        arena.holders += 1
        self._release = weakref.finalize(self, arena.release_one)

    def _detach(self) -> None:
        if self._release is not None:
            self._release()  # at most once, whether called here or at collection
        self._release, self.arena = None, None

    def _leave(self) -> None:
        """Out of the arena into tensors of this cache's own."""
        b, n = self.batch, self.length
        keys = self.keys[:b, :, :n].clone() if self.keys is not None else None
        values = self.values[:b, :, :n].clone() if self.values is not None else None
        self._detach()
        self.keys, self.values = keys, values

    # batch operations (mlx-lm's batch cache interface) --------------------------
    def merge(self, caches: list[TorchKVCache]) -> TorchKVCache:
        """One batch cache holding `caches`' sequences, in order."""
        out = TorchKVCache(pad=[])
        out._assign(caches)
        out.batched = True
        return out

    def extend(self, other: TorchKVCache) -> None:
        """Append `other`'s sequences to this batch."""
        self._assign([self, other])

    def _assign(self, caches: list[TorchKVCache]) -> None:
        length = max(c.length for c in caches)
        pads = [p + length - c.length for c in caches for p in c.pad]
        filled = [c for c in caches if c.keys is not None]
        keys = values = None
        if filled:
            like_k, like_v = filled[0].keys, filled[0].values
            parts_k, parts_v = [], []
            for c in caches:
                batch = len(c.pad)
                k = like_k.new_zeros(batch, like_k.shape[1], length, like_k.shape[3])
                v = like_v.new_zeros(batch, like_v.shape[1], length, like_v.shape[3])
                if c.keys is not None:
                    k[:, :, length - c.length :] = c.keys[:batch, :, : c.length]
                    v[:, :, length - c.length :] = c.values[:batch, :, : c.length]
                parts_k.append(k)
                parts_v.append(v)
            keys, values = torch.cat(parts_k), torch.cat(parts_v)
        self._detach()
        self.keys, self.values, self.length, self.pad = keys, values, length, pads

    def extract(self, index: int) -> TorchKVCache:
        """Sequence `index` alone, without its padding."""
        out = TorchKVCache()
        if self.keys is not None:
            pad = self.pad[index]
            out.keys = self.keys[index : index + 1, :, pad : self.length].clone()
            out.values = self.values[index : index + 1, :, pad : self.length].clone()
        out.length = self.length - self.pad[index]
        return out

    def filter(self, indices) -> None:
        """Keep the sequences at `indices` (in that order); drop padding no one needs."""
        keep = [int(i) for i in np.asarray(indices).reshape(-1)]
        self.pad = [self.pad[i] for i in keep]
        trim = min(self.pad, default=0)
        keys = values = None
        if self.keys is not None:
            index = torch.tensor(keep, device=self.keys.device)
            keys = self.keys[index, :, trim : self.length]
            values = self.values[index, :, trim : self.length]
        self._detach()
        self.keys, self.values = keys, values
        self.pad = [p - trim for p in self.pad]
        self.length -= trim

    @property
    def nbytes(self) -> int:
        """Bytes of the positions in use (an arena's spare rows and capacity not counted)."""
        if self.keys is None:
            return 0
        per_position = (self.keys.shape[1] * self.keys.shape[3]) * self.keys.element_size()
        per_position += (self.values.shape[1] * self.values.shape[3]) * self.values.element_size()
        return per_position * self.batch * self.length

    @property
    def state(self) -> list:
        return []  # nothing lazy to evaluate (mlx caches give arrays here)


class LayerCaches:
    """What transformers' attention modules see as `past_key_values`: the stage's caches."""

    def __init__(self, caches: dict[int, TorchKVCache]):
        self.caches = caches  # absolute layer index -> cache

    def update(self, keys, values, layer_idx: int, *args, **kwargs):
        return self.caches[layer_idx].update(keys, values)


def positions(cache: TorchKVCache, new: int, device) -> torch.Tensor:
    """Position ids [B, new] of the next `new` tokens of each sequence."""
    offsets = torch.tensor([cache.length - p for p in cache.pad], device=device)
    return offsets[:, None] + torch.arange(new, device=device)[None, :]


def attention_mask(cache: TorchKVCache, new: int, window: int | None, dtype, device):
    """Additive mask [B, 1, new, keys] for the next `new` tokens; None when nothing is hidden."""
    before, pad = cache.length, cache.pad
    total = before + new
    if new == 1 and not any(pad) and (window is None or total <= window):
        return None
    kv = torch.arange(total, device=device)[None, None, :]
    q = (before + torch.arange(new, device=device))[None, :, None]
    pads = torch.tensor(pad, device=device)[:, None, None]
    visible = (kv >= pads) & (kv <= q)
    if window is not None:
        visible &= q - kv < window
    mask = torch.zeros(visible.shape, dtype=dtype, device=device)
    mask.masked_fill_(~visible, torch.finfo(dtype).min)
    return mask[:, None]
