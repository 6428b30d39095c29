"""Run one rank on an mlxring worker, from the head: what ssh is for a configured node.

    python -m mlxring.cluster.attach WORKER_IP:PORT REQUEST_JSON

with MLXRING_CLUSTER_KEY (hex) and MLXRING_WORKER_TOKEN (the head's session token) in
the environment. It authenticates to the worker, asks it to start the rank that
REQUEST_JSON describes ({"args": rank argv, "env": {...}, "files": {...}}), copies the
rank's stdout and stderr to its own (control lines included), passes SIGTERM/SIGINT/SIGHUP
on, and exits as the rank did. If this process dies, the worker stops the rank.
"""

from __future__ import annotations

import json
import os
import signal
import sys

from mlxring.cluster import protocol
from mlxring.crypto.keys import key_from_env
from mlxring.crypto.link import IntegrityError
from mlxring.crypto.session import connect

TOKEN_ENV = "MLXRING_WORKER_TOKEN"


def command(worker: str, args: list[str], env: dict, files: dict) -> list[str]:
    """The attach command line that runs a rank (`args`: after `-m mlxring.node`)."""
    request = {"args": args, "env": env, "files": files}
    return [sys.executable, "-m", __name__, worker, json.dumps(request)]


def main(argv: list[str]) -> int:
    worker, request = argv[0], json.loads(argv[1])
    host, _, port = worker.rpartition(":")
    try:
        session = connect((host, int(port)), key_from_env() or b"")
        session.send({"op": "run", "token": os.environ.get(TOKEN_ENV, ""), **request})
    except (OSError, ValueError) as e:
        protocol.control(protocol.ERROR, f"cannot reach the worker at {worker}: {e}")
        return protocol.EXIT_CRASH

    def forward(sig: int, _frame) -> None:
        try:
            session.send({"op": "signal", "sig": sig})
        except OSError:
            os._exit(protocol.EXIT_CRASH)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, forward)
    out = {1: sys.stdout.buffer, 2: sys.stderr.buffer}
    try:
        while True:
            header, payload = session.recv()
            if header.get("op") == "out" and header.get("fd") in out:
                out[header["fd"]].write(payload)
                out[header["fd"]].flush()
            elif header.get("op") == "exit":
                code = int(header["code"])
                break
            elif "error" in header:
                protocol.control(protocol.ERROR, header["error"])
                return protocol.EXIT_CRASH
    except (OSError, IntegrityError) as e:
        protocol.control(protocol.ERROR, f"lost the connection to the worker at {worker}: {e}")
        return protocol.EXIT_CRASH
    if code < 0:  # killed by a signal there: end the same way here
        signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
