"""Cluster definition files: YAML validated into frozen dataclasses.

Only `load_config` touches the file system; everything else is pure. Every
problem is a `ConfigError` whose message is one line naming the field path.
"""

from __future__ import annotations

import difflib
import ipaddress
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import yaml

DEFAULT_RESERVE_GB = 4.0
CLUSTER_BACKENDS = ("ring", "jaccl")
NODE_BACKENDS = ("mlx", "torch")
DEVICES = ("gpu", "cpu", "cuda")
DTYPES = ("auto", "float32", "float16", "bfloat16")  # torch nodes; auto: the checkpoint's

_NAME = re.compile(r"[A-Za-z0-9_.-]+")
_NAME_WHAT = "a name of letters, digits, '_', '.' or '-'"
_HOST = re.compile(r"\S+")
_HOST_WHAT = "a host name or IP address"
_NON_BLANK = re.compile(r"(?s).*\S.*")
_LAYERS = re.compile(r"(?:model\.layers\.)?(\d+)(?:\s*-\s*(\d+))?")

Parser = Callable[[object, str], object]


class ConfigError(ValueError):
    """A cluster definition is invalid; the message is one line naming the field."""


def is_local_host(host: str) -> bool:
    """True for localhost and loopback addresses (127.x.x.x, ::1)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class ApiConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    api_keys: tuple[str, ...] = ()


@dataclass(frozen=True)
class BatchingConfig:
    max_batch: int = 16
    prefill_chunk: int = 512


@dataclass(frozen=True)
class NodeConfig:
    """One rank of the ring; `layers` is an explicit half-open `(start, end)` or None."""

    name: str
    host: str
    memory_gb: float | Literal["auto"]
    port: int | None = None
    reserve_gb: float = DEFAULT_RESERVE_GB
    backend: str = "mlx"
    device: str = "gpu"
    dtype: str = "auto"
    layers: tuple[int, int] | None = None
    ssh: str | None = None
    python: str | None = None  # interpreter on the node; default: the launcher's
    cwd: str | None = None  # working directory on the node; default: the launcher's
    rdma: tuple[str | None, ...] | None = None  # jaccl: RDMA device to each rank, None to self
    cluster_key_file: str | None = None  # the key file's path on this node, if not the cluster's

    @property
    def is_local(self) -> bool:
        return is_local_host(self.host)


@dataclass(frozen=True)
class ClusterConfig:
    """A whole cluster; `nodes` are in ring order and the first one is the head."""

    name: str
    nodes: tuple[NodeConfig, ...]
    model: str | None = None
    backend: str = "ring"
    cluster_key_file: str | None = None
    api: ApiConfig = field(default_factory=ApiConfig)
    batching: BatchingConfig = field(default_factory=BatchingConfig)

    @property
    def head(self) -> NodeConfig:
        return self.nodes[0]

    @property
    def is_all_local(self) -> bool:
        return all(node.is_local for node in self.nodes)


def _show(value: object) -> str:
    """How a bad value is quoted back to the user."""
    if value is None:
        return "nothing"
    if isinstance(value, bool):
        return f"{str(value).lower()} (a boolean)"
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, list):
        return "a list" if value else "an empty list"
    if isinstance(value, float):
        return f"{value:g}"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _expected(path: str, what: str, got: object) -> ConfigError:
    return ConfigError(f"{path or 'top level'}: expected {what}, got {_show(got)}")


def _inclusive(span: tuple[int, int]) -> str:
    """Half-open (a, b) written the way users write it: 'a-(b-1)' or 'a'."""
    start, end = span
    return f"{start}" if end - start == 1 else f"{start}-{end - 1}"


def _layers_text(span: tuple[int, int]) -> str:
    return f"layer{'' if span[1] - span[0] == 1 else 's'} {_inclusive(span)}"


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _text(what: str = "a non-empty string", pattern: re.Pattern[str] = _NON_BLANK) -> Parser:
    def parse(value: object, path: str) -> str:
        if not isinstance(value, str) or not pattern.fullmatch(value):
            raise _expected(path, what, value)
        return value

    return parse


def _integer(low: int, high: int | None = None) -> Parser:
    what = f"an integer {low}..{high}" if high is not None else f"an integer >= {low}"

    def parse(value: object, path: str) -> int:
        ok = isinstance(value, int) and not isinstance(value, bool) and value >= low
        if not ok or (high is not None and value > high):
            raise _expected(path, what, value)
        return value

    return parse


def _choice(*options: str) -> Parser:
    what = " or ".join(repr(option) for option in options)

    def parse(value: object, path: str) -> str:
        if not isinstance(value, str) or value not in options:
            raise _expected(path, what, value)
        return value

    return parse


def _memory(value: object, path: str) -> float | Literal["auto"]:
    if value == "auto":
        return "auto"
    if not _is_number(value) or value <= 0:
        raise _expected(path, "a positive number or 'auto'", value)
    return float(value)


def _reserve(value: object, path: str) -> float:
    if not _is_number(value) or value < 0:
        raise _expected(path, "a number >= 0", value)
    return float(value)


def _api_keys(value: object, path: str) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise _expected(path, "a list of strings", value)
    return tuple(_text()(key, f"{path}[{i}]") for i, key in enumerate(value))


def _rdma(value: object, path: str) -> tuple[str | None, ...]:
    ok = isinstance(value, list) and all(v is None or isinstance(v, str) for v in value)
    if not ok or not value:
        raise _expected(path, "a list of RDMA device names, one per rank (null for itself)", value)
    return tuple(value)


def parse_layers(value: object, path: str) -> tuple[int, int]:
    """Parse an inclusive layer range ("0-39", "model.layers.0-39", "5", 5) to half-open."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value, value + 1
    match = _LAYERS.fullmatch(value.strip()) if isinstance(value, str) else None
    if match is None:
        raise _expected(path, "an inclusive layer range 'A-B' or a layer index", value)
    start, last = int(match[1]), int(match[2] or match[1])
    if last < start:
        raise ConfigError(f"{path}: range {value!r} ends before it starts")
    return start, last + 1


