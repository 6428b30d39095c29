"""Facts about a model, read from its config.json alone: the one place that reads them.

Multimodal checkpoints nest the text model's settings under `text_config`;
`ModelFacts` unwraps it once, so callers never do. Pure (no mlx, no torch):
the planner and the server read these before anything is loaded.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from mlxring.cluster.plan import splits_pair
from mlxring.errors import UserError

DEFAULT_CONTEXT_LENGTH = 4096  # where config.json gives no max_position_embeddings
DEFAULT_DTYPE = "float32"  # where config.json names no dtype
GEMMA4_TYPES = ("gemma4", "gemma4_text")
GEMMA4_KV_SHARED, GEMMA4_PATTERN = 20, 5  # mlx-lm's defaults where config.json is silent


class CheckpointError(UserError, ValueError):
    """A model directory that cannot be used, with a message naming the fix."""


def read_config(model_dir: str | Path) -> dict:
    """The parsed config.json of `model_dir`."""
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{model_dir}: no config.json; point --model at a model directory")
    return json.loads(path.read_text())


@dataclass(frozen=True)
class ModelFacts:
    """What the runtime needs to know of a model before loading it."""

    model_type: str  # config.json's own (of a multimodal checkpoint: the outer one)
    text: dict = field(repr=False, hash=False)  # the text model's config
    num_layers: int
    kv_pairs: tuple[tuple[int, int], ...]  # (source, sharer): `sharer` reuses `source`'s K/V
    context_length: int  # max_position_embeddings
    dtype: str  # the checkpoint's dtype name ("bfloat16", ...)
    quantized: bool

    @classmethod
    def from_config(cls, config: dict) -> ModelFacts:
        """The facts of a parsed config.json."""
        text = text_config(config)
        if "num_hidden_layers" not in text:
            raise CheckpointError("config.json gives no num_hidden_layers")
        dtype = (
            text.get("dtype")
            or text.get("torch_dtype")
            or config.get("dtype")
            or config.get("torch_dtype")
            or DEFAULT_DTYPE
        )
        return cls(
            model_type=config.get("model_type", ""),
            text=text,
            num_layers=int(text["num_hidden_layers"]),
            kv_pairs=tuple(kv_sharing_pairs(config)),
            context_length=int(text.get("max_position_embeddings") or DEFAULT_CONTEXT_LENGTH),
            dtype=str(dtype),
            quantized=bool(config.get("quantization") or config.get("quantization_config")),
        )

    @classmethod
    def read(cls, model_dir: str | Path) -> ModelFacts:
        """The facts of the model in `model_dir`."""
        return cls.from_config(read_config(model_dir))


def text_config(config: dict) -> dict:
    """The text model's part of a config.json (all of it, unless a multimodal one)."""
    return config.get("text_config") or config


def kv_sharing_pairs(config: dict) -> list[tuple[int, int]]:
    """(source, sharer) layer pairs of a Gemma 4 config.json: `sharer` reuses `source`'s K/V.

    The last `num_kv_shared_layers` layers share; each reuses the last unshared
    layer of its own attention type, as mlx-lm and transformers do. Missing
    fields take mlx-lm's defaults. Empty for other model types.
    """
    if config.get("model_type") not in GEMMA4_TYPES:
        return []
    config = text_config(config)
    num_layers = int(config["num_hidden_layers"])
    first_shared = num_layers - int(config.get("num_kv_shared_layers", GEMMA4_KV_SHARED))
    if first_shared <= 0:
        return []
    types = config.get("layer_types")
    if types is None:
        pattern = int(config.get("sliding_window_pattern", GEMMA4_PATTERN))
        types = [
            "full_attention" if (i + 1) % pattern == 0 else "sliding_attention"
            for i in range(num_layers)
        ]
    source = {types[i]: i for i in range(first_shared)}  # the last one of each type wins
    return [(source[types[j]], j) for j in range(first_shared, num_layers)]


def check_kv_pairs(start: int, end: int, pairs: Sequence[tuple[int, int]]) -> None:
    """Refuse layers [start, end) if they hold one layer of a K/V-sharing pair but not the other."""
    if pair := splits_pair(start, pairs) or splits_pair(end, pairs):
        source, sharer = pair
        raise CheckpointError(
            f"layers {start}-{end - 1} split a K/V-sharing pair: layer {sharer} reuses "
            f"layer {source}'s keys and values, so both must be on one node; move the "
            "range boundary so that they are"
        )
