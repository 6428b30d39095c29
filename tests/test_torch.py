"""The torch backend against transformers' own model: alone, chained with mlx shards, in
real mixed rings; its KV caches and masks; the errors a user can hit.

Greedy tokens are the oracle throughout: transformers' `generate` on the whole model,
and every chain of torch and mlx shards must reproduce them exactly.
"""

from __future__ import annotations

import json
import random
import re
import shutil
import subprocess
import sys

import mlx.core as mx
import numpy as np
import pytest
import torch
from chain import generate
from oracle import hf_generate

from mlxring.cluster.config import ConfigError, parse_config
from mlxring.cluster.launch import resolve
from mlxring.cluster.ranks import rank_specs
from mlxring.model import tokenizer as jobs
from mlxring.model.facts import CheckpointError
from mlxring.shards import load_shard
from mlxring.shards.torch_cache import TorchKVCache, attention_mask, positions
from mlxring.tiny.make import make_tiny

FAMILIES = ("llama", "gpt_oss", "gemma3", "gemma4")
PROMPT = [364, 311, 78, 161, 53, 376, 40, 353, 172, 244]  # greedy output varies on every family
NEW_TOKENS = 16
PREFILL_CHUNK = 4  # the 10-token prompt prefills in 3 chunks
# gemma4's K/V-sharing pairs are (3, 4) and (3, 5): every split keeps layers 3-5 together
TWO_STAGES = [(0, 3), (3, 6)]
THREE_STAGES = [(0, 2), (2, 3), (3, 6)]
EOS = 2


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict:
    return {f: make_tiny(f, tmp_path_factory.mktemp(f"torch-{f}")) for f in FAMILIES}


def until_eos(tokens: list[int]) -> list[int]:
    return tokens[: tokens.index(EOS) + 1] if EOS in tokens else tokens


@pytest.fixture(scope="module")
def reference(checkpoints) -> dict[str, list[int]]:
    """Per family, transformers' greedy tokens for PROMPT."""
    return {f: hf_generate(checkpoints[f], PROMPT, NEW_TOKENS) for f in FAMILIES}


def chain_of(model_dir, split, backends, **torch_opts) -> tuple[list, str]:
    """Shards for `split` in ring order, each on its backend (torch ones with `torch_opts`)."""
    stages = []
    for (start, end), backend in zip(split, backends):
        opts = torch_opts if backend == "torch" else {}
        stages.append(load_shard(model_dir, start, end, start == 0, backend=backend, **opts))
    return stages, model_dir


def greedy(chain: tuple[list, str], prompt: list[int] = PROMPT, n: int = NEW_TOKENS) -> list[int]:
    stages, model_dir = chain
    return generate(stages, model_dir, prompt, n, prefill_chunk=PREFILL_CHUNK)


# --- in one process ------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_torch_chains_equal_transformers_generate(checkpoints, reference, family):
    want = reference[family]
    assert len(set(want)) >= 4, "the oracle's tokens are not discriminating"
    model_dir = checkpoints[family]
    assert greedy(chain_of(model_dir, [(0, 6)], ["torch"])) == want
    assert greedy(chain_of(model_dir, THREE_STAGES, ["torch"] * 3)) == want


@pytest.mark.parametrize("family", FAMILIES)
def test_mixed_chains_equal_the_mlx_chain(checkpoints, reference, family):
    model_dir = checkpoints[family]
    want = greedy(chain_of(model_dir, [(0, 6)], ["mlx"]))
    assert want == reference[family]
    for backends in (["mlx", "torch"], ["torch", "mlx"]):
        got = greedy(chain_of(model_dir, TWO_STAGES, backends))
        assert got == want, f"{family} {backends}"
    got = greedy(chain_of(model_dir, THREE_STAGES, ["torch", "mlx", "torch"]))
    assert got == want, f"{family} torch/mlx/torch"


