"""Hostile images: every bad entry or blob gives one clear line naming the layer and the entry, and
nothing is published (no manifest, no ref) — the spool is cleaned up too (the ``spool_dir`` fixture).
"""

from __future__ import annotations

import gzip
import json
import tarfile
from collections.abc import Callable
from pathlib import Path

import pytest

from lazyfs.errors import IntegrityError, LazyfsError, SeedError
from lazyfs.image import ImageLimits, ImageOptions
from lazyfs.testing import MemoryOrigin
from tests.image.conftest import assert_nothing_published, seed
from tests.image.imagebuild import (
    BuiltImage,
    Layer,
    build_image,
    compress,
    sha256,
    write_docker_archive,
    write_layout,
)


def raw(name: str, kind: bytes = tarfile.REGTYPE, *, linkname: str = "", size: int = 0,
        pax: dict[str, str] | None = None) -> tuple[tarfile.TarInfo, bytes | None]:
    ti = tarfile.TarInfo(name)
    ti.type = kind
    ti.linkname = linkname
    ti.size = size
    ti.pax_headers = pax or {}
    return ti, (b"x" * size if kind == tarfile.REGTYPE else None)


def layer_of(*items: tuple[tarfile.TarInfo, bytes | None]) -> Layer:
    layer = Layer()
    layer.items.extend(items)
    return layer


BASE = Layer().dir("etc").file("etc/passwd", b"root:x:0:0\n").symlink("escape", "../../..").symlink("abs", "/etc")

# name -> (top layer, fragment of the message)
CASES: dict[str, tuple[Layer, str]] = {
    "dotdot": (layer_of(raw("../outside")), "'..' component"),
    "dotdot-inside": (layer_of(raw("etc/../../outside")), "'..' component"),
    "absolute": (layer_of(raw("/etc/shadow")), "absolute path"),
    "dot-component": (layer_of(raw("etc/./x")), "empty or '.' component"),
    "empty-component": (Layer().file("etc//x", b"x"), "empty or '.' component"),
    "nul-in-name": (layer_of(raw("ok", pax={"path": "evil\x00name"})), "NUL byte"),
    "long-component": (Layer().file("a" * 256, b"x"), "over NAME_MAX"),
    "long-path": (Layer().file("/".join(["d" * 200] * 21), b"x"), "over PATH_MAX"),
    "through-relative-symlink": (Layer().file("escape/etc/cron.d/evil", b"x"), "its parent 'escape' is a symlink"),
    "through-absolute-symlink": (Layer().file("abs/shadow", b"x"), "its parent 'abs' is a symlink"),
    "symlink-then-write-same-layer": (Layer().symlink("l", "/").file("l/etc/evil", b"x"), "'l' is a symlink"),
    "whiteout-through-symlink": (Layer().whiteout("abs/passwd"), "its parent 'abs' is a symlink"),
    "parent-is-a-file": (Layer().file("etc/passwd/x", b"x"), "its parent 'etc/passwd' is not a directory"),
    "hardlink-missing": (Layer().hardlink("h", "etc/nothing"), "'etc/nothing' does not exist"),
    "hardlink-later-entry": (Layer().hardlink("h", "later").file("later", b"x"), "'later' does not exist"),
    "hardlink-escaping": (Layer().hardlink("h", "../../etc/shadow"), "'..' component"),
    "hardlink-absolute": (Layer().hardlink("h", "/etc/shadow"), "absolute path"),
    "hardlink-through-symlink": (Layer().hardlink("h", "abs/shadow"), "'abs' is a symlink"),
    "hardlink-to-dir": (Layer().hardlink("h", "etc"), "a hardlink to the directory 'etc'"),
    "hardlink-to-itself": (Layer().hardlink("etc/passwd", "etc/passwd"), "a hardlink to itself"),
    "hardlink-to-root": (Layer().hardlink("h", "./"), "a hardlink to the root"),
    "whiteout-dotdot": (Layer().file(".wh...", b""), "a whiteout of '..'"),
    "whiteout-dot": (Layer().file("etc/.wh..", b""), "a whiteout of '.'"),
    "whiteout-empty": (Layer().file("etc/.wh.", b""), "a whiteout of ''"),
    "root-as-file": (layer_of(raw(".", tarfile.REGTYPE)), "the root of a layer must be a directory"),
    "file-with-slash": (layer_of(raw("etc/file/", tarfile.SYMTYPE, linkname="x")), "ending with '/'"),
    "unsupported-type": (layer_of(raw("weird", b"V")), "unsupported tar entry type"),
    "empty-symlink": (layer_of(raw("s", tarfile.SYMTYPE, linkname="")), "a symlink needs a target"),
    "bad-pax-mtime": (layer_of(raw("t", pax={"mtime": "soon"})), "bad PAX mtime"),
    "too-many-xattrs": (
        layer_of(raw("x", pax={f"SCHILY.xattr.user.{i}": "v" for i in range(300)})), "xattrs, over 256"
    ),
    "huge-xattr": (layer_of(raw("x", pax={"SCHILY.xattr.user.big": "v" * 70000})), "over 65536"),
    "huge-size-field": (layer_of(raw("big", pax={"size": str(1 << 50)})), "over the limit of"),
}


