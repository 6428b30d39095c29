"""Finding workers on the local network: mDNS (zeroconf) records of `_mlxring._tcp.local.`.

A worker advertises its name, control port, memory, backend and version, and a tag that
only holders of the cluster key can check: an HMAC, under a key derived from the cluster
key, of a fresh random salt. The record never repeats across restarts and tells a listener
without the key nothing; the key itself is never sent.
"""

from __future__ import annotations

import hashlib
import hmac
import importlib.metadata
import ipaddress
import queue
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import ifaddr  # zeroconf's own dependency: the machine's interfaces
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from zeroconf import (
    DNSQuestionType,
    InterfaceChoice,
    NonUniqueNameException,
    ServiceBrowser,
    ServiceInfo,
    ServiceStateChange,
    Zeroconf,
)

from mlxring.errors import UserError

SERVICE = "_mlxring._tcp.local."
PROTOCOL = 1  # bump when the record or control protocol changes
SALT_BYTES = 8
QM = DNSQuestionType.QM
RESOLVE_MS = 3000  # how long to wait for one record's SRV/TXT/A answers
TAKEN_MS = 2000  # a multicast answer may wait ~1.4 s (RFC 6762 rate limit, aggregation)


def key_tag(key: bytes, salt: bytes) -> bytes:
    """The record's 8-byte proof of the cluster key: HMAC-SHA256 of a label and `salt` under
    HKDF(key). Without the key it says nothing; the key is 32 random bytes, so no guessing."""
    tag_key = HKDF(hashes.SHA256(), length=32, salt=None, info=b"mlxring v1 discovery").derive(key)
    return hmac.new(tag_key, b"mlxring discovery v1" + salt, hashlib.sha256).digest()[:8]


def package_version() -> str:
    try:
        return importlib.metadata.version("mlxring")
    except importlib.metadata.PackageNotFoundError:
        return "0+unknown"


def local_addresses() -> list[str]:
    """This machine's non-loopback IPv4 addresses (127.0.0.1 on a machine with none)."""
    found = {
        ip.ip
        for adapter in ifaddr.get_adapters()
        for ip in adapter.ips
        if ip.is_IPv4 and not ipaddress.ip_address(ip.ip).is_loopback
    }
    return sorted(found) or ["127.0.0.1"]


def _zeroconf(interfaces: list[str] | None) -> Zeroconf:
    try:
        return Zeroconf(interfaces=interfaces or InterfaceChoice.All)
    except OSError as e:
        where = ", ".join(interfaces) if interfaces else "this machine's interfaces"
        raise UserError(f"cannot use mDNS on {where}: {e.strerror or e}") from None


@dataclass(frozen=True)
class Advert:
    """One worker's record as a browser sees it."""

    name: str
    addresses: tuple[str, ...]
    port: int
    memory_bytes: int
    backend: str  # "mlx" | "torch"
    device: str  # mlx: "gpu" | "cpu"; torch: "cpu" | "cuda"
    version: str
    protocol: int
    key_matches: bool | None  # None when the browser has no key
    problem: str | None  # why it cannot be admitted, one clause; None if fine


def parse_advert(info: ServiceInfo, key: bytes | None) -> Advert | None:
    """The Advert of a resolved record; never raises on a malformed one (None: no name)."""
    props = info.decoded_properties
    bad: list[str] = []

    def field(name: str, convert: Callable, default):
        value = props.get(name)
        try:
            if value is None:
                raise ValueError
            return convert(value)
        except ValueError:
            bad.append(f"no {name}" if value is None else f"bad {name} {value[:16]!r}")
            return default

    def hex8(text: str) -> bytes:
        if len(raw := bytes.fromhex(text)) != SALT_BYTES:
            raise ValueError
        return raw

    name = props.get("name") or info.name.removesuffix("." + SERVICE)
    if not name:
        return None
    fields = {k: field(k, str, "") for k in ("version", "backend", "device")}
    protocol, memory = field("protocol", int, 0), field("mem", int, 0)
    salt, tag = field("salt", hex8, b""), field("tag", hex8, b"")
    key_matches = None if key is None else hmac.compare_digest(key_tag(key, salt), tag)
    if bad:
        problem = "malformed record: " + ", ".join(bad)
    elif protocol != PROTOCOL:
        problem = f"protocol {protocol}, this head speaks {PROTOCOL}"
    elif key_matches is False:
        problem = "another cluster's key"
    else:
        problem = None
    addresses, port = tuple(info.parsed_addresses()), info.port or 0
    return Advert(name, addresses, port, memory, **fields, protocol=protocol,
                  key_matches=key_matches, problem=problem)  # fmt: skip


