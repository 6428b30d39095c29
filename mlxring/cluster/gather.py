"""A zero-config cluster: find the workers of this cluster, admit them, plan, ship weights.

`mlxring serve` calls `gather` (discovery and admission), `zeroconf_cluster` (the head
and the admitted workers as a cluster definition, planned by the usual planner) and
`ship_all` (each worker gets the bundle of its layers). `WorkerRing` then gives every
start of the ring fresh ring ports on the workers and each attach process its secrets.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

from mlxring.cluster.attach import TOKEN_ENV
from mlxring.cluster.config import ClusterConfig, NodeConfig
from mlxring.cluster.discovery import Advert, Browser
from mlxring.cluster.fit import cluster_plan
from mlxring.cluster.plan import GIB, Plan
from mlxring.cluster.ranks import RankSpec, free_port
from mlxring.cluster.ship import Shipped, WorkerLink, launcher_key, open_worker, say
from mlxring.crypto.handshake import HandshakeError
from mlxring.crypto.keys import KEY_ENV
from mlxring.errors import UserError
from mlxring.model.bundle import manifest, plan_bundle

QUIET = 2.0  # once enough workers are in: stop when no new one appeared for this long
RETRY = 1.0  # seconds between tries of a worker that was busy or unreachable


@dataclass
class Seen:
    advert: Advert
    link: WorkerLink | None = None
    why_not: str | None = None  # why it is not admitted
    final: bool = False  # no point trying again (another key, another protocol)
    tried: float = 0.0


def _admit(seen: Seen, key: bytes) -> None:
    seen.tried = time.monotonic()
    adv = seen.advert
    if adv.problem:
        seen.why_not, seen.final = adv.problem, True
        return
    errors = []
    for host in adv.addresses:
        link = WorkerLink(adv.name, (host, adv.port), key)
        try:
            seen.link, seen.why_not = link.open(), None
            return
        except HandshakeError as e:
            seen.why_not, seen.final = f"refused at the handshake: {e}", True
            return
        except (OSError, ValueError) as e:
            errors.append(f"{host}:{adv.port}: {e}")
    seen.why_not = "; ".join(errors) or "the record has no address"


def gather(
    key: bytes, min_workers: int, timeout: float, interfaces: list[str] | None = None
) -> list[WorkerLink]:
    """Admitted workers (their sessions open), at least `min_workers` of them, sorted by
    name; a UserError naming every worker seen and why it was not admitted otherwise."""
    seen: dict[str, Seen] = {}
    start = last_new = time.monotonic()
    with Browser(key, interfaces) as browser:
        while True:
            now = time.monotonic()
            for adv in browser.seen():
                if adv.name not in seen:
                    seen[adv.name] = Seen(adv)
                    last_new = now
                s = seen[adv.name]
                if s.link is None and not s.final and now - s.tried >= RETRY:
                    s.advert = adv
                    _admit(s, key)
                    if s.link is not None:
                        say(f"admitted worker {adv.name!r} ({s.link.where})")
            admitted = sum(s.link is not None for s in seen.values())
            if admitted >= min_workers and now - last_new >= QUIET:
                break
            if now - start >= timeout:
                break
            time.sleep(0.2)
    links = sorted((s.link for s in seen.values() if s.link), key=lambda link: link.name)
    if len(links) < min_workers:
        for link in links:
            link.close()
        raise UserError(_shortfall(seen, min_workers, timeout))
    return links


def _shortfall(seen: dict[str, Seen], min_workers: int, timeout: float) -> str:
    admitted = [n for n, s in seen.items() if s.link]
    lines = [f"{len(admitted)} of the {min_workers} workers needed were admitted in {timeout:g} s"]
    for name, s in sorted(seen.items()):
        state = "admitted" if s.link else f"not admitted: {s.why_not}"
        lines.append(f"  {name} ({', '.join(s.advert.addresses)}:{s.advert.port}): {state}")
    if not seen:
        lines.append(
            "  no worker was seen: is `mlxring worker` running with this cluster key on the "
            "same network? mDNS may be blocked (macOS Local Network permission, a firewall, "
            "separate VLANs): then define the cluster in a config file (mlxring launch)"
        )
    return "\n".join(lines)


def head_address(links: list[WorkerLink], interfaces: list[str] | None) -> str:
    """The IP the workers reach this head at."""
    if interfaces:
        return interfaces[0]
    if links:
        return links[0].session.sock.getsockname()[0]
    return "127.0.0.1"


def zeroconf_cluster(
    model: str,
    links: list[WorkerLink],
    head: NodeConfig,
    key_file: str | None,
    **cluster_fields,
) -> tuple[ClusterConfig, Plan]:
    """The head, then the workers in name order, planned over their memories."""
    workers = tuple(
        NodeConfig(
            name=link.name,
            host=link.address[0],
            memory_gb=link.info["memory"] / GIB,
            backend=link.info["backend"],
            device=link.info["device"],
            worker=link.where,
        )
        for link in links
    )
    cluster = ClusterConfig(
        name="zeroconf", nodes=(head, *workers), cluster_key_file=key_file, **cluster_fields
    )
    return cluster, cluster_plan(cluster, model)


def ship_all(
    cluster: ClusterConfig, plan: Plan, model: str, links: list[WorkerLink], cache_dir: str
) -> ClusterConfig:
    """Send every worker the bundle of its layers (in parallel); the cluster with each
    worker node's `model` set to its bundle's directory there."""
    results: dict[str, Shipped | BaseException] = {}

    def one(position: int, link: WorkerLink, start: int, end: int) -> None:
        try:
            bundle = plan_bundle(model, start, end, is_head=False)
            files = manifest(bundle, cache_dir=cache_dir)
            results[link.name] = link.ship(bundle, files, position)
        except BaseException as e:  # reported below, in this thread
            results[link.name] = e

    spans = {a.name: (a.start, a.end) for a in plan.assignments}
    threads = [
        threading.Thread(target=one, args=(i, link, *spans[link.name]), daemon=True)
        for i, link in enumerate(links)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for link in links:
        result = results[link.name]
        if isinstance(result, BaseException):
            if isinstance(result, UserError):
                raise result
            raise UserError(f"worker {link.name!r}: the weight transfer failed: {result}")
        start, end = spans[link.name]
        say(
            f"worker {link.name!r}: layers {start}-{end - 1}: sent "
            f"{result.sent / 1e6:.1f} MB in {result.files_sent} files "
            f"({result.present / 1e6:.1f} MB already there)"
        )
    models = {link.name: results[link.name].path for link in links}
    nodes = tuple(
        dataclasses.replace(n, model=models[n.name]) if n.name in models else n
        for n in cluster.nodes
    )
    return dataclasses.replace(cluster, nodes=nodes)


@contextlib.contextmanager
def config_workers(
    cluster: ClusterConfig, plan: Plan, model: str, cache_dir: str | None = None
) -> Iterator[tuple[ClusterConfig, WorkerRing | None]]:
    """For a config whose nodes name mlxring workers (`worker: IP:PORT`): open their
    sessions, ship each its bundle; the cluster with their bundles' paths and the ring
    hooks (None, and the cluster unchanged, when no node names a worker)."""
    nodes = [n for n in cluster.nodes if n.worker]
    if not nodes:
        yield cluster, None
        return
    key = launcher_key(cluster)
    ring = WorkerRing([], key)
    try:
        for node in nodes:
            ring.links[node.name] = open_worker(node, key)
        links = list(ring.links.values())
        cluster = ship_all(cluster, plan, model, links, cache_dir or f"{cache_home()}/head")
        yield cluster, ring
    finally:
        ring.close()


class WorkerRing:
    """Each start of the ring: fresh ring ports from the workers, and the secrets of the
    attach processes (the cluster key, the head's session token), never on a command line."""

    def __init__(self, links: list[WorkerLink], key: bytes):
        self.links = {link.name: link for link in links}
        self.key = key

    def prepare(self, cluster: ClusterConfig) -> ClusterConfig:
        nodes = []
        for node in cluster.nodes:
            if (link := self.links.get(node.name)) is not None:
                node = dataclasses.replace(node, port=self._port(link))
            elif not node.remote and node.port is None:
                node = dataclasses.replace(node, port=free_port(node.host))
            nodes.append(node)
        return dataclasses.replace(cluster, nodes=tuple(nodes))

    @staticmethod
    def _port(link: WorkerLink) -> int:
        """A ring port of the worker; its session reopened first if it broke."""
        try:
            return link.ring_port()
        except UserError:
            link.recover()  # a UserError again: the supervisor waits and tries later
            return link.ring_port()

    def finish(self, specs: list[RankSpec]) -> list[RankSpec]:
        out = []
        for spec in specs:
            if (link := self.links.get(spec.node.name)) is not None:
                secret = {**spec.secret_env, KEY_ENV: self.key.hex(), TOKEN_ENV: link.token}
                spec = dataclasses.replace(spec, secret_env=secret)
            out.append(spec)
        return out

    def close(self) -> None:
        for link in self.links.values():
            link.close()


def default_name() -> str:
    """This machine's short host name, as a node name."""
    name = socket.gethostname().split(".")[0] or "head"
    return "".join(c if c.isalnum() or c in "_.-" else "-" for c in name) or "head"


def cache_home() -> str:
    """Where shipped weights and manifests are kept: $XDG_CACHE_HOME/mlxring or ~/.cache/mlxring."""
    root = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return os.path.join(root, "mlxring")
