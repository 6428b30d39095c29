"""Property tests on what comes from outside: cluster files, step headers off the wire,
activation bytes. Each parser either returns a value or raises its own one error type,
with a one-line message; nothing else escapes, and a malformed size allocates nothing."""

from __future__ import annotations

import copy
import json
import math
import os
import struct
from pathlib import Path

import mlx.core as mx
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mlxring.cluster.config import ClusterConfig, ConfigError, load_config, parse_config
from mlxring.engine.header import StepHeader
from mlxring.ring import codec
from mlxring.ring.transport import ProtocolError

FUZZ = settings(
    # a few seconds per test; MLXRING_FUZZ_EXAMPLES=5000 for a deeper run by hand
    max_examples=int(os.environ.get("MLXRING_FUZZ_EXAMPLES", "250")),
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)

FIELDS = [
    *("name", "model", "backend", "cluster_key_file", "api", "batching", "on_failure", "nodes"),
    *("host", "port", "memory_gb", "reserve_gb", "device", "dtype", "layers", "ssh", "python"),
    *("cwd", "rdma", "api_keys", "max_batch", "mode", "step_timeout", "max_body_bytes"),
]
# 10**5000 cannot be repr()'d (Python's digit limit): made by a map, never listed
HUGE = st.sampled_from([2**64, 2**31, -1, 0, float("nan"), float("inf"), -0.0]) | st.sampled_from(
    [1, -1]
).map(lambda sign: sign * 10**5000)

scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | HUGE
    | st.floats()
    | st.text(max_size=12)
    | st.sampled_from(["auto", "torch", "cuda", "0-3", "-oProxyCommand=x", "", " ", "a\nb"])
    | st.binary(max_size=8)
    | st.datetimes()
    | st.dates()
)
keys = (
    st.sampled_from(FIELDS)
    | st.sampled_from(["a\nb", "x y", "", "-", "é"])
    | st.text(max_size=8)
    | st.integers()
    | st.none()
    | st.booleans()
)
# what yaml.safe_load can make: nested lists and mappings of scalars
yamlish = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(keys, inner, max_size=5),
    max_leaves=24,
)

VALID = {
    "name": "ring",
    "model": "/models/m",
    "backend": "ring",
    "cluster_key_file": "~/.mlxring/cluster.key",
    "api": {"host": "0.0.0.0", "port": 8000, "api_keys": ["k1", "k2"]},
    "batching": {"max_batch": 8, "mode": "lockstep", "step_timeout": 30.0},
    "on_failure": "exit",
    "nodes": [
        {"name": "a", "host": "localhost", "memory_gb": 64, "layers": "0-9", "port": 40000},
        {"name": "b", "host": "10.0.0.2", "memory_gb": "auto", "layers": "10-19", "ssh": "me@b"},
        {
            "name": "c",
            "host": "10.0.0.3",
            "memory_gb": 32.5,
            "reserve_gb": 2,
            "layers": "20-31",
            "backend": "torch",
            "device": "cuda",
            "dtype": "float16",
            "python": "/opt/py",
            "cwd": "/srv",
        },
    ],
}


