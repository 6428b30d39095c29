"""Shards chained over every split equal mlx-lm's own full model (the oracle)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from chain import Chain
from mlx_lm import load as mlx_lm_load

from mlxring.model.facts import CheckpointError
from mlxring.shards import load_shard, shard_class
from tests.conftest import TINY_LAYERS
from tests.oracle import mlx_lm_steps

PROMPT_LEN, DECODE_STEPS, BATCH = 11, 4, 2


def splits(num_layers: int, stages: int):
    """Every way to cut [0, num_layers) into `stages` non-empty contiguous ranges."""
    for cuts in itertools.combinations(range(1, num_layers), stages - 1):
        bounds = (0, *cuts, num_layers)
        yield list(itertools.pairwise(bounds))


ALL_SPLITS = [s for n in (1, 2, 3) for s in splits(TINY_LAYERS, n)]


@pytest.fixture(scope="module")
def oracle(tiny_llama):
    """mlx-lm's full model: logits for a batch-2 prefill, then greedy decode steps."""
    model, _ = mlx_lm_load(str(tiny_llama))
    return mlx_lm_steps(model, BATCH, PROMPT_LEN, DECODE_STEPS)


@pytest.mark.parametrize("split", ALL_SPLITS, ids=lambda s: "/".join(f"{a}-{b}" for a, b in s))
def test_chained_shards_match_mlx_lm(tiny_llama, oracle, split):
    steps, expected = oracle
    chain = Chain([load_shard(tiny_llama, a, b, is_head=(a == 0)) for a, b in split])
    for tokens, want in zip(steps, expected):
        got = chain(tokens)
        np.testing.assert_allclose(np.array(got), np.array(want), rtol=1e-4, atol=1e-4)


def test_stage_holds_only_its_own_parameters(tiny_llama):
    head = load_shard(tiny_llama, 0, 2, is_head=True)
    middle = load_shard(tiny_llama, 2, 4, is_head=False)
    from mlx.utils import tree_flatten

    head_names = {k for k, _ in tree_flatten(head.model.parameters())}
    middle_names = {k for k, _ in tree_flatten(middle.model.parameters())}
    assert "model.embed_tokens.weight" in head_names and "lm_head.weight" in head_names
    assert {n.split(".")[2] for n in middle_names} == {"2", "3"}
    assert not any("embed" in n or "lm_head" in n for n in middle_names)
    assert head.nbytes > middle.nbytes > 0


def test_unknown_family_is_a_clear_error():
    with pytest.raises(CheckpointError, match="model_type 'mamba' is not supported"):
        shard_class("mamba")


def test_out_of_range_layers_are_a_clear_error(tiny_llama):
    with pytest.raises(CheckpointError, match="layers 4-6 are out of range: the model has 6"):
        load_shard(tiny_llama, 4, 7, is_head=False)
