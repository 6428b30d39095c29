"""Helpers for tests that start real processes: free ports, a raw mlx.distributed ring,
and checks that nothing started is left running."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def alive(pid: int) -> bool:
    """True while `pid` exists and is not a zombie."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


def children(pid: int) -> list[int]:
    """Direct children of `pid` (Linux /proc)."""
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with contextlib.suppress(FileNotFoundError):
            found += [int(c) for c in (task / "children").read_text().split()]
    return found


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except FileNotFoundError:
        return ""


def kill_group(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


def stop_launcher(proc: subprocess.Popen, grace: float = 15) -> None:
    """Stop an `mlxring launch` process the way a user does (Ctrl-C: it stops its ranks),
    then make sure: SIGKILL the launcher's group and every rank it started."""
    ranks = [p for p in children(proc.pid) if "mlxring.node" in cmdline(p)]
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGINT)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=grace)
    for pid in [proc.pid, *ranks]:
        kill_group(pid)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    proc.wait()


def two_node_config(directory: Path, header: str, nodes=("head", "tail")) -> Path:
    """`directory`/cluster.yaml: the `header` lines (name, api, batching) and two local
    nodes of 8 GB named `nodes`."""
    path = directory / "cluster.yaml"
    lines = "".join(f"  - {{name: {n}, host: localhost, memory_gb: 8}}\n" for n in nodes)
    path.write_text(f"{header}nodes:\n{lines}")
    return path


def launch_serving(config: Path, model: Path, *extra: str) -> subprocess.Popen:
    """`mlxring launch CONFIG --model MODEL` in its own process group, once it says it is
    serving (stdout a text pipe); stopped again if it ends before that. Its stderr is read
    on, into `proc.lines` (a full pipe would block the launcher: it logs every request)."""
    argv = [sys.executable, "-m", "mlxring", "launch", str(config), "--model", str(model)]
    proc = subprocess.Popen(
        [*argv, *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    proc.lines = []
    try:
        while not any("serving" in line for line in proc.lines):
            line = proc.stderr.readline()
            assert line, f"launch ended: {''.join(proc.lines)}"
            proc.lines.append(line)
    except BaseException:
        stop_launcher(proc)
        raise
    threading.Thread(target=lambda: proc.lines.extend(proc.stderr), daemon=True).start()
    return proc


def wait_for_line(proc: subprocess.Popen, text: str, after: int = 0, within: float = 60) -> str:
    """The first line of `proc.lines` (launch_serving) from index `after` on that holds
    `text`, once it has come."""
    deadline = time.monotonic() + within
    while not (found := [line for line in proc.lines[after:] if text in line]):
        assert time.monotonic() < deadline, f"no line with {text!r}: {''.join(proc.lines)}"
        time.sleep(0.05)
    return found[0]


def run_ring(script: str, size: int, *args: str, timeout: float = 120) -> list[tuple[int, str]]:
    """Run `python script args` as `size` ranks of a real ring on loopback.

    Returns (exit code, output) per rank; raises TimeoutError if any rank hangs.
    Every rank runs in its own process group and is killed on the way out.
    """
    hostfile = Path(f"/tmp/mlxring-test-hosts-{os.getpid()}-{free_port()}.json")
    hostfile.write_text(json.dumps([[f"127.0.0.1:{free_port()}"] for _ in range(size)]))
    env = {**os.environ, "MLX_HOSTFILE": str(hostfile), "PYTHONPATH": str(ROOT)}
    procs = [
        subprocess.Popen(
            [sys.executable, script, *args],
            env={**env, "MLX_RANK": str(rank)},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        for rank in range(size)
    ]
    try:
        deadline = time.monotonic() + timeout
        while any(p.poll() is None for p in procs):
            if time.monotonic() > deadline:
                raise TimeoutError(f"ring of {size} did not finish within {timeout} s (hang)")
            time.sleep(0.1)
        return [(p.returncode, p.stdout.read()) for p in procs]
    finally:
        for p in procs:
            kill_group(p.pid)
            p.wait()
        hostfile.unlink(missing_ok=True)
