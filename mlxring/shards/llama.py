"""Llama (and Llama-shaped) models on MLX, reusing mlx-lm's `models.llama`."""

from __future__ import annotations

import mlx.core as mx

from mlxring.shards.mlx_shard import Absent, MlxShard


class LlamaShard(MlxShard):
    """Embedding, layers, final norm and lm_head (or the tied embedding)."""

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

    def logits(self, x: dict[str, mx.array]) -> mx.array:
        h = self.model.model.norm(x["h"])
        if self.args.tie_word_embeddings:
            return self.model.model.embed_tokens.as_linear(h)
        return self.model.lm_head(h)
