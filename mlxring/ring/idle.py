"""Waiting for the left neighbour without spinning a core.

mlx's ring backend gives each socket a thread that, while a receive is posted and
no byte has come, calls the non-blocking `recv` in a loop: a rank waiting on its
left neighbour burns a core (measured: 1.96 s of CPU during a 5.4 s wait). When
the ranks share a machine's cores, as two stages on one Mac's efficiency cores or
a test ring do, that core is taken from the stage that has work.

So a rank first waits for the first byte itself, asleep in `poll` on the same
sockets, and only then posts mlx's receive, which then finds its bytes at once.
The sockets are the connections mlx accepted on this rank's own hostfile
addresses (its left links; with two ranks, left and right are the same peer
and the accepted ones are still the left). They are found by their local
address among the process's open file descriptors and only ever polled: never
read, written or reconfigured. Where they cannot be found (another backend, no
hostfile), `LeftLinks.wait` returns at once and mlx waits as before.
"""

from __future__ import annotations

import json
import os
import select
import socket
import stat
from pathlib import Path

POLL_MS = 500  # wake this often so that a signal (Ctrl-C) is seen while waiting


def _address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return socket.gethostbyname(host.strip("[]")), int(port)


def accepted_sockets(hostfile: str | os.PathLike, rank: int) -> list[int]:
    """The descriptors of this process's connected TCP sockets whose local address is
    one of `rank`'s addresses in the ring hostfile."""
    try:
        hosts = json.loads(Path(hostfile).read_text())
        mine = {_address(a) for a in hosts[rank]}
    except (OSError, ValueError, IndexError, TypeError):
        return []
    found = []
    for name in os.listdir("/proc/self/fd") if os.path.isdir("/proc/self/fd") else _fd_range():
        fd = int(name)
        try:
            if not stat.S_ISSOCK(os.fstat(fd).st_mode):
                continue
            with socket.socket(fileno=os.dup(fd)) as s:  # a duplicate: the original is untouched
                if s.type != socket.SOCK_STREAM or s.family != socket.AF_INET:
                    continue
                local, _ = s.getsockname(), s.getpeername()  # connected ones only
        except OSError:
            continue
        if local in mine:
            found.append(fd)
    return found


def _fd_range() -> list[str]:
    """Descriptors to try where /proc is missing (macOS): the low ones, as strings."""
    return [str(fd) for fd in range(3, 1024)]


class LeftLinks:
    """The left neighbour's sockets, polled for the first byte of a message."""

    def __init__(self, fds: list[int]):
        self.poller = None
        if fds:
            self.poller = select.poll()
            for fd in fds:
                self.poller.register(fd, select.POLLIN | select.POLLPRI)

    @classmethod
    def find(cls, rank: int) -> LeftLinks:
        hostfile = os.environ.get("MLX_HOSTFILE")
        return cls(accepted_sockets(hostfile, rank) if hostfile else [])

    @property
    def found(self) -> bool:
        return self.poller is not None

    def wait(self) -> None:
        """Return once a byte (or the end of the connection) waits on a left socket."""
        if self.poller is None:
            return
        while not self.poller.poll(POLL_MS):
            pass
