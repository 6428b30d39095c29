"""`mlxring status URL`: the ring at a glance in a terminal, from the API's GET /v1/status
(the JSON behind the status page at the same address)."""

from __future__ import annotations

import argparse
import json
import os
import time

import httpx

from mlxring.cluster.fit import human_bytes
from mlxring.cluster.protocol import API_KEYS_ENV
from mlxring.errors import UserError

KEY_ENV = "MLXRING_API_KEY"  # a client's key (the head's own list is MLXRING_API_KEYS)
TIMEOUT = 10.0
EVENTS = 5  # recent ring events shown


def setup_arg_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("url", help="the API's address, e.g. http://127.0.0.1:8000")
    parser.add_argument(
        "--api-key",
        help=f"a key of the API (default: {KEY_ENV}, else the first of {API_KEYS_ENV})",
    )
    parser.add_argument("--json", action="store_true", help="print the status JSON as it came")


def base_url(url: str) -> str:
    """http://host:port from what a user types (no scheme, a trailing / or /v1)."""
    url = url.strip().rstrip("/")
    if "://" not in url:
        url = f"http://{url}"
    return url.removesuffix("/v1")


def api_key(given: str | None) -> str | None:
    if given:
        return given
    if os.environ.get(KEY_ENV):
        return os.environ[KEY_ENV]
    keys = [k.strip() for k in os.environ.get(API_KEYS_ENV, "").split(",") if k.strip()]
    return keys[0] if keys else None


def fetch(url: str, key: str | None, timeout: float = TIMEOUT) -> dict:
    """The status JSON at `url`, or a UserError that says in one line what went wrong."""
    where = f"{base_url(url)}/v1/status"
    headers = {"authorization": f"Bearer {key}"} if key else {}
    try:
        r = httpx.get(where, headers=headers, timeout=timeout)
    except httpx.InvalidURL as e:
        raise UserError(f"{url!r} is not a URL ({e}); give one like http://127.0.0.1:8000") from e
    except httpx.TimeoutException as e:
        raise UserError(f"{where} did not answer within {timeout:g} s") from e
    except httpx.HTTPError as e:
        raise UserError(
            f"cannot reach {where} ({e}); is `mlxring launch` or `serve` running there?"
        ) from e
    if r.status_code == 401:
        if key:
            raise UserError(f"{where} refused the API key (401); check --api-key or {KEY_ENV}")
        raise UserError(f"{where} needs an API key (401): pass --api-key or set {KEY_ENV}")
    try:
        body = r.json()
    except ValueError:
        body = None
    if r.status_code != 200:
        message = body.get("error", {}).get("message") if isinstance(body, dict) else None
        raise UserError(f"{where} answered {r.status_code}: {message or r.reason_phrase}")
    if not isinstance(body, dict) or "nodes" not in body or "throughput" not in body:
        raise UserError(f"{where} is not an mlxring status (an older mlxring, or another server)")
    return body


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f} ms"


def _bytes(value: int | None) -> str:
    return "-" if value is None else human_bytes(value)


def status_table(status: dict) -> str:
    """A few lines: the ring's state, throughput and latency, a row per node, recent events."""
    ring, t, nodes = status.get("ring"), status["throughput"], status["nodes"]
    state = "serving" if status["status"] == "ok" else f"DOWN: {status['error']}"
    layers = nodes[-1]["layers"][1] + 1 if nodes and nodes[-1]["layers"] else "?"
    head = [f"{status['model']}: {state}", f"{len(nodes)} nodes, {layers} layers"]
    if ring:
        failures = ", ".join(f"{n} {k}" for n, k in ring["failures"].items())
        failed = f" (failures: {failures})" if failures else ""
        head.append(f"restarts {ring['restarts']}{failed}")
    lines = [" · ".join(head)]
    lines.append(
        f"tokens/s {t['tokens_per_second']:.1f} (last {t['window_s']} s) · "
        f"TTFT {_ms(t['ttft_ms'])} · inter-token {_ms(t['itl_ms'])} · "
        f"hop ≈ {_ms(t['hop_ms'])} · running {status['live']} · waiting {status['waiting']}"
    )
    rows = [("node", "host", "backend", "layers", "weights", "KV", "memory", "step", "state")]
    for n in nodes:
        layer = f"{n['layers'][0]}-{n['layers'][1]}" if n["layers"] else "-"  # inclusive
        backend = "/".join(x for x in (n["backend"], n["device"]) if x) or "-"
        rows.append(
            (
                n["name"],
                n["host"] or "-",
                backend,
                layer,
                _bytes(n["weight_bytes"]),
                _bytes(n["cache_bytes"]),
                _bytes(n["memory_bytes"]),
                _ms(n["step_ms"]),
                n["state"],
            )
        )
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    lines.append("")
    lines += ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    if ring and ring["events"]:
        lines += ["", "recent events:"]
        for e in ring["events"][:EVENTS]:
            when = time.strftime("%H:%M:%S", time.localtime(e["time"]))
            lines.append(f"  {when}  {e['kind']:<8} {e['message']}")
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    status = fetch(args.url, api_key(args.api_key))
    print(json.dumps(status) if args.json else status_table(status))
    return 0
