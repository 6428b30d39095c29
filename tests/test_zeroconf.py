"""Zero-config clusters for real: `mlxring worker` processes advertising over zeroconf on
loopback, `mlxring serve` finding them with the cluster key, shipping their layers into
their caches and serving mlx-lm's greedy tokens through them (an mlx worker and a torch
worker: a mixed ring). Weight shipping is also driven directly, through a TCP proxy that
cuts or corrupts the stream."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import mlx.core as mx
import openai
import pytest
from mlx_lm import load as mlx_lm_load
from mlx_lm.generate import generate_step

from mlxring.cluster.ship import WorkerLink
from mlxring.crypto.handshake import HandshakeError
from mlxring.crypto.keys import new_key, write_key
from mlxring.crypto.session import connect
from mlxring.model import tokenizer as prompts
from mlxring.model.bundle import manifest, plan_bundle
from mlxring.model.weights import layer_index, read_header
from tests import netns
from tests.ringutil import free_port, kill_group
from tests.tamper_proxy import FaultProxy

PROMPT = "Rings of machines"
MAX_TOKENS = 10
W2 = ("--backend", "mlx", "--device", "cpu")
CHUNK = 16 << 10  # the tiny model's files are small: several chunks to a file


class Proc:
    """A started process (own process group) whose output lines are collected."""

    def __init__(self, argv: list[str], env: dict | None = None, host: netns.Host | None = None):
        self.argv = argv
        self.proc = (host.popen if host else subprocess.Popen)(
            argv,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
            env={**os.environ, "MLXRING_TORCH_THREADS": "1", **(env or {})},
        )
        self.lines: list[str] = []
        threading.Thread(target=lambda: self.lines.extend(self.proc.stdout), daemon=True).start()

    @property
    def text(self) -> str:
        return "".join(self.lines)

    def wait_for(self, pattern: str, timeout: float) -> re.Match:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if m := re.search(pattern, self.text):
                return m
            if self.proc.poll() is not None:
                time.sleep(0.2)  # the last lines
                if m := re.search(pattern, self.text):
                    return m
                raise AssertionError(f"{self.argv[3]} exited {self.proc.returncode}:\n{self.text}")
            time.sleep(0.1)
        raise AssertionError(f"no {pattern!r} within {timeout} s:\n{self.text}")

    def stop(self, grace: float = 15) -> int | None:
        """Ctrl-C as a user would; then SIGKILL whatever is left of its group."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGINT)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(grace)
        kill_group(self.proc.pid)
        return self.proc.wait()


def mlxring(*args: str, env: dict | None = None, host: netns.Host | None = None) -> Proc:
    return Proc([sys.executable, "-m", "mlxring", *args], env, host)


def worker(
    key: Path, name: str, cache: Path, *extra: str, host: netns.Host | None = None, port=None
) -> tuple[Proc, int]:
    """`mlxring worker` on loopback, or on `host`'s address in its namespace."""
    port = port or free_port()
    w = mlxring(
        "worker",
        "--cluster-key-file",
        str(key),
        "--name",
        name,
        "--port",
        str(port),
        "--cache-dir",
        str(cache),
        "--interface",
        host.ip if host else "127.0.0.1",
        *extra,
        host=host,
    )
    w.wait_for("waiting for a head", 60)
    return w, port


def serve(
    model: str, key: Path, min_workers: int, port: int, *extra: str, env=None, host=None
) -> Proc:
    """`mlxring serve` on loopback, or on `host`'s address in its namespace."""
    return mlxring(
        "serve",
        model,
        "--cluster-key-file",
        str(key),
        "--min-workers",
        str(min_workers),
        "--discovery-timeout",
        "60",
        "--interface",
        host.ip if host else "127.0.0.1",
        "--port",
        str(port),
        *extra,
        env=env,
        host=host,
    )


def key_file(path: Path) -> Path:
    return write_key(path, new_key())


