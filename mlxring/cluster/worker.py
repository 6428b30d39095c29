"""`mlxring worker`: a machine that waits for a head, takes its weights, runs its rank.

The worker advertises itself over mDNS (`mlxring.cluster.discovery`) and listens on its
control port P. A head connects and authenticates (`mlxring.crypto.session`); a peer
without the cluster key is refused before anything else crosses. One head at a time owns
the worker. Over that head's session it asks which weight files the worker lacks, sends
them into the cache (`mlxring.cluster.store`), and asks for a ring port (P+1..P+RING_PORTS).
Each rank is started by a second authenticated connection that presents the head's
session token (`mlxring.cluster.attach`, on the head, relays its output like ssh would).
When the head's session ends, its ranks are stopped and the worker waits for the next.
"""

from __future__ import annotations

import os
import secrets
import socket
import sys
import threading
from pathlib import Path

from tqdm import tqdm

from mlxring.cluster.discovery import Advertiser
from mlxring.cluster.hosted import HostedRank
from mlxring.cluster.store import Store, StoreError
from mlxring.crypto.handshake import HandshakeError
from mlxring.crypto.link import IntegrityError
from mlxring.crypto.session import Session, SessionClosed, accept
from mlxring.errors import UserError

RING_PORTS = 8  # the worker uses its control port P and P+1 .. P+RING_PORTS for ring links


def detect_compute() -> tuple[str, str]:
    """(backend, device) of this machine: mlx on Apple Silicon, else torch (cuda or cpu)
    when torch is installed, else mlx on the CPU."""
    if sys.platform == "darwin" and os.uname().machine == "arm64":
        return "mlx", "gpu"
    try:
        import torch  # lazy: only a worker deciding its backend pays for torch
    except ImportError:
        return "mlx", "cpu"
    return "torch", "cuda" if torch.cuda.is_available() else "cpu"


