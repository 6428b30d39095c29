"""A node's bundle: the checkpoint bytes the node holding layers [start, end) needs.

A bundle is a list of virtual files, each a sequence of segments: literal bytes (a new
safetensors header, the filtered index) or a byte range of a source file (a tensor's raw
bytes, a tokenizer file). Nothing is copied until the bundle is read, hashed or written,
and the same checkpoint and range always give the same bytes.
"""

from __future__ import annotations

import bisect
import contextlib
import hashlib
import json
import os
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import NamedTuple

from mlxring.model.facts import CheckpointError, ModelFacts
from mlxring.model.weights import INDEX_FILE, belongs, read_full_header, weight_map

# checkpoint formats a bundle never carries (it carries safetensors and small files)
SKIPPED_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt", ".gguf", ".h5", ".msgpack", ".onnx")
# bytes per element: tensors are laid out largest first, so every one stays aligned
ITEMSIZE = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4}
ITEMSIZE |= {"F16": 2, "BF16": 2, "I16": 2, "U16": 2}
MANIFEST_VERSION = 1

Progress = Callable[[int], object]  # called with each chunk's byte count, e.g. tqdm.update


class Span(NamedTuple):
    """`length` bytes of the source file `path` from `offset`."""

    path: str
    offset: int
    length: int


Segment = bytes | Span


def _length(segment: Segment) -> int:
    return len(segment) if isinstance(segment, bytes) else segment.length


@dataclass(frozen=True)
class BundleFile:
    """One virtual file: `segments` (literal bytes or spans of source files) end to end."""

    path: str
    size: int
    segments: tuple[Segment, ...]

    @cached_property
    def _starts(self) -> list[int]:
        starts, pos = [], 0
        for segment in self.segments:
            starts.append(pos)
            pos += _length(segment)
        return starts

    def _read(
        self, offset: int, n: int, files: dict[str, int], stack: contextlib.ExitStack
    ) -> bytes:
        end = min(offset + n, self.size)
        out = bytearray()
        i = bisect.bisect_right(self._starts, offset) - 1
        while offset < end:
            segment, start = self.segments[i], self._starts[i]
            take = min(end, start + _length(segment)) - offset
            if isinstance(segment, bytes):
                out += segment[offset - start : offset - start + take]
            else:
                if segment.path not in files:
                    files[segment.path] = fd = os.open(segment.path, os.O_RDONLY)
                    stack.callback(os.close, fd)
                data = _pread(files[segment.path], take, segment.offset + offset - start)
                if len(data) != take:
                    raise CheckpointError(f"{segment.path}: file is shorter than its header says")
                out += data
            offset += take
            i += 1
        return bytes(out)

    def read(self, offset: int, n: int) -> bytes:
        """Up to `n` bytes from `offset` (fewer at the end of the file)."""
        with contextlib.ExitStack() as stack:
            return self._read(max(offset, 0), n, {}, stack)

    def chunks(self, offset: int = 0, chunk: int = 1 << 20) -> Iterator[bytes]:
        """The file's bytes from `offset` on, `chunk` bytes at a time."""
        with contextlib.ExitStack() as stack:
            files: dict[str, int] = {}
            while offset < self.size:
                data = self._read(offset, chunk, files, stack)
                offset += len(data)
                yield data


def _pread(fd: int, n: int, offset: int) -> bytes:
    parts = []
    while n > 0 and (data := os.pread(fd, min(n, 1 << 30), offset)):
        parts.append(data)
        n, offset = n - len(data), offset + len(data)
    return b"".join(parts)


def _literal(path: str, data: bytes) -> BundleFile:
    return BundleFile(path, len(data), (data,))


def _whole(path: Path) -> BundleFile:
    size = path.stat().st_size
    return BundleFile(path.name, size, (Span(str(path), 0, size),) if size else ())


@dataclass(frozen=True)
class Bundle:
    """The files of the node holding layers [start, end) (`layers`), the head's if `is_head`."""

    files: tuple[BundleFile, ...]
    layers: tuple[int, int]
    is_head: bool
    model_dir: Path  # the source checkpoint, resolved

    @property
    def size(self) -> int:
        return sum(f.size for f in self.files)

    @property
    def sources(self) -> list[Path]:
        """Every source file the bundle's bytes come from (its spans, and the index)."""
        paths = {Path(s.path) for f in self.files for s in f.segments if isinstance(s, Span)}
        if (self.model_dir / INDEX_FILE).is_file():
            paths.add(self.model_dir / INDEX_FILE)
        return sorted(paths)


