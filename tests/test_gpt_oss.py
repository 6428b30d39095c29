"""GPT-OSS shards from every checkpoint layout against mlx-lm, transformers and the ring.

All checkpoints hold the same random weights (same seed); prompts are longer
than the sliding window (4), so the rotating caches wrap.
"""

from __future__ import annotations

import json
import subprocess
import sys
from types import SimpleNamespace

import mlx.core as mx
import numpy as np
import pytest
from chain import Chain, generate
from mlx_lm import load as mlx_lm_load
from mlx_lm.generate import generate_step

from mlxring.model import tokenizer as jobs
from mlxring.model.facts import CheckpointError
from mlxring.shards import load_shard
from mlxring.shards.gpt_oss import experts_out_in
from mlxring.tiny import LAYOUTS
from mlxring.tiny import gpt_oss as tiny_gpt_oss
from mlxring.tiny.make import make_tiny
from tests.oracle import mlx_lm_steps

LAYERS, PROMPT_LEN, DECODE_STEPS, BATCH = 6, 11, 8, 2
PROMPT = "Hello, world! How are you today?"  # 19 ids with the chat template
SPLITS = [
    [(0, 6)],
    *([(0, a), (a, 6)] for a in range(1, 6)),
    [(0, 1), (1, 2), (2, 6)],
    [(0, 2), (2, 4), (4, 6)],
    [(0, 4), (4, 5), (5, 6)],
    [(0, 1), (1, 5), (5, 6)],
]


def split_id(split) -> str:
    return "/".join(f"{a}-{b}" for a, b in split)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """layout -> a 6-layer tiny gpt_oss in that layout, written on first use."""
    made = {}

    def get(layout: str):
        if layout not in made:
            out = tmp_path_factory.mktemp(f"gpt-oss-{layout}")
            if layout in LAYOUTS["gpt_oss"]:
                make_tiny("gpt_oss", out, layers=LAYERS, layout=layout)
            else:  # layouts only mlxring.tiny.gpt_oss knows
                make_tiny("gpt_oss", out, layers=LAYERS)
                tiny_gpt_oss.finish(out, layout)
            made[layout] = out
        return made[layout]

    return get


def mlx_lm_model(checkpoint, layout: str):
    """mlx-lm's full model (it cannot read the transformers layout: the original stands in)."""
    if layout in ("transformers", "original"):
        return tiny_gpt_oss.mlx_lm_model(checkpoint("original"))[0]
    return mlx_lm_load(str(checkpoint(layout)))[0]


def shards_of(model_dir, split) -> list:
    return [load_shard(model_dir, a, b, is_head=(a == 0)) for a, b in split]


@pytest.fixture(scope="module")
def oracle(checkpoint):
    """layout -> mlx-lm's logits for a batch-2 prefill, then greedy decode steps."""
    made = {}

    def get(layout: str):
        if layout not in made:
            model = mlx_lm_model(checkpoint, layout)
            made[layout] = mlx_lm_steps(model, BATCH, PROMPT_LEN, DECODE_STEPS)
        return made[layout]

    return get


