"""Per-node bundles: the exact tensors of a layer range, deterministic bytes, the manifest
and its cache; `mlxring split`; a real ring whose nodes load their bundles (`model:` per
node) and decode what mlx-lm decodes on the whole checkpoint; Hugging Face repo ids."""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import pytest
from mlx.utils import tree_flatten
from mlx_lm import load as mlx_lm_load
from mlx_lm.generate import generate_step

from mlxring import cli
from mlxring.cluster.launch import resolve
from mlxring.errors import UserError
from mlxring.model import tokenizer as jobs
from mlxring.model.bundle import BundleFile, manifest, plan_bundle, write_bundle
from mlxring.model.facts import CheckpointError
from mlxring.model.source import resolve_model
from mlxring.model.weights import INDEX_FILE, layer_index, read_full_header, weight_map
from mlxring.shards import load_shard
from mlxring.tiny.make import make_tiny

ROOT = Path(__file__).resolve().parent.parent
PROMPT = "Each node holds only its own layers"
MAX_TOKENS = 8
SNAPSHOT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(scope="module")
def single_file(tmp_path_factory):
    """A 3-layer Llama saved as one model.safetensors, without an index."""
    out = make_tiny("llama", tmp_path_factory.mktemp("single"), layers=3, max_shard_size="1GB")
    assert not (out / INDEX_FILE).exists()
    return out


def tensors(model_dir: Path) -> dict[str, bytes]:
    """Every tensor of a written checkpoint: name -> raw bytes, read by hand from each file."""
    found = {}
    for path in sorted(model_dir.glob("*.safetensors")):
        header, data_start = read_full_header(path)
        raw = path.read_bytes()
        header.pop("__metadata__", None)
        for name, info in header.items():
            start, end = info["data_offsets"]
            assert name not in found, f"{name} twice"
            found[name] = raw[data_start + start : data_start + end]
    return found


def expected(model_dir: Path, start: int, end: int, is_head: bool) -> set[str]:
    """The tensors of layers [start, end) of `model_dir`, and the non-layer ones on the head."""
    names = weight_map(model_dir)
    return {
        n for n in names if (start <= i < end if (i := layer_index(n)) is not None else is_head)
    }


def files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


@pytest.mark.parametrize(("start", "end", "is_head"), [(2, 4, False), (0, 2, True), (5, 6, False)])
def test_a_bundle_holds_exactly_its_tensors(tiny_llama, tmp_path, start, end, is_head):
    bundle = plan_bundle(tiny_llama, start, end, is_head)
    write_bundle(bundle, tmp_path)
    source = tensors(tiny_llama)
    want = expected(tiny_llama, start, end, is_head)
    got = tensors(tmp_path)
    assert set(got) == want
    assert all(got[n] == source[n] for n in want)  # raw bytes, untouched
    index = json.loads((tmp_path / INDEX_FILE).read_text())
    assert set(index["weight_map"]) == want
    assert index["metadata"]["total_size"] == sum(len(got[n]) for n in want)
    # a file holding none of the wanted tensors is left out
    held = {f for n, f in weight_map(tiny_llama).items() if n in want}
    assert {p.name for p in tmp_path.glob("*.safetensors")} == held
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        assert (tmp_path / name).read_bytes() == (tiny_llama / name).read_bytes()
    assert bundle.size == sum(len(b) for b in files(tmp_path).values())
    for path in tmp_path.glob("*.safetensors"):
        header, data_start = read_full_header(path)
        assert data_start % 8 == 0
        assert header["__metadata__"] == read_full_header(tiny_llama / path.name)[0]["__metadata__"]


def test_a_bundle_loads_as_its_shard_and_equals_the_whole_checkpoint(tiny_llama, tmp_path):
    write_bundle(plan_bundle(tiny_llama, 2, 4, False), tmp_path)
    mine, whole = (
        dict(tree_flatten(load_shard(d, 2, 4, False).model.parameters()))
        for d in (tmp_path, tiny_llama)
    )
    assert mine.keys() == whole.keys()
    assert all(mx.array_equal(mine[k], whole[k]) for k in whole)
    torch_shard = load_shard(tmp_path, 2, 4, False, backend="torch")
    assert torch_shard.nbytes > 0
    with pytest.raises(CheckpointError):  # layer 4 is not in it
        load_shard(tmp_path, 2, 5, False)


def test_bundle_bytes_are_deterministic_and_readable_at_any_offset(tiny_llama, tmp_path):
    write_bundle(plan_bundle(tiny_llama, 1, 3, False), tmp_path / "one")
    bundle = plan_bundle(tiny_llama, 1, 3, False)
    write_bundle(bundle, tmp_path / "two")
    written = files(tmp_path / "one")
    assert written == files(tmp_path / "two")
    assert sorted(f.path for f in bundle.files) == sorted(written)
    rng = random.Random(0)
    for f in bundle.files:
        data = written[f.path]
        assert f.size == len(data)
        for _ in range(20):
            offset, n = rng.randrange(f.size + 10), rng.randrange(1, 5000)
            assert f.read(offset, n) == data[offset : offset + n]
        offset = rng.randrange(f.size)
        assert b"".join(f.chunks(offset, chunk=777)) == data[offset:]


