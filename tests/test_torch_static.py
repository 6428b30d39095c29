"""The torch shard's static decode (arenas: the step a CUDA graph captures, run op by op
here), its fallbacks, and its on-device sampler, on CPU.

transformers' own `generate` is the oracle for greedy tokens; CUDA graphs themselves
are exercised by bench/torch_cuda.py on a GPU.
"""

from __future__ import annotations

import gc
import random
import shutil
from types import SimpleNamespace

import mlx.core as mx
import pytest
import torch
from chain import generate, tokenizer_of
from oracle import hf_generate

from mlxring.cluster.config import EngineConfig
from mlxring.engine.engine import Engine
from mlxring.engine.request import SamplingParams
from mlxring.jobs.workload import run_all
from mlxring.shards import load_shard, torch_static
from mlxring.shards.torch_fuse import FusedLinear, Part
from mlxring.shards.torch_pack import PACK_ENV, PackedLinear, packable
from mlxring.shards.torch_sample import TorchSampler
from mlxring.shards.torch_static import resolve_mode
from mlxring.tiny.make import make_tiny

FAMILIES = ("llama", "gemma3", "gemma4", "gpt_oss")
PROMPT = [364, 311, 78, 161, 53, 376, 40, 353, 172, 244]
NEW_TOKENS = 12


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict:
    return {f: make_tiny(f, tmp_path_factory.mktemp(f"static-{f}")) for f in FAMILIES}


def torch_head(model_dir, mode: str | None = "static", **opts):
    shard = load_shard(model_dir, 0, 6, True, backend="torch", **opts)
    shard.decoder.set_mode(mode)
    return shard


def engine_tokens(shard, model_dir, prompts, params) -> tuple[list[list[int]], list[dict]]:
    """Every request submitted at once to an engine over `shard` alone; tokens and stats."""
    config = EngineConfig(max_batch=8, prefill_chunk=4)
    engine = Engine(shard, None, tokenizer_of(str(model_dir)), config)
    try:
        results = run_all(engine, prompts, params)
        stats = engine.stats()
    finally:
        engine.close()
    return [r["tokens"] for r in results], stats


@pytest.mark.parametrize("family", FAMILIES)
def test_static_decode_equals_transformers(checkpoints, family):
    model_dir = checkpoints[family]
    want = hf_generate(model_dir, PROMPT, NEW_TOKENS)
    assert len(set(want)) >= 4, "the oracle's tokens are not discriminating"
    shard = torch_head(model_dir)
    assert generate([shard], model_dir, PROMPT, NEW_TOKENS, prefill_chunk=4) == want
    assert shard.decoder.pool.free, "the decode group never ran in an arena"


def concurrent_equal_solo(model_dir, mode: str | None, device: str = "cpu"):
    """Requests of several lengths at once through an engine over a torch head: each one's
    tokens equal its solo run in transformers. Returns the head."""
    rng = random.Random(7)
    prompts = [[rng.randrange(3, 380) for _ in range(n)] for n in (1, 3, 6, 9, 14, 23)]
    lengths = [rng.randrange(3, 14) for _ in prompts]
    solo = [hf_generate(model_dir, p, n, device) for p, n in zip(prompts, lengths)]
    shard = torch_head(model_dir, mode, device=device)
    params = [SamplingParams(max_tokens=n, ignore_eos=True) for n in lengths]
    got, stats = engine_tokens(shard, model_dir, prompts, params)
    for i, (tokens, want) in enumerate(zip(got, solo)):
        assert tokens == want, f"request {i} differs from its solo run"
    assert stats[0]["sequences"] == [] and stats[0]["cache_bytes"] == 0
    gc.collect()
    pool = shard.decoder.pool.free
    assert {a.capacity for a in pool} >= {32}, "no sequence outgrew its first capacity"
    assert all(a.holders == 0 for a in pool)
    return shard


@pytest.mark.parametrize("family", FAMILIES)
def test_concurrent_requests_in_arenas_equal_their_solo_runs(checkpoints, family, monkeypatch):
    """Admissions and evictions move a group between arenas (rows 1-8), left padding
    varies, and a small capacity makes long sequences move to larger arenas."""
    monkeypatch.setattr(torch_static, "MIN_CAPACITY", 16)
    concurrent_equal_solo(checkpoints[family], "static")


