"""Cluster definition files: the schema, its defaults and its one-line errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from mlxring.cluster.config import (
    DEFAULT_RESERVE_GB,
    ApiConfig,
    BatchingConfig,
    ConfigError,
    NodeConfig,
    load_config,
    parse_config,
    parse_layers,
)

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
A = "{name: a, host: localhost, memory_gb: auto}"


def three(
    extra0: str = "", extra1: str = "", extra2: str = "", memory: tuple[object, ...] = (64, 32, 16)
) -> str:
    """A 3-node config with extra flow-mapping fields spliced into each node."""
    return (
        "name: ring\nnodes:\n"
        f"  - {{name: a, host: h1, memory_gb: {memory[0]}{extra0}}}\n"
        f"  - {{name: b, host: h2, memory_gb: {memory[1]}{extra1}}}\n"
        f"  - {{name: c, host: h3, memory_gb: {memory[2]}{extra2}}}\n"
    )


BAD = [
    # jaccl needs RDMA devices on every node
    (
        "name: r\nbackend: jaccl\nnodes:\n"
        "  - {name: a, host: h1, memory_gb: 8, rdma: [null, en2]}\n"
        "  - {name: b, host: h2, memory_gb: 8}\n",
        "nodes[1].rdma: backend jaccl needs a list of 2 RDMA device names (one per rank, null for "
        "itself), got nothing",
    ),
    (
        "name: r\nnodes:\n  - {name: a, host: h1, memory_gb: 8, rdma: en2}\n",
        "nodes[0].rdma: expected a list of RDMA device names, one per rank (null for itself), "
        "got 'en2'",
    ),
    (
        "name: r\nnodes:\n  - {name: a, host: h, memory_gb: 8, python: ''}\n",
        "nodes[0].python: expected a non-empty string, got ''",
    ),
    # top level
    ("- just\n- a list\n", "top level: expected a mapping with name, nodes, got a list"),
    ("", "top level: expected a mapping with name, nodes, got nothing"),
    (
        f"nodes: [{A}]\n",
        "name: expected a name of letters, digits, '_', '.' or '-', starting with a letter, digit "
        "or '_', got nothing",
    ),
    (
        f"name: my ring\nnodes: [{A}]\n",
        "name: expected a name of letters, digits, '_', '.' or '-', starting with a letter, digit "
        "or '_', got 'my ring'",
    ),
    (  # '-rf' would be taken for an option on the rank's command line (`--name -rf`)
        "name: r\nnodes:\n  - {name: -rf, host: h, memory_gb: 8}\n",
        "nodes[0].name: expected a name of letters, digits, '_', '.' or '-', starting with a "
        "letter, digit or '_', got '-rf'",
    ),
    (  # a node's name is a directory of `mlxring split --out`
        "name: r\nnodes:\n  - {name: .., host: h, memory_gb: 8}\n",
        "nodes[0].name: expected a name of letters, digits, '_', '.' or '-', starting with a "
        "letter, digit or '_', got '..'",
    ),
    (
        "name: r\napi: {port: 70000}\nnodes:\n  - {name: a, host: h, memory_gb: 8}\n",
        "api.port: expected an integer 1..65535, got 70000",
    ),
    (f"nmae: r\nnodes: [{A}]\n", "nmae: unknown field (did you mean 'name'?)"),
    ("name: r\n", "nodes: expected a non-empty list of nodes, got nothing"),
    ("name: r\nnodes: []\n", "nodes: expected a non-empty list of nodes, got an empty list"),
    ("name: r\nnodes: {a: 1}\n", "nodes: expected a non-empty list of nodes, got a mapping"),
    (f"name: r\nbackend: nccl\nnodes: [{A}]\n", "backend: expected 'ring' or 'jaccl', got 'nccl'"),
    (f"name: r\nmodel: ''\nnodes: [{A}]\n", "model: expected a non-empty string, got ''"),
    (
        "name: r\nnodes:\n  - {name: a, host: h, memory_gb: 8, worker: '10.0.0.2:0'}\n",
        "nodes[0].worker: expected 'host:port' with a port 1..65535, got '10.0.0.2:0'",
    ),
    (
        "name: r\nnodes:\n  - {name: a, host: h, memory_gb: 8, worker: 10.0.0.2}\n",
        "nodes[0].worker: expected 'host:port' with a port 1..65535, got '10.0.0.2'",
    ),
    (
        "name: r\nnodes:\n  - {name: a, host: h, memory_gb: 8, model: ''}\n",
        "nodes[0].model: expected a non-empty string, got ''",
    ),
    # api and batching
    (
        f"name: r\napi: 8000\nnodes: [{A}]\n",
        "api: expected a mapping with host, port, api_keys, max_body_bytes, got 8000",
    ),
    (
        f"name: r\napi: {{port: '8000'}}\nnodes: [{A}]\n",
        "api.port: expected an integer 1..65535, got '8000'",
    ),
    (f"name: r\napi: {{port: 0}}\nnodes: [{A}]\n", "api.port: expected an integer 1..65535, got 0"),
    (
        f"name: r\napi: {{prot: 1}}\nnodes: [{A}]\n",
        "api.prot: unknown field (did you mean 'port'?)",
    ),
    (
        f"name: r\napi: {{api_keys: secret}}\nnodes: [{A}]\n",
        "api.api_keys: expected a list of strings, got 'secret'",
    ),
    (
        f"name: r\napi: {{api_keys: [ok, '']}}\nnodes: [{A}]\n",
        "api.api_keys[1]: expected a non-empty string, got ''",
    ),
    (
        f"name: r\nbatching: {{max_batch: 0}}\nnodes: [{A}]\n",
        "batching.max_batch: expected an integer >= 1, got 0",
    ),
    (
        f"name: r\nbatching: {{prefill_chunk: yes}}\nnodes: [{A}]\n",
        "batching.prefill_chunk: expected an integer >= 1, got true (a boolean)",
    ),
    (
        f"name: r\nbatching: {{max_batch: 2.5}}\nnodes: [{A}]\n",
        "batching.max_batch: expected an integer >= 1, got 2.5",
    ),
    (
        f"name: r\nbatching: {{token_budget: 0}}\nnodes: [{A}]\n",
        "batching.token_budget: expected an integer >= 1, got 0",
    ),
    (
        f"name: r\nbatching: {{mode: eager}}\nnodes: [{A}]\n",
        "batching.mode: expected 'pipelined' or 'lockstep', got 'eager'",
    ),
    (
        f"name: r\nbatching: {{step_timeout: 0}}\nnodes: [{A}]\n",
        "batching.step_timeout: expected a positive number, got 0",
    ),
    (
        f"name: r\nbatching: {{step_timeout: .inf}}\nnodes: [{A}]\n",
        "batching.step_timeout: expected a positive number, got inf",
    ),
    (
        f"name: r\nbatching: {{max_tokens: '64'}}\nnodes: [{A}]\n",
        "batching.max_tokens: expected an integer >= 1, got '64'",
    ),
    (
        f"name: r\nbatching: {{max_token: 64}}\nnodes: [{A}]\n",
        "batching.max_token: unknown field (did you mean 'max_tokens'?)",
    ),
    (
        f"name: r\nbatching: 16\nnodes: [{A}]\n",
        "batching: expected a mapping with max_batch, prefill_chunk, token_budget, mode, "
        "step_timeout, max_tokens, max_waiting, max_kv_tokens, got 16",
    ),
    # one node's fields
    (
        "name: r\nnodes: [studio]\n",
        "nodes[0]: expected a mapping with name, host, memory_gb, got 'studio'",
    ),
    (
        "name: r\nnodes: [{name: a, host: h, memroy_gb: 8}]\n",
        "nodes[0].memroy_gb: unknown field (did you mean 'memory_gb'?)",
    ),
    (
        "name: r\nnodes: [{name: a, host: h, memory_gb: 8, gpu: 1}]\n",
        "nodes[0].gpu: unknown field (expected one of name, host, port, memory_gb, reserve_gb, "
        "backend, device, dtype, layers, ssh, python, cwd, rdma, cluster_key_file, model, worker)",
    ),
    (
        "name: r\nnodes: [{name: a, memory_gb: 8}]\n",
        "nodes[0].host: expected a host name or IP address, got nothing",
    ),
    (
        "name: r\nnodes: [{name: a, host: 'my mac', memory_gb: 8}]\n",
        "nodes[0].host: expected a host name or IP address, got 'my mac'",
    ),
    (
        "name: r\nnodes: [{name: a, host: h}]\n",
        "nodes[0].memory_gb: expected a positive number or 'auto', got nothing",
    ),
    (
        three(memory=(64, 32, "16G")),
        "nodes[2].memory_gb: expected a positive number or 'auto', got '16G'",
    ),
    (three(memory=(64, 0, 16)), "nodes[1].memory_gb: expected a positive number or 'auto', got 0"),
    (
        "name: r\nnodes: [{name: a, host: h, memory_gb: yes}]\n",
        "nodes[0].memory_gb: expected a positive number or 'auto', got true (a boolean)",
    ),
    (three(extra0=", reserve_gb: -1"), "nodes[0].reserve_gb: expected a number >= 0, got -1"),
    (
        three(extra1=", reserve_gb: 32"),
        "nodes[1].reserve_gb: expected less than memory_gb (32), got 32",
    ),
    (
        "name: r\nnodes: [{name: a, host: h, memory_gb: 4}]\n",
        "nodes[0].reserve_gb: expected less than memory_gb (4), got 4 (the default)",
    ),
    (three(extra0=", port: 70000"), "nodes[0].port: expected an integer 1..65535, got 70000"),
    (
        three(extra0=", port: on"),
        "nodes[0].port: expected an integer 1..65535, got true (a boolean)",
    ),
    (three(extra1=", backend: jax"), "nodes[1].backend: expected 'mlx' or 'torch', got 'jax'"),
    (
        three(extra1=", device: tpu"),
        "nodes[1].device: expected 'gpu' or 'cpu' or 'cuda', got 'tpu'",
    ),
    (three(extra1=", device: cuda"), "nodes[1].device: 'cuda' needs backend: torch"),
    (three(extra2=", ssh: ''"), "nodes[2].ssh: expected a non-empty string, got ''"),
    # a leading '-' would reach ssh as an option
    (
        three(extra1=", ssh: '-oProxyCommand=touch /tmp/x'"),
        "nodes[1].ssh: expected an ssh target, got '-oProxyCommand=touch /tmp/x'",
    ),
    (
        three().replace("host: h2", "host: -oProxyCommand=id"),
        "nodes[1].host: expected a host name or IP address, got '-oProxyCommand=id'",
    ),
    (
        f"name: r\napi: {{api_keys: ['a,b']}}\nnodes: [{A}]\n",
        "api.api_keys[0]: expected a key of visible ASCII characters other than ','",
    ),
    # across nodes
    (
        three().replace("name: c", "name: a"),
        "nodes[2].name: duplicate node name 'a' (nodes[0])",
    ),
    (
        "name: r\nnodes:\n  - {name: a, host: localhost, port: 40000, memory_gb: auto}\n"
        "  - {name: b, host: 127.0.0.1, port: 40000, memory_gb: auto}\n",
        "nodes[1].port: 127.0.0.1:40000 is already used by nodes[0]",
    ),
    # explicit layers
    (
        three(extra0=", layers: 0-9", extra2=", layers: 10-31"),
        "nodes[1].layers: either every node sets layers or none does",
    ),
    (three(extra1=", layers: 0-9"), "nodes[1].layers: either every node sets layers or none does"),
    (
        three(", layers: 2-9", ", layers: 10-19", ", layers: 20-31"),
        "nodes[0].layers: the head must start at layer 0, got 2-9",
    ),
    (
        three(", layers: 0-17", ", layers: 18-27", ", layers: 30-31"),
        "nodes[2].layers: starts at 30 but nodes[1] ends at 27 (gap: layers 28-29 unassigned)",
    ),
    (
        three(", layers: 0-17", ", layers: 19-27", ", layers: 28-31"),
        "nodes[1].layers: starts at 19 but nodes[0] ends at 17 (gap: layer 18 unassigned)",
    ),
    (
        three(", layers: 0-17", ", layers: 15-27", ", layers: 28-31"),
        "nodes[1].layers: starts at 15 but nodes[0] ends at 17 "
        "(overlap: layers 15-17 assigned twice)",
    ),
    (
        three(", layers: 0-17", ", layers: 18-27", ", layers: 27"),
        "nodes[2].layers: starts at 27 but nodes[1] ends at 27 (overlap: layer 27 assigned twice)",
    ),
    (
        three(", layers: 0..9", ", layers: 10-19", ", layers: 20-31"),
        "nodes[0].layers: expected an inclusive layer range 'A-B' or a layer index, got '0..9'",
    ),
    (
        three(", layers: 0-9", ", layers: 19-10", ", layers: 20-31"),
        "nodes[1].layers: range '19-10' ends before it starts",
    ),
]


@pytest.mark.parametrize(("text", "message"), BAD, ids=[m.split(":")[0] for _, m in BAD])
def test_malformed_config_reports_one_line(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "cluster.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == f"{path}: {message}"
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_example_configs_load(path: Path) -> None:
    config = load_config(path)
    assert config.nodes and config.head is config.nodes[0]


def test_example_configs_exist() -> None:
    names = {p.name for p in CONFIGS.glob("*.yaml")}
    assert {"local-2.yaml", "local-4.yaml", "thunderbolt-4mac.yaml"} <= names
    assert {"mixed-mac-linux.yaml", "explicit-layers.yaml"} <= names


def test_defaults_are_applied() -> None:
    config = parse_config({"name": "r", "nodes": [{"name": "a", "host": "h", "memory_gb": 8}]})
    assert config.model is None and config.cluster_key_file is None
    assert config.backend == "ring"
    assert config.api == ApiConfig("127.0.0.1", 8000, ())
    assert config.batching == BatchingConfig(16, 512)
    assert config.head == NodeConfig(name="a", host="h", memory_gb=8.0)
    assert config.head.reserve_gb == DEFAULT_RESERVE_GB
    assert (config.head.backend, config.head.device, config.head.port) == ("mlx", "gpu", None)


def test_torch_node_defaults_to_cpu_and_null_means_unset() -> None:
    node = {"name": "a", "host": "h", "memory_gb": "auto", "backend": "torch", "ssh": None}
    config = parse_config({"name": "r", "api": None, "nodes": [node]})
    assert config.head.device == "cpu" and config.head.ssh is None
    assert config.api == ApiConfig()


def test_thunderbolt_example_fields() -> None:
    config = load_config(CONFIGS / "thunderbolt-4mac.yaml")
    assert [n.memory_gb for n in config.nodes] == [192, 128, 64, 64]
    assert config.api.host == "0.0.0.0" and config.api.api_keys == ("change-me",)
    assert config.cluster_key_file == "~/.mlxring/cluster.key"
    assert not config.is_all_local and all(n.ssh for n in config.nodes)


def test_mixed_and_explicit_examples() -> None:
    mixed = load_config(CONFIGS / "mixed-mac-linux.yaml")
    assert [(n.backend, n.device) for n in mixed.nodes] == [("mlx", "gpu"), ("torch", "cuda")]
    explicit = load_config(CONFIGS / "explicit-layers.yaml")
    assert [n.layers for n in explicit.nodes] == [(0, 18), (18, 27), (27, 32)]
    assert load_config(CONFIGS / "local-4.yaml").is_all_local


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("0-39", (0, 40)),
        ("model.layers.0-39", (0, 40)),
        (" 10 - 19 ", (10, 20)),
        ("model.layers.7", (7, 8)),
        (5, (5, 6)),
        ("5", (5, 6)),
        (0, (0, 1)),
    ],
)
def test_parse_layers(value: object, expected: tuple[int, int]) -> None:
    assert parse_layers(value, "nodes[0].layers") == expected


@pytest.mark.parametrize("value", [True, -1, 1.5, "", "a-b", "1-2-3", "layers.0-3", None])
def test_parse_layers_rejects(value: object) -> None:
    with pytest.raises(ConfigError, match=r"^x\.layers: expected an inclusive layer range"):
        parse_layers(value, "x.layers")


@pytest.mark.parametrize(
    ("host", "local"),
    [
        ("localhost", True),
        ("LocalHost", True),
        ("127.0.0.1", True),
        ("127.1.2.3", True),
        ("::1", True),
        ("192.168.2.1", False),
        ("studio.local", False),
        ("0.0.0.0", False),
    ],
)
def test_is_local(host: str, local: bool) -> None:
    assert NodeConfig(name="n", host=host, memory_gb="auto").is_local is local


def test_yaml_syntax_error_reports_line(tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("name: r\nnodes:\n  - name: a\n    host: [h\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert message.startswith(f"{path}: line ") and "invalid YAML" in message
    assert "\n" not in message


def test_yaml_syntax_error_line_number_is_one_based(tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("name: r\nnodes: x: y\n")
    with pytest.raises(ConfigError, match=r": line 2, column \d+: invalid YAML \("):
        load_config(path)


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == f"{path}: no such cluster config file"


def test_parse_config_has_no_path_prefix() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config({"name": "r", "nodes": [{"name": "a", "host": "h", "memory_gb": "16G"}]})
    assert str(info.value) == "nodes[0].memory_gb: expected a positive number or 'auto', got '16G'"


def test_configs_are_frozen() -> None:
    config = parse_config({"name": "r", "nodes": [{"name": "a", "host": "h", "memory_gb": 8}]})
    with pytest.raises(AttributeError):
        config.name = "other"  # type: ignore[misc]


def test_launch_fields(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(
        "name: r\nbackend: jaccl\nnodes:\n"
        "  - {name: a, host: h1, memory_gb: 8, rdma: [null, en2], python: /opt/py, cwd: /srv}\n"
        "  - {name: b, host: h2, memory_gb: 8, rdma: [en3, null]}\n"
    )
    cluster = load_config(path)
    assert cluster.nodes[0].rdma == (None, "en2") and cluster.nodes[1].rdma == ("en3", None)
    assert cluster.nodes[0].python == "/opt/py" and cluster.nodes[0].cwd == "/srv"
    assert cluster.nodes[1].python is None


def test_node_model_and_worker() -> None:
    node = {"name": "a", "host": "h", "memory_gb": 8, "model": "/m/a", "worker": "[::1]:7070"}
    config = parse_config({"name": "r", "nodes": [node, {**node, "name": "b", "model": None}]})
    assert (config.nodes[0].model, config.nodes[0].worker) == ("/m/a", "[::1]:7070")
    assert config.nodes[1].model is None