class Worker:
    def __init__(
        self,
        name: str,
        key: bytes,
        port: int,
        cache_dir: str | Path,
        memory_bytes: int,
        backend: str,
        device: str,
        interfaces: list[str] | None = None,
    ):
        self.name, self.key, self.port = name, key, port
        self.store = Store(cache_dir)
        self.memory_bytes, self.backend, self.device = memory_bytes, backend, device
        self.interfaces = interfaces
        self.lock = threading.Lock()
        self.owner: tuple[str, str] | None = None  # (token, head address) of the head in charge
        self.ranks: dict[int, tuple[str, HostedRank]] = {}  # pid -> (head's token, rank)
        self.next_port = 0
        self.stopping = threading.Event()

    def log(self, message: str) -> None:
        print(f"mlxring worker {self.name}: {message}", file=sys.stderr, flush=True)

    # the main loop -------------------------------------------------------------
    def listen(self) -> list[socket.socket]:
        hosts = self.interfaces or ["0.0.0.0"]
        sockets = []
        for host in hosts:
            try:
                s = socket.create_server((host, self.port), reuse_port=False)
            except OSError as e:
                for s in sockets:
                    s.close()
                raise UserError(
                    f"cannot listen on {host}:{self.port} ({e.strerror}); pick another --port"
                ) from None
            sockets.append(s)
        return sockets

    def serve_forever(self) -> None:
        sockets = self.listen()
        for s in sockets:
            threading.Thread(target=self._accept_loop, args=(s,), daemon=True).start()
        advert = Advertiser(
            self.name,
            self.port,
            self.memory_bytes,
            self.backend,
            self.device,
            self.key,
            self.interfaces,
        )
        with advert:
            where = ", ".join(f"{s.getsockname()[0]}:{self.port}" for s in sockets)
            self.log(
                f"{self.backend}/{self.device}, {self.memory_bytes / 2**30:.1f} GB, "
                f"control port {where}, cache {self.store.root}; waiting for a head"
            )
            try:
                self.stopping.wait()
            finally:
                for s in sockets:
                    s.close()
                self._stop_ranks(None)

    def _accept_loop(self, server: socket.socket) -> None:
        while not self.stopping.is_set():
            try:
                sock, _ = server.accept()
            except OSError:
                return
            threading.Thread(target=self._connection, args=(sock,), daemon=True).start()

    def _connection(self, sock: socket.socket) -> None:
        try:
            session = accept(sock, self.key)
        except HandshakeError as e:
            self.log(f"refused a connection: {e}")
            sock.close()
            return
        except (OSError, ValueError):
            sock.close()
            return
        try:
            header, _ = session.recv()
            if header.get("op") == "hello":
                self._head(session)
            elif header.get("op") == "run":
                self._run(session, header)
        except (SessionClosed, ConnectionError, IntegrityError, OSError) as e:
            if isinstance(e, IntegrityError):
                self.log(f"dropped {session.peer}: {e}")
        finally:
            session.close()

    # a head's session ------------------------------------------------------------
    def _head(self, session: Session) -> None:
        with self.lock:
            if self.owner is not None:
                session.send({"error": f"worker {self.name!r} serves the head at {self.owner[1]}"})
                return
            token = secrets.token_hex(16)
            self.owner = (token, session.peer)
        self.log(f"head {session.peer} connected")
        try:
            session.send(
                {
                    "name": self.name,
                    "memory": self.memory_bytes,
                    "backend": self.backend,
                    "device": self.device,
                    "token": token,
                }
            )
            self._head_loop(session)
        finally:
            self.store.close()  # partial files of a transfer cut short
            with self.lock:
                self.owner = None
            self._stop_ranks(token)
            self.log(f"head {session.peer} went away; waiting for a head")

    def _head_loop(self, session: Session) -> None:
        bar = None
        while True:
            header, payload = session.recv()
            op = header.get("op")
            try:
                if op == "have":
                    sizes = [self.store.have(f["sha256"], f["size"]) for f in header["files"]]
                    session.send({"have": sizes})
                elif op == "put":
                    if bar is None or bar.desc != header["path"]:
                        bar = self._bar(bar, header)
                    self.store.write(header["sha256"], header["offset"], payload)
                    bar.update(len(payload))
                elif op == "done":
                    ok = self.store.finish(header["sha256"], header["size"])
                    if not ok:
                        self.log(f"{header['path']} did not match its sha256; asking again")
                    session.send({"stored": ok})
                elif op == "bundle":
                    session.send({"path": str(self.store.bundle(header["files"]))})
                elif op == "port":
                    session.send({"port": self._ring_port()})
                else:
                    session.send({"error": f"unknown request {op!r}"})
            except (StoreError, KeyError, TypeError, OSError) as e:
                session.send({"error": f"worker {self.name!r}: {e}"})
            if bar is not None and op in ("done", "bundle"):
                bar.close()
                bar = None

    def _bar(self, bar, header: dict) -> tqdm:
        if bar is not None:
            bar.close()
        bar = tqdm(
            total=header["size"], initial=header["offset"], unit="B", unit_scale=True, leave=False
        )
        bar.set_description_str(header["path"])
        if header["offset"]:
            self.log(f"resuming {header['path']} at byte {header['offset']}")
        return bar

    def _ring_port(self) -> int:
        """A port of P+1..P+RING_PORTS that is free now, in turn (a restarted ring gets
        another one while the last one's sockets linger)."""
        host = (self.interfaces or ["0.0.0.0"])[0]
        for _ in range(RING_PORTS):
            port = self.port + 1 + self.next_port
            self.next_port = (self.next_port + 1) % RING_PORTS
            with socket.socket() as s:
                try:
                    s.bind((host, port))
                    return port
                except OSError:
                    continue
        raise StoreError(f"none of ports {self.port + 1}-{self.port + RING_PORTS} is free")

    # running a rank ----------------------------------------------------------------
    def _run(self, session: Session, header: dict) -> None:
        with self.lock:
            owner = self.owner
        if owner is None or not secrets.compare_digest(str(header.get("token")), owner[0]):
            session.send({"error": f"worker {self.name!r} does not serve that head"})
            return
        rank = HostedRank.start(session, header, self.store, self.key, self.name)
        if rank is None:
            return
        with self.lock:
            self.ranks[rank.proc.pid] = (owner[0], rank)
        try:
            rank.serve()
        finally:
            with self.lock:
                self.ranks.pop(rank.proc.pid, None)

    def _stop_ranks(self, token: str | None) -> None:
        with self.lock:
            procs = [p for t, p in self.ranks.values() if token is None or t == token]
        for rank in procs:
            rank.stop()
