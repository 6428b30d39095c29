"""The cluster key: 32 random bytes, made by `mlxring keygen`, never sent or advertised."""

from __future__ import annotations

import contextlib
import errno
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
    """Write `key` as hex to `path` with mode 0600 (the directory is created, 0700).

    The key goes to a temporary file made 0600 in the same directory, synced, then moved
    to `path` in one step: no moment exists where the file is partly written or readable
    by others. A symlink at `path` (dangling or not) is refused, never followed; `force`
    replaces an existing regular file only."""
    path = Path(path).expanduser()
    _check_key_path(path, force)
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as e:
        raise ClusterKeyError(f"cannot create the directory {path.parent}: {e.strerror}") from None
    temp = _write_temp(path.parent, key.hex() + "\n")
    try:
        if force:
            _check_key_path(path, force)  # again, just before the move
            os.replace(temp, path)  # replaces the name: a symlink put there is not followed
        else:
            _link_new(temp, path)
    except OSError as e:
        raise ClusterKeyError(f"cannot write {path}: {e.strerror}") from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)
    _sync_dir(path.parent)
    return path


def _check_key_path(path: Path, force: bool) -> None:
    """Refuse a symlink, a directory or anything but a regular file at `path`; an existing
    regular file only with `force`."""
    try:
        st = path.lstat()
    except FileNotFoundError:
        return
    except OSError as e:
        raise ClusterKeyError(f"cannot write {path}: {e.strerror}") from None
    if stat.S_ISLNK(st.st_mode):
        raise ClusterKeyError(
            f"{path} is a symbolic link; refusing to write a key through it (remove it, or "
            "pass the real path with --out)"
        )
    if stat.S_ISDIR(st.st_mode):
        raise ClusterKeyError(
            f"{path} is a directory; pass a file path with --out (e.g. {path / 'cluster.key'})"
        )
    if not stat.S_ISREG(st.st_mode):
        raise ClusterKeyError(f"{path} exists and is not a regular file; refusing to replace it")
    if not force:
        raise ClusterKeyError(
            f"{path} exists; pass --force to replace it (every node needs the new key)"
        )


def _write_temp(directory: Path, text: str) -> Path:
    """A new file in `directory` holding `text`, created 0600 (never a symlink), synced."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    for _ in range(100):
        temp = directory / f".cluster-key-{secrets.token_hex(8)}.tmp"
        try:
            fd = os.open(temp, flags, 0o600)
        except FileExistsError:
            continue
        except OSError as e:
            raise ClusterKeyError(f"cannot write in {directory}: {e.strerror}") from None
        try:
            os.fchmod(fd, 0o600)  # whatever the umask
            os.write(fd, text.encode())
            os.fsync(fd)
        except OSError as e:
            os.unlink(temp)
            raise ClusterKeyError(f"cannot write in {directory}: {e.strerror}") from None
        finally:
            os.close(fd)
        return temp
    raise ClusterKeyError(f"cannot create a temporary file in {directory}")


def _link_new(temp: Path, path: Path) -> None:
    """Give `temp` the name `path` only if nothing has it (atomic: a hard link)."""
    try:
        os.link(temp, path)
    except FileExistsError:
        _check_key_path(path, force=False)  # names what is there
        raise
    except OSError as e:
        if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV):
            raise
        # a file system without hard links: the name is checked again, then taken
        _check_key_path(path, force=False)
        os.replace(temp, path)


def _sync_dir(directory: Path) -> None:
    """Make the new name durable (best effort: not every system can sync a directory)."""
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


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