@pytest.mark.parametrize("family", FAMILIES)
def test_batched_decode_over_padded_caches_equals_solo(checkpoints, family):
    """Two prompts of different lengths merged into one batch (the shorter left-padded),
    then one evicted: each step's logits equal the sequence's own solo step."""
    shard = load_shard(checkpoints[family], 0, 6, True, backend="torch")
    prompts = [PROMPT, PROMPT[3:6]]  # 10 and 3 tokens: 7 positions of padding

    def step(tokens: list[list[int]], caches) -> np.ndarray:
        return np.array(shard.logits(shard(shard.embed(mx.array(tokens)), caches)))[:, -1]

    solo_caches, nxt = [], []
    for p in prompts:
        caches = shard.make_cache()
        nxt.append(int(step([p], caches).argmax()))
        solo_caches.append(caches)
    batch = [c.merge(list(layer)) for c, layer in zip(solo_caches[0], zip(*solo_caches))]
    assert batch[0].pad == [0, 7] and batch[0].length == 10
    batched = step([[t] for t in nxt], batch)
    for i, (t, caches) in enumerate(zip(nxt, solo_caches)):
        solo = step([[t]], caches)[0]
        np.testing.assert_allclose(batched[i], solo, rtol=1e-4, atol=1e-4, err_msg=f"seq {i}")
    # evict the long one: the padding no one needs goes, the short one decodes on
    for c in batch:
        c.filter(mx.array([1]))
    assert batch[0].pad == [0] and batch[0].length == 4
    t = int(batched[1].argmax())
    np.testing.assert_allclose(
        step([[t]], batch)[0], step([[t]], solo_caches[1])[0], rtol=1e-4, atol=1e-4
    )


# --- real rings ----------------------------------------------------------------


def ring_config(tmp_path, backends: tuple[str, str], spans=("0-2", "3-5")):
    """A 2-node localhost cluster file, node i on backends[i] with layers spans[i]."""
    lines = ["name: mixed", "nodes:"]
    for i, (backend, span) in enumerate(zip(backends, spans)):
        lines.append(
            f"  - {{name: n{i}, host: localhost, memory_gb: 8, reserve_gb: 0.5, "
            f"backend: {backend}, layers: '{span}'}}"
        )
    path = tmp_path / f"{'-'.join(backends)}.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


def launch(config, model_dir, job: str, opts: dict) -> dict:
    """Run `job` on a real ring in a subprocess (so nothing outlives it); the head's JSON."""
    cluster, _, plan = resolve(str(config), None, str(model_dir))
    specs = rank_specs(cluster, plan, str(model_dir), job, opts)
    for node, spec in zip(cluster.nodes, specs):  # the config really starts a torch rank
        assert ("--compute" in spec.argv) == (node.backend == "torch"), spec.argv
    code = (
        "import io, sys, json\nfrom mlxring.cluster.launch import launch_job\nbuf = io.BytesIO()\n"
        f"rc = launch_job(sys.argv[1], None, sys.argv[2], {job!r}, json.loads(sys.argv[3]), buf)\n"
        "sys.stdout.write(buf.getvalue().decode()); sys.exit(rc)"
    )
    argv = [sys.executable, "-c", code, str(config), str(model_dir), json.dumps(opts)]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize(
    "family, backends",
    [
        ("llama", ("mlx", "torch")),
        ("llama", ("torch", "mlx")),
        ("gemma4", ("mlx", "torch")),
        ("gemma4", ("torch", "mlx")),
    ],
)
def test_mixed_ring_generate_equals_transformers(checkpoints, tmp_path, family, backends):
    """gemma4's per-layer inputs cross the ring between the backends too."""
    model_dir = checkpoints[family]
    text, max_tokens = "The quick brown fox jumps over the lazy dog", 12
    prompt = jobs.encode_prompt(jobs.load_tokenizer(str(model_dir)), text, raw=True)
    want = until_eos(hf_generate(model_dir, prompt, max_tokens))
    assert len(set(want)) >= 4
    opts = {
        "prompt": text,
        "max_tokens": max_tokens,
        "json": True,
        "raw": True,
        "engine": {"prefill_chunk": PREFILL_CHUNK},
    }
    out = launch(ring_config(tmp_path, backends), model_dir, "generate", opts)
    assert out["prompt_tokens"] == len(prompt)
    assert out["tokens"] == want


