"""Shared fixtures: tiny real-architecture checkpoints written once per test session."""

from __future__ import annotations

import pytest

from mlxring.tiny.make import make_tiny

TINY_LAYERS = 6


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory):
    """A 6-layer random-weight Llama in HF layout (sharded safetensors + index, tokenizer)."""
    return make_tiny("llama", tmp_path_factory.mktemp("tiny-llama"), layers=TINY_LAYERS)
