"""The safetensors header parser treats its input as hostile (``lazyfs.loader.header``).

Every file here is crafted byte by byte: an 8-byte little-endian length, the JSON
header, the data region.  Each rule the parser enforces has a file that breaks it,
and the error must be a :class:`HeaderError` (a :class:`LoaderError`) whose message
names the file and, where one is at fault, the tensor.  ``load_file`` and
``safe_open`` raise the same error before reading any tensor byte.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import pytest
import safetensors
import safetensors.torch
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lazyfs.errors import LazyfsError
from lazyfs.loader import LoaderError, load_file, safe_open
from lazyfs.loader.errors import HeaderError
from lazyfs.loader.header import DTYPE_BITS, MAX_HEADER, parse_header
from lazyfs.loader.readers import PlainReader


def craft(path: Path, header: bytes | dict[str, Any] | list[Any], data: bytes = b"", length: int | None = None) -> Path:
    """Write ``length or len(header)``, the header (JSON-encoded unless bytes), then ``data``."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw) if length is None else length) + raw + data)
    return path


def tensor(dtype: str, shape: list[Any], begin: int, end: int) -> dict[str, Any]:
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


def header_of(path: Path) -> Any:
    reader = PlainReader(str(path))
    try:
        return reader.read_header()
    finally:
        reader.close()


def expect_error(path: Path, *fragments: str) -> HeaderError:
    """``read_header``, ``load_file`` and ``safe_open`` all refuse ``path`` with a message naming it."""
    with pytest.raises(HeaderError) as info:
        header_of(path)
    message = str(info.value)
    assert str(path) in message
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    with pytest.raises(HeaderError) as again:
        load_file(path)
    assert str(again.value) == message
    with pytest.raises(HeaderError):
        safe_open(path, framework="pt")
    return info.value


def test_header_error_is_a_loader_error() -> None:
    assert issubclass(HeaderError, LoaderError)
    assert issubclass(LoaderError, LazyfsError)


# --- valid files the parser must accept ------------------------------------------------------------------


def test_a_safetensors_file_parses_in_file_order(tmp_path: Path) -> None:
    tensors = {"b": torch.zeros(3, 4), "a": torch.ones(2, dtype=torch.float16), "s": torch.tensor(7)}
    p = tmp_path / "ok.safetensors"
    safetensors.torch.save_file(tensors, p, metadata={"format": "pt"})
    h = header_of(p)
    assert h.metadata == {"format": "pt"}
    assert sorted(h.names) == ["a", "b", "s"]
    assert [t.start for t in h.tensors] == sorted(t.start for t in h.tensors)
    assert h.tensor("b").shape == (3, 4) and h.tensor("b").nbytes == 48
    assert h.tensor("s").shape == () and h.tensor("s").dtype == "I64"
    assert h.tensors[-1].end == h.file_size


def test_empty_header_and_zero_size_tensors(tmp_path: Path) -> None:
    assert header_of(craft(tmp_path / "empty", {})).tensors == ()
    p = craft(
        tmp_path / "zeros",
        {"z1": tensor("F32", [0, 5], 0, 0), "x": tensor("U8", [2], 0, 2), "z2": tensor("BF16", [3, 0], 2, 2)},
        b"ab",
    )
    h = header_of(p)
    assert {t.name: t.nbytes for t in h.tensors} == {"z1": 0, "x": 2, "z2": 0}


def test_header_padding_and_metadata_only(tmp_path: Path) -> None:
    p = craft(tmp_path / "pad", b'{"__metadata__": {"k": "v"}}' + b" " * 5)
    h = header_of(p)
    assert h.metadata == {"k": "v"} and h.tensors == ()


def test_sub_byte_dtypes_count_bits(tmp_path: Path) -> None:
    # F4: 4 bits per element, so [3, 4] is 6 bytes; F6: 6 bits, so [4] is 3 bytes.
    p = craft(tmp_path / "f4", {"q": tensor("F4", [3, 4], 0, 6), "r": tensor("F6_E2M3", [4], 6, 9)}, bytes(9))
    assert [t.nbytes for t in header_of(p).tensors] == [6, 3]
    bad = craft(tmp_path / "f4-odd", {"q": tensor("F4", [3], 0, 2)}, bytes(2))
    expect_error(bad, "'q'", "12 bits")


