"""mDNS discovery with real zeroconf between real processes: on loopback, and between
network namespaces (separate "hosts" on one link) where they can be made."""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import os
import re
import secrets
import select
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from zeroconf import ServiceInfo, Zeroconf

from mlxring.cluster.discovery import (
    PROTOCOL,
    SERVICE,
    Advertiser,
    Browser,
    key_tag,
    parse_advert,
)
from mlxring.crypto.keys import KEY_ENV, write_key
from mlxring.errors import UserError
from tests import netns

ADVERTISE = str(Path(__file__).parent / "scripts" / "advertise.py")
KEY, OTHER = secrets.token_bytes(32), secrets.token_bytes(32)
LOOPBACK = ["127.0.0.1"]
RUN = secrets.token_hex(3)  # names unique to this run: other runs may advertise on loopback


def advertise(name: str, port: int, memory: int, key: bytes, *interfaces: str, host=None):
    """A worker advertising until stopped (in `host`'s namespace if given)."""
    argv = [sys.executable, ADVERTISE, name, str(port), str(memory), key.hex(), *interfaces]
    if host is not None:
        return host.popen(argv, stdout=subprocess.PIPE, text=True)
    return subprocess.Popen(argv, stdout=subprocess.PIPE, text=True, start_new_session=True)


def first_line(proc: subprocess.Popen, timeout: float = 15.0) -> str:
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    return proc.stdout.readline().strip() if ready else f"(nothing in {timeout} s)"