def test_arena_is_given_back_when_its_caches_leave_or_go(tiny_llama):
    shard = torch_head(tiny_llama)
    x = shard.embed(mx.array([PROMPT[:4], PROMPT[4:8]]))
    singles = [shard.make_cache(), shard.make_cache()]
    for i, caches in enumerate(singles):
        shard({"h": x["h"][i : i + 1]}, caches)
    batch = [c.merge(list(layer)) for c, layer in zip(singles[0], zip(*singles))]
    step = shard.embed(mx.array([[5], [6]]))
    first = shard(step, batch)["h"]
    arena = batch[0].arena
    assert arena is not None and arena.holders == len(batch) and arena.rows == 2
    assert all(c.length == 5 for c in batch)
    assert batch[0].nbytes == 2 * 5 * batch[0].keys.shape[1] * batch[0].keys.shape[3] * 4 * 2
    assert isinstance(first, torch.Tensor) and first.shape[0] == 2
    for cache in batch:  # an eviction moves the caches out: the arena goes back to the pool
        cache.filter(mx.array([1]))
    assert arena.holders == 0 and shard.decoder.pool.free == [arena]
    shard(shard.embed(mx.array([[7]])), batch)  # one row: a 1-row arena
    again = batch[0].arena
    assert again.rows == 1 and again.holders == len(batch)
    del batch, cache
    gc.collect()
    assert again.holders == 0 and again in shard.decoder.pool.free


@pytest.mark.parametrize("mode", ["graphs", "compiled"])
def test_graphs_on_a_cpu_fall_back_to_static_with_the_reason(tiny_llama, capsys, mode):
    shard = torch_head(tiny_llama, mode, device="cpu")
    assert shard.decoder.mode == "static"
    reason = "no CUDA graphs (they need a CUDA device; this stage runs on cpu)"
    assert shard.decoder.fallback == reason
    assert f"{reason}; decoding op by op with the static cache" in capsys.readouterr().err


def test_a_failed_capture_decodes_op_by_op_with_the_same_tokens(tiny_llama, capsys):
    """As on a GPU when an op cannot be captured: here capture itself fails (a CPU)."""
    shard = torch_head(tiny_llama, device="cpu")
    shard.decoder.mode = "graphs"  # as if on CUDA
    got = generate([shard], tiny_llama, PROMPT, NEW_TOKENS, prefill_chunk=4)
    assert got == hf_generate(tiny_llama, PROMPT, NEW_TOKENS)
    assert shard.decoder.mode == "static"
    assert shard.decoder.fallback.startswith("no CUDA graphs (capture failed: ")
    assert "no CUDA graphs (capture failed: " in capsys.readouterr().err


def test_decode_mode_defaults_and_setting(monkeypatch):
    monkeypatch.delenv(torch_static.DECODE_ENV, raising=False)
    assert resolve_mode(None, torch.device("cpu")) == ("eager", None)
    assert resolve_mode(None, torch.device("cuda")) == ("compiled", None)
    assert resolve_mode("static", torch.device("cuda")) == ("static", None)
    monkeypatch.setenv(torch_static.DECODE_ENV, "static")
    assert resolve_mode(None, torch.device("cpu")) == ("static", None)
    monkeypatch.setenv(torch_static.DECODE_ENV, "fast")
    with pytest.raises(ValueError, match="decode mode 'fast': use one of eager, static, graphs, c"):
        resolve_mode(None, torch.device("cpu"))


def test_depart_makes_host_mx_arrays_in_the_node_dtype(tiny_llama):
    shard = load_shard(tiny_llama, 0, 3, True, backend="torch", dtype="float16")
    out = shard(shard.embed(mx.array([PROMPT])), shard.make_cache())
    assert isinstance(out["h"], torch.Tensor) and out["h"].dtype == torch.float16
    wire = shard.depart(out)
    assert isinstance(wire["h"], mx.array) and wire["h"].dtype == mx.float16
    assert (wire["h"].shape, wire["h"].tolist()) == (tuple(out["h"].shape), out["h"].tolist())


# --- fused projections and the compiled step's own ops -------------------------------


