"""Checkpoint files: which tensor lives where, how big it is, and loading a subset.

A shard reads only the files that hold its own tensors, found through
`model.safetensors.index.json`; files holding only other layers are never opened.
"""

from __future__ import annotations

import json
import re
import struct
from collections.abc import Callable
from pathlib import Path

import mlx.core as mx

from mlxring.cluster.plan import ModelFootprint
from mlxring.model.facts import CheckpointError, ModelFacts

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")
# tensors of the vision / audio towers of multimodal checkpoints: never loaded
OTHER_TOWERS = (
    "vision_tower",
    "multi_modal_projector",
    "audio_tower",
    "embed_audio",
    "embed_vision",
    "vision_embedder",
)


def is_other_tower(name: str) -> bool:
    """Whether checkpoint tensor `name` belongs to a vision or audio tower (never loaded)."""
    return any(tower in name for tower in OTHER_TOWERS)


def layer_index(name: str) -> int | None:
    """The transformer layer a tensor belongs to (`model.layers.7.mlp...` -> 7), or None."""
    m = _LAYER.search(name)
    return int(m.group(1)) if m else None


def belongs(name: str, start: int, end: int, is_head: bool) -> bool:
    """Whether the node holding layers [start, end) needs checkpoint tensor `name`: its
    layers' tensors, and on the head every non-layer one; other towers' never."""
    if is_other_tower(name):
        return False
    i = layer_index(name)
    return is_head if i is None else start <= i < end


def weight_map(model_dir: str | Path) -> dict[str, str]:
    """Tensor name -> file name, from the index (or the single file's header)."""
    model_dir = Path(model_dir)
    index = model_dir / INDEX_FILE
    if index.is_file():
        return dict(json.loads(index.read_text())["weight_map"])
    single = model_dir / SINGLE_FILE
    if single.is_file():
        return dict.fromkeys(read_header(single), SINGLE_FILE)
    raise CheckpointError(f"{model_dir}: no {INDEX_FILE} or {SINGLE_FILE} found")


def read_header(path: Path) -> dict[str, dict]:
    """The safetensors header of one file: tensor name -> {dtype, shape, data_offsets}."""
    header, _ = read_full_header(path)
    header.pop("__metadata__", None)
    return header


def read_full_header(path: Path) -> tuple[dict, int]:
    """The whole safetensors header (`__metadata__` included) and the file offset its
    tensor data starts at (data_offsets count from there)."""
    with open(path, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(size))
    return header, 8 + size


def tensor_bytes(model_dir: str | Path) -> dict[str, int]:
    """Tensor name -> size in bytes, read from the safetensors headers only."""
    model_dir = Path(model_dir)
    sizes: dict[str, int] = {}
    for file in sorted(set(weight_map(model_dir).values())):
        for name, info in read_header(model_dir / file).items():
            start, end = info["data_offsets"]
            sizes[name] = end - start
    return sizes


def footprint(model_dir: str | Path) -> ModelFootprint:
    """Weight bytes per layer and of the head-only tensors (embedding, norm, lm_head)."""
    facts = ModelFacts.read(model_dir)
    num_layers = facts.num_layers
    layer_bytes = [0] * num_layers
    head_bytes = 0
    for name, size in tensor_bytes(model_dir).items():
        i = layer_index(name)
        if i is None:
            head_bytes += size
        elif i < num_layers:
            layer_bytes[i] += size
    return ModelFootprint(tuple(layer_bytes), head_bytes, facts.kv_pairs)


def load_subset(model_dir: str | Path, keep: Callable[[str], bool]) -> dict:
    """Lazily load the tensors for which `keep(name)` holds, opening only their files."""

    model_dir = Path(model_dir)
    files: dict[str, list[str]] = {}
    for name, file in weight_map(model_dir).items():
        if keep(name):
            files.setdefault(file, []).append(name)
    weights = {}
    for file, names in sorted(files.items()):
        arrays = mx.load(str(model_dir / file))  # lazy: only evaluated tensors are read
        weights.update((n, arrays[n]) for n in names)
    return weights