def test_concurrent_requests_on_a_mixed_ring_equal_their_solo_runs(checkpoints, tmp_path):
    model_dir = checkpoints["llama"]
    rng = random.Random(5)
    # a one-token prompt is admitted straight to decode with an empty cache
    reqs = [
        {"prompt": [rng.randrange(3, 380) for _ in range(n)], "max_tokens": rng.randrange(3, 12)}
        for n in (1, 3, 5, 8, 11, 14, 19, 23)
    ]
    solo = [until_eos(hf_generate(model_dir, r["prompt"], r["max_tokens"])) for r in reqs]
    assert len({tuple(s) for s in solo}) == len(solo)
    opts = {"requests": reqs, "engine": {"max_batch": 8, "prefill_chunk": PREFILL_CHUNK}}
    out = launch(ring_config(tmp_path, ("mlx", "torch")), model_dir, "batch", opts)
    for i, (result, want) in enumerate(zip(out["results"], solo)):
        assert result["tokens"] == want, f"request {i} differs from its solo run"
    assert len(out["stats"]) == 2
    for stage in out["stats"]:  # every sequence's cache freed, on the torch stage too
        assert stage["sequences"] == [] and stage["cache_bytes"] == 0


# --- caches and masks ----------------------------------------------------------

HEADS, DIM = 2, 3


def filled(length: int, seed: int, steps: int = 1) -> tuple[TorchKVCache, torch.Tensor]:
    """A one-sequence cache holding `length` random positions, written in `steps` updates."""
    g = torch.Generator().manual_seed(seed)
    keys = torch.randn(1, HEADS, length, DIM, generator=g)
    cache = TorchKVCache()
    for part in keys.chunk(steps, dim=2) if length else []:
        cache.update(part, -part)
    return cache, keys


def test_cache_merge_extract_filter_round_trip():
    (a, ka), (b, kb) = filled(3, 0, steps=3), filled(5, 1)
    empty = TorchKVCache()  # a one-token prompt is admitted with an empty cache
    assert a.keys.shape[2] == 256 and a.length == 3  # capacity grows in steps
    assert a.nbytes == 2 * ka.nbytes  # only the positions used count

    batch = a.merge([a, b, empty])
    assert batch.length == 5 and batch.pad == [2, 0, 5]
    assert batch.nbytes == 2 * 3 * HEADS * 5 * DIM * 4
    for cache, want in ((batch.extract(0), ka), (batch.extract(1), kb)):
        torch.testing.assert_close(cache.keys, want, rtol=0, atol=0)
        torch.testing.assert_close(cache.values, -want, rtol=0, atol=0)
        assert cache.length == want.shape[2] and cache.pad == [0]
    assert batch.extract(2).length == 0 and batch.extract(2).keys.shape[2] == 0

    # a decode step appends one position to every sequence
    new = torch.randn(3, HEADS, 1, DIM)
    batch.update(new, -new)
    torch.testing.assert_close(batch.extract(0).keys, torch.cat([ka, new[:1]], dim=2))
    torch.testing.assert_close(batch.extract(2).keys, new[2:])

    # the engine filters with mx arrays; dropping b trims the padding no one needs
    batch.filter(mx.array([2, 0]))
    assert batch.pad == [3, 0] and batch.length == 4
    torch.testing.assert_close(batch.extract(1).keys, torch.cat([ka, new[:1]], dim=2))
    batch.filter(mx.array([0]))
    assert batch.pad == [0] and batch.length == 1 and batch.keys.shape[2] == 1
    torch.testing.assert_close(batch.keys, new[2:])
    assert batch.nbytes == 2 * HEADS * DIM * 4


def test_cache_extend_appends_sequences_right_aligned():
    (a, ka), (b, kb) = filled(4, 2), filled(2, 3)
    batch = a.merge([a])
    batch.extend(b.merge([b]))
    assert batch.pad == [0, 2] and batch.length == 4
    torch.testing.assert_close(batch.extract(1).keys, kb)
    torch.testing.assert_close(batch.keys[1, :, :2], torch.zeros(HEADS, 2, DIM))
    longer, kl = filled(6, 4)
    batch.extend(longer)  # a longer newcomer pads the sequences already there
    assert batch.pad == [2, 4, 0] and batch.length == 6
    torch.testing.assert_close(batch.extract(0).keys, ka)
    torch.testing.assert_close(batch.extract(2).keys, kl)


