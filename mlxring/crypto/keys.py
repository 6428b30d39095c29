"""The cluster key: 32 random bytes, made by `mlxring keygen`, never sent or advertised."""

from __future__ import annotations

import os
import secrets
import stat
from pathlib import Path

from mlxring.errors import UserError

KEY_BYTES = 32
KEY_ENV = "MLXRING_CLUSTER_KEY"
DEFAULT_KEY_FILE = "~/.mlxring/cluster.key"


class ClusterKeyError(UserError, ValueError):
    """A cluster key that cannot be used; the message names the fix."""


def new_key() -> bytes:
    return secrets.token_bytes(KEY_BYTES)


def write_key(path: str | Path, key: bytes, force: bool = False) -> Path:
    """Write `key` as hex to `path` with mode 0600 (the directory is created, 0700)."""
    path = Path(path).expanduser()
    if path.exists() and not force:
        raise ClusterKeyError(
            f"{path} exists; pass --force to replace it (every node needs the new key)"
        )
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(key.hex() + "\n")
    os.chmod(path, 0o600)
    return path


def parse_key(text: str | bytes, where: str) -> bytes:
    """A key from its hex form (64 hex digits) or its 32 raw bytes."""
    if isinstance(text, bytes) and len(text) == KEY_BYTES:
        return text
    if isinstance(text, bytes):
        text = text.decode(errors="replace")
    try:
        key = bytes.fromhex(text.strip())
    except ValueError:
        key = b""
    if len(key) != KEY_BYTES:
        raise ClusterKeyError(
            f"{where}: expected a {KEY_BYTES}-byte key as 64 hex digits "
            "(make one with `mlxring keygen`)"
        )
    return key


def read_key_file(path: str | Path) -> bytes:
    path = Path(path).expanduser()
    try:
        data = path.read_bytes()
        mode = path.stat().st_mode
    except OSError as e:
        raise ClusterKeyError(
            f"cluster key file {path}: {e.strerror}; make one with `mlxring keygen --out {path}`"
        ) from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ClusterKeyError(f"cluster key file {path} is readable by others; chmod 600 {path}")
    return parse_key(data, f"cluster key file {path}")


def key_from_env() -> bytes | None:
    value = os.environ.get(KEY_ENV)
    return parse_key(value, KEY_ENV) if value else None
