"""A worker's weight cache: files kept by content hash, bundles made of them.

    CACHE/blobs/<sha256>          complete files, checked against their hash
    CACHE/partial/<sha256>        a file still arriving (a transfer resumes from its size)
    CACHE/bundles/<id>/<path>     a model directory for one node's layers: hard links to
                                  blobs (id: the hash of the bundle's manifest)

A second head, or the same one restarted, finds the blobs and sends nothing; a transfer
cut short resumes where the partial file ends. A file whose bytes do not hash to what the
head announced is deleted and asked for again.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
from pathlib import Path

_SHA256 = re.compile(r"[0-9a-f]{64}")
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]{0,199}")  # a file name of a model directory


class StoreError(ValueError):
    """A request the store refuses: a bad hash or path, a write out of order."""


def check_sha(sha: object) -> str:
    if not isinstance(sha, str) or not _SHA256.fullmatch(sha):
        raise StoreError(f"not a sha256: {sha!r}")
    return sha


def check_path(path: object) -> str:
    """A bundle member's relative path: plain names, no '..', no absolute path."""
    parts = path.split("/") if isinstance(path, str) else [None]
    if not all(isinstance(p, str) and _NAME.fullmatch(p) for p in parts) or len(parts) > 2:
        raise StoreError(f"not a bundle file name: {path!r}")
    return path


class Store:
    """The cache under `root`; `write` calls for one file come in order from one head."""

    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser().resolve()
        for sub in ("blobs", "partial", "bundles"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        # sha -> (open partial file, running hash, bytes written) of files arriving now
        self._writing: dict[str, tuple] = {}

    def blob(self, sha: str) -> Path:
        return self.root / "blobs" / check_sha(sha)

    def partial(self, sha: str) -> Path:
        return self.root / "partial" / check_sha(sha)

    def have(self, sha: str, size: int) -> int:
        """Bytes of file `sha` already here: `size` when complete, else the partial's size."""
        blob = self.blob(sha)
        if blob.is_file() and blob.stat().st_size == size:
            return size
        partial = self.partial(sha)
        if not partial.is_file():
            return 0
        here = partial.stat().st_size
        if here >= size:  # all arrived, never checked (the session ended first): check now
            return size if self.finish(sha, size) else 0
        return here

    def write(self, sha: str, offset: int, data: bytes) -> None:
        """Append `data` at `offset` of the partial file (which must end there)."""
        f, hasher, done = self._writing.get(sha, (None, None, None))
        if done != offset:  # a new or resumed file: hash what is already here first
            self.close(sha)
            partial = self.partial(sha)
            current = partial.stat().st_size if partial.is_file() else 0
            if offset != current:
                raise StoreError(f"chunk of {sha[:12]} at {offset}, but {current} bytes are here")
            hasher = hashlib.sha256()
            f = open(partial, "a+b")  # noqa: SIM115 (kept open across chunks; closed by close())
            f.seek(0)
            while block := f.read(1 << 22):
                hasher.update(block)
        f.write(data)
        hasher.update(data)
        self._writing[sha] = (f, hasher, offset + len(data))

    def close(self, sha: str | None = None) -> None:
        """Close the partial file of `sha` (all of them: None) kept open between chunks."""
        for key in [sha] if sha else list(self._writing):
            if (entry := self._writing.pop(key, None)) is not None:
                entry[0].close()

    def finish(self, sha: str, size: int) -> bool:
        """Check the arrived file against its hash; keep it (True) or delete it (False)."""
        f, hasher, done = self._writing.pop(sha, (None, None, None))
        if f is not None:
            f.flush()
            os.fsync(f.fileno())
            f.close()
        partial = self.partial(sha)
        if not partial.is_file() or partial.stat().st_size != size:
            partial.unlink(missing_ok=True)
            return False
        if done != size:  # finished without writes in this session: hash the file
            hasher = hashlib.sha256()
            with open(partial, "rb") as f:
                while block := f.read(1 << 22):
                    hasher.update(block)
        if hasher.hexdigest() != sha:
            partial.unlink()
            return False
        os.replace(partial, self.blob(sha))
        return True

    def bundle(self, files: list[dict]) -> Path:
        """The model directory of a manifest ([{path, sha256, size}]) whose files are all
        here: hard links to the blobs, made once."""
        entries = sorted((check_path(f["path"]), check_sha(f["sha256"]), f["size"]) for f in files)
        ident = hashlib.sha256(json.dumps(entries).encode()).hexdigest()[:32]
        target = self.root / "bundles" / ident
        if (target / ".complete").is_file():
            return target
        for path, sha, size in entries:
            if self.have(sha, size) != size:
                raise StoreError(f"{path} ({sha[:12]}) has not arrived")
            dest = target / path
            dest.parent.mkdir(parents=True, exist_ok=True)
            with contextlib.suppress(FileNotFoundError):
                dest.unlink()
            os.link(self.blob(sha), dest)
        (target / ".complete").write_text(json.dumps(entries))
        return target

    def owns(self, path: str | Path) -> bool:
        """Whether `path` is one of this store's complete bundles (what a rank may load)."""
        path = Path(path).resolve()
        return path.parent == self.root / "bundles" and (path / ".complete").is_file()