@pytest.mark.parametrize("case", sorted(CASES))
async def test_hostile_entry_is_refused_and_nothing_published(
    tmp_path: Path, options: ImageOptions, case: str
) -> None:
    top, fragment = CASES[case]
    if case == "huge-size-field":
        img = build_image([BASE, Layer()])
        tar = _huge_size_tar()
        img = _replace_layer(img, 1, tar)
    else:
        img = build_image([BASE, top])
    layout = write_layout(tmp_path / "layout", img)
    origin = MemoryOrigin()
    with pytest.raises(SeedError) as info:
        await seed(f"oci:{layout}", origin, options)
    msg = str(info.value)
    assert "\n" not in msg
    assert msg.startswith(f"layer 2/2 {img.layer_digests[1][:19]}: entry "), msg
    assert fragment in msg, msg
    await assert_nothing_published(origin)


def _huge_size_tar() -> bytes:
    """A member whose PAX size says 1 PiB followed by a few bytes: refused before reading."""
    ti = tarfile.TarInfo("big")
    ti.size = 3
    ti.pax_headers = {"size": str(1 << 50)}
    data = bytearray(ti.tobuf(tarfile.PAX_FORMAT))
    return bytes(data) + b"abc".ljust(512, b"\0") + b"\0" * 1024


def _replace_layer(img: BuiltImage, index: int, tar: bytes, kind: str = "gzip") -> BuiltImage:
    stored = compress(tar, kind)
    cfg = json.loads(img.config)
    cfg["rootfs"]["diff_ids"][index] = sha256(tar)
    config = json.dumps(cfg).encode()
    manifest = json.loads(img.manifest)
    manifest["config"].update(digest=sha256(config), size=len(config))
    manifest["layers"][index].update(digest=sha256(stored), size=len(stored))
    mbytes = json.dumps(manifest).encode()
    blobs = dict(img.blobs)
    blobs.update({sha256(stored): stored, sha256(config): config, sha256(mbytes): mbytes})
    tars = list(img.tars)
    tars[index] = tar
    digests = list(img.layer_digests)
    digests[index] = sha256(stored)
    diff_ids = list(img.diff_ids)
    diff_ids[index] = sha256(tar)
    return BuiltImage(mbytes, sha256(mbytes), config, blobs, digests, diff_ids, tars)


def _truncated_member_tar() -> bytes:
    ti = tarfile.TarInfo("etc/big")
    ti.size = 10_000
    return ti.tobuf(tarfile.PAX_FORMAT) + b"y" * 700  # the data stops early; no end-of-archive


def _corrupt(path: Path, offset: int = 100) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


async def test_size_field_past_the_end_of_the_stream(tmp_path: Path, options: ImageOptions) -> None:
    tar = _truncated_member_tar()
    img = _replace_layer(build_image([BASE, Layer()]), 1, tar)
    layout = write_layout(tmp_path / "layout", img)
    origin = MemoryOrigin()
    with pytest.raises(SeedError, match=r"^layer 2/2 sha256:[0-9a-f]{12}: entry 'etc/big': the layer ends inside"):
        await seed(f"oci:{layout}", origin, options)
    await assert_nothing_published(origin)