def _section(
    data: object, path: str, parsers: dict[str, Parser], required: tuple[str, ...] = ()
) -> dict[str, object]:
    """Check a mapping's keys against `parsers` and parse the fields that are set."""
    if not isinstance(data, Mapping):
        raise _expected(path, f"a mapping with {', '.join(required or parsers)}", data)
    for key in data:
        if key not in parsers:
            close = difflib.get_close_matches(str(key), list(parsers), n=1)
            hint = (
                f"did you mean {close[0]!r}?" if close else f"expected one of {', '.join(parsers)}"
            )
            raise ConfigError(f"{_join(path, str(key))}: unknown field ({hint})")
    # A key set to null counts as absent, so a required one reads "got nothing".
    return {
        key: parse(data.get(key), _join(path, key))
        for key, parse in parsers.items()
        if data.get(key) is not None or key in required
    }


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _parse_node(data: object, path: str) -> NodeConfig:
    fields = _section(data, path, _NODE_FIELDS, required=("name", "host", "memory_gb"))
    backend = fields.setdefault("backend", "mlx")
    device = fields.setdefault("device", "cpu" if backend == "torch" else "gpu")
    if device == "cuda" and backend != "torch":
        raise ConfigError(f"{path}.device: 'cuda' needs backend: torch")
    if device == "gpu" and backend == "torch":
        raise ConfigError(f"{path}.device: backend torch runs on 'cpu' or 'cuda', got 'gpu'")
    if fields.get("dtype", "auto") != "auto" and backend != "torch":
        raise ConfigError(f"{path}.dtype: needs backend: torch (mlx runs the checkpoint's dtype)")
    memory, reserve = fields["memory_gb"], fields.get("reserve_gb", DEFAULT_RESERVE_GB)
    if memory != "auto" and reserve >= memory:
        note = "" if "reserve_gb" in fields else " (the default)"
        raise ConfigError(
            f"{path}.reserve_gb: expected less than memory_gb ({memory:g}), got {reserve:g}{note}"
        )
    return NodeConfig(**fields)


def _check_unique(nodes: tuple[NodeConfig, ...]) -> None:
    names: dict[str, int] = {}
    endpoints: dict[tuple[str, int], int] = {}
    for i, node in enumerate(nodes):
        if node.name in names:
            first = names[node.name]
            raise ConfigError(
                f"nodes[{i}].name: duplicate node name {node.name!r} (nodes[{first}])"
            )
        names[node.name] = i
        if node.port is None:
            continue  # the launcher picks free ports; several local ranks may share a host
        endpoint = ("localhost" if node.is_local else node.host.lower(), node.port)
        if endpoint in endpoints:
            raise ConfigError(
                f"nodes[{i}].port: {node.host}:{node.port} is already used by "
                f"nodes[{endpoints[endpoint]}]"
            )
        endpoints[endpoint] = i