def test_fused_projections_keep_the_weights_and_answer_each_input(tiny_llama, monkeypatch):
    monkeypatch.setenv(PACK_ENV, "0")  # dense weights, to compute each projection alone
    shard = torch_head(tiny_llama)
    attn = shard.layers[1].self_attn
    assert isinstance(attn.q_proj, Part) and isinstance(attn.qkv_proj, FusedLinear)
    assert shard.fused[1] == [attn.qkv_proj, shard.layers[1].mlp.gate_up_proj]
    total = sum(t.numel() for t in torch_weights(tiny_llama, shard).values())
    assert shard.nbytes == total * 4, "fusing copied weights instead of replacing them"
    x, y = torch.randn(1, 3, 64), torch.randn(1, 3, 64)
    want = torch.nn.functional.linear(y, attn.k_proj.weight)
    attn.q_proj(x)  # remembered for x; k of another input is computed again
    torch.testing.assert_close(attn.k_proj(y), want)
    attn.qkv_proj.forget()
    assert attn.qkv_proj.last is None


def test_packed_linears_compute_what_dense_ones_do(tiny_llama, monkeypatch):
    """On a CPU in float32 every linear of a layer gets a oneDNN-packed weight (the fused
    groups' too); the dense weights are gone, and prefill and decode logits match."""
    packed = torch_head(tiny_llama, mode=None)
    monkeypatch.setenv(PACK_ENV, "0")
    dense = torch_head(tiny_llama, mode=None)
    attn = packed.layers[1].self_attn
    assert isinstance(attn.o_proj, PackedLinear) and isinstance(attn.qkv_proj.linear, PackedLinear)
    assert attn.k_proj.weight.shape == dense.layers[1].self_attn.k_proj.weight.shape
    assert packed.nbytes == dense.nbytes
    caches = packed.make_cache(), dense.make_cache()
    for tokens in (PROMPT[:4], [5], [9]):  # a prefill, then two decode steps
        x = dense.embed(mx.array([tokens]))
        got, want = packed(x, caches[0])["h"], dense(x, caches[1])["h"]
        got, want = packed.head_logits(got), dense.head_logits(want)
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
        assert got.argmax(-1).tolist() == want.argmax(-1).tolist()
    assert not packable(torch.device("cpu"), torch.float16)


def torch_weights(model_dir, shard) -> dict:
    """The checkpoint's tensors that `shard` holds (layers 0-5 and the head)."""
    from safetensors import safe_open

    from mlxring.model.weights import weight_map

    out = {}
    for name, file in weight_map(model_dir).items():
        if shard.checkpoint_name(name) is not None:
            with safe_open(str(model_dir / file), framework="pt") as f:
                out[name] = f.get_tensor(name)
    return out


@pytest.mark.skipif(shutil.which("c++") is None, reason="compiling on a CPU needs a C++ compiler")
def test_the_compiled_step_computes_what_the_step_computes_op_by_op(tiny_llama, monkeypatch):
    """torch.compile traces the step with the fused projections' remembered products
    (module state it must not get wrong): its logits are the uncompiled step's. Compiling
    is CUDA's mode, where weights stay dense: so here too (inductor does not lower
    eager-packed CPU weights)."""
    monkeypatch.setenv(PACK_ENV, "0")
    shard = torch_head(tiny_llama)
    caches = shard.make_cache()
    shard(shard.embed(mx.array([PROMPT[:4]])), caches)
    batch = [c.merge([c]) for c in caches]
    shard(shard.embed(mx.array([[5]])), batch)  # into an arena
    arena = batch[0].arena
    want = shard.decoder.step(arena)["logits"]  # the step again: the same K/V writes
    got = shard.decoder.step(arena, torch.compile(shard.decoder.forward, fullgraph=True))
    torch.testing.assert_close(got["logits"], want, atol=1e-4, rtol=1e-4)
    assert got["logits"].argmax(-1).tolist() == want.argmax(-1).tolist()


# --- the sampler -----------------------------------------------------------------


def seq(tokens: int = 0, **params) -> SimpleNamespace:
    return SimpleNamespace(params=SamplingParams(**params), tokens=[0] * tokens)


