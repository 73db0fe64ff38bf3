"""A real image (debootstrap + umoci), converted with skopeo, served by Debian's docker-registry.

Seeded with the CLI from all three inputs — the OCI layout, the docker-archive, the
registry (gzip layers anonymously; zstd layers behind htpasswd with credentials from a
DOCKER_CONFIG directory) — the manifests are identical, and the tree equals what
``umoci unpack`` makes of the image: paths, types, modes, owners, sizes, mtimes, symlink
targets, device numbers, xattrs, hardlink groups and every file's bytes.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import stat
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import pytest

from lazyfs.catalog import load_manifest, resolve_ref
from lazyfs.config import SeedConfig
from lazyfs.image import ImageOptions, seed_image
from lazyfs.manifest import EntryType, Manifest, parse_ref
from lazyfs.origin.file import FileOrigin
from lazyfs.seed import ENTRY_TYPES
from tests.helpers import assert_one_line_error, clean_env, read_file, run_lazyfs, walk_source
from tests.image.conftest import Registries
from tests.image.realimage import CAP_NET_RAW, PYTHON, RealImage

pytestmark = pytest.mark.integration



@dataclass(frozen=True)
class Seeded:
    origin: Path
    digests: dict[str, str]  # source kind -> manifest digest
    manifest: Manifest
    seconds: dict[str, float]


def _seed_cli(src: str, origin: str, name: str, **env: str) -> tuple[str, float]:
    run = run_lazyfs("seed", src, origin, "--name", name, env=clean_env(**env), timeout=600)
    assert run.returncode == 0, run.stderr
    ref, digest = run.stdout.split()
    assert ref == name
    assert "image linux/amd64, " in run.stderr, run.stderr
    return digest, run.seconds


@pytest.fixture(scope="module")
def seeded(tmp_path_factory: pytest.TempPathFactory, real_image: RealImage, registries: Registries) -> Seeded:
    origin = tmp_path_factory.mktemp("origin") / "o"
    url = origin.as_uri()
    digests: dict[str, str] = {}
    seconds: dict[str, float] = {}
    for kind, src, env in (
        ("layout", f"oci:{real_image.layout}:v3", {}),
        ("archive", f"docker-archive:{real_image.archive}", {}),
        ("registry", registries.public_src, {}),
        ("registry-auth-zstd", registries.private_src, {"DOCKER_CONFIG": str(registries.docker_config)}),
    ):
        digests[kind], seconds[kind] = _seed_cli(src, url, f"app:{kind}", **env)

    async def load() -> Manifest:
        o = FileOrigin(origin)
        try:
            _, m = await load_manifest(o, await resolve_ref(o, parse_ref("app:layout")))
            return m
        finally:
            await o.aclose()

    return Seeded(origin, digests, asyncio.run(load()), seconds)


def test_all_inputs_give_the_same_manifest(seeded: Seeded) -> None:
    assert len(set(seeded.digests.values())) == 1, seeded.digests


def test_private_registry_without_credentials_is_one_clear_line(
    registries: Registries, tmp_path: Path
) -> None:
    run = run_lazyfs("seed", registries.private_src, (tmp_path / "o").as_uri(), "--name", "x:y",
                     env=clean_env(DOCKER_CONFIG=str(tmp_path / "empty")))
    assert_one_line_error(run, "requires credentials", registries.private.host)
    assert not (tmp_path / "o" / "refs").exists()


def _sha(path: bytes) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


async def test_tree_matches_umoci_unpack(seeded: Seeded, real_image: RealImage) -> None:
    m = seeded.manifest
    items = walk_source(real_image.reference)
    assert {rel for rel, _, _ in items} == {e.path for e in m.entries}
    groups: dict[tuple[int, int], list[bytes]] = defaultdict(list)
    origin = FileOrigin(seeded.origin)
    try:
        for rel, fs, st in items:
            e = m.entry(rel)
            assert e is not None
            data_entry = m.resolve(e)
            where = rel.decode(errors="replace")
            assert data_entry.type is ENTRY_TYPES[stat.S_IFMT(st.st_mode)], where
            assert (e.mode, e.uid, e.gid) == (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid), where
            if not stat.S_ISDIR(st.st_mode):
                assert e.mtime_ns == st.st_mtime_ns, where
                if st.st_nlink > 1:
                    groups[(st.st_dev, st.st_ino)].append(rel)
            if stat.S_ISLNK(st.st_mode):
                assert e.target == os.readlink(fs), where
            if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
                assert e.rdev == st.st_rdev, where
            if e.type is not EntryType.HARDLINK:
                on_disk = tuple(sorted((n.encode(), os.getxattr(fs, n, follow_symlinks=False))
                                       for n in os.listxattr(fs, follow_symlinks=False)))
                assert e.xattrs == on_disk, where
            if stat.S_ISREG(st.st_mode):
                assert data_entry.size == st.st_size, where
                got = await read_file(origin, m, e)
                assert hashlib.sha256(got).hexdigest() == _sha(fs), where
    finally:
        await origin.aclose()
    # Hardlink groups: the names of one inode on disk are one REG entry plus HARDLINKs to it.
    for names in groups.values():
        primaries = {m.resolve(e).path for e in (m.entry(n) for n in names) if e is not None}
        assert len(primaries) == 1, names
    linked = {e.path for e in m.entries if e.type is EntryType.HARDLINK}
    assert linked == {n for names in groups.values() for n in sorted(names)[1:]}


def test_whiteouts_opaque_dirs_and_links_of_the_real_image(seeded: Seeded) -> None:
    m = seeded.manifest
    names = {e.path for e in m.entries}
    assert b"etc/issue" not in names  # umoci's whiteout from v2
    doc = {p for p in names if p.startswith(b"usr/share/doc/")}
    assert doc == {b"usr/share/doc/mine", b"usr/share/doc/mine/readme"}  # umoci's per-name whiteouts
    assert {p for p in names if p.startswith(b"etc/apt/")} == {b"etc/apt/sources.list"}  # opaque in v3
    assert b"etc/new-file" not in names
    link = m.entry(b"etc/new-link")
    assert link is not None and link.type is EntryType.REG and link.size == len(b"hello\n")
    assert dict(link.xattrs) == {b"user.lazyfs": b"kept"}
    py = m.entry(PYTHON.encode())
    hard = m.entry(b"usr/bin/py-hard")
    assert py is not None and hard is not None
    assert {py.type, hard.type} == {EntryType.REG, EntryType.HARDLINK}
    assert m.resolve(py) == m.resolve(hard)
    cap = m.entry(b"usr/local/bin/cap-true")
    assert cap is not None and dict(cap.xattrs)[b"security.capability"] == CAP_NET_RAW
    suid = m.entry(b"usr/local/bin/suid-true")
    assert suid is not None and suid.mode == 0o4755
    owned = m.entry(b"usr/local/bin/owned")
    assert owned is not None and (owned.uid, owned.gid) == (1234, 5678)
    null = m.entry(b"usr/local/null")
    assert null is not None and null.type is EntryType.CHR and null.rdev == os.makedev(1, 3)


def test_inspect_shows_the_image_config(seeded: Seeded) -> None:
    run = run_lazyfs("inspect", seeded.origin.as_uri(), "app:registry")
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("mode "))
    config = lines[:header]
    for expected in ('Entrypoint: ["/usr/bin/python3"]', 'Cmd: ["-c", "print(6 * 7)"]', "Env: LANG=C.UTF-8",
                     "Env: PYTHONDONTWRITEBYTECODE=1", "WorkingDir: /root", "User: 0:0", "Platform: linux/amd64"):
        assert expected in config, (expected, config)
    assert not any(line.startswith("annotation org.opencontainers.image.config") for line in lines)


async def test_second_image_on_the_same_base_uploads_only_its_new_bytes(
    real_image: RealImage, tmp_path: Path
) -> None:
    origin = FileOrigin(tmp_path / "origin")
    options = ImageOptions(spool_dir=str(tmp_path))
    try:
        base = await seed_image(f"oci:{real_image.layout}:base", origin, parse_ref("app:base"), SeedConfig(), options)
        top = await seed_image(f"oci:{real_image.layout}:v3", origin, parse_ref("app:v3"), SeedConfig(), options)
    finally:
        await origin.aclose()
    # Independently of lazyfs: the bytes of v3's files whose content no file of the base has.
    base_contents = {_sha(fs) for _, fs, st in walk_source(real_image.base_tree) if stat.S_ISREG(st.st_mode)}
    new: dict[str, int] = {}
    for _, fs, st in walk_source(real_image.reference):
        if stat.S_ISREG(st.st_mode) and st.st_size and (h := _sha(fs)) not in base_contents:
            new[h] = st.st_size
    assert base.result.bytes_new > 50 * 1024 * 1024
    assert top.result.bytes_new == sum(new.values()), (top.result.bytes_new, new)
    assert top.result.bytes_new < 100 * 1024
    assert top.result.bytes_uploaded <= top.result.bytes_new
    seen: set[tuple[int, int]] = set()
    inode_bytes = 0
    for _, _, st in walk_source(real_image.reference):
        if stat.S_ISREG(st.st_mode) and (st.st_dev, st.st_ino) not in seen:
            seen.add((st.st_dev, st.st_ino))
            inode_bytes += st.st_size
    assert top.result.bytes_total == inode_bytes
