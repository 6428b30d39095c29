"""The command line explains itself: --version, help text on every option with its
default, and one-line errors for bad values before anything starts. Also what the
launcher and the API print and count that needs no ring: the request log and response
counter (on a small real ASGI app), and the layer ranges of the status JSON."""

from __future__ import annotations

import argparse
import importlib.metadata
import logging

import pytest
from prometheus_client import CollectorRegistry, Counter
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from mlxring import cli
from mlxring.cluster.config import parse_config
from mlxring.cluster.plan import ModelFootprint, NodeBudget, make_plan
from mlxring.cluster.supervise import RingState
from mlxring.crypto.keys import KEY_ENV
from mlxring.server.access import AccessLog
from mlxring.server.status import Recent, RingWatch, head_status, node_facts


def subcommands() -> dict[str, argparse.ArgumentParser]:
    parser, _ = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


# --version and help ---------------------------------------------------------------------


def test_version_is_the_package_version(capsys):
    with pytest.raises(SystemExit) as done:
        cli.main(["--version"])
    assert done.value.code == 0
    assert capsys.readouterr().out == f"mlxring {importlib.metadata.version('mlxring')}\n"


def test_top_level_help_describes_mlxring_and_lists_every_command():
    parser, _ = cli.build_parser()
    text = " ".join(parser.format_help().split())  # as one line: argparse wraps
    assert text.startswith("usage: mlxring [-h] [--version] COMMAND ...")
    assert "Run one large language model across a ring of machines" in text
    assert "one dispatcher" not in text  # not the module's docstring
    for name, summary in cli.COMMANDS.items():
        assert f"{name} {summary}" in text
    assert "mlxring COMMAND --help" in text


def test_every_option_of_every_command_has_help_and_shows_its_default():
    missing, no_default = [], []
    for name, parser in subcommands().items():
        formatter = parser._get_formatter()
        for action in parser._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            where = f"{name} {'/'.join(action.option_strings) or action.dest}"
            if not action.help:
                missing.append(where)
            default = action.default
            if default is None or isinstance(default, bool) or not action.option_strings:
                continue
            # the help says it (e.g. "default: the checkpoint's"), or the formatter adds it
            if "default" not in formatter._get_help_string(action):
                no_default.append(f"{where} ({default!r})")
    assert not missing, f"options without help: {missing}"
    assert not no_default, f"defaults not shown: {no_default}"


# one-line errors, before anything starts --------------------------------------------------


@pytest.mark.parametrize(
    "args, message",
    [
        (["generate", "--temp", "-1"], "--temp -1: the temperature must be >= 0"),
        (["generate", "--temp", "nan"], "--temp nan: the temperature must be >= 0"),
        (["generate", "--top-p", "7"], "--top-p 7: must be in (0, 1]"),
        (["generate", "--top-p", "0"], "--top-p 0: must be in (0, 1]"),
        (["generate", "--seed", "-5"], "--seed -5: must be in [0, 2**64)"),
        (["generate", "--seed", str(2**64)], f"--seed {2**64}: must be in [0, 2**64)"),
        (["generate", "--ranks", "0"], "--ranks 0: a ring needs at least 1 rank"),
        (
            ["generate", "--max-tokens", "100000"],
            "--max-tokens 100000: the model's context length is 4096 tokens, the prompt "
            "included; ask for fewer than 4096",
        ),
    ],
)
def test_generate_refuses_bad_values_in_one_line(tiny_llama, capsys, args, message):
    argv = [args[0], "--model", str(tiny_llama), "--prompt", "x", *args[1:]]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"mlxring generate: error: {message}") and len(err.splitlines()) == 1


@pytest.fixture
def config(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("name: t\nnodes:\n  - {name: a, host: localhost, memory_gb: 8}\n")
    return path


@pytest.mark.parametrize(
    "args, message",
    [
        (["bench", "--model", "{model}", "--ranks", "0"], "--ranks 0: a ring needs at least 1"),
        (["launch", "{config}", "--port", "70000"], "--port 70000: a port is a number from 1"),
        (["launch", "{config}", "--port", "0"], "--port 0: a port is a number from 1 to 65535"),
        (
            ["launch", "{config}", "--model", "{model}", "--host=-x", "--dry-run"],
            "--host: expected a host name or IP address, got '-x'",
        ),
        (["serve", "{model}", "--port", "70000"], "--port 70000: a port is a number from 1"),
        (["serve", "{model}", "--name=-rf"], "--name: expected a name of letters, digits"),
        (["worker", "--name=-rf"], "--name: expected a name of letters, digits"),
        (["keygen", "--out", "{tmp}/new/"], "names a directory; pass a file path (e.g. "),
    ],
)
def test_commands_refuse_bad_values_in_one_line(
    tiny_llama, config, tmp_path, capsys, monkeypatch, args, message
):
    monkeypatch.setenv(KEY_ENV, "00" * 32)  # serve and worker read the key first
    argv = [a.format(model=tiny_llama, config=config, tmp=tmp_path) for a in args]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"mlxring {argv[0]}: error: ") and message in err, err
    assert len(err.splitlines()) == 1
    assert not (tmp_path / "new").exists()