async def test_size_over_a_configured_limit(tmp_path: Path, spool_dir: Path) -> None:
    layout = write_layout(tmp_path / "l", build_image([Layer().file("f", b"x" * 2000)]))
    opts = ImageOptions(spool_dir=str(spool_dir), limits=ImageLimits(max_file_size=1000))
    with pytest.raises(SeedError, match=r"entry 'f': its size field says 2000 bytes, over the limit of 1000"):
        await seed(f"oci:{layout}", MemoryOrigin(), opts)


async def test_too_many_entries(tmp_path: Path, spool_dir: Path) -> None:
    layer = Layer()
    for i in range(20):
        layer.file(f"f{i}", b"")
    layout = write_layout(tmp_path / "l", build_image([layer]))
    opts = ImageOptions(spool_dir=str(spool_dir), limits=ImageLimits(max_entries=10))
    with pytest.raises(SeedError, match=r"more than 10 entries"):
        await seed(f"oci:{layout}", MemoryOrigin(), opts)


def _blob_path(layout: Path, digest: str) -> Path:
    return layout / "blobs" / "sha256" / digest.split(":")[1]


BlobBreaker = Callable[[Path, str], None]


def _flip(layout: Path, digest: str) -> None:
    _corrupt(_blob_path(layout, digest), 40)


def _truncate(layout: Path, digest: str) -> None:
    p = _blob_path(layout, digest)
    p.write_bytes(p.read_bytes()[:-10])


def _append(layout: Path, digest: str) -> None:
    p = _blob_path(layout, digest)
    p.write_bytes(p.read_bytes() + b"more")


@pytest.mark.parametrize(("breaker", "fragment", "error"), [
    (_flip, r"(corrupt compressed data|blob: content is sha256:)", LazyfsError),
    (_truncate, r"(corrupt compressed data|blob: \d+ bytes, but its descriptor says \d+ \(truncated\?\))", LazyfsError),
    (_append, r"blob: longer than the \d+ bytes its descriptor says", IntegrityError),
])
async def test_a_damaged_blob_is_refused(
    tmp_path: Path, options: ImageOptions, breaker: BlobBreaker, fragment: str, error: type[Exception]
) -> None:
    img = build_image([BASE, Layer().file("etc/x", b"x" * 50_000)])
    layout = write_layout(tmp_path / "layout", img)
    breaker(layout, img.layer_digests[1])
    origin = MemoryOrigin()
    with pytest.raises(error, match=r"^layer 2/2 sha256:[0-9a-f]{12}: " + fragment):
        await seed(f"oci:{layout}", origin, options)
    await assert_nothing_published(origin)


async def test_a_blob_that_matches_its_digest_but_not_its_diff_id(tmp_path: Path, options: ImageOptions) -> None:
    img = build_image([BASE, Layer().file("etc/x", b"x")])
    other = Layer().file("etc/x", b"y").tar()
    stored = gzip.compress(other, mtime=0)
    manifest = json.loads(img.manifest)
    manifest["layers"][1].update(digest=sha256(stored), size=len(stored))
    img.blobs[sha256(stored)] = stored
    img.manifest = json.dumps(manifest).encode()
    img.manifest_digest = sha256(img.manifest)
    img.blobs[img.manifest_digest] = img.manifest
    layout = write_layout(tmp_path / "layout", img)
    origin = MemoryOrigin()
    with pytest.raises(IntegrityError, match=r"layer 2/2 sha256:[0-9a-f]{12}: uncompressed content: content is"):
        await seed(f"oci:{layout}", origin, options)
    await assert_nothing_published(origin)


async def test_docker_archive_layer_not_matching_its_diff_id(tmp_path: Path, options: ImageOptions) -> None:
    img = build_image([BASE, Layer().file("etc/x", b"x")])
    cfg = json.loads(img.config)
    cfg["rootfs"]["diff_ids"][1] = sha256(b"something else")
    img.config = json.dumps(cfg).encode()
    archive = write_docker_archive(tmp_path / "a.tar", img)
    origin = MemoryOrigin()
    with pytest.raises(IntegrityError, match=r"^layer 2/2 sha256:[0-9a-f]{12}: uncompressed content"):
        await seed(f"docker-archive:{archive}", origin, options)
    await assert_nothing_published(origin)


