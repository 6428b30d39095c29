"""Checkpoint indexing and subset loading: a shard opens only the files it needs."""

from __future__ import annotations

import json
import shutil

import mlx.core as mx
import numpy as np
import pytest

from mlxring.model.facts import CheckpointError
from mlxring.model.weights import (
    footprint,
    layer_index,
    tensor_bytes,
    weight_map,
)
from mlxring.shards import load_shard


def test_layer_index():
    assert layer_index("model.layers.17.mlp.up_proj.weight") == 17
    assert layer_index("language_model.model.layers.3.self_attn.q_proj.weight") == 3
    assert layer_index("model.embed_tokens.weight") is None
    assert layer_index("lm_head.weight") is None


def test_footprint_adds_up_to_the_checkpoint(tiny_llama):
    total = json.loads((tiny_llama / "model.safetensors.index.json").read_text())
    fp = footprint(tiny_llama)
    assert fp.num_layers == 6
    assert sum(fp.layer_bytes) + fp.head_bytes == total["metadata"]["total_size"]
    assert len(set(fp.layer_bytes)) == 1  # identical layers weigh the same
    vocab, hidden = 384, 64
    assert fp.head_bytes == 4 * (2 * vocab * hidden + hidden)  # embed + lm_head + norm
    assert set(tensor_bytes(tiny_llama)) == set(weight_map(tiny_llama))


def test_files_of_other_layers_are_never_opened(tiny_llama, tmp_path):
    """Delete every file that holds no tensor of layers 2-3: the shard still loads and runs."""
    files = weight_map(tiny_llama)
    needed = {f for name, f in files.items() if layer_index(name) in (2, 3)}
    assert len(needed) < len(set(files.values())) / 2  # the test removes most files
    subset = tmp_path / "subset"
    shutil.copytree(tiny_llama, subset)
    for f in set(files.values()) - needed:
        (subset / f).unlink()

    shard = load_shard(subset, 2, 4, is_head=False)
    full = load_shard(tiny_llama, 2, 4, is_head=False)
    h = mx.random.normal((1, 5, 64), key=mx.random.key(1))
    got = shard({"h": h}, shard.make_cache())["h"]
    want = full({"h": h}, full.make_cache())["h"]
    np.testing.assert_array_equal(np.array(got), np.array(want))
    # and the head, whose embedding/lm_head files are gone, cannot load from there
    with pytest.raises((CheckpointError, FileNotFoundError, ValueError, RuntimeError)):
        load_shard(subset, 0, 2, is_head=True)


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(CheckpointError, match="no model.safetensors.index.json"):
        weight_map(tmp_path)