# the request log and the response counter --------------------------------------------------


def small_app(responses: Counter) -> Starlette:
    """A real ASGI app behind AccessLog: plain, failing, a completion and a stream."""

    async def ok(_):
        return JSONResponse({"ok": True})

    async def boom(_):
        raise RuntimeError("unexpected")

    async def completion(_):
        return JSONResponse({"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 3}})

    async def stream(_):
        async def events():
            yield 'data: {"choices": [{"text": "a"}]}\n\n'
            yield 'data: {"choices": [], "usage": {"prompt_tokens": 4, "completion_tokens": 2}}\n\n'
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    usage_paths = ("/v1/completions", "/v1/chat/completions")
    return Starlette(
        routes=[
            Route("/ok", ok),
            Route("/boom", boom),
            Route("/v1/completions", completion, methods=["POST"]),
            Route("/v1/chat/completions", stream, methods=["POST"]),
        ],
        middleware=[Middleware(AccessLog, responses=responses, usage_paths=usage_paths)],
    )


class Lines(logging.Handler):
    def __init__(self):
        super().__init__()
        self.lines: list[tuple[int, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append((record.levelno, record.getMessage()))


def test_each_request_is_one_log_line_and_counted_by_status():
    registry = CollectorRegistry()
    responses = Counter("mlxring_http_responses", "by code", ["code"], registry=registry)
    logger, lines = logging.getLogger("mlxring.access"), Lines()
    level = logger.level
    logger.addHandler(lines)
    logger.setLevel(logging.INFO)
    try:
        with TestClient(small_app(responses), raise_server_exceptions=False) as client:
            assert client.get("/ok").status_code == 200
            assert client.get("/nowhere").status_code == 404
            assert client.get("/nowhere").status_code == 404
            assert client.get("/boom").status_code == 500
            assert client.post("/v1/completions").status_code == 200
            assert client.post("/v1/chat/completions").text.endswith("[DONE]\n\n")
    finally:
        logger.removeHandler(lines)
        logger.setLevel(level)

    def count(code: str) -> float | None:
        return registry.get_sample_value("mlxring_http_responses_total", {"code": code})

    assert (count("200"), count("404"), count("500")) == (3, 2, 1)
    shapes = [(lvl, msg.rsplit(" ms", 1)[0].rsplit(" ", 1)[0], msg) for lvl, msg in lines.lines]
    assert [(lvl, head) for lvl, head, _ in shapes] == [
        (logging.INFO, "GET /ok 200"),
        (logging.INFO, "GET /nowhere 404"),
        (logging.INFO, "GET /nowhere 404"),
        (logging.WARNING, "GET /boom 500"),
        (logging.INFO, "POST /v1/completions 200"),
        (logging.INFO, "POST /v1/chat/completions 200"),
    ]
    assert shapes[4][2].endswith(" ms, 7 prompt + 3 completion tokens")
    assert shapes[5][2].endswith(" ms, 4 prompt + 2 completion tokens")
    assert shapes[0][2].endswith(" ms")  # no tokens where the answer tells none


# layer ranges in the status JSON: inclusive, as configs and the plan table write them ----


def test_status_layers_are_inclusive_like_configs():
    cluster = parse_config(
        {
            "name": "r",
            "nodes": [
                {"name": "a", "host": "localhost", "memory_gb": 8},
                {"name": "b", "host": "localhost", "memory_gb": 8},
            ],
        }
    )
    fp = ModelFootprint(layer_bytes=(1,) * 6, head_bytes=1)
    plan = make_plan(fp, [NodeBudget(n, 2**30, 0) for n in ("a", "b")])
    facts = node_facts(cluster, plan)
    assert [(f["layers"], f["layers_text"]) for f in facts] == [([0, 2], "0-2"), ([3, 5], "3-5")]
    stages = [  # the engine's own, half-open
        {"layers": [0, 3], "sequences": [], "cache_bytes": 0, "step_ms": 1.0},
        {"layers": [3, 6], "sequences": [], "cache_bytes": 0, "step_ms": 1.0},
    ]
    snapshot = {"stages": stages, "live": 0, "waiting": 0}
    up = head_status("m", snapshot, None, facts, Recent())
    assert [(n["layers"], n["layers_text"]) for n in up["nodes"]] == [
        ([0, 2], "0-2"),
        ([3, 5], "3-5"),
    ]
    assert [s["layers"] for s in up["stages"]] == [[0, 2], [3, 5]]
    down = RingWatch(RingState(), "m", facts).down()
    assert [n["layers_text"] for n in down["nodes"]] == ["0-2", "3-5"]


def test_cache_home_is_an_absolute_path_under_home(monkeypatch, tmp_path):
    from mlxring.cluster.gather import cache_home

    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert cache_home() == str(tmp_path / ".cache" / "mlxring")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_home() == str(tmp_path / "xdg" / "mlxring")
