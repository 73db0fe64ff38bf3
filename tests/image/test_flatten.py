"""Flattening synthetic images: OCI whiteout rules, hardlinks across layers, metadata, compressions, sources.

Images are built in Python (:mod:`tests.image.imagebuild`), seeded to a memory origin
and checked entry by entry; file bytes are read back through the manifest (verified).
"""

from __future__ import annotations

import io
import json
import os
import stat
import tarfile
from pathlib import Path

import pytest
import zstandard

from lazyfs.errors import SeedError
from lazyfs.image import CONFIG_ANNOTATION, ImageConfig, ImageOptions, Platform
from lazyfs.image.layers import SMALL_FILE, LayerTree
from lazyfs.image.source import LayerRef
from lazyfs.manifest import Entry, EntryType, Manifest
from lazyfs.testing import MemoryOrigin
from tests.helpers import random_bytes, read_file
from tests.image.conftest import seed
from tests.image.imagebuild import (
    Layer,
    build_image,
    compress,
    sha256,
    write_docker_archive,
    write_layout,
    write_oci_archive,
)


def entry(m: Manifest, path: str) -> Entry:
    e = m.entry(path.encode())
    assert e is not None, f"{path} missing; have {[x.path for x in m.entries]}"
    return e


def paths(m: Manifest) -> set[str]:
    return {e.path.decode("utf-8", "surrogateescape") for e in m.entries}


async def flatten(tmp_path: Path, layers: list[Layer], options: ImageOptions,
                  origin: MemoryOrigin | None = None) -> tuple[Manifest, MemoryOrigin]:
    origin = origin or MemoryOrigin()
    layout = write_layout(tmp_path / f"layout{len(os.listdir(tmp_path))}", build_image(layers))
    out = await seed(f"oci:{layout}", origin, options)
    return out.result.manifest, origin


# --- whiteouts, opaque directories, replacement -----------------------------------------------


async def test_whiteouts_remove_lower_entries_and_everything_below(tmp_path: Path, options: ImageOptions) -> None:
    base = (Layer().dir("etc").file("etc/issue", b"Debian\n").file("etc/keep", b"k")
            .dir("opt/tool/lib").file("opt/tool/lib/x.so", b"\x7fELF").file("opt/tool/bin", b"#!")
            .file("becomes-dir", b"f").dir("becomes-file").file("becomes-file/inner", b"i"))
    top = (Layer().whiteout("etc/issue").whiteout("opt/tool").whiteout("etc/never-existed")
           .dir("becomes-dir").file("becomes-dir/child", b"c").file("becomes-file", b"now a file"))
    m, origin = await flatten(tmp_path, [base, top], options)
    assert paths(m) == {"", "etc", "etc/keep", "opt", "becomes-dir", "becomes-dir/child", "becomes-file"}
    assert entry(m, "becomes-dir").type is EntryType.DIR
    assert await read_file(origin, m, b"becomes-file") == b"now a file"
    assert not any(b".wh." in e.path for e in m.entries)


async def test_a_whiteout_never_hides_an_entry_of_its_own_layer(tmp_path: Path, options: ImageOptions) -> None:
    base = Layer().dir("d").file("d/old", b"o").file("f", b"lower")
    # Same layer: the new f and d stay; the whiteout still hides what the lower d held.
    top = Layer().file("f", b"upper").whiteout("f").dir("d").file("d/new", b"n").whiteout("d")
    m, origin = await flatten(tmp_path, [base, top], options)
    assert paths(m) == {"", "d", "d/new", "f"}
    assert await read_file(origin, m, b"f") == b"upper"


@pytest.mark.parametrize("marker_first", [True, False])
async def test_opaque_directory_drops_lower_contents_keeps_its_own(
    tmp_path: Path, options: ImageOptions, marker_first: bool
) -> None:
    base = (Layer().dir("d").file("d/a", b"a").dir("d/sub").file("d/sub/b", b"b").dir("d/sub/deep")
            .file("d/sub/deep/c", b"c").file("outside", b"o"))
    top = Layer().dir("d", mode=0o700)
    if marker_first:
        top.opaque("d")
    top.file("d/new", b"n").dir("d/sub").file("d/sub/mine", b"m")
    if not marker_first:
        top.opaque("d")
    m, origin = await flatten(tmp_path, [base, top], options)
    assert paths(m) == {"", "d", "d/new", "d/sub", "d/sub/mine", "outside"}
    assert entry(m, "d").mode == 0o700
    assert await read_file(origin, m, b"d/sub/mine") == b"m"


