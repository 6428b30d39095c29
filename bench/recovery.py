"""Recovery under load: a launched 2-rank ring on loopback serves a steady stream of
clients while faults are injected (SIGKILL of the tail rank, then SIGSTOP of it for 20 s);
counts the answers by status and measures how long each fault keeps the API down.

    python bench/recovery.py [--clients 8] [--step-timeout 4] [--json]

Figures: requests sent, answered 200 / 503 / other, in-flight requests that ended with
an error, per fault the seconds from the fault to the next correct answer.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import httpx

from mlxring.cluster.ranks import free_port

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / ".cache" / "tiny-llama"
PROMPT = "The ring splits the model"
BODY = {"model": MODEL.name, "prompt": PROMPT, "max_tokens": 16, "temperature": 0}


def rank_pid(launcher: int, name: str) -> int:
    for child in Path(f"/proc/{launcher}/task/{launcher}/children").read_text().split():
        cmd = Path(f"/proc/{child}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        if f"--name {name}" in cmd:
            return int(child)
    raise LookupError(name)


class Load:
    """`clients` threads sending greedy completions back to back; counts the outcomes."""

    def __init__(self, url: str, clients: int):
        self.url, self.stop = url, threading.Event()
        self.outcomes: Counter[str] = Counter()
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self.client) for _ in range(clients)]

    def client(self) -> None:
        while not self.stop.is_set():
            try:
                r = httpx.post(f"{self.url}/v1/completions", json=BODY, timeout=120)
                outcome = str(r.status_code)
            except httpx.HTTPError as e:
                outcome = type(e).__name__
            with self.lock:
                self.outcomes[outcome] += 1
            if outcome != "200":
                time.sleep(0.5)


def next_answer(url: str, want: str, since: float) -> float:
    """Seconds from `since` until a completion answers `want` again."""
    while True:
        with contextlib.suppress(httpx.HTTPError):
            r = httpx.post(f"{url}/v1/completions", json=BODY, timeout=120)
            if r.status_code == 200:
                assert r.json()["choices"][0]["text"] == want, "a wrong answer after recovery"
                return time.monotonic() - since
        time.sleep(0.2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--step-timeout", type=float, default=4)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if not (MODEL / "config.json").exists():
        subprocess.run([sys.executable, "-m", "mlxring", "make-tiny", "--out", str(MODEL)])
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    config = Path(tempfile.mkdtemp()) / "cluster.yaml"
    config.write_text(
        f"name: recovery\napi: {{port: {port}}}\nbatching: {{step_timeout: {args.step_timeout}}}\n"
        "nodes:\n  - {name: head, host: localhost, memory_gb: 8}\n"
        "  - {name: tail, host: localhost, memory_gb: 8}\n"
    )
    argv = [sys.executable, "-m", "mlxring", "launch", str(config), "--model", str(MODEL)]
    launcher = subprocess.Popen(argv, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        started = time.monotonic()
        want = ""
        while not want:
            with contextlib.suppress(httpx.HTTPError):
                r = httpx.post(f"{url}/v1/completions", json=BODY, timeout=120)
                want = r.json()["choices"][0]["text"] if r.status_code == 200 else ""
            time.sleep(0.2)
        first_up = time.monotonic() - started
        load = Load(url, args.clients)
        for t in load.threads:
            t.start()
        time.sleep(5)
        faults = []
        killed = time.monotonic()
        os.kill(rank_pid(launcher.pid, "tail"), signal.SIGKILL)
        faults.append(
            {"fault": "SIGKILL tail", "recovered_s": round(next_answer(url, want, killed), 1)}
        )
        time.sleep(5)
        tail = rank_pid(launcher.pid, "tail")
        stopped = time.monotonic()
        os.kill(tail, signal.SIGSTOP)
        recovered = next_answer(url, want, stopped)
        with contextlib.suppress(ProcessLookupError):
            os.kill(tail, signal.SIGCONT)
        faults.append({"fault": "SIGSTOP tail", "recovered_s": round(recovered, 1)})
        time.sleep(5)
        load.stop.set()
        for t in load.threads:
            t.join()
        result = {
            "clients": args.clients,
            "step_timeout_s": args.step_timeout,
            "first_up_s": round(first_up, 1),
            "requests": sum(load.outcomes.values()),
            "outcomes": dict(load.outcomes),
            "faults": faults,
        }
    finally:
        launcher.send_signal(signal.SIGINT)
        try:
            launcher.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(launcher.pid, signal.SIGKILL)
    if args.json:
        print(json.dumps(result))
        return
    print(f"{result['requests']} requests from {args.clients} clients: {result['outcomes']}")
    for fault in faults:
        print(f"{fault['fault']}: a correct answer again after {fault['recovered_s']} s")


if __name__ == "__main__":
    main()
