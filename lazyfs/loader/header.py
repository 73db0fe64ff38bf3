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
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from typing import Any

from lazyfs.errors import LazyfsError

__all__ = ["DTYPE_SIZES", "MAX_HEADER", "Header", "HeaderError", "TensorInfo", "parse_header", "read_header"]

# Item sizes of every dtype safetensors defines.
DTYPE_SIZES = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E5M2": 1,
    "F8_E4M3": 1,
    "F8_E5M2FNUZ": 1,
    "F8_E4M3FNUZ": 1,
    "F8_E8M0": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "C64": 8,
    "F64": 8,
    "I64": 8,
    "U64": 8,
}
# The same bound safetensors itself applies: a header is metadata, not data.
MAX_HEADER = 100 * 1024 * 1024
MAX_RANK = 64


class HeaderError(LazyfsError):
    """A safetensors file whose header is malformed or inconsistent."""


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

    def tensor(self, name: str) -> TensorInfo:
        for t in self.tensors:
            if t.name == name:
                return t
        raise KeyError(name)

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
    size = os.fstat(fd).st_size
    if size < 8:
        raise HeaderError(f"{path}: not a safetensors file ({size} bytes, too short for a header)")
    (n,) = struct.unpack("<Q", os.pread(fd, 8, 0))
    if n > MAX_HEADER:
        raise HeaderError(f"{path}: header of {n} bytes exceeds the {MAX_HEADER} byte limit")
    if 8 + n > size:
        raise HeaderError(f"{path}: header length {n} runs past the end of the {size}-byte file")
    raw = os.pread(fd, n, 8)
    if len(raw) != n:
        raise HeaderError(f"{path}: file shrank while reading the header")
    return parse_header(path, raw, size)


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
        if not isinstance(dtype, str) or dtype not in DTYPE_SIZES:
            raise HeaderError(f"{where}: unknown dtype {dtype!r}")
        shape = info["shape"]
        if (
            not isinstance(shape, list)
            or len(shape) > MAX_RANK
            or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)
        ):
            raise HeaderError(f"{where}: shape must be a list of non-negative integers")
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
        expected = math.prod(shape) * DTYPE_SIZES[dtype]
        if expected != end - begin:
            raise HeaderError(
                f"{where}: shape {shape} of {dtype} needs {expected} bytes but the range holds {end - begin}"
            )
        tensors.append(TensorInfo(name, dtype, tuple(shape), data_start + begin, data_start + end))
    tensors.sort(key=lambda t: (t.start, t.end))
    pos = data_start
    for t in tensors:
        if t.start < pos:
            raise HeaderError(f"{path}: tensor {t.name!r} overlaps the tensor before it")
        if t.start > pos:
            raise HeaderError(f"{path}: {t.start - pos} bytes before tensor {t.name!r} belong to no tensor")
        pos = t.end
    if pos != file_size:
        raise HeaderError(f"{path}: {file_size - pos} bytes after the last tensor belong to no tensor")
    return Header(path, data_start, file_size, metadata, tuple(tensors))