def _check_layers(nodes: tuple[NodeConfig, ...]) -> None:
    """All or none set layers; when all do, they tile [0, end) in ring order."""
    has = [node.layers is not None for node in nodes]
    if not any(has):
        return
    if not all(has):
        i = next(i for i, h in enumerate(has) if h != has[0])
        raise ConfigError(f"nodes[{i}].layers: either every node sets layers or none does")
    spans = [node.layers for node in nodes if node.layers is not None]
    if spans[0][0] != 0:
        raise ConfigError(
            f"nodes[0].layers: the head must start at layer 0, got {_inclusive(spans[0])}"
        )
    for i in range(1, len(spans)):
        (_, prev_end), (start, end) = spans[i - 1], spans[i]
        if start == prev_end:
            continue
        where = f"nodes[{i}].layers: starts at {start} but nodes[{i - 1}] ends at {prev_end - 1}"
        if start > prev_end:
            raise ConfigError(f"{where} (gap: {_layers_text((prev_end, start))} unassigned)")
        overlap = (start, min(prev_end, end))
        raise ConfigError(f"{where} (overlap: {_layers_text(overlap)} assigned twice)")


def _parse_nodes(value: object, path: str) -> tuple[NodeConfig, ...]:
    if not isinstance(value, list) or not value:
        raise _expected(path, "a non-empty list of nodes", value)
    nodes = tuple(_parse_node(item, f"{path}[{i}]") for i, item in enumerate(value))
    _check_unique(nodes)
    _check_layers(nodes)
    return nodes


_NODE_FIELDS: dict[str, Parser] = {
    "name": _text(_NAME_WHAT, _NAME),
    "host": _text(_HOST_WHAT, _HOST),
    "port": _integer(1, 65535),
    "memory_gb": _memory,
    "reserve_gb": _reserve,
    "backend": _choice(*NODE_BACKENDS),
    "device": _choice(*DEVICES),
    "dtype": _choice(*DTYPES),
    "layers": parse_layers,
    "ssh": _text(),
    "python": _text(),
    "cwd": _text(),
    "rdma": _rdma,
    "cluster_key_file": _text(),
}
_API_FIELDS: dict[str, Parser] = {
    "host": _text(_HOST_WHAT, _HOST),
    "port": _integer(1, 65535),
    "api_keys": _api_keys,
}
_BATCHING_FIELDS: dict[str, Parser] = {"max_batch": _integer(1), "prefill_chunk": _integer(1)}
_CLUSTER_FIELDS: dict[str, Parser] = {
    "name": _text(_NAME_WHAT, _NAME),
    "model": _text(),
    "backend": _choice(*CLUSTER_BACKENDS),
    "cluster_key_file": _text(),
    "api": lambda value, path: ApiConfig(**_section(value, path, _API_FIELDS)),
    "batching": lambda value, path: BatchingConfig(**_section(value, path, _BATCHING_FIELDS)),
    "nodes": _parse_nodes,
}


def parse_config(data: object) -> ClusterConfig:
    """Validate a parsed YAML object into a ClusterConfig."""
    cluster = ClusterConfig(**_section(data, "", _CLUSTER_FIELDS, required=("name", "nodes")))
    if cluster.backend == "jaccl":
        for i, node in enumerate(cluster.nodes):
            if node.rdma is None or len(node.rdma) != len(cluster.nodes):
                raise ConfigError(
                    f"nodes[{i}].rdma: backend jaccl needs a list of {len(cluster.nodes)} RDMA "
                    f"device names (one per rank, null for itself), got {_show(node.rdma)}"
                )
    return cluster


def load_config(path: str | Path) -> ClusterConfig:
    """Read and validate a cluster definition file; problems are one-line ConfigErrors."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such cluster config file") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: cannot read ({err})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(err, "problem", None) or "cannot parse"
        raise ConfigError(f"{path}: {where}invalid YAML ({problem})") from None
    try:
        return parse_config(data)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None
