"""The head's `serve` job: the OpenAI-compatible API over the engine, until stopped."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import uvicorn

from mlxring.cluster.protocol import API_KEYS_ENV, SERVING, control
from mlxring.engine.engine import Engine
from mlxring.model.facts import ModelFacts
from mlxring.ring.transport import PeerLost
from mlxring.server.access import configure_logging
from mlxring.server.app import create_app

FAILED_GRACE = 1.0  # seconds between a ring failure and the end of the job


def api_keys() -> tuple[str, ...]:
    """The head's bearer keys: MLXRING_API_KEYS (comma-separated), where the launcher puts
    the configured ones (`mlxring.cluster.ranks.api_keys`)."""
    return tuple(k.strip() for k in os.environ.get(API_KEYS_ENV, "").split(",") if k.strip())


def serve(engine: Engine, model_dir: str, opts: dict) -> None:
    """Serve until SIGINT/SIGTERM (the launcher sends SIGTERM when it stops the ring).

    With opts["exit_on_failure"] (a launcher that restarts failed rings), a ring
    failure ends the job once in-flight requests have their error, so that the
    launcher starts a new ring; the head then exits as having lost a peer.
    """
    configure_logging(opts.get("log_level", "info"))  # the request log (server.access)
    name = opts.get("model_name") or Path(model_dir).name
    facts = ModelFacts.read(model_dir)
    host, port = opts.get("host", "127.0.0.1"), int(opts.get("port", 8000))
    app = create_app(
        engine,
        engine.tokenizer,
        name,
        facts.context_length,
        api_keys(),
        vocab_size=facts.text.get("vocab_size"),
        max_body_bytes=int(opts.get("max_body_bytes", 1 << 20)),
        host=opts.get("public_host", host),  # behind the launcher's front: the public name
        nodes=opts.get("node_facts") or [{"name": n} for n in opts.get("nodes", [])],
    )
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="off")
    server = uvicorn.Server(config)
    url = f"http://{host}:{port}/v1"

    def watch() -> None:
        while not server.started and not server.should_exit:
            time.sleep(0.05)
        if server.started:  # only now can the launcher send requests here
            control(SERVING, url, name)  # the launcher announces where clients reach it
        while opts.get("exit_on_failure") and not server.should_exit:
            if engine.error is not None:
                time.sleep(FAILED_GRACE)  # let the streams in flight carry the error out
                server.should_exit = True
            time.sleep(0.1)

    threading.Thread(target=watch, name="serve-watch", daemon=True).start()
    server.run()
    if not server.started:
        raise OSError(f"cannot listen on {host}:{port} (in use? pick another with --port)")
    if engine.error is not None and opts.get("exit_on_failure"):
        raise PeerLost(f"the ring failed: {engine.error}")