# --- every rule, broken ---------------------------------------------------------------------------------


def test_too_short_for_a_length(tmp_path: Path) -> None:
    p = tmp_path / "short"
    p.write_bytes(b"\x01\x02\x03")
    expect_error(p, "too short")


def test_header_length_limit(tmp_path: Path) -> None:
    # The length is checked before anything is allocated: 2**63 must not try to read 8 EiB.
    expect_error(craft(tmp_path / "huge", b"{}", length=2**63), "limit")
    expect_error(craft(tmp_path / "limit", b"{}", length=MAX_HEADER + 1), "limit")


def test_header_length_past_the_end(tmp_path: Path) -> None:
    expect_error(craft(tmp_path / "past", b"{}", length=1000), "past the end")


@pytest.mark.parametrize(
    ("raw", "fragment"),
    [
        (b"\xff\xfe{}", "not valid JSON"),  # not UTF-8
        (b'{"a": ', "not valid JSON"),
        (b"", "not valid JSON"),
        (b"[1, 2]", "not a JSON object"),
        (b'"text"', "not a JSON object"),
        (b'{"a": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}, "a": {}}', "duplicate key 'a'"),
    ],
)
def test_not_a_json_object(tmp_path: Path, raw: bytes, fragment: str) -> None:
    expect_error(craft(tmp_path / "bad", raw, b"x"), fragment)


@pytest.mark.parametrize(
    "metadata",
    [["a"], {"k": 1}, {"k": None}, "text", {"k": {"nested": "x"}}],
)
def test_metadata_must_map_strings_to_strings(tmp_path: Path, metadata: Any) -> None:
    expect_error(craft(tmp_path / "meta", {"__metadata__": metadata}), "__metadata__")


@pytest.mark.parametrize("dtype", ["F128", "f32", "", None, 4, ["F32"], "Q4_K"])
def test_unknown_dtype(tmp_path: Path, dtype: Any) -> None:
    p = craft(tmp_path / "dtype", {"w": {"dtype": dtype, "shape": [1], "data_offsets": [0, 4]}}, bytes(4))
    expect_error(p, "'w'", "dtype")


@pytest.mark.parametrize(
    "info",
    [
        {"dtype": "F32", "shape": [1]},  # no data_offsets
        {"dtype": "F32", "data_offsets": [0, 4]},  # no shape
        {"shape": [1], "data_offsets": [0, 4]},  # no dtype
        {"dtype": "F32", "shape": [1], "data_offsets": [0, 4], "extra": 1},
        "F32",
        [0, 4],
    ],
)
def test_tensor_entry_fields(tmp_path: Path, info: Any) -> None:
    expect_error(craft(tmp_path / "fields", {"w": info}, bytes(4)), "'w'", "dtype, shape and data_offsets")


@pytest.mark.parametrize(
    "shape",
    [[-1], [1.0], [True], ["1"], [None], 4, "4", [[2, 2]], [1] * 65, [2**63], [2**64 + 4]],
)
def test_bad_shapes(tmp_path: Path, shape: Any) -> None:
    expect_error(craft(tmp_path / "shape", {"w": tensor("U8", shape, 0, 4)}, bytes(4)), "'w'", "shape")


@pytest.mark.parametrize(
    ("offsets", "fragment"),
    [
        ([0], "data_offsets"),
        ([0, 4, 8], "data_offsets"),
        ([0.0, 4], "data_offsets"),
        ([False, 4], "data_offsets"),
        ("0-4", "data_offsets"),
        ([-4, 0], "outside"),
        ([4, 0], "outside"),  # begin after end
        ([0, 8], "outside"),  # past the data region
        ([2**70, 2**70 + 4], "outside"),
    ],
)
def test_bad_offsets(tmp_path: Path, offsets: Any, fragment: str) -> None:
    p = craft(tmp_path / "offs", {"w": {"dtype": "U8", "shape": [4], "data_offsets": offsets}}, bytes(4))
    expect_error(p, "'w'", fragment)


