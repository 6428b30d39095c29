"""Gemma 3 and Gemma 4 text models on MLX, reusing mlx-lm's `gemma3_text` and `gemma4_text`.

The multimodal checkpoints (`gemma3`, `gemma4`) run their text tower: mlx-lm
wraps the same text model as `language_model`, and the other towers' tensors
are never read.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.base import create_attention_mask
from mlx_lm.models.cache import KVCache, RotatingKVCache
from mlx_lm.models.gemma4_text import logit_softcap

from mlxring.model.facts import check_kv_pairs, kv_sharing_pairs
from mlxring.shards.mlx_shard import Absent, MlxShard

# modules of the text model that only the head holds
HEAD_MODULES = (
    "embed_tokens",
    "norm",
    "embed_tokens_per_layer",
    "per_layer_model_projection",
    "per_layer_projection_norm",
)


class GemmaShard(MlxShard):
    """What Gemma 3 and 4 share: the text tower, its head modules, the tower filter."""

    @property
    def lm(self) -> nn.Module:
        """mlx-lm's text model (`Model` with `.model` and maybe `.lm_head`)."""
        return getattr(self.model, "language_model", self.model)

    @property
    def text_args(self):
        """The text model's mlx-lm args."""
        return self.lm.args

    @property
    def window(self) -> int:
        return self.text_args.sliding_window

    def drop_head_modules(self) -> None:
        inner = self.lm.model
        for name in HEAD_MODULES:
            if getattr(inner, name, None) is not None:
                setattr(inner, name, Absent())
        if "lm_head" in self.lm:
            self.lm.lm_head = Absent()

    def logits(self, x: dict[str, mx.array]) -> mx.array:
        """Final norm, then the tied embedding or lm_head."""
        h = self.lm.model.norm(x["h"])
        if "lm_head" in self.lm:
            return self.lm.lm_head(h)
        return self.lm.model.embed_tokens.as_linear(h)


class Gemma3Shard(GemmaShard):
    """Gemma 3: a global layer every `sliding_window_pattern` layers, by absolute index."""

    @property
    def sliding(self) -> list[bool]:
        """Per local layer: sliding-window attention (as mlx-lm's `gemma3_text`)."""
        pattern = self.text_args.sliding_window_pattern
        return [i % pattern != pattern - 1 for i in range(self.start, self.end)]

    def embed(self, tokens: mx.array) -> dict[str, mx.array]:
        h = self.lm.model.embed_tokens(tokens)
        # as mlx-lm: the scale is rounded to bfloat16 first
        h = h * mx.array(self.text_args.hidden_size**0.5, mx.bfloat16).astype(h.dtype)
        return {"h": h}


class Gemma4Shard(GemmaShard):
    """Gemma 4: per-layer inputs travel with the hidden states; K/V sharing stays local.

    The head builds every layer's per-layer input from the token ids; each stage
    uses its own layers' slices and passes on only those of later layers, as
    "per_layer" [B, T, remaining layers, D] (the last stage sends "h" alone).
    Layers that reuse an earlier layer's K/V have no cache of their own, as in
    mlx-lm: `make_cache` gives one cache per local layer that computes K/V.
    """

    def __init__(self, model: nn.Module, config: dict, start: int, end: int, is_head: bool):
        super().__init__(model, config, start, end, is_head)
        if 0 <= start < end <= self.num_layers:  # `load` reports a range out of bounds
            check_kv_pairs(start, end, kv_sharing_pairs(config))

    @property
    def types(self) -> list[str]:
        return self.text_args.layer_types[self.start : self.end]

    def embed(self, tokens: mx.array) -> dict[str, mx.array]:
        inner = self.lm.model
        embedded = inner.embed_tokens(tokens)
        h = embedded * inner.embed_scale
        if not inner.hidden_size_per_layer_input:
            return {"h": h}
        per_layer = inner._get_per_layer_inputs(tokens, embedded)
        return {"h": h, "per_layer": inner._project_per_layer_inputs(h, per_layer)}

    def __call__(self, x: dict[str, mx.array], cache: list) -> dict[str, mx.array]:
        h, per_layer = x["h"], x.get("per_layer")
        if per_layer is None and self.lm.model.hidden_size_per_layer_input:
            raise ValueError(f"layers {self.start}-{self.end - 1} need the per-layer inputs")
        # per_layer holds the slices of the last per_layer.shape[2] layers
        first = self.num_layers - per_layer.shape[2] if per_layer is not None else 0
        caches = iter(cache)
        own = [next(caches) if src == i else None for i, src in self.owners()]
        masks = {}
        for kind, c in zip(self.types, own):
            if c is not None and kind not in masks:
                window = self.window if kind == "sliding_attention" else None
                masks[kind] = create_attention_mask(h, c, window_size=window)
        kv = {}  # absolute layer -> ((keys, values), offset), for the layers that share them
        for (i, src), layer, kind, c in zip(self.owners(), self.layers, self.types, own):
            keys_values, offset = kv.get(src, (None, None))
            extra = per_layer[:, :, i - first, :] if per_layer is not None else None
            h, keys_values, offset = layer(
                h, masks[kind], c, per_layer_input=extra, shared_kv=keys_values, offset=offset
            )
            if src == i:
                kv[i] = (keys_values, offset)
        out = {"h": h}
        if per_layer is not None and self.end < self.num_layers:
            out["per_layer"] = per_layer[:, :, self.end - first :, :]
        return out

    def owners(self) -> list[tuple[int, int]]:
        """Per local layer: (absolute index, the layer whose K/V it uses: itself or its source)."""
        sources = self.lm.model.previous_kvs[self.start : self.end]
        return list(zip(range(self.start, self.end), sources))

    def logits(self, x: dict[str, mx.array]) -> mx.array:
        out = super().logits(x)
        if (cap := self.lm.final_logit_softcapping) is not None:
            out = logit_softcap(cap, out)
        return out

    def make_cache(self) -> list:
        """One cache per local layer that stores K/V (not those reusing another's)."""
        return [
            RotatingKVCache(max_size=self.window, keep=0)
            if kind == "sliding_attention"
            else KVCache()
            for (i, src), kind in zip(self.owners(), self.types)
            if src == i
        ]