async def test_later_entries_replace_earlier_ones(tmp_path: Path, options: ImageOptions) -> None:
    base = Layer().dir("d", mode=0o700, uid=5).file("d/keep", b"k").file("f", b"one").symlink("l", "a")
    top = (Layer().dir("d", mode=0o751, uid=7).file("f", b"two", mode=0o600).symlink("l", "b")
           .file("f", b"three", mode=0o640))  # a duplicate in one layer: the last wins
    m, origin = await flatten(tmp_path, [base, top], options)
    d = entry(m, "d")
    assert (d.mode, d.uid) == (0o751, 7)
    assert entry(m, "d/keep").type is EntryType.REG  # a directory over a directory keeps its contents
    assert await read_file(origin, m, b"f") == b"three" and entry(m, "f").mode == 0o640
    assert entry(m, "l").target == b"b"


async def test_missing_parents_are_created_like_runtimes_do(tmp_path: Path, options: ImageOptions) -> None:
    m, _ = await flatten(tmp_path, [Layer().file("a/b/c/file", b"x", uid=9)], options)
    for p in ("a", "a/b", "a/b/c"):
        e = entry(m, p)
        assert (e.type, e.mode, e.uid, e.gid, e.mtime_ns) == (EntryType.DIR, 0o755, 0, 0, 0)
    assert entry(m, "a/b/c/file").uid == 9


async def test_root_metadata_from_a_dot_entry(tmp_path: Path, options: ImageOptions) -> None:
    m, _ = await flatten(tmp_path, [Layer().dir("./", mode=0o750, uid=1).file("./x", b"x")], options)
    root = entry(m, "")
    assert (root.mode, root.uid) == (0o750, 1)
    assert paths(m) == {"", "x"}


# --- hardlinks -------------------------------------------------------------------------------------


async def test_hardlink_to_a_lower_layer_file_survives_deletion_of_its_target(
    tmp_path: Path, options: ImageOptions
) -> None:
    data = random_bytes(200_000, 1)  # several chunks
    l1 = Layer().dir("usr/bin").file("usr/bin/z-target", data, mode=0o755, uid=3)
    l2 = Layer().hardlink("usr/bin/a-link", "usr/bin/z-target").hardlink("usr/m-link", "usr/bin/z-target")
    m, origin = await flatten(tmp_path, [l1, l2], options)
    # One inode, three names: the first in tree order holds the data, the others name it.
    primary = entry(m, "usr/bin/a-link")
    assert primary.type is EntryType.REG and (primary.mode, primary.uid, primary.size) == (0o755, 3, len(data))
    for other in ("usr/bin/z-target", "usr/m-link"):
        e = entry(m, other)
        assert e.type is EntryType.HARDLINK and e.target == b"usr/bin/a-link" and e.mode == 0o755
    assert await read_file(origin, m, b"usr/m-link") == data

    l3 = Layer().whiteout("usr/bin/z-target").whiteout("usr/bin/a-link")
    m, origin = await flatten(tmp_path, [l1, l2, l3], options)
    last = entry(m, "usr/m-link")
    assert last.type is EntryType.REG and last.size == len(data)
    assert paths(m) == {"", "usr", "usr/bin", "usr/m-link"}
    assert await read_file(origin, m, b"usr/m-link") == data


async def test_replacing_one_name_of_a_hardlinked_file_breaks_the_link(tmp_path: Path, options: ImageOptions) -> None:
    l1 = Layer().file("a", b"old").hardlink("b", "a").fifo("p").hardlink("q", "p")
    l2 = Layer().file("a", b"new")
    m, origin = await flatten(tmp_path, [l1, l2], options)
    assert entry(m, "a").type is EntryType.REG and entry(m, "b").type is EntryType.REG
    assert await read_file(origin, m, b"a") == b"new"
    assert await read_file(origin, m, b"b") == b"old"
    assert entry(m, "q").type is EntryType.HARDLINK and entry(m, "q").target == b"p"  # links to non-files too