def test_manifest_hashes_the_bytes_and_is_cached(tiny_llama, tmp_path, monkeypatch):
    model = shutil.copytree(tiny_llama, tmp_path / "model")
    bundle = plan_bundle(model, 0, 3, True)
    write_bundle(bundle, tmp_path / "out")
    done = []
    entries = manifest(bundle, tmp_path / "cache", progress=done.append)
    assert entries == [
        {"path": p, "size": len(b), "sha256": hashlib.sha256(b).hexdigest()}
        for p, b in sorted(files(tmp_path / "out").items())
    ]
    assert sum(done) == bundle.size
    assert manifest(bundle) == entries  # the same without a cache

    def no_reading(*_, **__):
        raise AssertionError("a cached manifest read the bundle's bytes")

    with monkeypatch.context() as m:
        m.setattr(BundleFile, "chunks", no_reading)
        assert manifest(plan_bundle(model, 0, 3, True), tmp_path / "cache") == entries
        mine = {f.path for f in bundle.files}
        other = next(p for p in model.glob("*.safetensors") if p.name not in mine)
        os.utime(other, ns=(1, 1))  # not a source of this bundle: the cache still applies
        assert manifest(plan_bundle(model, 0, 3, True), tmp_path / "cache") == entries
        os.utime(model / min(p for p in mine if p.endswith(".safetensors")), ns=(1, 1))
        with pytest.raises(AssertionError, match="read the bundle"):
            manifest(plan_bundle(model, 0, 3, True), tmp_path / "cache")
    assert manifest(plan_bundle(model, 0, 3, False), tmp_path / "cache") != entries


def test_a_single_file_checkpoint_gets_an_index(single_file, tmp_path):
    bundle = plan_bundle(single_file, 1, 3, False)
    assert [f.path for f in bundle.files if "safetensors" in f.path] == [
        "model.safetensors",
        INDEX_FILE,
    ]
    write_bundle(bundle, tmp_path)
    index = json.loads((tmp_path / INDEX_FILE).read_text())
    assert set(index["weight_map"].values()) == {"model.safetensors"}
    assert {layer_index(n) for n in index["weight_map"]} == {1, 2}
    assert load_shard(tmp_path, 1, 3, False).nbytes > 0


def test_layers_out_of_range_are_refused(tiny_llama):
    with pytest.raises(CheckpointError, match="out of range"):
        plan_bundle(tiny_llama, 4, 7, False)


# mlxring split, and a ring of nodes that each load their own bundle ------------------------


def write(path: Path, nodes: list[str], model: str | None = None) -> str:
    head = f"name: split-ring\n{f'model: {model}' + chr(10) if model else ''}nodes:\n"
    path.write_text(head + "".join(f"  - {{{n}}}\n" for n in nodes))
    return str(path)


NODE = "name: {}, host: localhost, memory_gb: 8, reserve_gb: 1"


def mlxring(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mlxring", *args], capture_output=True, text=True, timeout=300
    )


@pytest.fixture(scope="module")
def split(tiny_llama, tmp_path_factory):
    """`mlxring split` of the tiny Llama over two local nodes: (out dir, plan, stdout)."""
    tmp = tmp_path_factory.mktemp("split")
    config = write(tmp / "cluster.yaml", [NODE.format("a"), NODE.format("b")])
    out = mlxring("split", str(tiny_llama), "--config", config, "--out", str(tmp / "out"))
    assert out.returncode == 0, out.stderr
    _, _, plan = resolve(config, None, str(tiny_llama), contact_nodes=False)
    return tmp / "out", plan, out.stdout


def test_split_writes_each_nodes_bundle(split, tiny_llama):
    out, plan, stdout = split
    for a, node in zip(plan.assignments, ("a", "b")):
        assert set(tensors(out / node)) == expected(tiny_llama, a.start, a.end, node == "a")
        row = next(line.split() for line in stdout.splitlines() if line.startswith(node + " "))
        assert row[:3] == [node, f"{a.start}-{a.end - 1}", str(len(list((out / node).iterdir())))]
    assert "set `model:`" in stdout


