"""Gemma 3 and Gemma 4 shards against two oracles: mlx-lm's full model and transformers.

Prompts are longer than the tiny models' sliding window (4), so sliding layers
really drop old positions; Gemma 4's per-layer inputs travel between stages and
its K/V-sharing pairs stay on one stage.
"""

from __future__ import annotations

import itertools
import json
import shutil
import subprocess
import sys

import mlx.core as mx
import numpy as np
import pytest
from chain import Chain, complete
from mlx.utils import tree_flatten
from mlx_lm import load as mlx_lm_load
from mlx_lm.generate import generate_step

from mlxring.model import tokenizer as jobs
from mlxring.model.facts import CheckpointError, read_config
from mlxring.model.weights import load_subset
from mlxring.shards import kv_sharing_pairs, load_shard
from mlxring.tiny import gemma as tiny_gemma
from mlxring.tiny.make import make_tiny
from tests.oracle import mlx_lm_steps

LAYERS, WINDOW = 6, tiny_gemma.SLIDING_WINDOW
PROMPT_LEN, DECODE_STEPS, BATCH = 11, 8, 2
PROMPT = "Hidden states travel around the ring"
MAX_TOKENS = 12
# A Gemma 4 variant whose sliding layer 4 shares layer 2's K/V (the default tiny
# one shares only full-attention K/V, so that an even 2-way split keeps its pairs).
SLIDING_SHARED = ["sliding_attention", "full_attention"] * 3


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict:
    dirs = {}
    for family in ("gemma3", "gemma4"):
        dirs[family] = make_tiny(family, tmp_path_factory.mktemp(family), layers=LAYERS)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(tiny_gemma, "gemma4_layer_types", lambda n: SLIDING_SHARED[:n])
        dirs["gemma4-sliding-shared"] = make_tiny(
            "gemma4", tmp_path_factory.mktemp("gemma4-sliding-shared"), layers=LAYERS
        )
    return dirs


def splits(num_layers: int, stages: int):
    """Every way to cut [0, num_layers) into `stages` non-empty contiguous ranges."""
    for cuts in itertools.combinations(range(1, num_layers), stages - 1):
        yield list(itertools.pairwise((0, *cuts, num_layers)))


def keeps_pairs(split, pairs) -> bool:
    return all(any(a <= s < b and a <= t < b for a, b in split) for s, t in pairs)


def until_eos(tokens: list[int], eos: int = 2) -> list[int]:
    return tokens[: tokens.index(eos) + 1] if eos in tokens else tokens


def full_model_steps(model_dir):
    """mlx-lm's full model on a batch-2 prompt, then greedy decode: (inputs, logits) per step."""
    model, _ = mlx_lm_load(str(model_dir))
    return mlx_lm_steps(model, BATCH, PROMPT_LEN, DECODE_STEPS)


@pytest.mark.parametrize("name", ["gemma3", "gemma4", "gemma4-sliding-shared"])
def test_chained_shards_match_mlx_lm(checkpoints, name):
    """Every 2-way and 3-way split that keeps the K/V pairs; the other splits are refused."""
    model_dir = checkpoints[name]
    pairs = kv_sharing_pairs(read_config(model_dir))
    assert bool(pairs) == name.startswith("gemma4")
    steps, expected = full_model_steps(model_dir)
    assert PROMPT_LEN > WINDOW
    for split in [s for n in (1, 2, 3) for s in splits(LAYERS, n)]:
        if not keeps_pairs(split, pairs):
            with pytest.raises(CheckpointError, match="split a K/V-sharing pair"):
                [load_shard(model_dir, a, b, is_head=(a == 0)) for a, b in split]
            continue
        chain = Chain([load_shard(model_dir, a, b, is_head=(a == 0)) for a, b in split])
        for tokens, want in zip(steps, expected):
            got = chain(tokens)
            np.testing.assert_allclose(
                np.array(got), np.array(want), rtol=1e-4, atol=1e-5, err_msg=f"{name} split {split}"
            )


def test_kv_sharing_pairs(checkpoints):
    assert kv_sharing_pairs(read_config(checkpoints["gemma3"])) == []
    assert kv_sharing_pairs(read_config(checkpoints["gemma4"])) == [(3, 4), (3, 5)]
    assert kv_sharing_pairs(read_config(checkpoints["gemma4-sliding-shared"])) == [(2, 4), (3, 5)]
    # the multimodal layout nests the text model; mlx-lm's defaults fill what is missing
    nested = {"model_type": "gemma4", "text_config": {"num_hidden_layers": 25}}
    assert kv_sharing_pairs(nested) == [(3, j) if j % 5 != 4 else (4, j) for j in range(5, 25)]
    assert kv_sharing_pairs({"model_type": "llama", "num_hidden_layers": 4}) == []
    # it agrees with the K/V sources mlx-lm's model uses
    model, _ = mlx_lm_load(str(checkpoints["gemma4-sliding-shared"]))
    sources = model.model.previous_kvs
    assert [(s, j) for j, s in enumerate(sources) if s != j] == [(2, 4), (3, 5)]


