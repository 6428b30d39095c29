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

from mlxring.shards.kv_sharing import kv_sharing_pairs
from mlxring.shards.torch_cache import LayerCaches
from mlxring.shards.torch_shard import TorchShard, to_mx, to_torch
from mlxring.weights import CheckpointError


class TorchGemma4Shard(TorchShard):
    HEAD_MODULES = (*TorchShard.HEAD_MODULES, "model.embed_tokens_per_layer",
                    "model.per_layer_model_projection",
                    "model.per_layer_projection_norm")  # fmt: skip

    def __init__(self, model, start: int, end: int, is_head: bool, device, dtype):
        super().__init__(model, start, end, is_head, device, dtype)
        config = {"model_type": "gemma4_text", **self.config.to_dict()}
        inside = range(start, end)
        for source, sharer in kv_sharing_pairs(config):
            if (source in inside) != (sharer in inside):
                raise CheckpointError(
                    f"layers {start}-{end - 1} split a K/V-sharing pair: layer {sharer} reuses "
                    f"layer {source}'s keys and values, so both must be on one node; move the "
                    "range boundary so that they are"
                )

    @torch.no_grad()
    def embed(self, tokens: mx.array) -> dict[str, torch.Tensor]:
        ids = to_torch(tokens, self.device).long()
        h = self.inner.embed_tokens(ids).to(self.dtype)
        if not self.config.hidden_size_per_layer_input:
            return {"h": h}
        per_layer = self.inner.get_per_layer_inputs(ids, h)
        return {"h": h, "per_layer": self.inner.project_per_layer_inputs(h, per_layer)}

    @torch.no_grad()
    def __call__(self, x: dict, cache: list) -> dict[str, mx.array]:
        x = self.arrive(x)
        h, per_layer = x["h"], x.get("per_layer")
        if per_layer is None and self.config.hidden_size_per_layer_input:
            raise ValueError(f"layers {self.start}-{self.end - 1} need the per-layer inputs")
        # per_layer holds the slices of the last per_layer.shape[2] layers
        first = self.num_layers - per_layer.shape[2] if per_layer is not None else 0
        pos, ropes, masks = self.step_inputs(h, cache[0])  # a stage starts with a K/V owner
        view = LayerCaches(dict(zip(self.layers, cache)))
        shared: dict = {}  # layer type -> the K/V its storing layer computed this step
        for i, layer in self.layers.items():
            kind = self.types[i]
            extra = per_layer[:, :, i - first, :] if per_layer is not None else None
            h = layer(h, extra, shared_kv_states=shared, position_embeddings=ropes[kind],
                      attention_mask=masks[kind], position_ids=pos,
                      past_key_values=view)  # fmt: skip
        out = {"h": to_mx(h)}
        if per_layer is not None and self.end < self.num_layers:
            out["per_layer"] = to_mx(per_layer[:, :, self.end - first :, :])
        return out
