#!/usr/bin/env python3
"""Set up and run mlxring from a fresh clone, needing only python3.

    python3 scripts/dev.py demo   # a 2-rank ring on a tiny model, serving the OpenAI API
    python3 scripts/dev.py test   # lint + the whole test suite

Creates `.venv/` (once; again when pyproject.toml changes) and installs the
package with its torch and dev extras.
"""

from __future__ import annotations

import hashlib
import os
import platform
import signal
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENV = ROOT / ".venv"
BIN = VENV / ("Scripts" if os.name == "nt" else "bin")
STAMP = VENV / ".mlxring-installed"
DEMO_MODEL = ROOT / ".cache" / "tiny-llama"
DEMO_PROMPT = "What does a ring of machines do?"
# On Linux the pinned CPU build is on local disk; an unpinned torch pulls a multi-GB CUDA build.
TORCH = "torch==2.13.0" if platform.system() == "Linux" else "torch"


def run(*cmd: str | Path) -> None:
    print("+", " ".join(str(c) for c in cmd), flush=True)
    subprocess.run([str(c) for c in cmd], cwd=ROOT, check=True)


def setup() -> None:
    """Create the virtual environment and install mlxring[torch,dev] unless up to date."""
    want = hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()
    if STAMP.is_file() and STAMP.read_text() == want:
        return
    if not VENV.is_dir():
        run(sys.executable, "-m", "venv", VENV)
    run(BIN / "python", "-m", "pip", "install", "--quiet", "--upgrade", "pip")
    run(BIN / "python", "-m", "pip", "install", "--quiet", TORCH, "-e", ".[torch,dev]")
    STAMP.write_text(want)


def demo() -> None:
    """A local 2-rank ring serving the tiny model; one chat request; then keep serving."""
    print("demo: a tiny random-weight Llama, so replies are noise; the machinery is real")
    if not (DEMO_MODEL / "config.json").is_file():
        run(BIN / "mlxring", "make-tiny", "--family", "llama", "--out", DEMO_MODEL)
    port = free_port()
    cmd = [
        str(BIN / "mlxring"),
        "launch",
        "configs/local-2.yaml",
        "--model",
        str(DEMO_MODEL),
        "--port",
        str(port),
    ]
    print("+", " ".join(cmd), flush=True)
    ring = subprocess.Popen(cmd, cwd=ROOT)
    try:
        url = f"http://127.0.0.1:{port}/v1"
        ask = (
            "import sys, time\nfrom openai import OpenAI\n"
            "client = OpenAI(base_url=sys.argv[1], api_key='none', max_retries=0)\n"
            "for _ in range(600):\n"
            "    try: client.models.list(); break\n"
            "    except Exception: time.sleep(0.5)\n"
            "r = client.chat.completions.create(model=sys.argv[2], max_tokens=24,\n"
            "    messages=[{'role': 'user', 'content': sys.argv[3]}])\n"
            "print(f'\\nreply: {r.choices[0].message.content!r}\\n')\n"
        )
        subprocess.run(
            [str(BIN / "python"), "-c", ask, url, DEMO_MODEL.name, DEMO_PROMPT], check=True
        )
        print(
            f"serving at {url}; try:\n  curl {url}/chat/completions -H 'content-type: "
            f'application/json\' -d \'{{"model": "{DEMO_MODEL.name}", "messages": '
            f'[{{"role": "user", "content": "hi"}}]}}\'\n'
            "Ctrl-C stops every rank.",
            flush=True,
        )
        ring.wait()
    finally:
        if ring.poll() is None:
            ring.send_signal(signal.SIGINT)  # the launcher stops every rank
            ring.wait()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test(pytest_args: list[str]) -> None:
    run(BIN / "ruff", "check", ".")
    run(BIN / "ruff", "format", "--check", ".")
    run(BIN / "python", "-m", "pytest", *pytest_args)


def main() -> int:
    if len(sys.argv) < 2 or sys.argv[1] not in ("demo", "test", "setup"):
        print(__doc__.strip(), file=sys.stderr)
        return 2
    try:
        setup()
        if sys.argv[1] == "demo":
            demo()
        elif sys.argv[1] == "test":
            test(sys.argv[2:])
    except subprocess.CalledProcessError as e:
        return e.returncode or 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
