"""The head's `serve` job: the OpenAI-compatible API over the engine, until stopped."""

from __future__ import annotations

import os
from pathlib import Path

import uvicorn

from mlxring.cluster.protocol import API_KEYS_ENV, SERVING, control
from mlxring.engine.engine import Engine
from mlxring.model.facts import ModelFacts
from mlxring.server.app import create_app


def api_keys(configured: list[str] | tuple[str, ...] = ()) -> tuple[str, ...]:
    """The configured bearer keys plus those of MLXRING_API_KEYS (comma-separated)."""
    env = [k.strip() for k in os.environ.get(API_KEYS_ENV, "").split(",") if k.strip()]
    return (*configured, *env)


def serve(engine: Engine, model_dir: str, opts: dict) -> None:
    """Serve until SIGINT/SIGTERM (the launcher sends SIGTERM when it stops the ring)."""
    name = opts.get("model_name") or Path(model_dir).name
    context = ModelFacts.read(model_dir).context_length
    app = create_app(engine, engine.tokenizer, name, context, api_keys())
    host, port = opts.get("host", "127.0.0.1"), int(opts.get("port", 8000))
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="off")
    server = uvicorn.Server(config)
    control(SERVING, f"http://{host}:{port}/v1", name)
    print(f"serving {name} at http://{host}:{port}/v1 (OpenAI API)", flush=True)
    server.run()
    if not server.started:
        raise OSError(f"cannot listen on {host}:{port} (in use? pick another with --port)")
