"""Shard adapters, one per model family, found by config.json's `model_type`."""

from __future__ import annotations

import importlib
from pathlib import Path

from mlxring.shards.kv_sharing import kv_sharing_pairs  # noqa: F401  (public here)
from mlxring.weights import CheckpointError, read_config

# model_type -> "module:Class"
MLX_SHARDS = {
    "llama": "mlxring.shards.llama:LlamaShard",
    "gpt_oss": "mlxring.shards.gpt_oss:GptOssShard",
    "gemma3_text": "mlxring.shards.gemma:Gemma3Shard",
    "gemma3": "mlxring.shards.gemma:Gemma3Shard",  # the text tower of a gemma3 checkpoint
    "gemma4_text": "mlxring.shards.gemma:Gemma4Shard",
    "gemma4": "mlxring.shards.gemma:Gemma4Shard",  # the text tower of a gemma4 checkpoint
}


def shard_class(model_type: str) -> type:
    """The MLX shard class for a config.json `model_type`."""
    try:
        target = MLX_SHARDS[model_type]
    except KeyError:
        supported = ", ".join(sorted(MLX_SHARDS))
        raise CheckpointError(
            f"model_type {model_type!r} is not supported; supported: {supported}"
        ) from None
    module, name = target.split(":")
    return getattr(importlib.import_module(module), name)


def load_shard(model_dir: str | Path, start: int, end: int, is_head: bool):
    """Load layers [start, end) of the model in `model_dir` (the head also embeds/projects)."""
    cls = shard_class(read_config(model_dir)["model_type"])
    return cls.load(model_dir, start, end, is_head)


def num_layers(model_dir: str | Path) -> int:
    config = read_config(model_dir)
    return int(config.get("text_config", config)["num_hidden_layers"])
