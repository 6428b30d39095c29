"""Quantized checkpoints made locally with mlx-lm (`mlx_lm.convert`): affine 4/8-bit and
mxfp4, loaded per shard; chained shards and the real ring equal mlx-lm on the same files."""

from __future__ import annotations

import json
import subprocess
import sys

import mlx.core as mx
import pytest
from chain import complete
from mlx_lm import convert
from mlx_lm import load as mlx_lm_load
from mlx_lm.generate import generate_step

from mlxring.model import tokenizer as jobs
from mlxring.shards import load_shard

QUANTS = {
    "affine4": dict(q_bits=4, q_group_size=32),
    "affine8": dict(q_bits=8, q_group_size=64),
    "mxfp4": dict(q_bits=4, q_group_size=32, q_mode="mxfp4"),
}
PROMPT = "Quantized weights around the ring"


def make_quantized(name: str, tiny_llama, tmp_path_factory):
    """`name`'s checkpoint made with mlx_lm.convert, and mlx-lm's greedy tokens on it."""
    out = tmp_path_factory.mktemp(f"q-{name}") / "model"
    convert(str(tiny_llama), str(out), quantize=True, **QUANTS[name])
    model, tokenizer = mlx_lm_load(str(out))
    prompt = jobs.encode_prompt(tokenizer, PROMPT)
    want = [int(t) for t, _ in generate_step(mx.array(prompt), model, max_tokens=10)]
    return name, out, want


@pytest.fixture(scope="module", params=list(QUANTS))
def quantized(request, tiny_llama, tmp_path_factory):
    return make_quantized(request.param, tiny_llama, tmp_path_factory)


def test_the_checkpoint_is_quantized(quantized):
    name, path, _ = quantized
    config = json.loads((path / "config.json").read_text())
    assert config["quantization"]["bits"] in (4, 8)
    shard = load_shard(path, 0, 3, is_head=True)
    weight = shard.model.layers[0].mlp.up_proj
    assert hasattr(weight, "scales"), f"{name}: the layer was not quantized"


@pytest.mark.parametrize("split", [[(0, 6)], [(0, 2), (2, 6)], [(0, 1), (1, 5), (5, 6)]])
def test_chained_quantized_shards_equal_mlx_lm(quantized, split):
    _, path, want = quantized
    shards = [load_shard(path, a, b, is_head=(a == 0)) for a, b in split]
    got = {"tokens": complete(shards, path, PROMPT, 10)}
    assert got["tokens"] == want


def test_quantized_ring_tokens_equal_mlx_lm(tiny_llama, tmp_path_factory):
    _, path, want = make_quantized("affine4", tiny_llama, tmp_path_factory)
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "mlxring",
            "generate",
            "--model",
            str(path),
            "--prompt",
            PROMPT,
            "--max-tokens",
            "10",
            "--json",
            "--ranks",
            "2",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["tokens"] == want
