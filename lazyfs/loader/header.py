"""safetensors headers, parsed as hostile input.  No torch here.

File layout: an 8-byte little-endian header length ``N``, ``N`` bytes of JSON
(an object: tensor name -> ``{"dtype", "shape", "data_offsets"}`` plus an
optional ``"__metadata__"`` of string -> string), then the data region.
``data_offsets`` are relative to the start of the data region.

Every rule is checked, and a violation raises :class:`HeaderError` naming the
file and the tensor: header length limit, valid UTF-8 JSON without duplicate
keys, known dtypes, non-negative integer shapes, ``prod(shape) * itemsize ==
end - begin``, ranges inside the data region, no overlaps, and the data region
covered exactly (no gaps, nothing after the last tensor).

Sub-byte dtypes (``F4``: 4 bits, ``F6_*``: 6 bits) count their shape in elements;
their byte size is ``prod(shape) * bits / 8``, which must be a whole number.
"""

from __future__ import annotations

import functools
import json
import math
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from lazyfs.loader.errors import HeaderError, LoaderIOError

__all__ = [
    "DTYPE_BITS",
    "DTYPE_SIZES",
    "MAX_HEADER",
    "Header",
    "HeaderError",
    "TensorInfo",
    "parse_header",
    "read_header",
    "read_header_with",
]

