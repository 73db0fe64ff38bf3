"""Every kind of entry, presented faithfully by a real mount; byte-exact reads at chunk boundaries.

One mount of the ``tree`` fixture (every kind of entry ``build_tree`` makes, 64 KiB chunks)
serves the whole module: these tests only read.
"""

from __future__ import annotations

import errno
import json
import os
import stat
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from lazyfs.manifest import EntryType
from tests.fuse.conftest import CHUNK, Mount, Mounter, Published, publish, read_file, wait_until
from tests.helpers import walk_source

pytestmark = pytest.mark.fuse


@pytest.fixture(scope="module")
def tree_mount(tree: Published, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mount]:
    mounter = Mounter(tmp_path_factory.mktemp("tree-mount"))
    try:
        yield mounter.mount(tree.file_url, tree.ref)
    finally:
        mounter.cleanup()
    mounter.check_logs()


def _entries(tree: Published) -> list[tuple[bytes, bytes, os.stat_result]]:
    return walk_source(tree.src)


# --- metadata -----------------------------------------------------------------------------------


def test_every_entry_has_its_type_mode_owner_and_mtime(tree: Published, tree_mount: Mount) -> None:
    items = _entries(tree)
    assert len(items) > 40
    seen_types = set()
    for rel, _, want in items:
        got = os.lstat(tree_mount.path(rel))
        where = f"{rel!r}"
        seen_types.add(stat.S_IFMT(want.st_mode))
        assert got.st_mode == want.st_mode, f"{where}: mode {got.st_mode:o} != {want.st_mode:o}"
        assert (got.st_uid, got.st_gid) == (want.st_uid, want.st_gid), where
        assert got.st_mtime_ns == want.st_mtime_ns, f"{where}: mtime {got.st_mtime_ns} != {want.st_mtime_ns}"
        assert got.st_nlink == want.st_nlink, f"{where}: nlink {got.st_nlink} != {want.st_nlink}"
        if not stat.S_ISDIR(want.st_mode):
            assert got.st_size == want.st_size, f"{where}: size {got.st_size} != {want.st_size}"
        if stat.S_ISCHR(want.st_mode) or stat.S_ISBLK(want.st_mode):
            assert got.st_rdev == want.st_rdev, where
        if stat.S_ISREG(want.st_mode):
            assert got.st_blocks == (want.st_size + 511) // 512, where
    # The fixture has one of each (devices only as root, which the CI machine is).
    expected = {stat.S_IFDIR, stat.S_IFREG, stat.S_IFLNK, stat.S_IFIFO, stat.S_IFSOCK}
    if tree.tree is not None and tree.tree.as_root:
        expected |= {stat.S_IFCHR, stat.S_IFBLK}
    assert expected <= seen_types


def test_special_modes_and_devices(tree: Published, tree_mount: Mount) -> None:
    st = os.lstat(tree_mount.path(b"setuid"))
    assert stat.S_IMODE(st.st_mode) == 0o4755
    assert stat.S_IMODE(os.lstat(tree_mount.path(b"setgid")).st_mode) == 0o2750
    assert stat.S_IMODE(os.lstat(tree_mount.path(b"all-bits")).st_mode) == 0o7777
    assert stat.S_IMODE(os.lstat(tree_mount.path(b"sticky")).st_mode) == 0o1777
    assert stat.S_IMODE(os.lstat(tree_mount.path(b"no-perms")).st_mode) == 0
    assert stat.S_ISFIFO(os.lstat(tree_mount.path(b"fifo")).st_mode)
    assert stat.S_ISSOCK(os.lstat(tree_mount.path(b"socket")).st_mode)
    assert tree.tree is not None and tree.tree.as_root, "the FUSE suite runs as root (owners, devices)"
    dev = os.lstat(tree_mount.path(b"dev-null"))
    assert stat.S_ISCHR(dev.st_mode) and dev.st_rdev == os.makedev(1, 3)
    blk = os.lstat(tree_mount.path(b"dev-block"))
    assert stat.S_ISBLK(blk.st_mode) and (os.major(blk.st_rdev), os.minor(blk.st_rdev)) == (7, 200)
    assert (os.lstat(tree_mount.path(b"text.txt")).st_uid, os.lstat(tree_mount.path(b"text.txt")).st_gid) == (
        1234,
        5678,
    )
    assert os.lstat(tree_mount.path(b"setuid")).st_gid == 4294967294
    # Times before 1970 and the epoch itself survive (nanoseconds included).
    assert os.lstat(tree_mount.path(b"one-byte")).st_mtime_ns == -1_234_567_891
    assert os.lstat(tree_mount.path(b"empty")).st_mtime_ns == 0