async def test_relinking_an_existing_name_keeps_the_inode(tmp_path: Path, options: ImageOptions) -> None:
    l1 = Layer().file("a", b"data").hardlink("b", "a")
    l2 = Layer().hardlink("b", "a").hardlink("c", "./b")
    m, origin = await flatten(tmp_path, [l1, l2], options)
    assert [entry(m, p).type for p in ("a", "b", "c")] == [EntryType.REG, EntryType.HARDLINK, EntryType.HARDLINK]
    assert await read_file(origin, m, b"c") == b"data"


# --- metadata ------------------------------------------------------------------------------------


async def test_metadata_is_kept(tmp_path: Path, options: ImageOptions) -> None:
    cap = bytes([1, 0, 0, 2, 0x20, 0, 0, 0, 0, 0, 0, 0, 0xFF, 0xC3, 0xA9, 0x80, 0, 0, 0, 0])  # binary, non-UTF-8
    layer = (
        Layer()
        .file("bin/ping", b"\x7fELF ping", mode=0o4755, uid=0, gid=4294967294,
              xattrs={"security.capability": cap, "user.note": "é".encode()})
        .file("bin/wall", b"w", mode=0o2755, gid=5)
        .dir("tmp", mode=0o1777)
        .file("ns", b"n", pax={"mtime": "1700000000.123456789"})
        .file("old", b"o", pax={"mtime": "-1.5"})
        .file("whole", b"w", mtime=1234567890)
        .symlink("abs", "/usr/lib/../lib//x")
        .symlink("dangling", "../../nowhere")
        .device("dev/null", "c", 1, 3, mode=0o666)
        .device("dev/loop0", "b", 7, 0, mode=0o660, gid=6)
        .fifo("run/initctl", mode=0o600)
        .file("name with space\nand newline \udcff", b"odd")
    )
    layer.items.append(_libarchive_xattr())
    m, origin = await flatten(tmp_path, [layer], options)
    ping = entry(m, "bin/ping")
    assert (ping.mode, ping.uid, ping.gid) == (0o4755, 0, 4294967294)
    assert dict(ping.xattrs) == {b"security.capability": cap, b"user.note": "é".encode()}
    assert entry(m, "bin/wall").mode == 0o2755
    assert entry(m, "tmp").mode == 0o1777
    assert entry(m, "ns").mtime_ns == 1_700_000_000_123_456_789
    assert entry(m, "old").mtime_ns == -1_500_000_000
    assert entry(m, "whole").mtime_ns == 1234567890 * 10**9
    assert entry(m, "abs").target == b"/usr/lib/../lib//x" and entry(m, "abs").size == len(b"/usr/lib/../lib//x")
    assert entry(m, "dangling").target == b"../../nowhere"
    null = entry(m, "dev/null")
    assert null.type is EntryType.CHR and (os.major(null.rdev), os.minor(null.rdev)) == (1, 3)
    loop = entry(m, "dev/loop0")
    assert loop.type is EntryType.BLK and loop.rdev == os.makedev(7, 0) and loop.mode == 0o660
    assert entry(m, "run/initctl").type is EntryType.FIFO
    odd = m.entry(b"name with space\nand newline \xff")
    assert odd is not None and await read_file(origin, m, odd) == b"odd"
    assert dict(entry(m, "bsd").xattrs) == {b"user.from bsdtar": b"\x00\x01binary"}


def _libarchive_xattr() -> tuple[tarfile.TarInfo, bytes]:
    ti = tarfile.TarInfo("bsd")
    ti.size = 1
    ti.pax_headers = {"LIBARCHIVE.xattr.user.from%20bsdtar": "AAFiaW5hcnk"}  # base64 without padding
    return ti, b"b"


# --- compression and sources ------------------------------------------------------------------


def _layers(kinds: tuple[str, str, str]) -> list[Layer]:
    return [
        Layer(kinds[0]).dir("usr/lib").file("usr/lib/big", random_bytes(300_000, 2)).file("usr/lib/text", b"t" * 5000),
        Layer(kinds[1]).whiteout("usr/lib/text").file("etc/hosts", b"127.0.0.1 localhost\n"),
        Layer(kinds[2]).hardlink("usr/big-again", "usr/lib/big").device("dev/zero", "c", 1, 5),
    ]