def paths(value: object, at: tuple = ()) -> list[tuple]:
    """Every place inside `value`, the root included."""
    found = [at]
    if isinstance(value, dict):
        for k, v in value.items():
            found += paths(v, (*at, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            found += paths(v, (*at, i))
    return found


@st.composite
def mutated(draw) -> object:
    """VALID with one to three places replaced, removed, or given an extra field."""
    data = copy.deepcopy(VALID)
    for _ in range(draw(st.integers(1, 3))):
        at = draw(st.sampled_from(paths(data)))
        if not at:
            return draw(yamlish)
        parent = data
        for part in at[:-1]:
            parent = parent[part]
        op = draw(st.sampled_from(["replace", "remove", "extra"]))
        if op == "replace" or not isinstance(parent, dict):
            parent[at[-1]] = draw(yamlish)
        elif op == "remove":
            del parent[at[-1]]
        else:
            parent[draw(keys)] = draw(yamlish)
    return data


def check_config(data: object) -> None:
    try:
        result = parse_config(data)
    except ConfigError as e:
        message = str(e)
        assert message and "\n" not in message and len(message) < 400, message
        # pydantic's own wording: a check let a case through unworded
        assert "Value error" not in message and "Input should" not in message, message
    else:
        assert isinstance(result, ClusterConfig)


def test_the_valid_base_parses():
    config = parse_config(copy.deepcopy(VALID) | {"nodes": VALID["nodes"][:2]})
    assert [n.layers for n in config.nodes] == [(0, 10), (10, 20)]


@FUZZ
@given(yamlish)
def test_parse_config_arbitrary_data_is_a_config_or_one_line_error(data):
    check_config(data)


@FUZZ
@given(st.dictionaries(st.sampled_from(FIELDS), yamlish, max_size=6))
def test_parse_config_arbitrary_fields_is_a_config_or_one_line_error(data):
    check_config(data)
    check_config({"name": "r", "nodes": [data]})


@FUZZ
@given(mutated())
def test_parse_config_mutated_valid_config_is_a_config_or_one_line_error(data):
    check_config(data)


@FUZZ
@given(
    st.text(max_size=200)
    | st.builds(
        lambda text, at, junk: text[:at] + junk + text[at:],
        st.just(yaml.safe_dump(VALID)),
        st.integers(0, 500),
        st.text(max_size=6) | st.sampled_from(["!!binary ", "2024-13-45", "9" * 5000, "[" * 50]),
    )
)
def test_load_config_arbitrary_text_is_a_config_or_one_line_error(tmp_path: Path, text: str):
    path = tmp_path / "fuzz.yaml"
    path.write_text(text, encoding="utf-8")
    try:
        load_config(path)
    except ConfigError as e:
        assert "\n" not in str(e) and str(e).startswith(f"{path}: ")


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("a: " + "1" * 5000, "invalid YAML (Exceeds the limit"),
        ("a: 2024-13-45", "invalid YAML (month must be in 1..12)"),
        ("a: !!float abc", "invalid YAML (could not convert"),
        ("a: " + "[" * 3000, "invalid YAML ("),
    ],
)
def test_load_config_scalars_yaml_cannot_build(tmp_path: Path, text: str, problem: str):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value).startswith(f"{path}: {problem}") and "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("node", "message"),
    [
        (
            {"port": 10**5000},
            "nodes[0].port: expected an integer 1..65535, got an integer of 16610 bits",
        ),
        (
            {"layers": 10**5000},
            "nodes[0].layers: expected an inclusive layer range 'A-B' or a layer index, "
            "got an integer of 16610 bits",
        ),
        (
            {"layers": "0-" + "9" * 5000},
            "nodes[0].layers: expected an inclusive layer range 'A-B' or a layer index, "
            "got '0-999999999999999999999999999999999999999999999999999999...",
        ),
        (
            {"a\nb": 1},
            "nodes[0]['a\\nb']: unknown field (expected one of name, host, port, "
            "memory_gb, reserve_gb, backend, device, dtype, layers, ssh, python, cwd, rdma, "
            "cluster_key_file, model, worker)",
        ),
    ],
)
def test_what_fuzzing_found_in_configs(node: dict, message: str):
    with pytest.raises(ConfigError) as info:
        parse_config({"name": "r", "nodes": [{"name": "n", "host": "h", "memory_gb": 8} | node]})
    assert str(info.value) == message


def test_deeply_nested_data_is_one_line_error():
    deep: object = []
    for _ in range(3000):
        deep = [deep]
    with pytest.raises(ConfigError, match=r"^nodes\[0\]: expected a mapping"):
        parse_config({"name": "r", "nodes": deep})


# step headers ---------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=16,
)
HEADER_FIELDS = ["seqs", "micro_batch", "prefill", "new", "admit", "evict", "drop", "op"]
header_like = st.fixed_dictionaries(
    {},
    optional={
        name: json_values | st.sampled_from(["decode", [1, 2], [], -1, 0, 10**30, True, [True]])
        for name in HEADER_FIELDS
    },
)


def check_header(meta: object) -> None:
    try:
        header = StepHeader.from_wire(meta)
    except ProtocolError as e:
        assert "\n" not in str(e) and len(str(e)) < 200
    else:
        assert all(
            type(i) is int
            for f in ("seqs", "prefill", "new", "admit", "evict", "drop")
            for i in getattr(header, f)
        )
        assert type(header.micro_batch) is int


@FUZZ
@given(json_values | header_like | HUGE)
def test_step_header_from_arbitrary_values_raises_only_protocol_error(meta):
    check_header(meta)


@FUZZ
@given(
    *(st.lists(st.integers(0, 2**40), max_size=5) for _ in range(6)),
    st.integers(0, 64),
)
def test_step_header_round_trips_over_json(seqs, prefill, new, admit, evict, drop, micro_batch):
    header = StepHeader(
        tuple(seqs),
        micro_batch,
        tuple(prefill),
        tuple(new),
        tuple(admit),
        tuple(evict),
        tuple(drop),
    )
    assert StepHeader.from_wire(json.loads(json.dumps(header.to_wire()))) == header
    assert StepHeader.from_wire(header.to_wire()) == header