def test_directory_listings_match_names_verbatim(tree: Published, tree_mount: Mount) -> None:
    dirs = [rel for rel, _, st in _entries(tree) if stat.S_ISDIR(st.st_mode)]
    for rel in dirs:
        want = sorted(os.listdir(os.path.join(os.fsencode(tree.src), rel) if rel else os.fsencode(tree.src)))
        got = sorted(os.listdir(tree_mount.path(rel)))
        assert got == want, rel
    names = set(os.listdir(tree_mount.path(b"names")))
    assert {b"with space", b"new\nline", b"latin1-\xe9\xff", b"tab\there", b"dir with space"} <= names
    assert read_file(tree_mount.path(b"names/dir with space/\xfe\xfd")) == b"inside odd dir"
    # Directory entries carry the right types (d_type), as `find` and `os.scandir` rely on.
    with os.scandir(tree_mount.path()) as it:
        kinds = {e.name: (e.is_dir(follow_symlinks=False), e.is_symlink()) for e in it}
    assert kinds[b"sub"] == (True, False)
    assert kinds[b"link-to-dir"] == (False, True)


def test_symlinks_read_back_verbatim(tree: Published, tree_mount: Mount) -> None:
    links = [(rel, p) for rel, p, st in _entries(tree) if stat.S_ISLNK(st.st_mode)]
    assert len(links) >= 7
    for rel, src_path in links:
        assert os.readlink(tree_mount.path(rel)) == os.readlink(src_path), rel
    assert os.readlink(tree_mount.path(b"link-odd-target")) == b"\xff weird target\n"
    assert os.readlink(tree_mount.path(b"link-long-target")) == b"x" * 1000
    # Relative links resolve inside the mount.
    assert read_file(tree_mount.path(b"link-relative")) == b"x"
    assert read_file(tree_mount.path(b"sub/link-up")) == tree.contents[b"text.txt"]
    assert os.path.isdir(tree_mount.path(b"link-to-dir"))


def test_hardlinks_share_one_inode(tree: Published, tree_mount: Mount) -> None:
    names = [b"hard-a", b"sub/hard-b", b"sub/deeper/hard-c"]
    stats = [os.lstat(tree_mount.path(n)) for n in names]
    assert len({s.st_ino for s in stats}) == 1
    assert all(s.st_nlink == 3 for s in stats)
    assert all(read_file(tree_mount.path(n)) == tree.contents[b"hard-a"] for n in names)
    fifo_a, fifo_b = (os.lstat(tree_mount.path(n)) for n in (b"fifo-linked", b"sub/fifo-linked-too"))
    assert fifo_a.st_ino == fifo_b.st_ino and fifo_a.st_nlink == 2 and stat.S_ISFIFO(fifo_a.st_mode)
    # Distinct files have distinct inodes, stable across lookups.
    inos = {os.lstat(tree_mount.path(r)).st_ino for r in tree.files()}
    assert len(inos) == len(tree.files())
    assert os.lstat(tree_mount.path(b"hard-a")).st_ino == stats[0].st_ino


def test_xattrs(tree: Published, tree_mount: Mount) -> None:
    for rel, src_path, _ in _entries(tree):
        want = sorted(os.listxattr(src_path, follow_symlinks=False))
        got = sorted(os.listxattr(tree_mount.path(rel), follow_symlinks=False))
        assert got == want, rel
        for name in want:
            assert os.getxattr(tree_mount.path(rel), name, follow_symlinks=False) == os.getxattr(
                src_path, name, follow_symlinks=False
            ), (rel, name)
    text = tree_mount.path(b"text.txt")
    assert os.getxattr(text, "user.binary") == bytes(range(256))
    assert os.getxattr(text, "user.empty") == b""
    # Another name of the inode shows the inode's xattrs.
    assert os.getxattr(tree_mount.path(b"sub/hard-b"), "user.on-inode") == b"shared by every name"
    with pytest.raises(OSError) as info:
        os.getxattr(text, "user.missing")
    assert info.value.errno == errno.ENODATA


def test_control_xattrs_answer_but_are_not_listed(tree_mount: Mount) -> None:
    root = tree_mount.path()
    assert not [n for n in os.listxattr(root) if n.startswith("user.lazyfs.")]
    status = json.loads(os.getxattr(root, "user.lazyfs.status"))
    assert status["mountpoint"] == str(tree_mount.mountpoint)
    assert os.getxattr(root, "user.lazyfs.control").startswith(b"/")
    # Only on the root: elsewhere they do not exist.
    with pytest.raises(OSError) as info:
        os.getxattr(tree_mount.path(b"sub"), "user.lazyfs.status")
    assert info.value.errno == errno.ENODATA


