"""Run the ranks of a ring and watch them: prefixed output, readiness, failure, teardown.

Every rank runs in its own process group. When any rank dies or fails to
start, the supervisor names the node and why and stops every other rank
(SIGTERM, then SIGKILL); nothing it started is left running. Then it either
returns non-zero, or (with `restart`) starts a fresh set of rank processes
after a backoff: mlx.distributed sets its group up once per process, so a ring
is recovered by new processes. `RingState` tells whoever serves the API
(`mlxring.server.front`) whether the ring is up, where its head's API is, and
what has failed so far.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable

from tqdm import tqdm

from mlxring.cluster import protocol
from mlxring.cluster.fit import human_bytes
from mlxring.cluster.protocol import EXIT_AUTH, EXIT_PEER_LOST, EXIT_USER_ERROR
from mlxring.cluster.ranks import RankSpec, ssh_argv
from mlxring.errors import UserError

STARTUP_TIMEOUT = 300.0  # loading a large model's shard takes a while
STOP_GRACE = 3.0  # seconds between SIGTERM and SIGKILL
FAIL_GRACE = 3.0  # after a rank fails: time for the head to end its requests with the error
POLL = 0.05
BACKOFF = (1.0, 2.0, 5.0, 10.0, 30.0)  # seconds before restart n; a ring up for STABLE resets it
STABLE = 60.0
REPEATED = 3  # failures of one node that /health and the launcher point out


class RingState:
    """What the API front needs to know of the ring, shared between threads."""

    def __init__(self):
        self.lock = threading.Lock()
        self.url: str | None = None  # the head's API while the ring is up
        self.down_reason = "the ring is starting"
        self.restarts = 0
        self.failures: collections.Counter[str] = collections.Counter()  # node -> failures
        self.announce: Callable[[str], None] | None = None  # called when first up, with the url
        self.ever_up = False

    def up(self, url: str) -> None:
        with self.lock:
            self.url = url
            first, self.ever_up = not self.ever_up, True
        if first and self.announce is not None:
            self.announce(url)

    def down(self, reason: str, node: str | None = None) -> None:
        with self.lock:
            self.url, self.down_reason = None, reason
            if node is not None:
                self.failures[node] += 1

    def restarting(self) -> None:
        with self.lock:
            self.restarts += 1

    def snapshot(self) -> dict:
        with self.lock:
            repeated = sorted(n for n, k in self.failures.items() if k >= REPEATED)
            return {
                "up": self.url is not None,
                "url": self.url,
                "reason": None if self.url else self.down_reason,
                "restarts": self.restarts,
                "failures": dict(self.failures),
                "repeated": repeated,
            }


class Rank:
    """One started rank: its process, readiness and the last error it reported."""

    def __init__(self, spec: RankSpec, proc: subprocess.Popen):
        self.spec, self.proc = spec, proc
        self.ready = False
        self.remote_pid: int | None = None
        self.error: str | None = None
        self.layers = ""  # the range it said it loads, as users write it ("0-2")
        self.last_line = ""
        self.threads: list[threading.Thread] = []

    @property
    def name(self) -> str:
        return self.spec.node.name

    def describe(self) -> str:
        return f"node {self.name!r} (rank {self.spec.rank}, {self.spec.node.host})"

    def failure(self) -> str:
        rc = self.proc.returncode
        if rc < 0:
            return f"{self.describe()} was killed by {signal.Signals(-rc).name}"
        why = self.error or self.last_line or "no message"
        return f"{self.describe()} exited with code {rc}: {why}"


class Supervisor:
    """Start `specs`, relay their output, and stop them all when one fails or the head ends."""

    def __init__(
        self,
        specs: list[RankSpec],
        head_output_raw: bool = False,
        startup_timeout: float = STARTUP_TIMEOUT,
        progress: bool = False,
        head_output=None,
        respec: Callable[[], list[RankSpec]] | None = None,
        state: RingState | None = None,
    ):
        self.specs = specs
        # with `respec`, a failed ring is restarted from fresh specs (new ports); else it ends
        self.respec = respec
        self.state = state or RingState()
        self.head_output = head_output  # binary stream for the head's raw output (stdout)
        self.progress = progress  # draw the head's "progress" control lines as a bar
        self.bar = None
        self.head_output_raw = head_output_raw
        self.startup_timeout = startup_timeout
        self.ranks: list[Rank] = []
        self.lock = threading.Lock()
        self.width = max(len(s.node.name) for s in specs)
        self.stopping = threading.Event()

    # output -----------------------------------------------------------------
    def log(self, message: str) -> None:
        with self.lock:
            print(f"mlxring: {message}", file=sys.stderr, flush=True)

    def info(self, message: str, prefix: str = "mlxring: ") -> None:
        """A line that --log-level warning (or error) leaves out: progress, notes."""
        if logging.getLogger("mlxring").isEnabledFor(logging.INFO):
            with self.lock:
                print(f"{prefix}{message}", file=sys.stderr, flush=True)

    def _relay_lines(self, rank: Rank, stream, out, control: bool) -> None:
        prefix = f"{rank.name:>{self.width}} | "
        for raw in iter(stream.readline, b""):
            line = raw.decode(errors="replace").rstrip("\n")
            if control and (message := protocol.parse_control(line)):
                self._on_control(rank, *message)
                continue
            if line.strip():
                rank.last_line = line.strip()
            with self.lock:
                print(prefix + line, file=out, flush=True)

    def _on_control(self, rank: Rank, word: str, rest: str) -> None:
        if word == protocol.READY:
            rank.ready = True
        elif word == protocol.PID and rank.remote_pid is None and not rank.ready:
            # the launch script's first line; a later one could come from the rank's own code
            rank.remote_pid = int(rest) if rest.isdigit() else None
        elif word == protocol.ERROR:
            rank.error = rest
        elif word == protocol.SERVING:
            url, _, model = rest.partition(" ")
            if self.state.announce is None:  # a head serving its own port (remote): its URL
                self.state.announce = lambda url: self.log(
                    f"serving {model} at {url} (OpenAI API); Ctrl-C stops every rank"
                )
            self.state.up(url)  # announced once, when first up (the front names its own URL)
        elif word == protocol.PROGRESS and self.progress:
            self._show_progress(*map(int, rest.split()))
        elif word == protocol.LOADING:
            self._loading(rank, rest)
        elif word == protocol.LOADED:
            self.info(f"node {rank.name!r}: loaded layers {rank.layers} in {rest} s")
        elif word == protocol.NOTE:
            self.info(rest, prefix="")

    def _loading(self, rank: Rank, rest: str) -> None:
        start, end, nbytes = (int(x) for x in rest.split())
        rank.layers = f"{start}-{end - 1}"
        size = f" ({human_bytes(nbytes)})" if nbytes else ""
        self.info(f"node {rank.name!r}: loading layers {rank.layers}{size}")

    def _show_progress(self, done: int, total: int) -> None:
        with self.lock:
            if self.bar is None:
                self.bar = tqdm(total=total, unit="tok", desc="generating", leave=False)
            self.bar.update(done - self.bar.n)

    def _relay_raw(self, stream) -> None:
        out = self.head_output or sys.stdout.buffer
        while chunk := stream.read1(65536):
            with self.lock:
                out.write(chunk)
                out.flush()

    # processes --------------------------------------------------------------
    def _start(self, spec: RankSpec) -> Rank:
        secret = spec.stdin_secret  # secrets a remote rank reads from its stdin, never argv
        proc = subprocess.Popen(
            spec.command(),
            stdin=subprocess.DEVNULL if secret is None else subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,  # its own process group: stopped as a whole
            env={**os.environ, **spec.secret_env},  # the key, for local nodes without a file
        )
        if secret is not None:
            with contextlib.suppress(OSError):  # a dead ssh reports itself by its exit
                proc.stdin.write(secret)
                proc.stdin.close()
        rank = Rank(spec, proc)
        if spec.rank == 0 and self.head_output_raw:
            out = threading.Thread(target=self._relay_raw, args=(proc.stdout,), daemon=True)
        else:
            out = threading.Thread(
                target=self._relay_lines, args=(rank, proc.stdout, sys.stdout, False), daemon=True
            )
        err = threading.Thread(
            target=self._relay_lines, args=(rank, proc.stderr, sys.stderr, True), daemon=True
        )
        rank.threads = [out, err]
        for t in rank.threads:
            t.start()
        return rank

    def _signal(self, rank: Rank, sig: int) -> None:
        if rank.proc.poll() is not None:
            return
        if rank.spec.remote and rank.remote_pid:
            kill = shlex.join(["kill", f"-{sig}", str(rank.remote_pid)])
            target = rank.spec.node.ssh or rank.spec.node.host
            with contextlib.suppress(OSError, subprocess.SubprocessError):
                subprocess.run(ssh_argv(target, kill), timeout=5, capture_output=True)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(rank.proc.pid, sig)

    def stop_all(self) -> None:
        """SIGTERM every live rank, SIGKILL what is left after STOP_GRACE, reap all."""
        for rank in self.ranks:
            self._signal(rank, signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE
        while time.monotonic() < deadline and any(r.proc.poll() is None for r in self.ranks):
            time.sleep(POLL)
        for rank in self.ranks:
            self._signal(rank, signal.SIGKILL)
            # the group may outlive its leader (children of the rank): kill it regardless
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(rank.proc.pid, signal.SIGKILL)
            rank.proc.wait()
        for rank in self.ranks:
            for t in rank.threads:
                t.join(timeout=2)
        if self.bar is not None:
            self.bar.close()

    # the loop ---------------------------------------------------------------
    def _blame(self, first: list[Rank]) -> tuple[str, str | None]:
        """Why the ring failed, in one line naming the node, and that node's name. `first`:
        the ranks seen failed first (a killed rank's neighbours die after it, one of them
        perhaps by a signal of its own, such as an abort as it exits)."""
        failed = [r for r in self.ranks if r.proc.returncode not in (None, 0)]

        def order(r: Rank) -> tuple[int, bool]:
            rc = r.proc.returncode
            return (0 if rc < 0 else 2 if rc == EXIT_PEER_LOST else 1), r not in first

        auth = [r for r in failed if r.proc.returncode == EXIT_AUTH]
        if auth:
            return self._blame_auth(auth), None
        culprit = min(failed, key=order)
        node = culprit.name
        if culprit.proc.returncode == EXIT_PEER_LOST:  # it names the neighbour it lost
            others = [n for n in re.findall(r"node '([^']+)'", culprit.error or "") if n != node]
            node = others[-1] if others else None  # a stall: which rank froze is unknown
        return culprit.failure(), node

    @property
    def recoverable(self) -> bool:
        """False when restarting cannot help: a wrong cluster key or a user error."""
        codes = {r.proc.returncode for r in self.ranks}
        return not codes & {EXIT_AUTH, EXIT_USER_ERROR}

    def _blame_auth(self, failed: list[Rank]) -> str:
        """The rank whose key differs: the one its neighbours name (both, on a 2-rank ring)."""
        named = collections.Counter(
            int(m.group(1)) for r in failed if (m := re.search(r"rank (\d+)", r.error or ""))
        )
        size = len(self.ranks)
        odd = [rank for rank, n in named.items() if n >= min(2, size - 1)]
        if len(odd) == 1 and size > 2:
            bad = self.ranks[odd[0]]
            return (
                f"{bad.describe()} does not hold the cluster key its neighbours hold "
                f"(authentication failed on both its links): {failed[0].error}"
            )
        who = " and ".join(r.describe() for r in failed)
        return f"{who} do not share the cluster key: {failed[0].error}"

    def _watch(self) -> int:
        started = time.monotonic()
        announced = False
        while not self.stopping.is_set():
            head = self.ranks[0]
            if first := [r for r in self.ranks if r.proc.poll() not in (None, 0)]:
                self._settle()
                reason, node = self._blame(first)
                self.state.down(reason, node)
                self.log(f"{reason}; stopping the other ranks")
                return 1
            if head.proc.poll() == 0:
                deadline = time.monotonic() + 10
                while time.monotonic() < deadline and any(
                    r.proc.poll() is None for r in self.ranks
                ):
                    time.sleep(POLL)
                return 0
            if not announced and all(r.ready for r in self.ranks):
                announced = True
                if not self.head_output_raw:
                    took = time.monotonic() - started
                    self.log(f"{len(self.ranks)} ranks ready in {took:.1f} s")
            if not announced and time.monotonic() - started > self.startup_timeout:
                late = ", ".join(r.describe() for r in self.ranks if not r.ready)
                reason = (
                    f"{late} not ready after {self.startup_timeout:.0f} s (still loading, or "
                    "cannot reach its ring neighbours)"
                )
                self.state.down(reason, next(r.name for r in self.ranks if not r.ready))
                self.log(f"{reason}; stopping every rank")
                return 1
            time.sleep(POLL)
        self.log("interrupted; stopping every rank")
        return 130

    def _settle(self) -> None:
        """Let the neighbours' "peer lost" exits arrive, and give the head a moment to end
        its requests with the error (it exits once it has), before blaming and stopping."""
        deadline = time.monotonic() + FAIL_GRACE
        time.sleep(0.5)
        head = self.ranks[0]
        while time.monotonic() < deadline and head.proc.poll() is None and self.respec:
            time.sleep(POLL)
        for r in self.ranks:
            r.proc.poll()

    def _attempt(self) -> int:
        """Start every rank of `self.specs` and supervise them until the ring ends."""
        self.ranks = []
        try:
            for spec in self.specs:
                try:
                    self.ranks.append(self._start(spec))
                except OSError as e:
                    reason = f"node {spec.node.name!r}: cannot start ({e})"
                    self.state.down(reason, spec.node.name)
                    self.log(f"{reason}; stopping the others")
                    return 1
            return self._watch()
        finally:
            self.stop_all()

    def run(self) -> int:
        """Start every rank and supervise them; the exit code of the whole ring. With
        `respec`, a failed ring is started again (with backoff) until interrupted."""
        previous = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
                previous[sig] = signal.signal(sig, lambda *_: self.stopping.set())
        try:
            consecutive = 0
            while True:
                started = time.monotonic()
                code = self._attempt()
                done = code in (0, 130) or self.respec is None or not self.recoverable
                if done or self.stopping.is_set():
                    return 130 if self.stopping.is_set() else code
                consecutive = 1 if time.monotonic() - started > STABLE else consecutive + 1
                wait = BACKOFF[min(consecutive, len(BACKOFF)) - 1]
                snapshot = self.state.snapshot()
                for node in snapshot["repeated"]:
                    count = snapshot["failures"][node]
                    self.log(f"node {node!r} has failed {count} times; check that machine")
                self.log(f"restarting the ring in {wait:.0f} s (the API answers 503 meanwhile)")
                while True:
                    if self.stopping.wait(wait):
                        return 130
                    self.state.restarting()
                    try:
                        self.specs = self.respec()
                        break
                    except UserError as e:  # a node not back yet (a worker gone): wait more
                        self.state.down(str(e))
                        consecutive += 1
                        wait = BACKOFF[min(consecutive, len(BACKOFF)) - 1]
                        self.log(f"{e}; trying again in {wait:.0f} s")
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