async def test_gzip_zstd_and_plain_layers_give_one_tree(tmp_path: Path, options: ImageOptions) -> None:
    digests = set()
    for kinds in (("gzip", "zstd", ""), ("", "gzip", "zstd"), ("zstd", "", "gzip")):
        layout = write_layout(tmp_path / "-".join(k or "plain" for k in kinds), build_image(_layers(kinds)))
        out = await seed(f"oci:{layout}", MemoryOrigin(), options)
        digests.add(out.result.digest)
    assert len(digests) == 1  # compression is a transport detail: same tars, same manifest


async def test_multi_frame_zstd_and_mislabelled_plain_gzip(tmp_path: Path, options: ImageOptions) -> None:
    layers = _layers(("", "", ""))
    img = build_image(layers)
    # Re-store layer 1 as two zstd frames and layer 2 as gzip under a "plain" media type (containerd unpacks both).
    t0, t1 = img.tars[0], img.tars[1]
    z = zstandard.ZstdCompressor()
    frames = z.compress(t0[: len(t0) // 2]) + z.compress(t0[len(t0) // 2 :])
    gz = compress(t1, "gzip")
    manifest = json.loads(img.manifest)
    manifest["layers"][0].update(mediaType="application/vnd.oci.image.layer.v1.tar+zstd", digest=sha256(frames),
                                 size=len(frames))
    manifest["layers"][1].update(digest=sha256(gz), size=len(gz))
    img.blobs.update({sha256(frames): frames, sha256(gz): gz})
    img.manifest = json.dumps(manifest).encode()
    img.manifest_digest = sha256(img.manifest)
    img.blobs[img.manifest_digest] = img.manifest
    plain = write_layout(tmp_path / "plain", build_image(_layers(("", "", ""))))
    odd = write_layout(tmp_path / "odd", img)
    a = await seed(f"oci:{plain}", MemoryOrigin(), options)
    b = await seed(f"oci:{odd}", MemoryOrigin(), options)
    assert a.result.digest == b.result.digest


async def test_layout_docker_archive_and_oci_archive_agree(tmp_path: Path, options: ImageOptions) -> None:
    img = build_image(_layers(("gzip", "zstd", "")))
    layout = write_layout(tmp_path / "layout", img)
    legacy = write_docker_archive(tmp_path / "legacy.tar", img, ["example/app:v1"])
    oci_tar = write_oci_archive(tmp_path / "oci.tar", img, "v1")
    digests = {
        (await seed(src, MemoryOrigin(), options)).result.digest
        for src in (f"oci:{layout}", f"oci:{layout}:latest", f"docker-archive:{legacy}",
                    f"docker-archive:{legacy}:example/app:v1", f"docker-archive:{oci_tar}")
    }
    assert len(digests) == 1


async def test_docker_archive_with_a_deduplicated_layer_symlink(tmp_path: Path, options: ImageOptions) -> None:
    same = Layer("").file("f", b"same bytes")
    img = build_image([same, Layer("").file("g", b"g"), same])
    archive = write_docker_archive(tmp_path / "a.tar", img, dedup_symlink=True)
    with tarfile.open(archive) as tf:
        assert any(m.issym() for m in tf.getmembers())
    out = await seed(f"docker-archive:{archive}", MemoryOrigin(), options)
    assert paths(out.result.manifest) == {"", "f", "g"}


# --- the image config -------------------------------------------------------------------------


async def test_config_is_kept_canonical_and_readable(tmp_path: Path, options: ImageOptions) -> None:
    m, _ = await flatten(tmp_path, [Layer().file("bin/app", b"app", mode=0o755)], options)
    raw = dict(m.annotations)[CONFIG_ANNOTATION]
    assert raw == json.dumps(json.loads(raw), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    cfg = ImageConfig.from_manifest(m)
    assert cfg is not None
    assert cfg.entrypoint == ("/bin/app",) and cfg.cmd == ("--serve", "two words")
    assert cfg.argv() == ["/bin/app", "--serve", "two words"] and cfg.argv(["x"]) == ["/bin/app", "x"]
    assert cfg.environment()["LANG"] == "C.UTF-8"
    assert (cfg.working_dir, cfg.user, cfg.platform) == ("/srv", "1000:1000", "linux/amd64")
    assert cfg.summary_lines()[:4] == [
        "Platform: linux/amd64",
        'Entrypoint: ["/bin/app"]',
        'Cmd: ["--serve", "two words"]',
        "Env: PATH=/usr/local/bin:/usr/bin:/bin",
    ]


async def test_index_platform_selection(tmp_path: Path, spool_dir: Path) -> None:
    amd = build_image([Layer().file("arch", b"amd64")])
    arm = build_image([Layer().file("arch", b"arm64")])
    layout = write_layout(tmp_path / "multi", {"x": amd})
    for img in (amd, arm):
        for d, b in img.blobs.items():
            (layout / "blobs/sha256" / d.split(":")[1]).write_bytes(b)
    index = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json", "manifests": [
        {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": i.manifest_digest,
         "size": len(i.manifest), "platform": {"os": "linux", "architecture": a, **({"variant": "v8"} if a == "arm64"
                                                                                     else {})}}
        for i, a in ((amd, "amd64"), (arm, "arm64"))]}
    index_bytes = json.dumps(index).encode()
    (layout / "blobs/sha256" / sha256(index_bytes).split(":")[1]).write_bytes(index_bytes)
    (layout / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [
        {"mediaType": "application/vnd.oci.image.index.v1+json", "digest": sha256(index_bytes),
         "size": len(index_bytes), "annotations": {"org.opencontainers.image.ref.name": "multi"}}]}))
    for plat, expected in (("linux/amd64", b"amd64"), ("linux/arm64", b"arm64"), ("linux/arm64/v8", b"arm64")):
        origin = MemoryOrigin()
        out = await seed(f"oci:{layout}:multi", origin,
                         ImageOptions(spool_dir=str(spool_dir), platform=Platform.parse(plat)))
        assert await read_file(origin, out.result.manifest, b"arch") == expected
    with pytest.raises(SeedError, match=r"platform linux/s390x \(the index has: linux/amd64, linux/arm64/v8\)"):
        await seed(f"oci:{layout}:multi", MemoryOrigin(), ImageOptions(spool_dir=str(spool_dir),
                                                                        platform=Platform("linux", "s390x")))


