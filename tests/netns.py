"""Separate "hosts" on one machine: network namespaces on a private link (needs root).

Each call makes a hub namespace holding a bridge and one namespace per host, joined to the
bridge by a veth pair, on its own 10.77.x.0/24. Nothing touches the root namespace, so
deleting the namespaces removes every link; a run killed before its cleanup leaves
namespaces named after its pid, which the next call deletes.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import os
import random
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass

PREFIX = "mlxring-test-"
_calls = itertools.count()


@dataclass(frozen=True)
class Host:
    name: str
    ns: str
    ip: str

    def popen(self, argv: list[str], **kw) -> subprocess.Popen:
        """Run `argv` inside this host's namespace, in a process group of its own (stop it
        with os.killpg)."""
        return subprocess.Popen(
            ["ip", "netns", "exec", self.ns, *argv], **{**kw, "start_new_session": True}
        )

    def run(self, argv: list[str], **kw) -> subprocess.CompletedProcess:
        return subprocess.run(["ip", "netns", "exec", self.ns, *argv], **kw)


def ip(*args: str) -> None:
    """Run `ip ARGS`; a failure raises with ip's own message."""
    done = subprocess.run(["ip", *args], capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"ip {' '.join(args)}: {done.stderr.strip()}")


@functools.cache
def skip_reason() -> str | None:
    """Why namespaces cannot be made here (for pytest.skip), or None."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "no `ip` command (install iproute2)"
    probe = f"{PREFIX}{os.getpid()}-probe"
    try:
        ip("netns", "add", probe)
        ip("-n", probe, "link", "add", "vprobe0", "type", "veth", "peer", "name", "vprobe1")
        ip("-n", probe, "link", "add", "brprobe", "type", "bridge")
    except RuntimeError as e:
        return f"cannot make network namespaces, veths and a bridge here ({e})"
    finally:
        _delete(probe)
    return None


def _delete(ns: str) -> None:
    subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def _delete_leftovers() -> None:
    """Namespaces of test runs whose process is gone."""
    for line in subprocess.run(
        ["ip", "netns", "list"], capture_output=True, text=True
    ).stdout.split("\n"):
        ns = line.split(" ")[0]
        pid = ns.removeprefix(PREFIX).split("-")[0]
        if ns.startswith(PREFIX) and pid.isdigit() and not os.path.exists(f"/proc/{pid}"):
            _delete(ns)


@contextlib.contextmanager
def make_hosts(n: int) -> Iterator[list[Host]]:
    """`n` hosts on one link (10.77.x.1, .2, ...), deleted on exit, failure or not."""
    _delete_leftovers()
    tag = f"{PREFIX}{os.getpid()}-{next(_calls)}"
    hub, subnet = f"{tag}-hub", random.randrange(256)
    made: list[str] = []
    try:
        ip("netns", "add", hub)
        made.append(hub)
        ip("-n", hub, "link", "add", "br0", "type", "bridge", "mcast_snooping", "0")
        ip("-n", hub, "link", "set", "br0", "multicast", "on", "up")
        hosts = []
        for i in range(n):
            host = Host(f"h{i}", f"{tag}-h{i}", f"10.77.{subnet}.{i + 1}")
            ip("netns", "add", host.ns)
            made.append(host.ns)
            # created in the hub, the peer moved straight into the host: no name in the root ns
            ip(
                "-n",
                hub,
                "link",
                "add",
                f"v{i}",
                "type",
                "veth",
                "peer",
                "name",
                "eth0",
                "netns",
                host.ns,
            )
            ip("-n", hub, "link", "set", f"v{i}", "master", "br0", "multicast", "on", "up")
            ip("-n", host.ns, "link", "set", "lo", "up")
            ip("-n", host.ns, "addr", "add", f"{host.ip}/24", "dev", "eth0")
            ip("-n", host.ns, "link", "set", "eth0", "multicast", "on", "up")
            hosts.append(host)
        yield hosts
    finally:
        for ns in reversed(made):
            _delete(ns)