# Bits per element of every dtype safetensors defines (its Rust ``Dtype`` enum).
DTYPE_BITS = {
    "BOOL": 8,
    "F4": 4,
    "F6_E2M3": 6,
    "F6_E3M2": 6,
    "U8": 8,
    "I8": 8,
    "F8_E5M2": 8,
    "F8_E4M3": 8,
    "F8_E5M2FNUZ": 8,
    "F8_E4M3FNUZ": 8,
    "F8_E8M0": 8,
    "I16": 16,
    "U16": 16,
    "F16": 16,
    "BF16": 16,
    "I32": 32,
    "U32": 32,
    "F32": 32,
    "C64": 64,
    "F64": 64,
    "I64": 64,
    "U64": 64,
}
# Item sizes in bytes of the whole-byte dtypes.
DTYPE_SIZES = {k: v // 8 for k, v in DTYPE_BITS.items() if v % 8 == 0}
# The same bound safetensors itself applies (100 MB): a header is metadata, not data.
MAX_HEADER = 100_000_000
MAX_RANK = 64
# A dimension must fit an int64 (torch sizes); the byte-range check bounds the product.
MAX_DIM = 2**63 - 1


@dataclass(frozen=True, slots=True)
class TensorInfo:
    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int  # absolute file offset
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class Header:
    path: str
    data_start: int  # 8 + N
    file_size: int
    metadata: dict[str, str] | None
    tensors: tuple[TensorInfo, ...]  # in file order

    @functools.cached_property
    def _by_name(self) -> dict[str, TensorInfo]:
        return {t.name: t for t in self.tensors}

    def tensor(self, name: str) -> TensorInfo:
        """The tensor called ``name`` (``KeyError`` if there is none)."""
        return self._by_name[name]

    @property
    def names(self) -> list[str]:
        return [t.name for t in self.tensors]


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicate key {k!r}")
        out[k] = v
    return out


def read_header(path: str, fd: int) -> Header:
    """Read and validate the header of the safetensors file open at ``fd``."""
    try:
        size = os.fstat(fd).st_size
    except OSError as exc:
        raise LoaderIOError(f"{path}: {exc.strerror}") from exc
    return read_header_with(path, size, lambda offset, n: _pread_full(path, fd, n, offset))


def read_header_with(path: str, size: int, read: Callable[[int, int], bytes]) -> Header:
    """Read and validate a header with ``read(offset, n)`` (all ``n`` bytes or an exception)."""
    if size < 8:
        raise HeaderError(f"{path}: not a safetensors file ({size} bytes, too short for a header)")
    (n,) = struct.unpack("<Q", read(0, 8))
    if n > MAX_HEADER:
        raise HeaderError(f"{path}: header of {n} bytes exceeds the {MAX_HEADER} byte limit")
    if 8 + n > size:
        raise HeaderError(f"{path}: header length {n} runs past the end of the {size}-byte file")
    return parse_header(path, read(8, n), size)


def _pread_full(path: str, fd: int, n: int, offset: int) -> bytes:
    parts: list[bytes] = []
    got = 0
    while got < n:
        try:
            part = os.pread(fd, n - got, offset + got)
        except OSError as exc:
            raise LoaderIOError(f"{path}: reading the header failed: {exc.strerror}") from exc
        if not part:
            raise HeaderError(f"{path}: file shrank while reading the header")
        parts.append(part)
        got += len(part)
    return b"".join(parts)


def parse_header(path: str, raw: bytes, file_size: int) -> Header:
    try:
        obj = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except (UnicodeDecodeError, ValueError) as exc:
        raise HeaderError(f"{path}: header is not valid JSON: {exc}") from exc
    if not isinstance(obj, dict):
        raise HeaderError(f"{path}: header is not a JSON object")
    data_start = 8 + len(raw)
    data_size = file_size - data_start
    metadata = obj.pop("__metadata__", None)
    if metadata is not None and not (
        isinstance(metadata, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items())
    ):
        raise HeaderError(f"{path}: __metadata__ must map strings to strings")
    tensors: list[TensorInfo] = []
    for name, info in obj.items():
        where = f"{path}: tensor {name!r}"
        if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
            raise HeaderError(f"{where}: expected exactly dtype, shape and data_offsets")
        dtype = info["dtype"]
        if not isinstance(dtype, str) or dtype not in DTYPE_BITS:
            raise HeaderError(f"{where}: unknown dtype {dtype!r}")
        shape = info["shape"]
        if (
            not isinstance(shape, list)
            or len(shape) > MAX_RANK
            or not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d <= MAX_DIM for d in shape)
        ):
            raise HeaderError(f"{where}: shape must be a list of at most {MAX_RANK} non-negative 64-bit integers")
        offs = info["data_offsets"]
        if (
            not isinstance(offs, list)
            or len(offs) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) for o in offs)
        ):
            raise HeaderError(f"{where}: data_offsets must be two integers")
        begin, end = offs
        if not 0 <= begin <= end <= data_size:
            raise HeaderError(f"{where}: data_offsets [{begin}, {end}] fall outside the {data_size}-byte data region")
        bits = math.prod(shape) * DTYPE_BITS[dtype]
        if bits % 8:
            raise HeaderError(f"{where}: shape {shape} of {dtype} is {bits} bits, not a whole number of bytes")
        expected = bits // 8
        if expected != end - begin:
            raise HeaderError(
                f"{where}: shape {shape} of {dtype} needs {expected} bytes but the range holds {end - begin}"
            )
        tensors.append(TensorInfo(name, dtype, tuple(shape), data_start + begin, data_start + end))
    tensors.sort(key=lambda t: (t.start, t.end))
    pos = data_start
    prev: TensorInfo | None = None
    for t in tensors:
        if t.start < pos:
            assert prev is not None
            raise HeaderError(
                f"{path}: tensor {t.name!r} (bytes {t.start - data_start}-{t.end - data_start}) overlaps "
                f"tensor {prev.name!r} (bytes {prev.start - data_start}-{prev.end - data_start})"
            )
        if t.start > pos:
            raise HeaderError(f"{path}: {t.start - pos} bytes before tensor {t.name!r} belong to no tensor")
        pos = t.end
        prev = t
    if pos != file_size:
        last = f"the last tensor {prev.name!r}" if prev is not None else "the header (no tensor)"
        raise HeaderError(f"{path}: {file_size - pos} bytes after {last} belong to no tensor")
    return Header(path, data_start, file_size, metadata, tuple(tensors))