class Advertiser:
    """A worker's record on the network: registered by start() (or `with`), gone on close()."""

    def __init__(
        self,
        name: str,
        port: int,
        memory_bytes: int,
        backend: str,
        device: str,
        key: bytes,
        interfaces: list[str] | None = None,
    ):
        if not 0 < len(name.encode()) <= 63:  # one DNS label
            raise UserError(f"worker name {name!r}: 1 to 63 bytes (it names an mDNS record)")
        self.name, self.port, self.interfaces = name, port, interfaces
        self._key = key
        self._facts = {"mem": str(memory_bytes), "backend": backend, "device": device}
        self.info: ServiceInfo | None = None
        self._zc: Zeroconf | None = None

    def record(self) -> ServiceInfo:
        """This worker's record, with a fresh salt: no two advertisements are alike."""
        salt = secrets.token_bytes(SALT_BYTES)
        properties = {
            "protocol": str(PROTOCOL),
            "version": package_version(),
            "name": self.name,
            **self._facts,
            "salt": salt.hex(),
            "tag": key_tag(self._key, salt).hex(),
        }
        return ServiceInfo(
            SERVICE,
            f"{self.name}.{SERVICE}",
            port=self.port,
            properties=properties,
            # a host name of its own: not the machine's (its own responder has that), and
            # not the instance name (zeroconf then fails to resolve a record not in cache)
            server=f"mlxring-{salt.hex()}.local.",
            parsed_addresses=self.interfaces or local_addresses(),
        )

    def start(self) -> Advertiser:
        if self._zc is not None:
            return self
        self.info = self.record()
        self._zc = _zeroconf(self.interfaces)
        try:
            if self._taken():  # before announcing: a clash would replace the other's record
                raise NonUniqueNameException
            self._zc.register_service(self.info, allow_name_change=False)
        except BaseException as e:
            self.close()
            if isinstance(e, NonUniqueNameException):
                msg = f"another worker on this network is named {self.name!r}; pass --name"
                raise UserError(msg) from None
            raise
        return self

    def _taken(self) -> bool:
        """Whether another worker answers for this name. zeroconf's own probe asks for unicast
        answers, which reach only one of several mDNS responders on a machine; multicast
        questions reach them all."""
        other = ServiceInfo(SERVICE, self.info.name)
        return (
            other.request(self._zc, TAKEN_MS, question_type=QM) and other.server != self.info.server
        )

    def close(self) -> None:
        zc, self._zc = self._zc, None
        if zc is not None:
            zc.close()  # sends the goodbye of every service it registered

    def __enter__(self) -> Advertiser:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()


class Browser:
    """The workers on the network, kept current: browsing starts at construction, in
    zeroconf's thread; records resolve in a thread of ours (zeroconf forbids blocking in its
    callbacks)."""

    def __init__(self, key: bytes | None, interfaces: list[str] | None = None):
        self.key = key
        self._adverts: dict[str, Advert] = {}  # service name -> advert
        self._changed = threading.Condition()
        self._todo: queue.SimpleQueue = queue.SimpleQueue()
        self._zc = _zeroconf(interfaces)
        self._resolver = threading.Thread(target=self._resolve, daemon=True, name="mdns-resolve")
        self._resolver.start()
        self._browser = ServiceBrowser(self._zc, SERVICE, handlers=[self._on_change])

    def _on_change(self, zeroconf, service_type, name, state_change) -> None:
        self._todo.put((name, state_change))

    def _resolve(self) -> None:
        while (item := self._todo.get()) is not None:
            name, change = item
            advert = None
            if change is not ServiceStateChange.Removed:
                info = ServiceInfo(SERVICE, name)
                try:
                    if info.request(self._zc, RESOLVE_MS):
                        advert = parse_advert(info, self.key)
                except Exception:  # a record that cannot be resolved is not a worker
                    continue
            with self._changed:
                if advert is not None:
                    self._adverts[name] = advert
                elif change is ServiceStateChange.Removed:
                    self._adverts.pop(name, None)
                self._changed.notify_all()

    def seen(self) -> list[Advert]:
        with self._changed:
            return sorted(self._adverts.values(), key=lambda a: a.name)

    def wait(
        self, timeout: float, until: Callable[[list[Advert]], bool] | None = None
    ) -> list[Advert]:
        """Block until `until(seen)` holds or `timeout` seconds pass (all of them when no
        `until`); the adverts seen then."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while not (until and until(self.seen())):
                if (left := deadline - time.monotonic()) <= 0:
                    break
                self._changed.wait(left)
        return self.seen()

    def close(self) -> None:
        self._browser.cancel()
        self._todo.put(None)
        self._resolver.join()
        self._zc.close()

    def __enter__(self) -> Browser:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def browse(key: bytes | None, timeout: float, interfaces: list[str] | None = None) -> list[Advert]:
    """The workers that answer within `timeout` seconds."""
    with Browser(key, interfaces) as browser:
        return browser.wait(timeout)