def stop(proc: subprocess.Popen) -> int:
    """SIGTERM the process group (the worker says goodbye), SIGKILL if it lingers."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        return proc.wait(5)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        return proc.wait()


@pytest.fixture(scope="module")
def workers():
    """On loopback: ours-1 and ours-2 with the cluster key, theirs with another key, doomed
    (to be stopped by a test) with the key, and a malformed record from this process."""
    specs = {
        f"ours-1-{RUN}": (7101, 16 * 2**30, KEY),
        f"ours-2-{RUN}": (7102, 8 * 2**30, KEY),
        f"theirs-{RUN}": (7103, 4 * 2**30, OTHER),
        f"doomed-{RUN}": (7104, 2**30, KEY),
    }
    procs = {}
    zc = Zeroconf(interfaces=LOOPBACK)
    try:
        for name, (port, memory, key) in specs.items():
            procs[name] = advertise(name, port, memory, key, *LOOPBACK)
        bad = {"protocol": "1", "name": f"bad-{RUN}", "mem": "lots", "tag": "zz"}
        info = ServiceInfo(SERVICE, f"bad-{RUN}.{SERVICE}", port=7105, properties=bad,
                           server=f"bad-{RUN}.local.", parsed_addresses=LOOPBACK)  # fmt: skip
        zc.register_service(info)
        for name, proc in procs.items():
            assert first_line(proc) == "ready", name
        yield {name: (*spec, procs[name]) for name, spec in specs.items()}
    finally:
        for proc in procs.values():
            stop(proc)
        zc.close()


def test_a_browser_sees_each_worker_and_checks_its_key(workers):
    names = set(workers) | {f"bad-{RUN}"}
    every = lambda seen: names <= {a.name for a in seen}  # noqa: E731
    with Browser(KEY, LOOPBACK) as keyed, Browser(None, LOOPBACK) as keyless:
        seen = {a.name: a for a in keyed.wait(10, every)}
        blind = {a.name: a for a in keyless.wait(10, every)}
    assert names <= set(seen), sorted(seen)
    for name, (port, memory, key, _) in workers.items():
        a = seen[name]
        assert (a.port, a.memory_bytes, a.backend, a.device) == (port, memory, "mlx", "cpu")
        assert a.addresses == ("127.0.0.1",) and a.protocol == PROTOCOL and a.version
        assert a.key_matches is (key == KEY)
        assert a.problem == (None if key == KEY else "another cluster's key")
        assert blind[name].key_matches is None and blind[name].problem is None
    bad = seen[f"bad-{RUN}"]
    assert bad.problem.startswith("malformed record: ") and "bad mem 'lots'" in bad.problem
    assert bad.key_matches is False and blind[f"bad-{RUN}"].key_matches is None


def test_the_record_on_the_wire_holds_no_key(workers):
    name = f"ours-1-{RUN}"
    with Zeroconf(interfaces=LOOPBACK) as zc:
        info = zc.get_service_info(SERVICE, f"{name}.{SERVICE}", timeout=5000)
    assert info is not None
    keys = {k.decode() for k in info.properties}
    assert keys == {"protocol", "version", "name", "mem", "backend", "device", "salt", "tag"}
    assert info.text.isascii()
    tag_key = HKDF(hashes.SHA256(), 32, None, b"mlxring v1 discovery").derive(KEY)
    for secret in (KEY, tag_key, key_tag(KEY, b"")):  # no key, nothing derived without salt
        assert secret not in info.text and secret.hex().encode() not in info.text.lower()


def test_each_advertisement_has_a_fresh_salt_and_tag():
    worker = Advertiser("w1", 7000, 2**30, "torch", "cuda", KEY, LOOPBACK)
    first, second = (r.decoded_properties for r in (worker.record(), worker.record()))
    assert first["salt"] != second["salt"] and first["tag"] != second["tag"]
    assert {k: v for k, v in first.items() if k not in ("salt", "tag")} == {
        k: v for k, v in second.items() if k not in ("salt", "tag")
    }
    for props in (first, second):
        salt, tag = bytes.fromhex(props["salt"]), bytes.fromhex(props["tag"])
        assert len(salt) == len(tag) == 8 and key_tag(KEY, salt) == tag


def test_key_tag_is_an_hmac_under_a_derived_key():
    salt = bytes(8)
    derived = HKDF(hashes.SHA256(), 32, None, b"mlxring v1 discovery").derive(KEY)
    expected = hmac.new(derived, b"mlxring discovery v1" + salt, hashlib.sha256).digest()[:8]
    assert key_tag(KEY, salt) == expected
    assert key_tag(OTHER, salt) != expected and key_tag(KEY, b"\x01" * 8) != expected


def test_records_of_another_protocol_or_malformed_are_named_not_raised():
    def advert(**props):
        base = {"protocol": "1", "version": "9", "name": "w", "mem": "1", "backend": "mlx",
                "device": "gpu", "salt": "00" * 8, "tag": key_tag(KEY, bytes(8)).hex()}  # fmt: skip
        info = ServiceInfo(SERVICE, f"w.{SERVICE}", port=1, properties={**base, **props})
        return parse_advert(info, KEY)

    assert advert().problem is None and advert().key_matches is True
    assert advert(protocol="2").problem == f"protocol 2, this head speaks {PROTOCOL}"
    assert advert(tag="00" * 8).problem == "another cluster's key"
    assert advert(salt="abc", mem=None).problem == "malformed record: no mem, bad salt 'abc'"
    assert advert(name=None).name == "w"  # the instance name stands in


def test_a_second_worker_with_a_taken_name_is_refused(workers):
    name = next(iter(workers))
    second = Advertiser(name, 7200, 2**30, "mlx", "cpu", KEY, LOOPBACK)
    try:
        with pytest.raises(UserError, match=f"another worker on this network is named '{name}'"):
            second.start()
    finally:
        second.close()


def test_mlxring_nodes_lists_workers_with_their_key(workers, tmp_path):
    key_file = write_key(tmp_path / "cluster.key", KEY)
    argv = [sys.executable, "-m", "mlxring", "nodes", "--interface", "127.0.0.1"]
    env = {k: v for k, v in os.environ.items() if k != KEY_ENV}
    as_json = subprocess.Popen(  # both at once: each listens for 3 s
        [*argv, "--cluster-key-file", str(key_file), "--timeout", "3", "--json"],
        stdout=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    table = subprocess.run([*argv, "--timeout", "3"], capture_output=True, text=True,
                           env={**env, KEY_ENV: KEY.hex()}, timeout=30)  # fmt: skip
    listed = {n["name"]: n for n in json.loads(as_json.communicate(timeout=30)[0])["nodes"]}
    assert as_json.returncode == 0 and table.returncode == 0, table.stderr
    for name, (port, memory, key, _) in workers.items():
        node = listed[name]
        assert node["addresses"] == ["127.0.0.1"] and node["port"] == port
        assert node["memory_bytes"] == memory and node["key_matches"] is (key == KEY)
        row = next(line for line in table.stdout.splitlines() if line.startswith(name))
        assert f"127.0.0.1:{port}" in row and "mlx/cpu" in row
        ours = row.endswith(" matches")  # and no problem
        assert ours if key == KEY else re.search(r" other cluster +another cluster's key$", row)
    assert table.stdout.splitlines()[0].split() == [
        "name", "address", "memory", "backend", "version", "key", "problem"
    ]  # fmt: skip


def test_a_stopped_worker_drops_out(workers):
    name = f"doomed-{RUN}"
    with Browser(KEY, LOOPBACK) as browser:
        assert name in {a.name for a in browser.wait(10, lambda s: name in {a.name for a in s})}
        assert stop(workers[name][3]) == 0  # SIGTERM: it unregisters
        seen = browser.wait(10, lambda s: name not in {a.name for a in s})
    assert name not in {a.name for a in seen}
    assert f"ours-1-{RUN}" in {a.name for a in seen}


def test_mlxring_nodes_says_what_to_check_when_no_worker_answers():
    argv = [sys.executable, "-m", "mlxring", "nodes", "--timeout", "1"]
    if netns.skip_reason():  # this machine's loopback: fine unless another run advertises
        done = subprocess.run([*argv, "--interface", "127.0.0.1"], capture_output=True, text=True)
    else:  # a host of its own: nobody else there
        with netns.make_hosts(1) as (host,):
            done = host.run([*argv, "--interface", host.ip], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("no mlxring worker answered in 1 s")
    for hint in ("worker is running", "same network", "Local Network permission", "firewall"):
        assert hint in done.stdout
    assert "config file" in done.stdout


BROWSE_IN_NS = """
import json, sys
from mlxring.cluster.discovery import Browser
names, key, ip = set(sys.argv[1].split(",")), bytes.fromhex(sys.argv[2]), sys.argv[3]
with Browser(key, [ip]) as browser:
    seen = browser.wait(15, lambda s: names <= {a.name for a in s})
print(json.dumps([[a.name, list(a.addresses), a.port, a.key_matches] for a in seen]))
"""


def test_workers_on_other_hosts_are_seen_at_their_address():
    """Three hosts on one link: h0 advertises on its address, h1 on all its interfaces (its
    record names its non-loopback address), h2 browses on its address."""
    if reason := netns.skip_reason():
        pytest.skip(reason)
    with netns.make_hosts(3) as (h0, h1, h2):
        procs = [
            advertise("on-h0", 7300, 2**30, KEY, h0.ip, host=h0),
            advertise("on-h1", 7301, 2**30, KEY, host=h1),
        ]
        try:
            assert [first_line(p) for p in procs] == ["ready", "ready"]
            argv = [sys.executable, "-c", BROWSE_IN_NS, "on-h0,on-h1", KEY.hex(), h2.ip]
            done = h2.run(argv, capture_output=True, text=True, timeout=30)
        finally:
            for proc in procs:
                stop(proc)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == [
        ["on-h0", [h0.ip], 7300, True],
        ["on-h1", [h1.ip], 7301, True],
    ]