@pytest.fixture(scope="module")
def greedy(tiny_llama):
    """mlx-lm's own greedy chat answer to PROMPT (the full model, one process)."""
    model, tokenizer = mlx_lm_load(str(tiny_llama))
    ids = prompts.encode_prompt(tokenizer, PROMPT)
    tokens = []
    for t, _ in generate_step(mx.array(ids), model, max_tokens=MAX_TOKENS):
        if int(t) in tokenizer.eos_token_ids:
            break
        tokens.append(int(t))
    assert len(set(tokens)) > 2, "a reply of varied tokens makes a telling oracle"
    return tokenizer.decode(tokens), len(tokens)


def answer(port: int, model: str):
    """The served model's greedy chat answer to PROMPT: (text, completion tokens)."""
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="-", max_retries=0)
    chat = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": PROMPT}],
        max_tokens=MAX_TOKENS,
        temperature=0,
        timeout=120,
    )
    return chat.choices[0].message.content, chat.usage.completion_tokens


def bundle_layers(cache: Path) -> tuple[set[int | None], list[Path]]:
    """The layer of every tensor in the cache's bundles (None: a non-layer tensor)."""
    layers: set[int | None] = set()
    files = sorted(cache.glob("bundles/*/*.safetensors"))
    for f in files:
        layers |= {layer_index(name) for name in read_header(f)}
    return layers, files


@pytest.fixture(scope="module")
def zeroconf(tiny_llama, tmp_path_factory):
    """Two workers of the cluster (torch, the default on Linux, and mlx), one worker of
    another cluster, and `mlxring serve` started twice over them."""
    tmp = tmp_path_factory.mktemp("zeroconf")
    key, other_key = key_file(tmp / "k"), key_file(tmp / "other")
    started: list[Proc] = []
    try:
        w1, w1_port = worker(key, "w1", tmp / "c1")
        started.append(w1)
        w2, w2_port = worker(key, "w2", tmp / "c2", *W2)
        started.append(w2)
        stranger, stranger_port = worker(other_key, "stranger", tmp / "c3")
        started.append(stranger)
        api = free_port()
        first = serve(str(tiny_llama), key, 2, api)
        started.append(first)
        first.wait_for(r"serving .* at http", 240)
        result = {"first": first, "api": api, "tmp": tmp, "key": key, "w1_port": w1_port}
        result["first_answer"] = answer(api, tiny_llama.name)
        assert first.stop() in (0, 130), first.text
        w1.wait_for("went away; waiting for a head", 30)
        second = serve(str(tiny_llama), key, 2, api)
        started.append(second)
        second.wait_for(r"serving .* at http", 240)
        result.update(second=second, workers=(w1, w2), stranger=stranger, started=started)
        result["w2_port"] = w2_port
        result["stranger_port"] = stranger_port
        yield result
    finally:
        for p in reversed(started):
            p.stop()


def test_head_finds_both_workers_and_serves_mlx_lm_greedy_tokens(zeroconf, tiny_llama, greedy):
    assert zeroconf["first_answer"] == greedy
    assert answer(zeroconf["api"], tiny_llama.name) == greedy  # the second head: the same
    log = zeroconf["first"].text
    assert "admitted worker 'w1'" in log and "admitted worker 'w2'" in log
    w1, w2 = zeroconf["workers"]  # a mixed ring: torch (Linux's default) and mlx
    assert "worker w1: torch/cpu" in w1.text and "worker w2: mlx/cpu" in w2.text
    assert "stranger" not in log.split("serving")[0].replace("'stranger'", "")


