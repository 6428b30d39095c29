"""The head's `serve` job: the OpenAI-compatible API over the engine, until stopped."""

from __future__ import annotations

import os
from pathlib import Path

API_KEYS_ENV = "MLXRING_API_KEYS"  # comma-separated bearer keys


def api_keys(configured: list[str] | tuple[str, ...] = ()) -> tuple[str, ...]:
    env = [k.strip() for k in os.environ.get(API_KEYS_ENV, "").split(",") if k.strip()]
    return (*configured, *env)


def context_length(model_dir: str) -> int:
    from mlxring.weights import read_config

    config = read_config(model_dir)
    config = config.get("text_config", config)
    return int(config.get("max_position_embeddings") or 4096)


def serve(engine, model_dir: str, opts: dict) -> None:
    """Serve until SIGINT/SIGTERM (the launcher sends SIGTERM when it stops the ring)."""
    import uvicorn

    from mlxring.node import control
    from mlxring.server.app import create_app

    name = opts.get("model_name") or Path(model_dir).name
    app = create_app(engine, engine.tokenizer, name, context_length(model_dir), api_keys())
    host, port = opts.get("host", "127.0.0.1"), int(opts.get("port", 8000))
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="off")
    server = uvicorn.Server(config)
    control("serving", f"http://{host}:{port}/v1", name)
    print(f"serving {name} at http://{host}:{port}/v1 (OpenAI API)", flush=True)
    server.run()
    if not server.started:
        raise OSError(f"cannot listen on {host}:{port} (in use? pick another with --port)")
