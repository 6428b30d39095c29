"""Cluster definition files: YAML validated into frozen pydantic dataclasses.

Only `load_config` touches the file system; everything else is pure. Every
problem is a `ConfigError` whose message is one line naming the field path.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import ipaddress
import re
import socket
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Annotated, Literal, get_args

import yaml
from pydantic import (
    AfterValidator,
    BeforeValidator,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    ValidatorFunctionWrapHandler,
    WrapValidator,
    model_validator,
)
from pydantic.dataclasses import dataclass
from pydantic_core import ArgsKwargs, ErrorDetails

from mlxring.cluster.plan import inclusive, range_problem
from mlxring.errors import UserError

ClusterBackend = Literal["ring", "jaccl"]
NodeBackend = Literal["mlx", "torch"]
Device = Literal["gpu", "cpu", "cuda"]
Dtype = Literal["auto", "float32", "float16", "bfloat16"]  # torch nodes; auto: the checkpoint's
Mode = Literal["pipelined", "lockstep"]
OnFailure = Literal["restart", "exit"]

DEFAULT_RESERVE_GB = 4.0
CLUSTER_BACKENDS: tuple[str, ...] = get_args(ClusterBackend)
NODE_BACKENDS: tuple[str, ...] = get_args(NodeBackend)
DEVICES: tuple[str, ...] = get_args(Device)
DTYPES: tuple[str, ...] = get_args(Dtype)

_LAYERS = re.compile(r"(?:model\.layers\.)?(\d{1,9})(?:\s*-\s*(\d{1,9}))?")
_MAX_LAYER = 10**9  # beyond any model; bounds what a config can make the planner count
_SCHEMA = ConfigDict(extra="forbid")
_PLAIN_KEY = re.compile(r"[A-Za-z0-9_.-]{1,60}")  # a field path's part that needs no quotes


class ConfigError(UserError, ValueError):
    """A cluster definition is invalid; the message is one line naming the field."""


class _Problem(ValueError):
    """Raised inside validation: the message, and where it is below pydantic's `loc`."""

    def __init__(self, message: str, at: tuple[str | int, ...] = ()) -> None:
        super().__init__(message)
        self.at = at


def is_local_host(host: str) -> bool:
    """True for localhost, loopback addresses (127.x.x.x, ::1) and this machine's own IP
    addresses (a node given by its LAN address runs here as a local process)."""
    if host.lower() == "localhost":
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    if address.is_unspecified or address.is_multicast:
        return False
    return address.is_loopback or _own_address(str(address))


@functools.lru_cache(maxsize=64)
def _own_address(ip: str) -> bool:
    """Whether `ip` is an address of this machine: only then can a socket bind to it."""
    family = socket.AF_INET6 if ":" in ip else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        try:
            s.bind((ip, 0))
        except OSError:
            return False
    return True


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
    if isinstance(value, int) and value.bit_length() > 64:  # repr may refuse 4300+ digits
        return f"{'a negative' if value < 0 else 'an'} integer of {value.bit_length()} bits"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _expected(what: str, got: object, at: tuple[str | int, ...] = ()) -> _Problem:
    return _Problem(f"expected {what}, got {_show(got)}", at)


def _expect(what: str) -> WrapValidator:
    """Pydantic checks the value; its verdict reads "expected `what`, got <the value>"."""

    def check(value: object, handler: ValidatorFunctionWrapHandler) -> object:
        try:
            return handler(value)
        except ValidationError as err:
            if isinstance(err.errors()[0].get("ctx", {}).get("error"), _Problem):
                raise  # worded further down: an item of a list, a field of a node
            raise _expected(what, value) from None

    return WrapValidator(check)


def _one_of(options: object) -> WrapValidator:
    return _expect(" or ".join(repr(name) for name in get_args(options)))


def _layer_range(value: object) -> tuple[int, int]:
    # A tuple comes from Python (launch.local_ring) and is already half-open.
    if isinstance(value, tuple) and len(value) == 2 and all(_is_index(v) for v in value):
        if value[0] < value[1]:
            return value
    elif _is_index(value):
        return value, value + 1
    match = _LAYERS.fullmatch(value.strip()) if isinstance(value, str) else None
    if match is None:
        raise _expected("an inclusive layer range 'A-B' or a layer index", value)
    start, last = int(match[1]), int(match[2] or match[1])
    if last < start:
        raise _Problem(f"range {value!r} ends before it starts")
    return start, last + 1