def test_each_worker_cache_holds_only_its_layers(zeroconf, tiny_llama):
    tmp = zeroconf["tmp"]
    w1, files1 = bundle_layers(tmp / "c1")
    w2, files2 = bundle_layers(tmp / "c2")
    assert files1 and files2
    assert None not in w1 | w2, "a worker holds the embedding or the lm_head"
    assert w1 and w2 and not w1 & w2
    assert w1 | w2 == set(range(min(w1 | w2), 6)), "the workers hold the last layers"
    assert min(w1 | w2) > 0, "the head keeps layer 0"
    plan = zeroconf["first"].text
    for name, layers in (("w1", w1), ("w2", w2)):
        m = re.search(rf"worker '{name}': layers (\d+)-(\d+)", plan)
        assert m and layers == set(range(int(m[1]), int(m[2]) + 1)), plan


def test_a_second_start_sends_no_weight_bytes(zeroconf):
    first, second = zeroconf["first"].text, zeroconf["second"].text
    assert re.search(r"worker 'w1': .*sent (?!0\.0 )[\d.]+ MB in [1-9]", first), first
    for name in ("w1", "w2"):
        assert re.search(rf"worker '{name}': .*sent 0\.0 MB in 0 files", second), second


def test_a_worker_of_another_cluster_is_never_admitted_and_gets_no_bytes(zeroconf):
    tmp = zeroconf["tmp"]
    cache = tmp / "c3"
    assert not [p for p in cache.rglob("*") if p.is_file()], "bytes reached the stranger"
    assert "head" not in zeroconf["stranger"].text.split("waiting for a head", 1)[1]
    # the stranger refuses this cluster's key too, before anything else
    key = bytes.fromhex((tmp / "k").read_text())
    with pytest.raises(HandshakeError, match="does not hold this cluster key"):
        connect(("127.0.0.1", zeroconf["stranger_port"]), key)
    zeroconf["stranger"].wait_for("refused a connection", 10)


def test_a_busy_worker_refuses_a_second_head(zeroconf):
    key = bytes.fromhex((zeroconf["tmp"] / "k").read_text())
    link = WorkerLink("w1", ("127.0.0.1", zeroconf["w1_port"]), key)
    with pytest.raises(ConnectionError, match="serves the head at"):
        link.open()


def test_a_worker_that_dies_and_comes_back_is_taken_back(zeroconf, tiny_llama, greedy):
    """SIGKILL of a worker (its rank follows it): the API answers 503 while the head waits
    for it; a new worker on the same port and cache is taken back, and nothing is sent."""
    api, head = zeroconf["api"], zeroconf["second"]
    _, w2 = zeroconf["workers"]
    kill_group(w2.proc.pid)
    w2.proc.wait()
    client = f"http://127.0.0.1:{api}/v1/models"
    deadline = time.monotonic() + 60
    while httpx.get(client, timeout=10).status_code != 503:
        assert time.monotonic() < deadline, "the API never noticed the dead worker"
        time.sleep(0.5)
    head.wait_for(r"worker 'w2' \(127\.0\.0\.1:\d+\) cannot be reached", 60)
    back, _ = worker(zeroconf["key"], "w2", zeroconf["tmp"] / "c2", *W2, port=zeroconf["w2_port"])
    zeroconf["started"].append(back)
    deadline = time.monotonic() + 120
    while True:
        try:
            assert answer(api, tiny_llama.name) == greedy
            break
        except openai.APIStatusError as e:
            assert e.status_code == 503 and time.monotonic() < deadline, head.text[-3000:]
            time.sleep(1)
    assert "head 127.0.0.1" in back.text and "resuming" not in back.text


# shipping, driven directly --------------------------------------------------------


@pytest.fixture()
def lone_worker(tmp_path):
    key = key_file(tmp_path / "k")
    w, port = worker(key, f"lone{port_suffix()}", tmp_path / "cache", "--backend", "mlx")
    try:
        yield w, port, bytes.fromhex(key.read_text()), tmp_path / "cache"
    finally:
        w.stop()


def port_suffix() -> str:
    return str(free_port())