@pytest.mark.parametrize("split", SPLITS, ids=split_id)
@pytest.mark.parametrize("layout", ["transformers", "original", "mlx-community", "original-mxfp4"])
def test_chained_shards_match_mlx_lm(checkpoint, oracle, layout, split):
    steps, expected = oracle(layout)
    shards = Chain(shards_of(checkpoint(layout), split))
    for tokens, want in zip(steps, expected):
        np.testing.assert_allclose(np.array(shards(tokens)), np.array(want), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("layout", ["mlx-community-4bit", "mlx-community-8bit"])
def test_quantized_shards_greedy_tokens_match_mlx_lm(checkpoint, layout):
    model, tokenizer = mlx_lm_load(str(checkpoint(layout)))
    prompt = jobs.encode_prompt(tokenizer, PROMPT)
    want = [int(t) for t, _ in generate_step(mx.array(prompt), model, max_tokens=12)]
    shards = shards_of(checkpoint(layout), [(0, 2), (2, 3), (3, 6)])
    assert generate(shards, checkpoint(layout), prompt, 12) == want


def test_greedy_tokens_match_transformers_generate(checkpoint):
    import torch
    from transformers import AutoModelForCausalLM

    model_dir = checkpoint("transformers")
    prompt = jobs.encode_prompt(jobs.load_tokenizer(str(model_dir)), PROMPT)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    out = model.generate(
        torch.tensor([prompt]),
        max_new_tokens=12,
        do_sample=False,
        eos_token_id=None,
        pad_token_id=0,
    )
    want = out[0, len(prompt) :].tolist()
    assert len(want) == 12
    shards = shards_of(model_dir, [(0, 3), (3, 6)])
    assert generate(shards, model_dir, prompt, 12) == want


def test_ring_generate_matches_mlx_lm(checkpoint):
    model_dir = checkpoint("transformers")
    model = mlx_lm_model(checkpoint, "transformers")
    prompt = jobs.encode_prompt(jobs.load_tokenizer(str(model_dir)), PROMPT)
    want = [int(t) for t, _ in generate_step(mx.array(prompt), model, max_tokens=12)]
    assert 2 not in want  # no early stop at eos: all 12 tokens compare
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
            "12",
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


def test_middle_stage_holds_only_its_layers(checkpoint):
    from mlx.utils import tree_flatten

    middle = load_shard(checkpoint("transformers"), 2, 4, is_head=False)
    names = {k for k, _ in tree_flatten(middle.model.parameters())}
    assert {n.split(".")[2] for n in names} == {"2", "3"}
    assert "model.layers.2.mlp.experts.gate_proj.weight" in names
    assert [type(c).__name__ for c in middle.make_cache()] == ["RotatingKVCache", "KVCache"]


def experts(hidden: int, inter: int, transformers: bool, layers=(0, 1)) -> dict:
    gate_up, down = (hidden, 2 * inter), (inter, hidden)
    if not transformers:
        gate_up, down = gate_up[::-1], down[::-1]
    weights = {}
    for i in layers:
        weights[f"model.layers.{i}.mlp.experts.gate_up_proj"] = mx.zeros((3, *gate_up))
        weights[f"model.layers.{i}.mlp.experts.down_proj"] = mx.zeros((3, *down))
        weights[f"model.layers.{i}.mlp.experts.down_proj_bias"] = mx.zeros((3, hidden))
    return weights


@pytest.mark.parametrize("hidden, inter", [(8, 8), (8, 4), (8, 6)], ids=["I=H", "2I=H", "I!=H"])
@pytest.mark.parametrize("transformers", [True, False], ids=["transformers", "original"])
def test_expert_layout_is_told_apart(hidden, inter, transformers):
    args = SimpleNamespace(hidden_size=hidden, intermediate_size=inter)
    out = experts_out_in(experts(hidden, inter, transformers), args)
    assert out["model.layers.1.mlp.experts.gate_up_proj.weight"].shape == (3, 2 * inter, hidden)
    assert out["model.layers.1.mlp.experts.down_proj.weight"].shape == (3, hidden, inter)
    assert out["model.layers.1.mlp.experts.down_proj_bias"].shape == (3, hidden)


def test_mixed_expert_layouts_are_a_clear_error():
    args = SimpleNamespace(hidden_size=8, intermediate_size=6)
    weights = {**experts(8, 6, True, layers=(0,)), **experts(8, 6, False, layers=(1,))}
    with pytest.raises(CheckpointError, match="mixes expert layouts"):
        experts_out_in(weights, args)
    with pytest.raises(CheckpointError, match="fits neither expert layout"):
        experts_out_in(experts(8, 6, True), SimpleNamespace(hidden_size=8, intermediate_size=5))
