"""Llama (and Llama-shaped) models on MLX, reusing mlx-lm's `models.llama`."""

from __future__ import annotations

import mlx.core as mx
from mlx_lm.models.base import create_attention_mask
from mlx_lm.models.cache import KVCache, RotatingKVCache

from mlxring.shards.mlx_shard import Absent, MlxShard


class LlamaShard(MlxShard):
    def drop_head_modules(self) -> None:
        self.model.model.embed_tokens = Absent()
        self.model.model.norm = Absent()
        if "lm_head" in self.model:
            self.model.lm_head = Absent()

    def embed(self, tokens: mx.array) -> dict[str, mx.array]:
        return {"h": self.model.model.embed_tokens(tokens)}

    @property
    def sliding(self) -> list[bool]:
        """Per local layer: sliding-window attention (by absolute index)."""
        types = self.args.layer_types[self.start : self.end]
        return [t == "sliding_attention" for t in types]

    def __call__(self, x: dict[str, mx.array], cache: list) -> dict[str, mx.array]:
        h = x["h"]
        window = self.args.sliding_window
        masks = {}
        for i, sliding in enumerate(self.sliding):
            if sliding not in masks:
                masks[sliding] = create_attention_mask(
                    h, cache[i], window_size=window if sliding else None
                )
        for layer, sliding, c in zip(self.layers, self.sliding, cache):
            h = layer(h, masks[sliding], cache=c)
        return {"h": h}

    def logits(self, x: dict[str, mx.array]) -> mx.array:
        h = self.model.model.norm(x["h"])
        if self.args.tie_word_embeddings:
            return self.model.model.embed_tokens.as_linear(h)
        return self.model.lm_head(h)

    def make_cache(self) -> list:
        window = self.args.sliding_window
        return [RotatingKVCache(max_size=window) if s else KVCache() for s in self.sliding]