def ship_through(proxy: FaultProxy, key: bytes, model, layers=(2, 5)):
    bundle = plan_bundle(model, *layers, is_head=False)
    files = manifest(bundle)
    link = WorkerLink("lone", ("127.0.0.1", proxy.port), key, chunk=CHUNK).open()
    try:
        return link.ship(bundle, files), bundle, files
    finally:
        link.close()


def check_cache(cache: Path, files: list[dict]) -> None:
    for f in files:
        blob = cache / "blobs" / f["sha256"]
        assert hashlib.sha256(blob.read_bytes()).hexdigest() == f["sha256"], f["path"]


def test_an_interrupted_transfer_resumes_where_it_stopped(lone_worker, tiny_llama):
    w, port, key, cache = lone_worker
    proxy = FaultProxy(port, cut=300_000)
    try:
        shipped, bundle, files = ship_through(proxy, key, tiny_llama)
    finally:
        proxy.close()
    assert proxy.connections == 2, "the head reconnected once"
    check_cache(cache, files)
    # what crossed before the cut was kept: sent again is only what was still in flight
    assert bundle.size <= shipped.sent < bundle.size + 300_000
    w.wait_for(r"resuming \S+ at byte [1-9]", 10)


def test_a_corrupted_chunk_is_detected_and_sent_again(lone_worker, tiny_llama):
    w, port, key, cache = lone_worker
    proxy = FaultProxy(port, flip=200_000)  # inside the first chunk's sealed bytes
    try:
        shipped, bundle, files = ship_through(proxy, key, tiny_llama)
    finally:
        proxy.close()
    assert proxy.connections == 2
    check_cache(cache, files)
    w.wait_for("failed authentication", 10)


