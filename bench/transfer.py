"""Weight shipping on loopback against a plain copy of the same bytes.

A real `mlxring worker` (its own process, fresh cache) receives the bundle of layers 1-7
of the benchmark Llama from a head in this process (`WorkerLink.ship`: sealed 1 MiB
chunks, sha256 checked per file on arrival, fsync'd into the content-hash cache). The
baselines copy the same bundle, materialised as files, with `cp -r` (an in-kernel copy)
and with `cat src > dst` per file (read and write through user space, as any receiver
of bytes from a socket must). Everything reads from the page cache. The first manifest
(the head's sha256 pass over the bundle) is timed apart, as is a second start (nothing
to send). Run once with the cache on disk and once on tmpfs (--root /dev/shm).

    python -m bench.transfer [--rounds 3] [--root DIR] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import ensure_model
from mlxring.cluster.ranks import free_port
from mlxring.cluster.ship import WorkerLink
from mlxring.crypto.keys import new_key
from mlxring.model.bundle import manifest, plan_bundle, write_bundle


def start_worker(key: bytes, cache: Path) -> tuple[subprocess.Popen, int]:
    port = free_port()
    argv = [sys.executable, "-m", "mlxring", "worker", "--name", f"bench{port}"]
    argv += ["--port", str(port), "--cache-dir", str(cache), "--interface", "127.0.0.1"]
    proc = subprocess.Popen(
        [*argv, "--backend", "mlx"],
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "MLXRING_CLUSTER_KEY": key.hex()},
        start_new_session=True,
    )
    for line in proc.stderr:
        if "waiting for a head" in line:
            break
    else:
        sys.exit(f"the worker did not start (exit {proc.wait()})")
    return proc, port


def one_round(model: Path, key: bytes, tmp: Path) -> dict:
    bundle = plan_bundle(model, 1, 8, is_head=False)
    t = time.perf_counter()
    files = manifest(bundle)
    hash_s = time.perf_counter() - t
    proc, port = start_worker(key, tmp / "cache")
    try:
        link = WorkerLink("bench", ("127.0.0.1", port), key).open()
        t = time.perf_counter()
        shipped = link.ship(bundle, files)
        ship_s = time.perf_counter() - t
        t = time.perf_counter()
        again = link.ship(bundle, files)
        again_s = time.perf_counter() - t
        link.close()
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait()
    assert shipped.sent == bundle.size and again.sent == 0
    write_bundle(bundle, tmp / "src")
    t = time.perf_counter()
    subprocess.run(["cp", "-r", str(tmp / "src"), str(tmp / "dst")], check=True)
    cp_s = time.perf_counter() - t
    (tmp / "cat").mkdir()
    t = time.perf_counter()
    script = 'for f in "$1"/*; do cat "$f" > "$2/${f##*/}"; done'
    subprocess.run(["sh", "-c", script, "-", str(tmp / "src"), str(tmp / "cat")], check=True)
    cat_s = time.perf_counter() - t
    mb = bundle.size / 1e6
    return {
        "mb": mb,
        "ship_mb_s": mb / ship_s,
        "cp_mb_s": mb / cp_s,
        "cat_mb_s": mb / cat_s,
        "hash_mb_s": mb / hash_s,
        "second_start_s": again_s,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--root", help="where the caches and copies go (default: the temp dir)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    model = ensure_model()
    key = new_key()
    rows = []
    for _ in range(args.rounds):
        tmp = Path(tempfile.mkdtemp(prefix="mlxring-transfer-", dir=args.root))
        try:
            rows.append(one_round(model, key, tmp))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    result = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
    result["ship_over_cp"] = result["ship_mb_s"] / result["cp_mb_s"]
    result["ship_over_cat"] = result["ship_mb_s"] / result["cat_mb_s"]
    if args.json:
        print(json.dumps(result))
        return
    print(f"bundle of layers 1-7: {result['mb']:.0f} MB (median of {args.rounds} rounds)")
    print(f"  shipped to a worker : {result['ship_mb_s']:8.0f} MB/s")
    print(f"  cp -r of the files  : {result['cp_mb_s']:8.0f} MB/s")
    print(f"  cat src > dst       : {result['cat_mb_s']:8.0f} MB/s")
    print(f"  ship / cp, ship / cat: {result['ship_over_cp']:.2f}, {result['ship_over_cat']:.2f}")
    print(f"  head's first sha256 : {result['hash_mb_s']:8.0f} MB/s (cached afterwards)")
    print(f"  second start        : {result['second_start_s']:8.3f} s (nothing sent)")


if __name__ == "__main__":
    main()