@pytest.mark.parametrize(
    ("dtype", "shape", "nbytes"),
    [("F32", [2, 2], 8), ("BF16", [3], 8), ("U8", [], 2), ("F64", [0], 8), ("C64", [1], 4), ("BOOL", [5], 4)],
)
def test_shape_times_dtype_must_equal_the_range(tmp_path: Path, dtype: str, shape: list[int], nbytes: int) -> None:
    p = craft(tmp_path / "size", {"w": tensor(dtype, shape, 0, nbytes)}, bytes(nbytes))
    expect_error(p, "'w'", "needs", f"holds {nbytes}")


def test_overlapping_tensors_are_named(tmp_path: Path) -> None:
    p = craft(tmp_path / "overlap", {"a": tensor("U8", [8], 0, 8), "b": tensor("U8", [4], 6, 10)}, bytes(10))
    expect_error(p, "'a'", "'b'", "overlaps")
    # The same range twice is an overlap too (two names for one buffer).
    p = craft(tmp_path / "alias", {"a": tensor("U8", [4], 0, 4), "b": tensor("U8", [4], 0, 4)}, bytes(4))
    expect_error(p, "overlaps")
    # A zero-size tensor inside another one's bytes (safetensors refuses it as well).
    p = craft(tmp_path / "inside", {"a": tensor("U8", [8], 0, 8), "z": tensor("U8", [0], 4, 4)}, bytes(8))
    expect_error(p, "'z'", "overlaps")


def test_gap_before_a_tensor_is_named(tmp_path: Path) -> None:
    p = craft(tmp_path / "gap", {"a": tensor("U8", [4], 0, 4), "b": tensor("U8", [4], 6, 10)}, bytes(10))
    expect_error(p, "2 bytes before tensor 'b'")
    p = craft(tmp_path / "lead", {"a": tensor("U8", [4], 3, 7)}, bytes(7))
    expect_error(p, "3 bytes before tensor 'a'")


def test_bytes_after_the_last_tensor(tmp_path: Path) -> None:
    p = craft(tmp_path / "tail", {"a": tensor("U8", [4], 0, 4)}, bytes(9))
    expect_error(p, "5 bytes after the last tensor 'a'")
    expect_error(craft(tmp_path / "tail0", {}, b"junk"), "4 bytes after")


def test_a_truncated_file_is_refused_before_reading(tmp_path: Path) -> None:
    good = tmp_path / "good.safetensors"
    safetensors.torch.save_file({"a": torch.zeros(100), "b": torch.ones(100)}, good)
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(good.read_bytes()[:-10])
    expect_error(cut, "'b'", "outside")


def test_parse_header_directly() -> None:
    raw = b'{"x": {"dtype": "I32", "shape": [2], "data_offsets": [0, 8]}}'
    h = parse_header("mem", raw, 8 + len(raw) + 8)
    assert h.data_start == 8 + len(raw) and h.tensor("x").start == h.data_start
    with pytest.raises(KeyError):
        h.tensor("y")


# --- fuzzing: whatever the bytes, HeaderError or a consistent header ------------------------------------------


def _valid_file() -> bytes:
    header = {
        "__metadata__": {"format": "pt"},
        "a": tensor("F32", [2, 3], 0, 24),
        "b": tensor("BF16", [4], 24, 32),
        "c": tensor("U8", [0], 32, 32),
        "d": tensor("I64", [], 32, 40),
    }
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + bytes(range(40))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzzed_headers_fail_cleanly(tmp_path: Path, data: st.DataObject) -> None:
    blob = bytearray(_valid_file())
    for _ in range(data.draw(st.integers(1, 4))):
        pos = data.draw(st.integers(0, len(blob) - 1))
        op = data.draw(st.sampled_from(["flip", "insert", "delete"]))
        if op == "flip":
            blob[pos] = data.draw(st.integers(0, 255))
        elif op == "insert":
            blob[pos:pos] = data.draw(st.binary(min_size=1, max_size=4))
        elif len(blob) > 1:
            del blob[pos]
    p = tmp_path / "fuzz.safetensors"
    p.write_bytes(bytes(blob))
    try:
        h = header_of(p)
    except HeaderError as exc:
        assert str(p) in str(exc)
        return
    # Accepted: then it is a real safetensors file that tiles the data region exactly.
    pos = h.data_start
    for t in h.tensors:
        assert t.start == pos and t.dtype in DTYPE_BITS
        pos = t.end
    assert pos == h.file_size == len(blob)