def test_attention_mask_hides_left_padding_and_the_future():
    cache = TorchKVCache(pad=[2, 0])
    cache.length = 3  # sequence 0 has 1 real position, sequence 1 has 3
    assert positions(cache, 2, "cpu").tolist() == [[1, 2], [3, 4]]
    mask = attention_mask(cache, 2, None, torch.float32, "cpu")
    assert mask.shape == (2, 1, 2, 5)
    visible = (mask[:, 0] == 0).int().tolist()
    assert visible == [
        [[0, 0, 1, 1, 0], [0, 0, 1, 1, 1]],  # padding at keys 0-1 hidden
        [[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]],
    ]
    assert mask.min() == torch.finfo(torch.float32).min
    window = attention_mask(cache, 2, 2, torch.float32, "cpu")
    assert (window[:, 0] == 0).int().tolist() == [
        [[0, 0, 1, 1, 0], [0, 0, 0, 1, 1]],
        [[0, 0, 1, 1, 0], [0, 0, 0, 1, 1]],
    ]
    plain = TorchKVCache()
    plain.length = 3
    assert attention_mask(plain, 1, None, torch.float32, "cpu") is None  # nothing to hide
    assert attention_mask(plain, 1, 3, torch.float32, "cpu") is not None  # key 0 out of window


# --- dtypes ---------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_torch_stage_after_an_fp32_mlx_head(checkpoints, dtype):
    """Activations cross in the sender's dtype and each receiver converts them on arrival;
    gemma4's per-layer inputs are passed on in the torch stage's dtype."""
    model_dir = checkpoints["gemma4"]
    head = load_shard(model_dir, 0, 2, True)
    middle = load_shard(model_dir, 2, 3, False, backend="torch", dtype=dtype)
    last = load_shard(model_dir, 3, 6, False)
    full = load_shard(model_dir, 0, 6, True)
    tokens = mx.array([PROMPT])
    x = head(head.embed(tokens), head.make_cache())
    assert x["h"].dtype == mx.float32
    x = middle.depart(middle(x, middle.make_cache()))
    assert x["h"].dtype == x["per_layer"].dtype == getattr(mx, dtype)
    assert middle.layers[2].self_attn.q_proj.weight.dtype == getattr(torch, dtype)
    x = last(last.arrive(x), last.make_cache())
    logits = head.logits(head.arrive(x))
    assert logits.dtype == mx.float32 and bool(mx.all(mx.isfinite(logits)))
    want = full.logits(full(full.embed(tokens), full.make_cache()))
    np.testing.assert_allclose(np.array(logits), np.array(want), atol=0.1)  # half precision
    agree = np.mean(np.array(mx.argmax(logits, -1)) == np.array(mx.argmax(want, -1)))
    assert agree >= 0.8


# --- errors a user can hit -----------------------------------------------------


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_a_gpu_is_a_checkpoint_error(checkpoints):
    with pytest.raises(CheckpointError, match="device cuda: torch sees no CUDA GPU"):
        load_shard(checkpoints["llama"], 0, 6, True, backend="torch", device="cuda")


def test_unsupported_dtype_and_device_are_checkpoint_errors(checkpoints):
    with pytest.raises(CheckpointError, match="dtype 'float8' is not supported; use one of"):
        load_shard(checkpoints["llama"], 0, 6, True, backend="torch", dtype="float8")
    with pytest.raises(CheckpointError, match="torch device 'gpu' is not supported"):
        load_shard(checkpoints["llama"], 0, 6, True, backend="torch", device="gpu")


def test_quantized_checkpoint_on_torch_names_the_mlx_backend(checkpoints, tmp_path):
    model_dir = tmp_path / "quantized"
    shutil.copytree(checkpoints["llama"], model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    config["quantization"] = {"group_size": 64, "bits": 4}
    (model_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="quantized checkpoints run on the mlx backend"):
        load_shard(model_dir, 0, 6, True, backend="torch")


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"backend": "mlx", "dtype": "float16"}, "nodes[0].dtype: needs backend: torch"),
        ({"backend": "torch", "device": "gpu"}, "nodes[0].device: backend torch runs on 'cpu' or"),
        ({"device": "cuda"}, "nodes[0].device: 'cuda' needs backend: torch"),
    ],
)
def test_config_rejects_settings_of_the_other_backend(fields, message):
    node = {"name": "a", "host": "localhost", "memory_gb": 8, **fields}
    with pytest.raises(ConfigError, match=re.escape(message)):
        parse_config({"name": "r", "nodes": [node]})
    ok = parse_config({"name": "r", "nodes": [{**node, "backend": "torch", "device": "cpu"}]})
    assert ok.head.backend == "torch" and ok.head.device == "cpu"