def test_gemma4_sends_only_later_layers_per_layer_inputs(checkpoints):
    head = load_shard(checkpoints["gemma4"], 0, 2, is_head=True)
    middle = load_shard(checkpoints["gemma4"], 2, 3, is_head=False)
    last = load_shard(checkpoints["gemma4"], 3, 6, is_head=False)
    x = head.embed(mx.array([[5, 6, 7]]))
    assert x["per_layer"].shape == (1, 3, LAYERS, 8)
    x = head(x, head.make_cache())
    assert x["per_layer"].shape == (1, 3, LAYERS - 2, 8)
    x = middle(x, middle.make_cache())
    assert x["per_layer"].shape == (1, 3, LAYERS - 3, 8)
    assert set(last(x, last.make_cache())) == {"h"}
    assert len(last.make_cache()) == 1  # layers 4 and 5 reuse layer 3's cache
    # the per-layer embedding and projection live on the head only
    names = [k for k, _ in tree_flatten(middle.model.parameters())]
    assert names and all(".layers.2." in n for n in names)
    assert "model.embed_tokens_per_layer.weight" in dict(tree_flatten(head.model.parameters()))


def as_multimodal(text_dir, out, family: str):
    """The text checkpoint in the layout of a multimodal one (its text tower, named as the
    hub's checkpoints name it), plus vision tensors in a file that does not exist."""
    text = read_config(text_dir)
    config = {"model_type": family, "vocab_size": text["vocab_size"], "text_config": text}
    prefix = {"gemma3": "language_model.model.", "gemma4": "model.language_model."}[family]
    tensors = load_subset(text_dir, lambda name: True)
    weights = {prefix + k.removeprefix("model."): v for k, v in tensors.items()}
    mx.save_safetensors(str(out / "model-text.safetensors"), weights)
    index = dict.fromkeys(weights, "model-text.safetensors")
    index["vision_tower.blocks.0.attn.weight"] = "missing-vision.safetensors"
    index["model.vision_tower.encoder.layers.1.mlp.weight"] = "missing-vision.safetensors"
    (out / "model.safetensors.index.json").write_text(json.dumps({"weight_map": index}))
    (out / "config.json").write_text(json.dumps(config))
    for f in text_dir.iterdir():
        if "token" in f.name or f.name == "chat_template.jinja":
            shutil.copy(f, out)
    return out


@pytest.mark.parametrize("family", ["gemma3", "gemma4"])
def test_multimodal_checkpoint_runs_its_text_tower(checkpoints, tmp_path, family):
    """model_type gemma3 / gemma4: the text tower runs, the vision tower is never read."""
    model_dir = as_multimodal(checkpoints[family], tmp_path, family)
    steps, expected = full_model_steps(model_dir)
    pairs = kv_sharing_pairs(read_config(model_dir))
    assert pairs == kv_sharing_pairs(read_config(checkpoints[family]))
    split = [(0, 2), (2, 6)]
    assert keeps_pairs(split, pairs)
    chain = Chain([load_shard(model_dir, a, b, is_head=(a == 0)) for a, b in split])
    for tokens, want in zip(steps, expected):
        np.testing.assert_allclose(np.array(chain(tokens)), np.array(want), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family", ["gemma3", "gemma4"])
def test_greedy_tokens_match_transformers(checkpoints, family):
    import torch
    from transformers import AutoModelForCausalLM

    model_dir = checkpoints[family]
    tokenizer = jobs.load_tokenizer(str(model_dir))
    prompt = jobs.encode_prompt(tokenizer, PROMPT)
    assert len(prompt) > WINDOW
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt]), max_new_tokens=MAX_TOKENS, do_sample=False)
    want = until_eos(out[0, len(prompt) :].tolist())
    stages = [load_shard(model_dir, 0, 2, is_head=True), load_shard(model_dir, 2, 6, False)]
    got = {"tokens": complete(stages, model_dir, PROMPT, MAX_TOKENS)}
    assert got["tokens"] == want
    assert len(set(want)) > MAX_TOKENS // 2  # the random model's tokens are discriminating


@pytest.mark.parametrize("family", ["gemma3", "gemma4"])
def test_ring_greedy_tokens_equal_mlx_lm(checkpoints, family):
    model_dir = checkpoints[family]
    model, tokenizer = mlx_lm_load(str(model_dir))
    prompt = jobs.encode_prompt(tokenizer, PROMPT)
    steps = generate_step(mx.array(prompt), model, max_tokens=MAX_TOKENS)
    want = until_eos([int(t) for t, _ in steps])
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "mlxring",
            "generate",
            "--model",
            str(model_dir),
            "--prompt",
            PROMPT,
            "--max-tokens",
            str(MAX_TOKENS),
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
