"""Gemma 4 on torch: per-layer inputs travel with the hidden states; K/V sharing stays local.

As on MLX (`mlxring.shards.gemma.Gemma4Shard`), the head builds every layer's
per-layer input from the token ids and sends them as "per_layer" [B, T,
remaining layers, D]; each stage uses its own layers' slices and passes on
those of later layers. A layer that reuses K/V takes them from the last
storing layer of its type, which the planner keeps on the same stage.
"""

from __future__ import annotations

import mlx.core as mx
import torch

from mlxring.model.facts import check_kv_pairs, kv_sharing_pairs
from mlxring.shards.torch_shard import TorchShard, to_torch


class TorchGemma4Shard(TorchShard):
    """Gemma 4's text model: the head also holds the per-layer input embedding."""

    HEAD_MODULES = (
        *TorchShard.HEAD_MODULES,
        "model.embed_tokens_per_layer",
        "model.per_layer_model_projection",
        "model.per_layer_projection_norm",
    )

    def __init__(self, model, start: int, end: int, is_head: bool, device, dtype):
        super().__init__(model, start, end, is_head, device, dtype)
        text = {**self.config.to_dict(), "model_type": "gemma4_text"}  # as in config.json
        check_kv_pairs(start, end, kv_sharing_pairs(text))

    @torch.no_grad()
    def embed(self, tokens: mx.array) -> dict[str, torch.Tensor]:
        ids = to_torch(tokens, self.device).long()
        h = self.inner.embed_tokens(ids).to(self.dtype)
        if not self.config.hidden_size_per_layer_input:
            return {"h": h}
        per_layer = self.inner.get_per_layer_inputs(ids, h)
        return {"h": h, "per_layer": self.inner.project_per_layer_inputs(h, per_layer)}

    def run(self, x: dict[str, torch.Tensor], inputs: dict[str, dict]) -> dict[str, torch.Tensor]:
        h, per_layer = x["h"], x.get("per_layer")
        if per_layer is None and self.config.hidden_size_per_layer_input:
            raise ValueError(f"layers {self.start}-{self.end - 1} need the per-layer inputs")
        # per_layer holds the slices of the last per_layer.shape[2] layers
        first = self.num_layers - per_layer.shape[2] if per_layer is not None else 0
        shared: dict = {}  # layer type -> the K/V its storing layer computed this step
        for i, layer in self.layers.items():  # a stage starts with a K/V owner (cache[0])
            extra = per_layer[:, :, i - first, :] if per_layer is not None else None
            h = layer(h, extra, shared_kv_states=shared, **inputs[self.types[i]])
        out = {"h": h}
        if per_layer is not None and self.end < self.num_layers:
            out["per_layer"] = per_layer[:, :, self.end - first :, :]
        return out
