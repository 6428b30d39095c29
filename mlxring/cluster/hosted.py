"""A head's rank, run by a worker (`mlxring.cluster.worker`) as the head asks.

The request (from `mlxring.cluster.attach` on the head) names the rank's arguments, the
mlx.distributed environment and the files it reads (the hostfile). The worker checks
them (only a bundle of its own cache as the model, only the rank protocol's variables and
files), gives the rank its own cluster key (never sent by the head), starts it in a
process group of its own, streams its stdout and stderr back over the session, passes
the head's signals on, and stops it when the session ends.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

from mlxring.cluster import protocol
from mlxring.cluster.store import Store
from mlxring.crypto.keys import KEY_ENV
from mlxring.crypto.link import IntegrityError
from mlxring.crypto.session import Session

STOP_GRACE = 3.0  # seconds between SIGTERM and SIGKILL
# what a head may set in a rank's environment, and which files it may have written
_ENV = {
    protocol.MLX_RANK,
    protocol.WATCH_PARENT_ENV,
    protocol.JACCL_COORDINATOR,
    protocol.JACCL_RING,
    "PYTHONUNBUFFERED",
}
_FILES = {protocol.MLX_HOSTFILE, protocol.JACCL_DEVICES}
_SIGNALS = (signal.SIGINT, signal.SIGKILL, signal.SIGTERM)


def rank_command(request: dict, store: Store, key: bytes) -> tuple[list[str], dict, list[str]]:
    """(argv, environment, temporary files) of the rank `request` describes; ValueError
    for a request this worker does not run."""
    try:
        args = protocol.RankArgs.parse(list(request["args"]))
    except SystemExit:
        raise ValueError("a malformed rank command") from None
    if not store.owns(args.model):
        raise ValueError(f"{args.model} is not a bundle of this worker's cache")
    argv = [sys.executable, "-m", protocol.RANK_MODULE, *args.argv()]
    env = {k: v for k, v in os.environ.items() if k != KEY_ENV}
    env.update({k: str(v) for k, v in request.get("env", {}).items() if k in _ENV})
    env[KEY_ENV] = key.hex()  # the worker's own key: never sent by the head
    root = str(Path(__file__).resolve().parents[2])  # run this very mlxring
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    temp = []
    for var, content in request.get("files", {}).items():
        if var not in _FILES:
            continue
        fd, path = tempfile.mkstemp(prefix="mlxring-")
        with os.fdopen(fd, "w") as f:
            f.write(str(content))
        env[var] = path
        temp.append(path)
    env[protocol.TEMP_FILES_ENV] = " ".join(temp)
    return argv, env, temp


class HostedRank:
    """One running rank and the session of the head's attach process that asked for it."""

    def __init__(self, session: Session, proc: subprocess.Popen, temp: list[str]):
        self.session, self.proc, self.temp = session, proc, temp

    @classmethod
    def start(
        cls, session: Session, request: dict, store: Store, key: bytes, worker: str
    ) -> HostedRank | None:
        """Start the rank; None (the head told why) when it cannot be started."""
        try:
            argv, env, temp = rank_command(request, store, key)
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env=env,
                start_new_session=True,  # its own process group: stopped as a whole
            )
        except (ValueError, TypeError, KeyError, OSError) as e:
            session.send({"error": f"worker {worker!r} cannot start the rank: {e}"})
            return None
        return cls(session, proc, temp)

    def serve(self) -> None:
        """Relay the rank's output and the head's signals until the rank exits; then tell
        the head its exit code."""
        relays = [
            threading.Thread(target=self._relay, args=(stream, n), daemon=True)
            for n, stream in ((1, self.proc.stdout), (2, self.proc.stderr))
        ]
        for t in relays:
            t.start()
        threading.Thread(target=self._signals, daemon=True).start()
        code = self.proc.wait()
        for t in relays:
            t.join(timeout=5)
        for path in self.temp:
            with contextlib.suppress(OSError):
                os.unlink(path)
        with contextlib.suppress(OSError):
            self.session.send({"op": "exit", "code": code})

    def _relay(self, stream, number: int) -> None:
        with contextlib.suppress(OSError):
            while data := stream.read1(65536):
                self.session.send({"op": "out", "fd": number}, data)

    def _signals(self) -> None:
        """Signals from the head's attach process; its connection gone: stop the rank."""
        try:
            while self.proc.poll() is None:
                header, _ = self.session.recv()
                if header.get("op") == "signal" and header.get("sig") in _SIGNALS:
                    self._kill(header["sig"])
        except (ConnectionError, IntegrityError, OSError):
            self.stop()

    def _kill(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, sig)

    def stop(self) -> None:
        """SIGTERM the rank's process group, SIGKILL it after STOP_GRACE."""
        self._kill(signal.SIGTERM)
        try:
            self.proc.wait(STOP_GRACE)
        except subprocess.TimeoutExpired:
            self._kill(signal.SIGKILL)
            self.proc.wait()
