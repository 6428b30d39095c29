"""The MLX shard: one contiguous range of an mlx-lm model's layers.

A shard builds mlx-lm's own model class (parameters stay lazy, nothing is
allocated), drops every layer outside its range and, off the head, the
embedding, final norm and lm_head; then it loads only its own tensors through
mlx-lm's `sanitize` and quantization, and evaluates them. Families subclass it
and supply what differs: embedding, head, and which layers attend within a
sliding window. It implements `mlxring.shards.base.Shard`.
"""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten
from mlx_lm.models.base import create_attention_mask
from mlx_lm.models.cache import KVCache, RotatingKVCache
from mlx_lm.utils import _get_classes, infer_quant_config, load_config

from mlxring.model.facts import CheckpointError
from mlxring.model.weights import belongs, load_subset
from mlxring.shards.mlx_sample import sample


class Absent(nn.Module):
    """Stands where a layer or head module of another stage would be; holds nothing."""


class MlxShard:
    """Layers [start, end) of a model; the head (`is_head`) also embeds and projects."""

    # a decode group of one sequence may run on that sequence's own (non-batch) caches
    single_caches = True

    def __init__(self, model: nn.Module, config: dict, start: int, end: int, is_head: bool):
        self.model = model
        self.args = model.args
        self.config = config
        self.start, self.end, self.is_head = start, end, is_head
        self.layers = model.layers[start:end]

    # family hooks ---------------------------------------------------------
    def drop_head_modules(self) -> None:
        """Replace the embedding, final norm and lm_head by `Absent` (non-head stages)."""
        raise NotImplementedError

    def embed(self, tokens: mx.array) -> dict[str, mx.array]:
        """What travels the ring for `tokens` [B, T]: at least the hidden states "h"."""
        raise NotImplementedError

    def logits(self, x: dict[str, mx.array]) -> mx.array:
        """Final norm and lm_head (head only) on the last stage's output."""
        raise NotImplementedError

    @property
    def sliding(self) -> list[bool]:
        """Per local layer: whether it attends within a sliding window of `window` tokens."""
        raise NotImplementedError

    @property
    def window(self) -> int | None:
        """The sliding window's size, in tokens."""
        return self.args.sliding_window

    # the shard contract -----------------------------------------------------
    def __call__(self, x: dict[str, mx.array], cache: list) -> dict[str, mx.array]:
        """Run this shard's layers on `x` (updating `cache`); the same keys come out."""
        h = x["h"]
        sliding = self.sliding
        masks = {}  # one per attention kind, built with the first cache of that kind
        for s, c in zip(sliding, cache):
            if s not in masks:
                masks[s] = create_attention_mask(h, c, window_size=self.window if s else None)
        for layer, s, c in zip(self.layers, sliding, cache):
            h = layer(h, masks[s], cache=c)
        return {"h": h}

    def make_cache(self) -> list:
        """One cache per local layer: rotating over the window for sliding layers."""
        return [RotatingKVCache(max_size=self.window) if s else KVCache() for s in self.sliding]

    def depart(self, x: dict[str, mx.array]) -> dict[str, mx.array]:
        """mx arrays are the wire form already."""
        return x

    def sample(self, x: dict[str, mx.array], seqs: list) -> list[int]:
        """A token per sequence from the last position's logits (the mlx sampler)."""
        return sample(self.logits(x)[:, -1, :], seqs)

    def arrive(self, x: dict[str, mx.array]) -> dict[str, mx.array]:
        """Tensors from the ring in this shard's dtype (a torch stage may compute in another)."""
        out = dict(x)
        for k, v in x.items():
            if mx.issubdtype(v.dtype, mx.floating) and v.dtype != self.dtype:
                out[k] = v.astype(self.dtype)
        return out

    @property
    def dtype(self) -> mx.Dtype:
        """The dtype activations are computed in: that of the layers' norms."""
        if not hasattr(self, "_dtype"):
            floats = [
                v.dtype
                for k, v in tree_flatten(self.model.parameters())
                if "norm" in k and mx.issubdtype(v.dtype, mx.floating)
            ]
            self._dtype = floats[0] if floats else mx.float32
        return self._dtype

    # loading --------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        """The whole model's layer count (not this shard's)."""
        return len(self.model.layers)

    def keeps(self, name: str) -> bool:
        """Whether checkpoint tensor `name` belongs to this shard."""
        return belongs(name, self.start, self.end, self.is_head)

    @classmethod
    def load(cls, model_dir: str | Path, start: int, end: int, is_head: bool) -> MlxShard:
        """Build the shard for layers [start, end) and load its weights from `model_dir`."""
        model_dir = Path(model_dir)
        config = load_config(model_dir)
        model_class, args_class = _get_classes(config)
        model = model_class(args_class.from_dict(config))
        shard = cls(model, config, start, end, is_head)
        num_layers = shard.num_layers
        if not 0 <= start < end <= num_layers:
            raise CheckpointError(
                f"layers {start}-{end - 1} are out of range: the model has {num_layers} "
                f"layers (0-{num_layers - 1})"
            )
        for i in range(num_layers):
            if not start <= i < end:
                model.layers[i] = Absent()
        if not is_head:
            shard.drop_head_modules()
        weights = shard.sanitize(load_subset(model_dir, shard.keeps))
        if quantization := quantization_of(config):
            quantize(model, quantization, weights)
        try:
            model.load_weights(list(weights.items()), strict=True)
        except ValueError as e:
            raise CheckpointError(f"{model_dir}: weights do not match the model: {e}") from e
        mx.eval(model.parameters())
        # private arrays too (rope frequencies): lazy ones cannot be evaluated on another thread
        mx.eval([v for m in model.modules() for v in m.values() if isinstance(v, mx.array)])
        return shard

    def sanitize(self, weights: dict) -> dict:
        """Checkpoint tensors -> the model's names and shapes (mlx-lm's `sanitize`)."""
        return self.model.sanitize(weights) if hasattr(self.model, "sanitize") else weights

    @property
    def nbytes(self) -> int:
        """Bytes of the weights this shard holds."""
        return sum(v.nbytes for _, v in tree_flatten(self.model.parameters()))


def quantization_of(config: dict) -> dict | None:
    """mlx-lm's `quantization` block, or the one an HF `quantization_config` implies (mxfp4)."""
    if quantization := config.get("quantization"):
        return quantization
    method = (config.get("quantization_config") or {}).get("quant_method")
    if method == "mxfp4":
        return {"group_size": 32, "bits": 4, "mode": "mxfp4"}
    if method is not None:
        raise CheckpointError(f"quantization method {method!r} is not supported")
    return None


def quantize(model: nn.Module, quantization: dict, weights: dict) -> None:
    """Quantize the modules whose checkpoint tensors are quantized, as mlx-lm does."""

    def predicate(path: str, module: nn.Module):
        if path in quantization:
            return quantization[path]
        if not hasattr(module, "to_quantized") or f"{path}.scales" not in weights:
            return False
        return infer_quant_config(path, module, weights)

    nn.quantize(
        model,
        group_size=quantization["group_size"],
        bits=quantization["bits"],
        mode=quantization.get("mode", "affine"),
        class_predicate=predicate,
    )