@pytest.mark.parametrize(
    "meta",
    [
        {
            "prefill": [],
            "seqs": "abc",
            "micro_batch": 0,
            "new": [],
            "admit": [],
            "evict": [],
            "drop": [],
        },
        {
            "prefill": [],
            "seqs": [1],
            "micro_batch": 1.5,
            "new": [],
            "admit": [],
            "evict": [],
            "drop": [],
        },
        {
            "prefill": [],
            "seqs": [True],
            "micro_batch": 0,
            "new": [],
            "admit": [],
            "evict": [],
            "drop": [],
        },
        {
            "prefill": [],
            "seqs": [1],
            "micro_batch": "0",
            "new": [],
            "admit": [],
            "evict": [],
            "drop": [],
        },
        {"prefill": ["decode"], "seqs": [1], "micro_batch": 0},
        ["seqs", [1]],
        {"prefill": [10**5000], "seqs": []},
    ],
)
def test_what_fuzzing_found_in_headers(meta):
    # each was accepted as a header (or escaped as another exception) before
    with pytest.raises(ProtocolError):
        StepHeader.from_wire(meta)


# the codec ------------------------------------------------------------------------------

DIMS = st.sampled_from([0, 1, 3, 2**16, 2**31 - 1, 2**31, 2**32 - 1]) | st.integers(0, 5)


@st.composite
def activation_buffers(draw) -> bytes:
    """A header that may lie (any dtype code, ndim, dims) and some data."""
    ndim = draw(st.integers(0, 4) | st.integers(0, codec.MAX_NDIM + 1))
    code = draw(st.sampled_from([*codec.DTYPES, 5, 255]))
    dims = draw(st.lists(DIMS, min_size=ndim, max_size=ndim))
    head = struct.pack("<BB", code, ndim) + struct.pack(f"<{ndim}I", *dims)
    # the bytes the header claims as a 64-bit product counts them (it wraps), or any
    claimed = math.prod(dims) % 2**64 * {0: 4, 1: 2, 2: 2, 3: 4}.get(code, 1)
    fits = st.just(bytes(claimed)) if claimed <= 4096 else st.nothing()
    return head + draw(fits | st.binary(max_size=96))


def encoded() -> st.SearchStrategy[bytes]:
    shapes = st.lists(st.integers(0, 4), max_size=3)
    dtypes = st.sampled_from(list(codec.DTYPES.values()))
    return st.builds(lambda s, d: codec.encode(mx.zeros(tuple(s)).astype(d)), shapes, dtypes)


def mutations(good: st.SearchStrategy[bytes]) -> st.SearchStrategy[bytes]:
    def flip(buf: bytes, at: int, bit: int) -> bytes:
        if not buf:
            return buf
        at %= len(buf)
        return buf[:at] + bytes([buf[at] ^ (1 << bit)]) + buf[at + 1 :]

    return (
        st.builds(flip, good, st.integers(0, 2**16), st.integers(0, 7))
        | st.builds(lambda b, n: b[:n], good, st.integers(0, 64))
        | st.builds(lambda b, extra: b + extra, good, st.binary(min_size=1, max_size=8))
    )


def check_decoded(x: object, buf: bytes) -> None:
    assert isinstance(x, mx.array)
    mx.eval(x)  # mlx is lazy: a bad view would fail only here
    assert x.nbytes <= len(buf)


@FUZZ
@given(st.binary(max_size=128) | activation_buffers() | mutations(encoded()))
def test_decode_arbitrary_bytes_raises_only_codec_error(buf):
    try:
        x = codec.decode(buf)
    except codec.CodecError:
        return
    check_decoded(x, buf)


def one_tensor(buf: bytes) -> bytes:
    """A tensor list of one tensor, named "x", whose bytes are `buf`."""
    return struct.pack("<BB", 1, 1) + b"x" + struct.pack("<I", len(buf)) + buf


def many() -> st.SearchStrategy[bytes]:
    names = st.text(max_size=4)
    arrays = st.builds(lambda n: mx.zeros((n, 2)), st.integers(0, 3))
    return st.dictionaries(names, arrays, max_size=3).map(codec.encode_many)


@FUZZ
@given(st.binary(max_size=128) | mutations(many()) | activation_buffers().map(one_tensor))
def test_decode_many_arbitrary_bytes_raises_only_codec_error(buf):
    try:
        tensors = codec.decode_many(buf)
    except codec.CodecError:
        return
    assert isinstance(tensors, dict)
    for x in tensors.values():
        check_decoded(x, buf)


@pytest.mark.parametrize(
    "shape",
    [
        (2**16, 2**16, 2**16, 2**16),  # 2**64 elements: an int64 product wraps to 0
        (2**32 - 1, 0),  # no elements, but a dimension mlx cannot hold
        (2**31, 2**31, 4),
    ],
)
def test_decode_refuses_shapes_a_wrapping_product_would_pass(shape):
    buf = struct.pack("<BB", 4, len(shape)) + struct.pack(f"<{len(shape)}I", *shape)
    with pytest.raises(codec.CodecError, match="too large"):
        codec.decode(buf)