# --- the spool -----------------------------------------------------------------------------------


def test_spool_files_go_with_the_last_name(tmp_path: Path) -> None:
    """Deleted and replaced files leave the spool as soon as their last name goes: a large file's
    own spool file at once, a shared segment of small files once none of them is named."""
    spool = tmp_path / "spool"
    spool.mkdir()
    tree = LayerTree(str(spool))
    big = SMALL_FILE + 1000
    layers = [
        Layer("").file("a", b"x" * big).hardlink("b", "a").file("c", b"y" * 10).dir("d").file("d/e", b"z" * 100),
        Layer("").whiteout("a").file("c", b"new").whiteout("d"),
        Layer("").whiteout("b"),
        Layer("").whiteout("c"),
    ]
    expected = [(big + 110, 2), (big + 3, 2), (3, 1), (0, 0)]  # (live bytes, spool files)
    for i, layer in enumerate(layers):
        tar = layer.tar()
        tree.apply(io.BytesIO(tar), LayerRef(i, len(layers), "", "", len(tar), "", sha256(tar)))
        if i == 2:
            tree.close()  # the segment is sealed: it may go once its last file does
        assert (tree.spooled_bytes, len(os.listdir(spool))) == expected[i], i
    for name in os.listdir(spool):
        assert stat.S_ISREG(os.lstat(spool / name).st_mode)


# --- dedup across images ----------------------------------------------------------------------------


async def test_a_second_image_on_the_same_base_uploads_only_its_new_bytes(
    tmp_path: Path, options: ImageOptions
) -> None:
    base = Layer().dir("usr/lib").file("usr/lib/libbig.so", random_bytes(700_000, 5)).file("etc/os", b"debian\n")
    new_a, new_b = random_bytes(90_000, 6), random_bytes(150_000, 7)
    origin = MemoryOrigin()
    first = await seed(f"oci:{write_layout(tmp_path / 'a', build_image([base, Layer().file('app/a', new_a)]))}",
                       origin, options, "app-a:v1")
    assert first.result.bytes_new == 700_000 + 7 + len(new_a)
    second = await seed(f"oci:{write_layout(tmp_path / 'b', build_image([base, Layer().file('app/b', new_b)]))}",
                        origin, options, "app-b:v1")
    assert second.result.bytes_new == len(new_b)  # the base's chunks are already at the origin
    assert second.result.bytes_uploaded <= len(new_b) + 1024
    assert await read_file(origin, second.result.manifest, b"usr/lib/libbig.so") == random_bytes(700_000, 5)