def test_statfs(tree: Published, tree_mount: Mount) -> None:
    st = os.statvfs(tree_mount.path())
    inodes = sum(1 for e in tree.manifest.entries if e.type is not EntryType.HARDLINK)
    assert st.f_bsize == 4096 and st.f_frsize == 4096
    assert st.f_blocks == (tree.manifest.total_size + 4095) // 4096
    assert st.f_files == inodes
    assert st.f_bfree == st.f_bavail == st.f_ffree == 0
    assert st.f_flag & os.ST_RDONLY
    assert st.f_namemax == 255


def test_writes_fail_with_erofs(tree_mount: Mount) -> None:
    f = tree_mount.path(b"one-byte")
    attempts: dict[str, Callable[[], object]] = {
        "open for write": lambda: os.open(f, os.O_WRONLY),
        "open rdwr": lambda: os.open(f, os.O_RDWR),
        "create": lambda: os.open(tree_mount.path(b"new-file"), os.O_WRONLY | os.O_CREAT, 0o644),
        "truncate": lambda: os.truncate(f, 0),
        "mkdir": lambda: os.mkdir(tree_mount.path(b"new-dir")),
        "unlink": lambda: os.unlink(f),
        "rmdir": lambda: os.rmdir(tree_mount.path(b"sub/deeper/empty-dir")),
        "rename": lambda: os.rename(f, tree_mount.path(b"renamed")),
        "symlink": lambda: os.symlink(b"x", tree_mount.path(b"new-link")),
        "link": lambda: os.link(f, tree_mount.path(b"new-hardlink")),
        "chmod": lambda: os.chmod(f, 0o600),
        "chown": lambda: os.chown(f, 1, 1),
        "utime": lambda: os.utime(f, ns=(1, 1)),
        "setxattr": lambda: os.setxattr(f, "user.new", b"v"),
        "removexattr": lambda: os.removexattr(tree_mount.path(b"text.txt"), "user.comment"),
    }
    for what, attempt in attempts.items():
        with pytest.raises(OSError) as info:
            attempt()
        assert info.value.errno == errno.EROFS, f"{what}: {info.value}"
    assert read_file(f) == b"x"


def test_non_regular_files_cannot_be_read_as_files(tree_mount: Mount) -> None:
    with pytest.raises(OSError) as info:
        read_file(tree_mount.path(b"sub"))
    assert info.value.errno == errno.EISDIR
    # A device node on a nodev mount cannot be opened.
    with pytest.raises(OSError) as info:
        os.open(tree_mount.path(b"dev-null"), os.O_RDONLY)
    assert info.value.errno == errno.EACCES


# --- data ----------------------------------------------------------------------------------------


def test_every_file_reads_back_exactly(tree: Published, tree_mount: Mount) -> None:
    assert len(tree.contents) > 25
    for rel, data in tree.contents.items():
        assert read_file(tree_mount.path(rel)) == data, rel
    sizes = {rel: len(tree.contents[rel]) for rel in (b"empty", b"one-byte", b"exact-chunk", b"chunk-plus-one")}
    assert sizes == {b"empty": 0, b"one-byte": 1, b"exact-chunk": CHUNK, b"chunk-plus-one": CHUNK + 1}
    assert len(tree.contents[b"multi.bin"]) > 3 * CHUNK