def _tensor_file(source: Path, names: list[str]) -> tuple[BundleFile, dict[str, int]]:
    """`source` holding only `names`: a new header, then their bytes copied in order."""
    header, data_start = read_full_header(source)
    missing = [n for n in names if n not in header]
    if missing:
        raise CheckpointError(f"{source}: has no tensor {missing[0]} (its index says it does)")
    order = sorted(names, key=lambda n: (-ITEMSIZE.get(header[n]["dtype"], 1), n))
    new: dict[str, dict] = {}
    if "__metadata__" in header:
        new["__metadata__"] = header["__metadata__"]
    spans: list[Span] = []
    sizes, pos = {}, 0
    for name in order:
        info = header[name]
        start, end = info["data_offsets"]
        size = end - start
        new[name] = {
            "dtype": info["dtype"],
            "shape": info["shape"],
            "data_offsets": [pos, pos + size],
        }
        sizes[name] = size
        pos += size
        last = spans[-1] if spans else None
        if last and last.offset + last.length == data_start + start:  # contiguous in the source
            spans[-1] = last._replace(length=last.length + size)
        elif size:
            spans.append(Span(str(source), data_start + start, size))
    text = json.dumps(new, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    head = struct.pack("<Q", len(text)) + text
    return BundleFile(source.name, len(head) + pos, (head, *spans)), sizes


def plan_bundle(model_dir: str | Path, start: int, end: int, is_head: bool) -> Bundle:
    """The bundle of the node holding layers [start, end) of the model in `model_dir`
    (the head, `is_head`, also holds the embedding, final norm and lm_head). Only headers
    are read."""
    model_dir = Path(model_dir).resolve()
    num_layers = ModelFacts.read(model_dir).num_layers
    if not 0 <= start < end <= num_layers:
        raise CheckpointError(
            f"layers {start}-{end - 1} are out of range: the model has {num_layers} layers"
        )
    wanted: dict[str, list[str]] = {}
    for name, file in weight_map(model_dir).items():
        if belongs(name, start, end, is_head):
            wanted.setdefault(file, []).append(name)
    files, where, total = [], {}, 0
    for file, names in sorted(wanted.items()):
        bundle_file, sizes = _tensor_file(model_dir / file, names)
        files.append(bundle_file)
        where.update(dict.fromkeys(sizes, file))
        total += sum(sizes.values())
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(where.items()))}
    files.append(_literal(INDEX_FILE, (json.dumps(index, indent=2) + "\n").encode()))
    for path in sorted(model_dir.iterdir()):
        if path.is_file() and not _skipped(path.name):
            files.append(_whole(path))
    files.sort(key=lambda f: f.path)
    return Bundle(tuple(files), (start, end), is_head, model_dir)


def _skipped(name: str) -> bool:
    return name.startswith(".") or name.endswith((*SKIPPED_SUFFIXES, ".index.json"))


def _cache_key(bundle: Bundle) -> str:
    stats = []
    for path in bundle.sources:
        st = path.stat()
        stats.append([path.name, st.st_size, st.st_mtime_ns])
    key = [MANIFEST_VERSION, str(bundle.model_dir), stats, list(bundle.layers), bundle.is_head]
    return hashlib.sha256(json.dumps(key).encode()).hexdigest()


def manifest(
    bundle: Bundle, cache_dir: Path | None = None, progress: Progress | None = None
) -> list[dict]:
    """[{"path", "size", "sha256"}] per file of the bundle, hashing its bytes as a stream.

    With `cache_dir` the result is kept there, keyed by the source directory, every source
    file's name, size and mtime, and the layers: a second call reads no weight bytes.
    `progress(n)` is called with each hashed chunk's byte count (a tqdm's `update` fits).
    """
    cached = Path(cache_dir) / f"manifest-{_cache_key(bundle)}.json" if cache_dir else None
    if cached is not None and cached.is_file():
        with contextlib.suppress(OSError, ValueError):
            return json.loads(cached.read_text())
    entries = []
    for f in bundle.files:
        digest = hashlib.sha256()
        for data in f.chunks(chunk=8 << 20):
            digest.update(data)
            if progress:
                progress(len(data))
        entries.append({"path": f.path, "size": f.size, "sha256": digest.hexdigest()})
    if cached is not None:
        cached.parent.mkdir(parents=True, exist_ok=True)
        part = cached.with_suffix(f".{os.getpid()}.part")
        part.write_text(json.dumps(entries))
        os.replace(part, cached)
    return entries


def write_bundle(bundle: Bundle, out_dir: Path, progress: Progress | None = None) -> None:
    """Write the bundle's files into `out_dir` (created; files of the same name replaced).
    `progress(n)` is called with each written chunk's byte count."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for f in bundle.files:
        part = out_dir / f"{f.path}.part"
        with open(part, "wb") as out:
            for data in f.chunks(chunk=8 << 20):
                out.write(data)
                if progress:
                    progress(len(data))
        os.replace(part, out_dir / f.path)  # no half-written file under the real name