def test_ring_of_bundles_decodes_what_mlx_lm_decodes(split, tiny_llama, tmp_path):
    out, plan, _ = split
    nodes = [
        NODE.format(a.name) + f", layers: {a.start}-{a.end - 1}, model: {out / a.name}"
        for a in plan.assignments
    ]
    config = write(tmp_path / "ring.yaml", nodes)
    model, tokenizer = mlx_lm_load(str(tiny_llama))
    prompt = jobs.encode_prompt(tokenizer, PROMPT)
    want = [int(t) for t, _ in generate_step(mx.array(prompt), model, max_tokens=MAX_TOKENS)]
    ring = mlxring(
        "generate",
        "--config",
        config,
        "--prompt",
        PROMPT,
        "--max-tokens",
        str(MAX_TOKENS),
        "--json",
    )
    assert ring.returncode == 0, ring.stderr
    assert json.loads(ring.stdout)["tokens"] == want


def test_node_models_need_layers_or_a_model_everywhere(split, tiny_llama, tmp_path):
    out, plan, _ = split
    no_layers = [NODE.format(n) + f", model: {out / n}" for n in ("a", "b")]
    with pytest.raises(UserError, match=r"holds only some of the layers .* set layers:"):
        resolve(write(tmp_path / "c1.yaml", no_layers), None, None)
    one_model = [NODE.format("a") + f", model: {out / 'a'}", NODE.format("b")]
    with pytest.raises(UserError, match="no model: pass --model"):
        resolve(write(tmp_path / "c2.yaml", one_model), None, None)
    # with a cluster model too, that is what is planned with
    cluster, model, _ = resolve(write(tmp_path / "c3.yaml", one_model, str(tiny_llama)), None, None)
    assert model == str(tiny_llama) and cluster.head.model == str(out / "a")


def test_split_errors_are_one_line(split, tiny_llama, tmp_path, capsys):
    out, _, _ = split
    config = write(tmp_path / "c.yaml", [NODE.format("a"), NODE.format("b")])
    argv = ["split", str(tiny_llama), "--config", config, "--out", str(out)]
    assert cli.main(argv) == 2
    not_empty = f"{out / 'a'}: is not empty; pass --force or choose another --out"
    assert capsys.readouterr().err == f"mlxring split: error: {not_empty}\n"
    assert cli.main([*argv, "--force"]) == 0  # the same bytes again
    capsys.readouterr()
    nope = tmp_path / "nope"
    assert cli.main(["split", str(nope), "--config", config, "--out", str(tmp_path)]) == 2
    no_dir = f"model {nope}: no such directory; pass a model directory"
    assert capsys.readouterr().err == f"mlxring split: error: {no_dir}\n"


# Hugging Face repo ids --------------------------------------------------------------------


@pytest.fixture(scope="module")
def hf_cache(tiny_llama, tmp_path_factory):
    """A Hugging Face cache (HF_HOME) holding the tiny Llama as repo `tiny-org/tiny-llama`."""
    home = tmp_path_factory.mktemp("hf-home")
    repo = home / "hub" / "models--tiny-org--tiny-llama"
    shutil.copytree(tiny_llama, repo / "snapshots" / SNAPSHOT)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(SNAPSHOT)
    return home


def offline(home: Path, *args: str) -> subprocess.CompletedProcess:
    """A process that sees only `home` as its Hugging Face cache and no network."""
    env = {**os.environ, "HF_HOME": str(home), "HF_HUB_CACHE": str(home / "hub")}
    env |= {"HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, timeout=120, env=env, cwd=ROOT
    )


def test_a_repo_id_resolves_to_its_cached_snapshot(hf_cache, tmp_path):
    code = "from mlxring.model.source import resolve_model as r; print(r('tiny-org/tiny-llama'))"
    out = offline(hf_cache, "-c", code)
    assert out.returncode == 0, out.stderr
    snapshot = hf_cache / "hub" / "models--tiny-org--tiny-llama" / "snapshots" / SNAPSHOT
    assert Path(out.stdout.strip()) == snapshot
    config = write(tmp_path / "c.yaml", [NODE.format("a"), NODE.format("b")])
    split = offline(
        hf_cache,
        "-m",
        "mlxring",
        "split",
        "tiny-org/tiny-llama",
        "--config",
        config,
        "--out",
        str(tmp_path / "out"),
    )
    assert split.returncode == 0, split.stderr
    assert str(snapshot) in split.stdout and (tmp_path / "out" / "b" / INDEX_FILE).is_file()


def test_a_repo_id_not_in_the_cache_offline_is_one_line(hf_cache):
    argv = ["split", "tiny-org/absent", "--config", "x", "--out", "y"]
    code = f"from mlxring.cli import main; main({argv!r})"
    out = offline(hf_cache, "-c", code)
    assert out.stderr.count("\n") == 1, out.stderr
    assert out.stderr.startswith("mlxring split: error: model tiny-org/absent: no such directory")
    assert "hf download tiny-org/absent" in out.stderr


def test_directories_and_other_paths_are_left_alone(tiny_llama):
    assert resolve_model(str(tiny_llama)) == str(tiny_llama)
    assert resolve_model("/no/such/dir") == "/no/such/dir"
    with pytest.raises(UserError, match="no such directory"):
        resolve(None, 1, "/no/such/dir")