def _probes(size: int) -> list[tuple[int, int]]:
    """(offset, length) pairs at and across every chunk boundary of a ``size``-byte file, and past EOF."""
    out = [(0, 1), (0, size + 10), (size - 1, 1), (size - 5, 100), (size, 1), (size + 10, 5), (size + CHUNK, CHUNK)]
    for k in range(1, size // CHUNK + 1):
        b = k * CHUNK
        for off in (b - 1, b, b + 1):
            for length in (1, 2, 4095, CHUNK, CHUNK + 2, 3 * CHUNK):
                out.append((off, length))
    out += [(CHUNK // 2, CHUNK), (7, 2 * CHUNK + 3), (1, size)]
    return [(max(off, 0), length) for off, length in out]


@pytest.mark.parametrize("direct", [False, True], ids=["page-cache", "o-direct"])
def test_reads_at_chunk_boundaries_are_byte_exact(tree: Published, tree_mount: Mount, direct: bool) -> None:
    """pread at, before and after each boundary, straddling several chunks, at EOF and past it.

    With O_DIRECT the kernel forwards each pread as is, so the daemon sees unaligned
    offsets and lengths; through the page cache it sees page-aligned reads.
    """
    files = [b"exact-chunk", b"chunk-plus-one", b"multi.bin", b"text.txt", b"sub/shares-first-chunk", b"sub/hard-b"]
    flags = os.O_RDONLY | (os.O_DIRECT if direct else 0)
    for rel in files:
        data = tree.contents[rel]
        fd = os.open(tree_mount.path(rel), flags)
        try:
            for off, length in _probes(len(data)):
                got = os.pread(fd, length, off)
                assert got == data[off : off + length], (rel, off, length)
            # Sequential reads in odd sizes see the file exactly once through.
            os.lseek(fd, 0, os.SEEK_SET)
            parts = []
            while part := os.read(fd, 12345):
                parts.append(part)
            assert b"".join(parts) == data, rel
        finally:
            os.close(fd)


def test_walk_visits_every_directory_once(tree: Published, tree_mount: Mount) -> None:
    """``os.walk`` (readdir + d_type, no symlink following) visits exactly the published directories."""
    listed = sum(1 for _ in os.walk(tree_mount.path()))
    dirs = sum(1 for e in tree.manifest.entries if e.type is EntryType.DIR)
    assert listed == dirs


def test_a_large_directory_lists_every_name_once_in_order(tmp_path: Path, mounter: Mounter) -> None:
    """5,000 names take many readdir requests (one page of the kernel's buffer each): each resumes
    where the last one stopped, so the listing is whole, once, in name order, as `ls -f` sees it."""
    src = tmp_path / "src"
    (src / "many").mkdir(parents=True)
    want = sorted(f"entry-{i:05d}-{'x' * (i % 40)}".encode() for i in range(5000))
    for name in want:
        (src / "many" / os.fsdecode(name)).touch()
    p = publish(src, tmp_path / "origin", "many:v1")
    m = mounter.mount(p.file_url, p.ref)
    # Too many names to list ahead for one lookup: each first lookup reaches the daemon.
    before = m.status()["metadata"]
    for name in want[100:103]:
        os.stat(m.path(b"many/" + name))
    after = m.status()["metadata"]
    assert after["lookups"] - before["lookups"] == 4  # "many", then the three names
    assert after["dirs_listed_ahead"] == 0
    with os.scandir(m.path(b"many")) as it:
        got = [e.name for e in it]
    assert got == want
    assert os.stat(m.path(b"many/" + want[-1])).st_size == 0


def metadata(m: Mount) -> dict[str, int]:
    out: dict[str, int] = m.status()["metadata"]
    return out


def test_a_first_lookup_lists_its_directory_so_siblings_need_no_lookup(tmp_path: Path, mounter: Mounter) -> None:
    """The daemon lists a directory through the mount after a first lookup in it: the kernel
    learns every name (and its attributes) from that one READDIRPLUS, and answers the
    siblings' lookups itself, with the attributes the source has."""
    src = tmp_path / "src"
    (src / "pkg").mkdir(parents=True)
    (src / "other").mkdir()
    for i in range(40):
        (src / "pkg" / f"mod{i:02d}.py").write_bytes(b"x" * i)
        os.chmod(src / "pkg" / f"mod{i:02d}.py", 0o600 + i % 8)
    p = publish(src, tmp_path / "origin", "pkg:v1")
    m = mounter.mount(p.file_url, p.ref)
    os.stat(m.path(b"pkg/mod00.py"))
    wait_until(lambda: metadata(m)["dirs_listed_ahead"] == 2, 10, "the root and pkg to be listed ahead")
    before = metadata(m)
    for i in range(40):
        got, want = os.lstat(m.path(f"pkg/mod{i:02d}.py")), os.lstat(src / "pkg" / f"mod{i:02d}.py")
        assert (got.st_size, got.st_mode, got.st_mtime_ns, got.st_uid) == (
            want.st_size, want.st_mode, want.st_mtime_ns, want.st_uid
        )
    os.stat(m.path(b"other"))
    after = metadata(m)
    assert after["lookups"] == before["lookups"], "the siblings' lookups reached the daemon"
    assert (after["list_ahead_errors"], after["readdirs"] >= 2) == (0, True)
    assert read_file(m.path(b"pkg/mod07.py")) == b"x" * 7


def test_a_missing_name_is_asked_once(tmp_path: Path, mounter: Mounter) -> None:
    """The tree never changes, so the daemon lets the kernel keep "no such name" answers."""
    src = tmp_path / "src"
    (src / "d").mkdir(parents=True)
    (src / "d" / "there").write_bytes(b"1")
    p = publish(src, tmp_path / "origin", "neg:v1")
    m = mounter.mount(p.file_url, p.ref)
    before = metadata(m)
    for _ in range(3):
        with pytest.raises(FileNotFoundError):
            os.stat(m.path(b"d/absent"))
    after = metadata(m)
    assert after["lookups_missing"] - before["lookups_missing"] == 1
    assert read_file(m.path(b"d/there")) == b"1"
    with pytest.raises(FileNotFoundError):
        read_file(m.path(b"d/absent"))
    assert metadata(m)["lookups_missing"] == after["lookups_missing"]
