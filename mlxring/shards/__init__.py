"""Shard adapters, one per model family, found by config.json's `model_type`."""

from __future__ import annotations

import importlib
from pathlib import Path

from mlxring.model.facts import CheckpointError, ModelFacts, kv_sharing_pairs
from mlxring.shards.base import Shard

__all__ = ["Shard", "kv_sharing_pairs", "load_shard", "shard_class"]

# model_type -> "module:Class"
MLX_SHARDS = {
    "llama": "mlxring.shards.llama:LlamaShard",
    "gpt_oss": "mlxring.shards.gpt_oss:GptOssShard",
    "gemma3_text": "mlxring.shards.gemma:Gemma3Shard",
    "gemma3": "mlxring.shards.gemma:Gemma3Shard",  # the text tower of a gemma3 checkpoint
    "gemma4_text": "mlxring.shards.gemma:Gemma4Shard",
    "gemma4": "mlxring.shards.gemma:Gemma4Shard",  # the text tower of a gemma4 checkpoint
}
# the torch backend (nodes without Apple Silicon): transformers' modules, own caches
TORCH_SHARDS = {
    "llama": "mlxring.shards.torch_shard:TorchShard",
    "gpt_oss": "mlxring.shards.torch_shard:TorchShard",
    "gemma3_text": "mlxring.shards.torch_shard:TorchShard",
    "gemma3": "mlxring.shards.torch_shard:TorchShard",
    "gemma4_text": "mlxring.shards.torch_gemma4:TorchGemma4Shard",
    "gemma4": "mlxring.shards.torch_gemma4:TorchGemma4Shard",
}
BACKENDS = {"mlx": MLX_SHARDS, "torch": TORCH_SHARDS}


def shard_class(model_type: str, backend: str = "mlx") -> type:
    """The shard class of `backend` for a config.json `model_type`."""
    shards = BACKENDS[backend]
    try:
        target = shards[model_type]
    except KeyError:
        supported = ", ".join(sorted(shards))
        raise CheckpointError(
            f"model_type {model_type!r} is not supported; supported: {supported}"
        ) from None
    module, name = target.split(":")
    try:
        return getattr(importlib.import_module(module), name)
    except ImportError as e:
        if backend != "torch":
            raise
        raise CheckpointError(
            f"the torch backend needs torch and transformers ({e}); "
            "install them with: pip install 'mlxring[torch]'"
        ) from None


def load_shard(
    model_dir: str | Path,
    start: int,
    end: int,
    is_head: bool,
    backend: str = "mlx",
    device: str | None = None,
    dtype: str | None = None,
) -> Shard:
    """Load layers [start, end) of the model in `model_dir` (the head also embeds/projects).

    `backend` "torch" runs them with torch on `device` (cpu | cuda) in `dtype`
    (float32 | float16 | bfloat16 | auto: the checkpoint's).
    """
    cls = shard_class(ModelFacts.read(model_dir).model_type, backend)
    if backend == "torch":
        return cls.load(model_dir, start, end, is_head, device=device, dtype=dtype)
    return cls.load(model_dir, start, end, is_head)
