"""The head's side of one worker: its authenticated session, weight shipping, ring ports.

Shipping a bundle (`mlxring.model.bundle`): the head asks which files the worker has
(by sha256), sends what is missing in sealed chunks, starting where a partial file ends
(a resumed transfer), and waits for the worker's hash check of each file; a file whose
hash does not match is sent again. A session that breaks mid-transfer (a tampered frame,
a dropped connection) is reopened and the transfer resumes. Then the worker links the
files into a model directory, whose path the rank is started with.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass

from tqdm import tqdm

from mlxring.cluster.config import ClusterConfig, NodeConfig
from mlxring.crypto.handshake import HandshakeError
from mlxring.crypto.keys import KEY_ENV, key_from_env, read_key_file
from mlxring.crypto.link import IntegrityError
from mlxring.crypto.session import Session, connect
from mlxring.errors import UserError
from mlxring.model.bundle import Bundle

CHUNK = 1 << 20
RETRIES = 3  # a file sent again after a failed hash check; a session reopened after a break


@dataclass
class Shipped:
    path: str  # the bundle's model directory on the worker
    sent: int  # bytes sent now
    present: int  # bytes the worker already had (cached, or a partial file resumed)
    files_sent: int


def say(message: str) -> None:
    """A line of the launcher's own (stderr: stdout carries a job's output)."""
    print(f"mlxring: {message}", file=sys.stderr, flush=True)


class WorkerLink:
    """The head's session with one worker, held while the head serves (the worker knows
    its head is alive while it is open)."""

    def __init__(self, name: str, address: tuple[str, int], key: bytes, chunk: int = CHUNK):
        self.name, self.address, self.key = name, address, key
        self.chunk = chunk  # bytes of weights per sealed message
        self.session: Session | None = None
        self.info: dict = {}
        self.shipped: tuple[Bundle, list[dict]] | None = None  # what the worker must hold

    @property
    def where(self) -> str:
        return f"{self.address[0]}:{self.address[1]}"

    def open(self) -> WorkerLink:
        """Connect, authenticate and take the worker. Raises HandshakeError (another
        key), ConnectionError (busy, unreachable)."""
        self.close()
        session = connect(self.address, self.key)
        try:
            self.info = session.request({"op": "hello"})
        except BaseException:
            session.close()
            raise
        self.session = session
        return self

    def close(self) -> None:
        if self.session is not None:
            self.session.close()
            self.session = None

    @property
    def token(self) -> str:
        return self.info["token"]

    def ring_port(self) -> int:
        return int(self._request({"op": "port"})["port"])

    def recover(self) -> None:
        """After the session broke (the worker restarted, the network blinked): open it
        again and make sure the worker still holds its bundle (cached: nothing is sent)."""
        try:
            self.open()
            if self.shipped is not None:
                self.ship(*self.shipped)
        except (OSError, HandshakeError, IntegrityError) as e:
            raise UserError(f"worker {self.name!r} ({self.where}) cannot be reached: {e}") from None

    def _request(self, header: dict) -> dict:
        if self.session is None:
            raise UserError(f"worker {self.name!r} ({self.where}): not connected")
        try:
            return self.session.request(header)
        except (OSError, IntegrityError) as e:
            raise UserError(f"worker {self.name!r} ({self.where}): {e}") from None

    # shipping ---------------------------------------------------------------------
    def ship(self, bundle: Bundle, files: list[dict], position: int = 0) -> Shipped:
        """Make `bundle` (whose manifest is `files`) present on the worker; its path there."""
        total = Shipped("", 0, 0, 0)
        for attempt in range(RETRIES + 1):
            try:
                self._send_missing(bundle, files, total, position, first=attempt == 0)
                total.path = self._request({"op": "bundle", "files": files})["path"]
                self.shipped = (bundle, files)
                return total
            except (ConnectionError, IntegrityError, OSError) as e:
                if attempt == RETRIES or isinstance(e, HandshakeError):
                    raise UserError(
                        f"worker {self.name!r} ({self.where}): the weight transfer failed: {e}"
                    ) from None
                say(f"worker {self.name!r}: transfer interrupted ({e}); reconnecting")
                time.sleep(0.5)
                self.open()
        raise AssertionError("unreachable")

    def _send_missing(
        self, bundle: Bundle, files: list[dict], total: Shipped, position: int, first: bool
    ) -> None:
        by_path = {f.path: f for f in bundle.files}
        have = self.session.request({"op": "have", "files": files})["have"]
        missing = [(f, h) for f, h in zip(files, have) if h < f["size"]]
        if first:  # what was there before this head sent anything
            total.present = sum(have)
        todo = sum(f["size"] - h for f, h in missing)
        with tqdm(
            total=todo,
            unit="B",
            unit_scale=True,
            desc=f"weights to {self.name}",
            position=position,
            leave=False,
            disable=not todo,
        ) as bar:
            for entry, offset in missing:
                for attempt in range(RETRIES + 1):
                    sent = self._send_file(by_path[entry["path"]], entry, offset, bar)
                    total.sent += sent
                    if self.session.request({"op": "done", **_ids(entry)})["stored"]:
                        total.files_sent += 1
                        break
                    if attempt == RETRIES:
                        raise UserError(
                            f"worker {self.name!r}: {entry['path']} arrived corrupted "
                            f"{RETRIES + 1} times; check the worker's disk and memory"
                        )
                    say(
                        f"worker {self.name!r}: {entry['path']} failed its hash "
                        "check; sending it again"
                    )
                    bar.total += entry["size"]
                    offset = 0

    def _send_file(self, file, entry: dict, offset: int, bar) -> int:
        sent = 0
        for data in file.chunks(offset, self.chunk):
            header = {"op": "put", **_ids(entry), "offset": offset}
            self.session.send(header, data)
            offset += len(data)
            sent += len(data)
            bar.update(len(data))
        return sent


def _ids(entry: dict) -> dict:
    return {"path": entry["path"], "sha256": entry["sha256"], "size": entry["size"]}


# workers named in a config file (`worker: IP:PORT`) --------------------------------


def launcher_key(cluster: ClusterConfig) -> bytes:
    """The cluster key this launcher proves to workers: the cluster's key file, or the
    environment."""
    file = cluster.cluster_key_file or cluster.head.cluster_key_file
    key = read_key_file(file) if file else key_from_env()
    if key is None:
        raise UserError(
            f"nodes run on mlxring workers need the cluster key here too: set "
            f"cluster_key_file or {KEY_ENV}"
        )
    return key


def open_worker(node: NodeConfig, key: bytes) -> WorkerLink:
    """The authenticated session with the worker a config node names; one clear line when
    it cannot be had."""
    host, _, port = node.worker.rpartition(":")
    link = WorkerLink(node.name, (host.strip("[]"), int(port)), key)
    try:
        return link.open()
    except HandshakeError as e:
        raise UserError(f"node {node.name!r}: {e}") from None
    except (OSError, ValueError) as e:
        raise UserError(
            f"node {node.name!r}: cannot use the worker at {node.worker} ({e}); is "
            "`mlxring worker` running there, with this cluster's key?"
        ) from None


def worker_memory(node: NodeConfig, cluster: ClusterConfig) -> int:
    """`memory_gb: auto` of a node on an mlxring worker: what the worker offers."""
    link = open_worker(node, launcher_key(cluster))
    try:
        return int(link.info["memory"])
    finally:
        link.close()