@pytest.mark.parametrize(("mutate", "fragment"), [
    (lambda m: m["layers"][0].update(mediaType="application/vnd.oci.image.layer.v1.tar+bzip2"),
     "not a layer type lazyfs reads"),
    (lambda m: m["layers"][0].update(mediaType="application/vnd.oci.image.layer.v1.tar+gzip+encrypted"),
     "encrypted layers are not supported"),
    (lambda m: m["layers"][0].update(mediaType="application/vnd.oci.image.layer.v1.tar+zstd"),
     "says zstd, but the data is not zstd"),
    (lambda m: m.update(schemaVersion=1), "schema 1"),
    (lambda m: m["layers"][0].update(digest="md5:abc"), "malformed digest"),
    (lambda m: m["layers"].append(m["layers"][0]), "2 layers"),
])
async def test_bad_manifests(tmp_path: Path, options: ImageOptions, mutate: Callable[[dict[str, object]], None],
                             fragment: str) -> None:
    img = build_image([Layer().file("f", b"f")])
    manifest = json.loads(img.manifest)
    mutate(manifest)
    img.manifest = json.dumps(manifest).encode()
    img.manifest_digest = sha256(img.manifest)
    img.blobs[img.manifest_digest] = img.manifest
    layout = write_layout(tmp_path / "layout", img)
    origin = MemoryOrigin()
    with pytest.raises(SeedError, match=fragment):
        await seed(f"oci:{layout}", origin, options)
    await assert_nothing_published(origin)


async def test_oversized_manifest_and_config(tmp_path: Path, spool_dir: Path) -> None:
    img = build_image([Layer().file("f", b"f")], config={"Env": ["X=" + "y" * 5000]})
    layout = write_layout(tmp_path / "layout", img)
    small = ImageLimits(max_config_bytes=4096)
    with pytest.raises(SeedError, match=r"config: \d+ bytes, over the 4096 byte limit"):
        await seed(f"oci:{layout}", MemoryOrigin(), ImageOptions(spool_dir=str(spool_dir), limits=small))
    with pytest.raises(SeedError, match=r"over the 100 byte limit"):
        await seed(f"oci:{layout}", MemoryOrigin(),
                   ImageOptions(spool_dir=str(spool_dir), limits=ImageLimits(max_manifest_bytes=100)))


async def test_a_manifest_that_does_not_match_its_digest(tmp_path: Path, options: ImageOptions) -> None:
    img = build_image([Layer().file("f", b"f")])
    layout = write_layout(tmp_path / "layout", img)
    p = _blob_path(layout, img.manifest_digest)
    p.write_bytes(p.read_bytes().replace(b'"schemaVersion": 2', b'"schemaVersion":  2')[:-1] + b"}")
    with pytest.raises(IntegrityError):
        await seed(f"oci:{layout}", MemoryOrigin(), options)


async def test_layout_errors(tmp_path: Path, options: ImageOptions) -> None:
    img = build_image([Layer().file("f", b"f")])
    layout = write_layout(tmp_path / "layout", {"a": img, "b": img})
    with pytest.raises(SeedError, match=r"holds 2 images; name one as oci:DIR:TAG \(tags: a, b\)"):
        await seed(f"oci:{layout}", MemoryOrigin(), options)
    with pytest.raises(SeedError, match=r"no image tagged 'c' \(tags: a, b\)"):
        await seed(f"oci:{layout}:c", MemoryOrigin(), options)
    (tmp_path / "empty").mkdir()
    with pytest.raises(SeedError, match="no oci-layout file"):
        await seed(f"oci:{tmp_path / 'empty'}", MemoryOrigin(), options)
    _blob_path(layout, img.layer_digests[0]).unlink()
    with pytest.raises(SeedError, match=r"blob sha256:[0-9a-f]{12}\.\.\. is missing"):
        await seed(f"oci:{layout}:a", MemoryOrigin(), options)
    bad = tmp_path / "bad.tar"
    bad.write_bytes(b"not a tar at all" * 100)
    with pytest.raises(SeedError, match=r"not a .*tar archive"):
        await seed(f"docker-archive:{bad}", MemoryOrigin(), options)