def test_a_partial_file_corrupted_on_disk_fails_its_hash_and_is_sent_again(lone_worker, tiny_llama):
    w, port, key, cache = lone_worker
    bundle = plan_bundle(tiny_llama, 2, 5, is_head=False)
    files = manifest(bundle)
    big = max(files, key=lambda f: f["size"])
    half = next(f for f in bundle.files if f.path == big["path"]).read(0, big["size"] // 2)
    (cache / "partial" / big["sha256"]).write_bytes(bytes(b ^ 1 for b in half[:64]) + half[64:])
    proxy = FaultProxy(port)
    try:
        shipped, _, _ = ship_through(proxy, key, tiny_llama)
    finally:
        proxy.close()
    check_cache(cache, files)
    assert shipped.present == len(half)
    # the rest of the file after what was there, then the whole file again
    assert shipped.sent == bundle.size - len(half) + big["size"]
    w.wait_for("did not match its sha256", 10)


# serving alone, and too few workers -----------------------------------------------


def hf_cache(root: Path, repo: str, model: Path) -> Path:
    """A Hugging Face hub cache holding `model` as `repo` (what a download leaves)."""
    revision = "0" * 40
    base = root / "hub" / f"models--{repo.replace('/', '--')}"
    snapshot = base / "snapshots" / revision
    snapshot.mkdir(parents=True)
    for f in model.iterdir():
        (snapshot / f.name).symlink_to(f)
    (base / "refs").mkdir()
    (base / "refs" / "main").write_text(revision)
    return root


def test_serve_alone_from_a_hub_repo_id_when_no_worker_is_needed(tiny_llama, tmp_path, greedy):
    key = key_file(tmp_path / "k")
    home = hf_cache(tmp_path / "hf", "tiny/llama", tiny_llama)
    api = free_port()
    env = {"HF_HOME": str(home), "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(home / "hub")}
    head = serve("tiny/llama", key, 0, api, "--discovery-timeout", "3", env=env)
    try:
        head.wait_for(r"serving tiny/llama at http", 180)
        assert answer(api, "tiny/llama") == greedy
    finally:
        head.stop()


def test_too_few_workers_names_what_was_seen_and_why(tiny_llama, tmp_path):
    key, other = key_file(tmp_path / "k"), key_file(tmp_path / "other")
    w, _ = worker(other, f"elsewhere{port_suffix()}", tmp_path / "c")
    try:
        head = serve(str(tiny_llama), key, 1, free_port(), "--discovery-timeout", "4")
        assert head.proc.wait(60) == 2
        text = head.text
        assert "0 of the 1 workers needed were admitted" in text
        assert re.search(r"elsewhere\d+ \(127\.0\.0\.1:\d+\): not admitted: another cluster", text)
        assert "Traceback" not in text
    finally:
        w.stop()


# across hosts ---------------------------------------------------------------------

ANSWER = """
import json, sys, openai
client = openai.OpenAI(base_url=f"http://127.0.0.1:{sys.argv[1]}/v1", api_key="-", max_retries=0)
chat = client.chat.completions.create(model=sys.argv[2], max_tokens=int(sys.argv[4]),
    messages=[{"role": "user", "content": sys.argv[3]}], temperature=0, timeout=120)
print(json.dumps([chat.choices[0].message.content, chat.usage.completion_tokens]))
"""


def test_a_head_and_two_workers_on_three_hosts(tiny_llama, tmp_path, greedy):
    """Three network namespaces on one link (ip netns + veth): the ring crosses real
    interfaces, discovery is multicast between hosts, nothing is on loopback but the API."""
    if reason := netns.skip_reason():
        pytest.skip(reason)
    key = key_file(tmp_path / "k")
    started: list[Proc] = []
    with netns.make_hosts(3) as (h0, h1, h2):
        try:
            for host, name in ((h1, "w1"), (h2, "w2")):
                started.append(worker(key, name, tmp_path / name, host=host)[0])
            head = serve(str(tiny_llama), key, 2, 8000, host=h0)
            started.append(head)
            head.wait_for(r"serving .* at http", 240)
            assert f"admitted worker 'w1' ({h1.ip}:" in head.text
            assert f"admitted worker 'w2' ({h2.ip}:" in head.text
            argv = [sys.executable, "-c", ANSWER, "8000", tiny_llama.name, PROMPT, str(MAX_TOKENS)]
            done = h0.run(argv, capture_output=True, text=True, timeout=180)
            assert done.returncode == 0, done.stderr
            assert tuple(json.loads(done.stdout)) == greedy
        finally:
            for p in reversed(started):
                p.stop()


def test_a_config_file_names_a_worker_instead_of_mdns(tiny_llama, tmp_path):
    """Where mDNS cannot reach: a cluster file gives the worker's address (`worker:`); its
    memory is asked of the worker, its layers shipped, its rank run there."""
    key = key_file(tmp_path / "k")
    w, port = worker(key, f"cfg{port_suffix()}", tmp_path / "cache", "--backend", "mlx")
    config = tmp_path / "cluster.yaml"
    config.write_text(
        f"name: by-file\ncluster_key_file: {key}\nnodes:\n"
        "  - {name: head, host: localhost, memory_gb: 8}\n"
        f"  - {{name: far, host: 127.0.0.1, memory_gb: auto, worker: '127.0.0.1:{port}'}}\n"
    )
    try:
        argv = [sys.executable, "-m", "mlxring", "generate", "--config", str(config)]
        argv += ["--model", str(tiny_llama), "--prompt", PROMPT, "--raw", "--json"]
        argv += ["--max-tokens", str(MAX_TOKENS)]
        done = subprocess.run(argv, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        got = json.loads(done.stdout)["tokens"]  # stdout: the job's output only
        assert re.search(r"worker 'far': layers \d+-5: sent", done.stdout + done.stderr)
    finally:
        w.stop()
    model, tokenizer = mlx_lm_load(str(tiny_llama))
    ids = prompts.encode_prompt(tokenizer, PROMPT, raw=True)
    want = [int(t) for t, _ in generate_step(mx.array(ids), model, max_tokens=MAX_TOKENS)]
    assert got == want
    layers, _ = bundle_layers(tmp_path / "cache")
    assert layers and None not in layers and 0 not in layers