def test_sampler_greedy_rows_are_argmax_and_filters_hold():
    sampler = TorchSampler(torch.device("cpu"))
    logits = torch.randn(5, 60, generator=torch.Generator().manual_seed(0))
    top = logits.argsort(dim=-1, descending=True)
    greedy = logits.argmax(dim=-1).tolist()
    seqs = [seq(), seq(temperature=1.0, top_k=1), seq(temperature=2.0, top_p=1e-6), seq(), seq()]
    assert sampler(logits, seqs) == greedy
    draws = {i: set() for i in range(5)}
    for n in range(200):
        seqs = [
            seq(n, temperature=1.5, top_k=3, seed=1),
            seq(n, temperature=1.0, top_p=0.5, seed=2),
            seq(n, temperature=1.0, seed=3),
            seq(n),
            seq(n, temperature=1.0, top_k=5, top_p=0.9),  # unseeded
        ]
        for i, t in enumerate(sampler(logits, seqs)):
            draws[i].add(t)
    assert len(draws[0]) > 1 and draws[0] <= set(top[0, :3].tolist())
    probs = torch.softmax(logits[1], -1)[top[1]]
    nucleus = int((probs.cumsum(0) - probs < 0.5).sum())  # the smallest set past 0.5
    assert draws[1] <= set(top[1, :nucleus].tolist())
    assert len(draws[2]) > 10 and draws[3] == {greedy[3]}
    assert draws[4] <= set(top[4, :5].tolist())


def test_sampler_draws_follow_the_distribution_and_repeat_by_seed():
    sampler = TorchSampler(torch.device("cpu"))
    logits = torch.log(torch.tensor([[0.75, 0.25]]))
    ones = sum(sampler(logits, [seq(n, temperature=1.0, seed=9)])[0] for n in range(2000))
    assert 0.2 < ones / 2000 < 0.3
    first = [
        sampler(logits.repeat(3, 1), [seq(n, temperature=1.0, seed=s) for s in (4, 5, 6)])
        for n in range(50)
    ]
    # a seeded sequence's draws do not depend on its row or its batch
    alone = [sampler(logits, [seq(n, temperature=1.0, seed=5)])[0] for n in range(50)]
    assert [row[1] for row in first] == alone
    assert [row[0] for row in first] != alone


def test_seeded_requests_repeat_on_a_torch_head_beside_greedy_ones(tiny_llama):
    shard = torch_head(tiny_llama)
    prompts = [PROMPT, PROMPT[:5]]
    sampled = SamplingParams(max_tokens=10, temperature=1.0, top_k=20, seed=11, ignore_eos=True)
    greedy = SamplingParams(max_tokens=10, ignore_eos=True)
    (a, g), _ = engine_tokens(shard, tiny_llama, prompts, [sampled, greedy])
    (b,), _ = engine_tokens(shard, tiny_llama, prompts[:1], [sampled])
    assert a == b and len(set(a)) > 3
    assert g == hf_generate(tiny_llama, PROMPT[:5], 10)


# --- on a GPU (skipped without one; bench/torch_cuda.py runs them there) -----------

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@cuda
@pytest.mark.parametrize("family", FAMILIES)
def test_cuda_graphs_equal_transformers_on_the_gpu(checkpoints, family, monkeypatch, capsys):
    monkeypatch.setattr(torch_static, "MIN_CAPACITY", 16)
    shard = concurrent_equal_solo(checkpoints[family], "graphs", "cuda")
    if family == "gpt_oss":  # transformers' experts loop over the experts hit, on the host
        assert shard.decoder.mode == "static"
        assert "no CUDA graphs (capture failed: " in capsys.readouterr().err
        return
    assert shard.decoder.mode == "graphs", shard.decoder.fallback
    assert any(a.graph is not None for a in shard.decoder.pool.free)


@cuda
def test_the_compiled_step_equals_transformers_on_the_gpu(tiny_llama, monkeypatch):
    monkeypatch.setattr(torch_static, "MIN_CAPACITY", 16)
    shard = concurrent_equal_solo(tiny_llama, None, "cuda")
    assert shard.decoder.mode == "compiled", shard.decoder.fallback


@cuda
def test_an_op_that_cannot_be_captured_falls_back_on_the_gpu(tiny_llama, capsys):
    shard = torch_head(tiny_llama, "graphs", device="cuda")
    layer = shard.layers[2]
    forward = layer.forward

    def syncing(*args, **kwargs):  # a host sync: not allowed while a graph is captured
        out = forward(*args, **kwargs)
        out.sum().item()
        return out

    layer.forward = syncing
    got = generate([shard], tiny_llama, PROMPT, NEW_TOKENS, prefill_chunk=4)
    assert got == hf_generate(tiny_llama, PROMPT, NEW_TOKENS, "cuda")
    assert shard.decoder.mode == "static"
    assert "no CUDA graphs (capture failed: " in capsys.readouterr().err
