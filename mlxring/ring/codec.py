"""Activations <-> bytes: a small header (dtype, shape) and the raw little-endian data.

The codec keeps the dtype the stage computed in (fp32, fp16, bf16): nothing is
widened on the wire.
"""

from __future__ import annotations

import math
import struct

import mlx.core as mx
import numpy as np

DTYPES = {0: mx.float32, 1: mx.float16, 2: mx.bfloat16, 3: mx.int32, 4: mx.uint8}
CODES = {dtype: code for code, dtype in DTYPES.items()}
_HEAD = struct.Struct("<BB")  # dtype code, ndim; then ndim x uint32 dims
MAX_NDIM = 8
MAX_DIM = 2**31 - 1  # mlx shapes are int32
MAX_ELEMENTS = 2**31 - 1  # per tensor; the data must be in the buffer anyway


class CodecError(ValueError):
    """Bytes that do not describe an activation tensor."""


def _parts(x: mx.array) -> tuple[bytes, memoryview]:
    """The header of `x` and a view of its data (no copy)."""
    if x.dtype not in CODES:
        raise CodecError(f"cannot encode dtype {x.dtype}")
    head = _HEAD.pack(CODES[x.dtype], x.ndim) + struct.pack(f"<{x.ndim}I", *x.shape)
    flat = mx.contiguous(x).reshape(-1)
    data = np.asarray(flat.view(mx.uint8)) if x.size else np.empty(0, np.uint8)
    return head, memoryview(data)


def encode(x: mx.array) -> bytes:
    """Header + data bytes of `x`."""
    return b"".join(_parts(x))


def encode_parts(tensors: dict[str, mx.array]) -> list[bytes | memoryview]:
    """Several named tensors (what travels between stages) as buffers to join, views of the
    tensors' data among them: the caller makes the one copy."""
    parts: list[bytes | memoryview] = [struct.pack("<B", len(tensors))]
    for name, x in tensors.items():
        head, data = _parts(x)
        size = struct.pack("<I", len(head) + data.nbytes)
        parts += [struct.pack("<B", len(name)), name.encode(), size, head, data]
    return parts


def encode_many(tensors: dict[str, mx.array]) -> bytes:
    """Several named tensors as one buffer."""
    return b"".join(encode_parts(tensors))


def decode_many(buf: bytes | memoryview) -> dict[str, mx.array]:
    buf = memoryview(buf)
    try:
        (count,), offset, tensors = struct.unpack_from("<B", buf), 1, {}
        for _ in range(count):
            (n,) = struct.unpack_from("<B", buf, offset)
            name = bytes(buf[offset + 1 : offset + 1 + n]).decode()
            (size,) = struct.unpack_from("<I", buf, offset + 1 + n)
            start = offset + 5 + n
            if start + size > len(buf):
                raise CodecError("tensor list is truncated")
            tensors[name] = decode(buf[start : start + size])
            offset = start + size
    except (struct.error, UnicodeDecodeError) as e:
        raise CodecError(f"malformed tensor list ({e})") from None
    if offset != len(buf):
        raise CodecError("trailing bytes after the tensor list")
    return tensors


def decode(buf: bytes | memoryview) -> mx.array:
    """The tensor `encode` made; raises CodecError on a malformed buffer."""
    buf = memoryview(buf)
    if len(buf) < _HEAD.size:
        raise CodecError("activation header is truncated")
    code, ndim = _HEAD.unpack_from(buf)
    if code not in DTYPES or ndim > MAX_NDIM:
        raise CodecError(f"bad activation header (dtype code {code}, ndim {ndim})")
    offset = _HEAD.size + 4 * ndim
    if len(buf) < offset:
        raise CodecError("activation shape is truncated")
    shape = struct.unpack_from(f"<{ndim}I", buf, _HEAD.size)
    dtype = DTYPES[code]
    elements = math.prod(shape)  # exact: a product that wraps could match a short buffer
    if max(shape, default=0) > MAX_DIM or elements > MAX_ELEMENTS:
        raise CodecError(f"activation of shape {shape} is too large")
    nbytes = elements * dtype.size
    if len(buf) - offset != nbytes:
        raise CodecError(
            f"activation of shape {shape} needs {nbytes} bytes, got {len(buf) - offset}"
        )
    raw = mx.array(np.frombuffer(buf[offset:], dtype=np.uint8))
    return raw.view(dtype).reshape(shape)