def _is_index(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < _MAX_LAYER


def parse_layers(value: object, path: str) -> tuple[int, int]:
    """Parse an inclusive layer range ("0-39", "model.layers.0-39", "5", 5) to half-open."""
    try:
        return _layer_range(value)
    except _Problem as problem:
        raise ConfigError(f"{path}: {problem}") from None


# a leading '-' would make a node's or cluster's name an option of the rank's command line,
# and a name of dots a directory outside `mlxring split --out`
_NAME_PATTERN = r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$"
_NAME_RULE = "a name of letters, digits, '_', '.' or '-', starting with a letter, digit or '_'"
_Name = Annotated[str, Field(strict=True, pattern=_NAME_PATTERN), _expect(_NAME_RULE)]
# a leading '-' would reach ssh as an option (`-oProxyCommand=...` runs a command)
_Host = Annotated[
    str, Field(strict=True, pattern=r"^[^\s-]\S*$"), _expect("a host name or IP address")
]
_Text = Annotated[str, Field(strict=True, pattern=r"\S"), _expect("a non-empty string")]


def check_name(value: str, what: str) -> str:
    """`value` if it is a valid node name, else a ConfigError naming `what` (an option)."""
    if not re.fullmatch(_NAME_PATTERN, value):
        raise ConfigError(f"{what}: expected {_NAME_RULE}, got {_show(value)}")
    return value


def _ssh_target(value: str) -> str:
    if value.startswith("-") or re.search(r"\s", value):
        raise _expected("an ssh target", value)
    return value


def _api_key(value: str) -> str:
    # keys travel comma-separated (MLXRING_API_KEYS) and as `Authorization: Bearer KEY`;
    # a key is a secret: the message does not quote it
    if not re.fullmatch(r"[!-+\--~]+", value):  # 0x21-0x7e but 0x2c (the comma)
        raise _Problem("expected a key of visible ASCII characters other than ','")
    return value


def _address(value: str) -> str:
    host, _, port = value.rpartition(":")
    if host.startswith("[") and host.endswith("]"):  # an IPv6 address: [::1]:8000
        host = host[1:-1]
    elif ":" in host:
        host = ""  # an IPv6 address needs brackets
    valid_host = re.fullmatch(r"[^\s\[\]-][^\s\[\]]*", host)
    if not valid_host or not re.fullmatch(r"[0-9]{1,5}", port) or not 1 <= int(port) <= 65535:
        raise _expected("'host:port' with a port 1..65535", value)
    return value


_SshTarget = Annotated[_Text, AfterValidator(_ssh_target)]
_Address = Annotated[_Text, AfterValidator(_address)]
_ApiKey = Annotated[_Text, AfterValidator(_api_key)]
_Port = Annotated[int, Field(strict=True, ge=1, le=65535), _expect("an integer 1..65535")]
_Count = Annotated[int, Field(strict=True, ge=1), _expect("an integer >= 1")]
_Positive = Annotated[float, Field(strict=True, gt=0, allow_inf_nan=False)]
_Reserve = Annotated[float, Field(strict=True, ge=0, allow_inf_nan=False), _expect("a number >= 0")]
_Rdma = Annotated[
    tuple[str | None, ...],
    Field(min_length=1),
    _expect("a list of RDMA device names, one per rank (null for itself)"),
]


def _given(cls: type, data: object) -> object:
    """The fields `data` sets, by name, for a dataclass's validation; instances pass through.

    A null counts as absent, except that a required field stays so its check reads "got nothing".
    """
    if isinstance(data, cls):
        return data
    fields = dataclasses.fields(cls)
    names = [f.name for f in fields]
    required = [f.name for f in fields if f.default is f.default_factory is dataclasses.MISSING]
    if isinstance(data, ArgsKwargs):  # a call from Python: positional arguments by name
        positional = [f.name for f in fields if not f.kw_only]
        if len(data.args) > len(positional):
            raise TypeError(f"{cls.__name__} takes {len(positional)} positional arguments")
        data = {**dict(zip(positional, data.args)), **(data.kwargs or {})}
    if not isinstance(data, Mapping):
        raise _expected(f"a mapping with {', '.join(required or names)}", data)
    for key in data:
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f"did you mean {close[0]!r}?" if close else f"expected one of {', '.join(names)}"
            raise _Problem(f"unknown field ({hint})", (str(key),))
    return {k: data.get(k) for k in names if data.get(k) is not None or k in required}


@dataclass(frozen=True, config=_SCHEMA)
class ApiConfig:
    """The head's OpenAI-compatible HTTP API."""

    host: _Host = "127.0.0.1"
    port: _Port = 8000
    api_keys: Annotated[tuple[_ApiKey, ...], _expect("a list of strings")] = dataclasses.field(
        default=(),
        repr=False,  # secrets: never in a printed config
    )
    max_body_bytes: _Count = 1_048_576  # larger request bodies get 413

    _fields = model_validator(mode="before")(classmethod(_given))


@dataclass(frozen=True, config=_SCHEMA)
class EngineConfig:
    """How the head's engine batches and paces the ring: the `batching:` section."""

    max_batch: _Count = 16
    prefill_chunk: _Count = 512  # prompt tokens per prefill step
    token_budget: _Count = 512  # tokens per step: the group's decode tokens + prefill chunks
    mode: Annotated[Mode, _one_of(Mode)] = "pipelined"
    # seconds with no step back before the ring is declared down
    step_timeout: Annotated[_Positive, _expect("a positive number")] = 60.0
    max_tokens: _Count = 256  # completion length when a request gives none
    max_waiting: _Count = 256  # requests queued beyond the live batch; more get 429
    # KV budget: prompt + max_tokens summed over live sequences; admission waits beyond it
    max_kv_tokens: _Count = 262_144

    _fields = model_validator(mode="before")(classmethod(_given))


BatchingConfig = EngineConfig


def api_options(base: ApiConfig | None = None, **options: object) -> ApiConfig:
    """`base` (by default the defaults) with command-line `options` (host=, port=); a bad
    value is a ConfigError naming the option (`--host: expected a host name ...`)."""
    try:
        return dataclasses.replace(base or ApiConfig(), **options)
    except ValidationError as err:
        error = err.errors()[0]
        problem = error.get("ctx", {}).get("error") or error["msg"]
        flag = "--" + str(error["loc"][0]).replace("_", "-") if error["loc"] else "the API"
        raise ConfigError(f"{flag}: {problem}") from None


@dataclass(frozen=True, config=_SCHEMA, kw_only=True)
class NodeConfig:
    """One rank of the ring; `layers` is an explicit half-open `(start, end)` or None.

    `device` defaults to 'cpu' on a torch node and to 'gpu' on an mlx one.
    """

    name: _Name
    host: _Host
    port: _Port | None = None
    memory_gb: Annotated[_Positive | Literal["auto"], _expect("a positive number or 'auto'")]
    reserve_gb: _Reserve = DEFAULT_RESERVE_GB
    backend: Annotated[NodeBackend, _one_of(NodeBackend)] = "mlx"
    device: Annotated[Device, _one_of(Device)] = "gpu"
    dtype: Annotated[Dtype, _one_of(Dtype)] = "auto"
    layers: Annotated[tuple[int, int], BeforeValidator(_layer_range)] | None = None
    ssh: _SshTarget | None = None  # user@host; never starting with '-' (an ssh option)
    python: _Text | None = None  # interpreter on the node; default: the launcher's
    cwd: _Text | None = None  # working directory on the node; default: the launcher's
    rdma: _Rdma | None = None  # jaccl: the RDMA device to each rank, None to itself
    cluster_key_file: _Text | None = None  # the key file's path on this node, if not the cluster's
    model: _Text | None = None  # the model directory on this node, if not the cluster's
    worker: _Address | None = None  # ip:port of an mlxring worker's control port

    @property
    def is_local(self) -> bool:
        return is_local_host(self.host)

    @property
    def remote(self) -> bool:
        """Started over ssh: the node names an ssh target or is not this machine."""
        return self.ssh is not None or not self.is_local

    @model_validator(mode="wrap")
    @classmethod
    def _fields(cls, data: object, handler: Callable[[object], NodeConfig]) -> NodeConfig:
        given = _given(cls, data)
        if isinstance(given, cls):
            return given
        torch = given.get("backend") == "torch"
        node = handler({"device": "cpu" if torch else "gpu", **given})
        if node.device == "cuda" and node.backend != "torch":
            raise _Problem("'cuda' needs backend: torch", ("device",))
        if node.device == "gpu" and node.backend == "torch":
            raise _Problem("backend torch runs on 'cpu' or 'cuda', got 'gpu'", ("device",))
        if node.dtype != "auto" and node.backend != "torch":
            raise _Problem("needs backend: torch (mlx runs the checkpoint's dtype)", ("dtype",))
        if node.memory_gb != "auto" and node.reserve_gb >= node.memory_gb:
            note = "" if "reserve_gb" in given else " (the default)"
            raise _Problem(
                f"expected less than memory_gb ({node.memory_gb:g}), got {node.reserve_gb:g}{note}",
                ("reserve_gb",),
            )
        return node


@dataclass(frozen=True, config=_SCHEMA, kw_only=True)
class ClusterConfig:
    """A whole cluster; `nodes` are in ring order and the first one is the head."""

    name: _Name
    model: _Text | None = None
    backend: Annotated[ClusterBackend, _one_of(ClusterBackend)] = "ring"
    cluster_key_file: _Text | None = None
    api: ApiConfig = dataclasses.field(default_factory=ApiConfig)
    batching: EngineConfig = dataclasses.field(default_factory=EngineConfig)
    # a dead, stalled or failed ring: restart it (with backoff), or stop and exit
    on_failure: Annotated[OnFailure, _one_of(OnFailure)] = "restart"
    nodes: Annotated[
        tuple[NodeConfig, ...], Field(min_length=1), _expect("a non-empty list of nodes")
    ]

    _fields = model_validator(mode="before")(classmethod(_given))

    @property
    def head(self) -> NodeConfig:
        return self.nodes[0]

    @property
    def is_all_local(self) -> bool:
        return all(node.is_local for node in self.nodes)

    def __post_init__(self) -> None:
        names: dict[str, int] = {}
        endpoints: dict[tuple[str, int | None], int] = {}
        for i, node in enumerate(self.nodes):
            if node.name in names:
                first = names[node.name]
                raise _Problem(
                    f"duplicate node name {node.name!r} (nodes[{first}])", ("nodes", i, "name")
                )
            names[node.name] = i
            endpoint = ("localhost" if node.is_local else node.host.lower(), node.port)
            # without a port the launcher picks a free one: local ranks may share a host
            if node.port is not None and endpoint in endpoints:
                raise _Problem(
                    f"{node.host}:{node.port} is already used by nodes[{endpoints[endpoint]}]",
                    ("nodes", i, "port"),
                )
            endpoints[endpoint] = i
        if problem := _layers_problem([node.layers for node in self.nodes]):
            raise problem
        for i, node in enumerate(self.nodes):
            if self.backend == "jaccl" and (node.rdma is None or len(node.rdma) != len(self.nodes)):
                raise _Problem(
                    f"backend jaccl needs a list of {len(self.nodes)} RDMA device names "
                    f"(one per rank, null for itself), got {_show(node.rdma)}",
                    ("nodes", i, "rdma"),
                )


def _layers_problem(spans: list[tuple[int, int] | None]) -> _Problem | None:
    # Either every node sets layers or none does; set ones tile [0, end) in ring order.
    problem = range_problem(spans)
    if problem is None:
        return None
    i, (start, end) = problem.index, problem.layers
    at = ("nodes", i, "layers")
    if problem.kind == "mixed":
        return _Problem("either every node sets layers or none does", at)
    if problem.kind == "head":
        return _Problem(f"the head must start at layer 0, got {inclusive(start, end)}", at)
    # a gap, or an overlap whether in ring order or not; ranges from the file are never empty
    layers = f"layer{'' if end - start == 1 else 's'} {inclusive(start, end)}"
    gap = problem.kind == "gap"
    what = f"gap: {layers} unassigned" if gap else f"overlap: {layers} assigned twice"
    where = f"starts at {spans[i][0]} but nodes[{i - 1}] ends at {spans[i - 1][1] - 1}"
    return _Problem(f"{where} ({what})", at)


_CLUSTER = TypeAdapter(ClusterConfig)


def _config_error(error: ErrorDetails) -> ConfigError:
    """One pydantic error as a ConfigError naming the field path, e.g. `nodes[1].layers`."""
    problem = error.get("ctx", {}).get("error")
    loc, message = error["loc"], error["msg"]  # pydantic's own only if a check missed a case
    if isinstance(problem, _Problem):
        loc, message = (*loc, *problem.at), str(problem)
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif not _PLAIN_KEY.fullmatch(str(part)):  # a key from the file: quoted, on one line
            path += f"[{_show(str(part))}]"
        else:
            path += f".{part}" if path else str(part)
    return ConfigError(f"{path or 'top level'}: {message}")


def parse_config(data: object) -> ClusterConfig:
    """Validate a parsed YAML object into a ClusterConfig."""
    try:
        return _CLUSTER.validate_python(data)
    except ValidationError as err:
        raise _config_error(err.errors()[0]) from None


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
    except RecursionError:
        raise ConfigError(f"{path}: invalid YAML (nested too deeply)") from None
    except (ValueError, OverflowError) as err:  # a scalar PyYAML cannot build: 2024-13-45
        problem = str(err).splitlines()[0][:100] if str(err) else type(err).__name__
        raise ConfigError(f"{path}: invalid YAML ({problem})") from None
    try:
        return parse_config(data)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None
