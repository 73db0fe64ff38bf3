"""Real FUSE mounts, driven through the ``lazyfs`` command line and checked with plain syscalls.

Everything runs the way a user runs it: ``lazyfs seed`` publishes a tree, ``lazyfs mount``
starts a daemon (detached; it returns once the mount is ready), and the test reads the
mount with ``open``/``pread``/``stat``.  Nothing here imports the daemon's code.

Fixtures:

* ``tree`` (session) — :func:`tests.helpers.build_tree` (every kind of entry) published
  with 64 KiB chunks to a ``file://`` origin.
* ``bulk`` (session) — 4 MiB of incompressible data in a few files, 64 KiB chunks: enough
  chunks for concurrency, eviction and kill tests, little enough to stay fast.
* ``origins`` — ``origins(published) -> OriginProcess``: a controllable HTTP origin
  (``tools/test_origin.py``) serving a published origin directory; stopped at teardown.
* ``mounter`` — mounts through the CLI and ALWAYS cleans up: ``lazyfs umount``; if the
  daemon is gone or stuck, ``fusermount3 -u -z``; then any daemon still alive is killed by
  its pid.

Missing FUSE (``/dev/fuse`` or ``fusermount3``) fails every test here: it never skips.
Every wait is bounded.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from lazyfs.manifest import Chunk, Entry, EntryType, Manifest, decode
from tests.helpers import Tree, build_tree, random_bytes
from tools.test_origin import OriginProcess, start_test_origin

KiB = 1024
MiB = 1024 * KiB
CHUNK = 64 * KiB
LAZYFS: tuple[str, ...] = (sys.executable, "-m", "lazyfs")
# A CLI call that does not finish in this long is stuck (mount waits for the daemon's
# manifest load; umount for its cache writes to finish).
CLI_TIMEOUT = 60.0
FUSERMOUNT = "fusermount3"


def require_fuse() -> None:
    """Fail (never skip) when this machine cannot run real mounts."""
    if not os.path.exists("/dev/fuse"):
        pytest.fail("/dev/fuse is missing: these tests need FUSE (modprobe fuse; in a container, --device /dev/fuse)")
    if shutil.which(FUSERMOUNT) is None:
        pytest.fail(f"{FUSERMOUNT} is missing: install the fuse3 package")


@pytest.fixture(scope="session", autouse=True)
def _fuse_is_required() -> None:
    """Session-scoped so it runs before any session or module fixture mounts something."""
    require_fuse()


# --- processes and mounts ---------------------------------------------------------------------


def lazyfs(
    *args: str | os.PathLike[str],
    timeout: float = CLI_TIMEOUT,
    check: bool = True,
    prefix: Sequence[str] = (),
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run ``lazyfs ARGS`` (``prefix`` runs it through ``setpriv`` and the like)."""
    argv = [*prefix, *LAZYFS, *(os.fspath(a) for a in args)]
    try:
        res = subprocess.run(
            argv,
            capture_output=True,
            text=True,
            errors="surrogateescape",
            timeout=timeout,
            stdin=subprocess.DEVNULL,
            env=env,
            cwd="/",
        )
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"`lazyfs {' '.join(map(str, args))}` did not finish within {timeout:g} s: {exc.stderr!r}")
    if check and res.returncode != 0:
        pytest.fail(f"`lazyfs {' '.join(map(str, args))}` failed ({res.returncode}):\n{res.stderr}")
    return res


def pid_alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie waiting to be reaped has exited: it counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat_line = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return False
    state = stat_line.rsplit(b")", 1)[1].split()[0]
    return state not in (b"Z", b"X")


def mounted(path: str | os.PathLike[str]) -> bool:
    """Whether something is mounted at ``path``, from /proc/self/mountinfo.

    (``os.path.ismount`` stats the path, which fails on a mount whose daemon is dead.)
    """
    want = os.fsencode(os.path.abspath(path))
    with open("/proc/self/mountinfo", "rb") as f:
        for line in f:
            mp = re.sub(rb"\\([0-7]{3})", lambda m: bytes([int(m.group(1), 8)]), line.split()[4])
            if mp == want:
                return True
    return False


def daemons_of(mountpoint: str | os.PathLike[str]) -> list[int]:
    """Pids of live ``lazyfs mount`` processes for ``mountpoint`` (from their command lines)."""
    want = os.fsencode(os.path.abspath(mountpoint))
    out = []
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == os.getpid():
            continue
        try:
            with open(f"/proc/{name}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if b"lazyfs" in argv and b"mount" in argv and want in argv and pid_alive(int(name)):
            out.append(int(name))
    return out


def wait_until(predicate: Callable[[], bool], timeout: float, what: str, interval: float = 0.02) -> None:
    """Poll ``predicate`` until it holds; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


def force_unmount(mountpoint: str | os.PathLike[str]) -> None:
    """Lazily detach ``mountpoint`` (works when the daemon is dead or stuck)."""
    if mounted(mountpoint) and shutil.which(FUSERMOUNT):
        subprocess.run([FUSERMOUNT, "-u", "-z", os.fspath(mountpoint)], capture_output=True, timeout=30)
    if mounted(mountpoint) and os.geteuid() == 0:
        subprocess.run(["umount", "-l", os.fspath(mountpoint)], capture_output=True, timeout=30)


def read_file(path: bytes | str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


@dataclass
class Outcome:
    """What a bounded call did: its result or the OSError it raised, and how long it took."""

    result: bytes | None
    error: OSError | None
    seconds: float

    @property
    def errno(self) -> int | None:
        return None if self.error is None else self.error.errno


def bounded(fn: Callable[[], bytes], timeout: float, what: str) -> Outcome:
    """Run ``fn`` (a read from a mount) in a thread; fail the test if it has not returned after ``timeout``.

    A read that hangs stays blocked in its (daemon) thread until the mount is torn down,
    which the ``mounter`` fixture does whatever happens.
    """
    box: list[Outcome] = []

    def run() -> None:
        t0 = time.monotonic()
        try:
            box.append(Outcome(fn(), None, time.monotonic() - t0))
        except OSError as exc:
            box.append(Outcome(None, exc, time.monotonic() - t0))

    thread = threading.Thread(target=run, name=f"bounded {what}", daemon=True)
    thread.start()
    thread.join(timeout)
    if not box:
        pytest.fail(f"{what} did not return within {timeout:g} s (a hang)")
    return box[0]


# --- published trees --------------------------------------------------------------------------


@dataclass
class Published:
    """A tree published to a ``file://`` origin directory (``lazyfs seed``)."""

    src: Path
    origin_dir: Path
    ref: str
    digest: str
    manifest: Manifest
    contents: dict[bytes, bytes]  # manifest path -> bytes of every regular file (hardlinks too)
    tree: Tree | None = None

    @property
    def file_url(self) -> str:
        return f"file://{self.origin_dir}"

    def entry(self, rel: bytes) -> Entry:
        e = self.manifest.entry(rel)
        assert e is not None, rel
        return self.manifest.resolve(e)

    def chunks_of(self, rel: bytes) -> list[Chunk]:
        return self.manifest.file_chunks(self.entry(rel))

    def pack_range(self, chunk: Chunk) -> tuple[str, int, int]:
        """Where the origin stores ``chunk``: (key, start, end)."""
        return self.manifest.packs[chunk.pack].key, chunk.offset, chunk.offset + chunk.stored_size

    def stored_bytes(self, rels: Sequence[bytes] | None = None) -> int:
        """Stored (wire) bytes of the distinct chunks of ``rels`` (all files: None)."""
        if rels is None:
            return self.manifest.stored_size
        chunks = {c.digest: c.stored_size for r in rels for c in self.chunks_of(r)}
        return sum(chunks.values())

    def files(self) -> list[bytes]:
        """Paths of regular files (not hardlink names), in tree order."""
        return [e.path for e in self.manifest.entries if e.type is EntryType.REG]


def publish(src: Path, origin_dir: Path, name: str, chunk_size: int = CHUNK) -> Published:
    res = lazyfs("seed", src, f"file://{origin_dir}", "--name", name, "--chunk-size", str(chunk_size), "-q")
    ref, digest = res.stdout.split()
    manifest = decode((origin_dir / "manifests" / digest).read_bytes())
    contents = {}
    for e in manifest.entries:
        target = manifest.resolve(e)
        if target.type is EntryType.REG:
            contents[e.path] = read_file(os.path.join(os.fsencode(src), e.path))
    return Published(src, origin_dir, ref, digest, manifest, contents)


@pytest.fixture(scope="session")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Published:
    """Every kind of entry (see tests.helpers.build_tree), 64 KiB chunks."""
    base = tmp_path_factory.mktemp("tree")
    t = build_tree(base / "src", CHUNK)
    p = publish(t.root, base / "origin", "tree:v1")
    p.tree = t
    return p


BULK_FILES = {f"data/f{i}.bin".encode(): (i + 1) * 256 * KiB + 1000 * i for i in range(4)}


@pytest.fixture(scope="session")
def bulk(tmp_path_factory: pytest.TempPathFactory) -> Published:
    """~2.6 MiB of random bytes in 4 files plus a 1.5 MiB 'big.bin': many 64 KiB chunks, fast to move."""
    base = tmp_path_factory.mktemp("bulk")
    src = base / "src"
    (src / "data").mkdir(parents=True)
    for i, (rel, size) in enumerate(BULK_FILES.items()):
        (src / os.fsdecode(rel)).write_bytes(random_bytes(size, seed=100 + i))
    (src / "big.bin").write_bytes(random_bytes(3 * MiB // 2 + 17, seed=99))
    return publish(src, base / "origin", "bulk:v1")


# --- the HTTP origin --------------------------------------------------------------------------


class Origins:
    """``origins(published) -> OriginProcess``: an HTTP origin for a published tree."""

    def __init__(self, logdir: Path) -> None:
        self.logdir = logdir
        self.started: list[OriginProcess] = []

    def __call__(self, published: Published, *, port: int = 0) -> OriginProcess:
        log = self.logdir / f"origin-{len(self.started)}.log"
        server = start_test_origin(published.origin_dir, port=port, log_path=log)
        self.started.append(server)
        return server

    def stop_all(self) -> None:
        for s in self.started:
            s.stop()


@pytest.fixture
def origins(tmp_path: Path) -> Iterator[Origins]:
    o = Origins(tmp_path)
    try:
        yield o
    finally:
        o.stop_all()


# --- mounts -----------------------------------------------------------------------------------


@dataclass
class Mount:
    mountpoint: Path
    cache_dir: Path
    origin: str
    ref: str
    pid: int
    prefix: tuple[str, ...] = ()  # how CLI calls for this mount run (setpriv ...)
    env: dict[str, str] | None = None

    def path(self, rel: bytes | str = b"") -> bytes:
        rel_b = os.fsencode(rel)
        return os.path.join(os.fsencode(self.mountpoint), rel_b) if rel_b else os.fsencode(self.mountpoint)

    def status(self) -> dict[str, Any]:
        """The daemon's status: what ``lazyfs status --json`` prints, read from the control xattr
        directly when the mount is ours (milliseconds instead of a CLI start-up)."""
        if self.prefix:
            return self.cli_status()
        data: dict[str, Any] = json.loads(os.getxattr(self.mountpoint, "user.lazyfs.status"))
        return data

    def cli_status(self) -> dict[str, Any]:
        res = lazyfs("status", self.mountpoint, "--json", prefix=self.prefix, env=self.env)
        data: dict[str, Any] = json.loads(res.stdout)
        return data

    def log(self) -> str:
        try:
            return (self.cache_dir / "daemon.log").read_text(errors="replace")[-4000:]
        except OSError:
            return "(no daemon log)"

    def wait_idle(self, timeout: float = 30) -> dict[str, Any]:
        """Wait until nothing is fetched or written back; returns the last status."""
        last: dict[str, Any] = {}

        def idle() -> bool:
            nonlocal last
            last = self.status()
            f: dict[str, int] = last["fetch"]
            return f["inflight_chunks"] == 0 and f["queued_chunks"] == 0 and f["writeback_pending"] == 0

        wait_until(idle, timeout, f"the daemon of {self.mountpoint} to go idle", interval=0.1)
        return last

    def read_all(self, published: Published) -> None:
        """Read every regular file (hardlink names too) and compare with the source."""
        for rel, data in published.contents.items():
            assert read_file(self.path(rel)) == data, rel


def cached_chunks(cache_dir: Path) -> dict[str, int]:
    """Chunk files in a cache directory: hex digest (the file name) -> size on disk."""
    out = {}
    for sub in (cache_dir / "chunks").glob("*"):
        for f in sub.iterdir():
            out[f.name] = f.stat().st_size
    return out


@dataclass
class Mounter:
    """Mounts through the CLI; :meth:`cleanup` leaves nothing mounted and no daemon alive."""

    base: Path
    mounts: list[Mount] = field(default_factory=list)
    mountpoints: list[Path] = field(default_factory=list)
    _n: int = 0

    def new_dir(self, what: str) -> Path:
        self._n += 1
        d = self.base / f"{what}{self._n}"
        d.mkdir(parents=True)
        return d

    def mount(
        self,
        origin: str,
        ref: str,
        *,
        mountpoint: Path | None = None,
        cache_dir: Path | None = None,
        read_timeout: float | None = None,
        cache_size: str | None = None,
        extra: Sequence[str] = (),
        prefix: Sequence[str] = (),
        env: dict[str, str] | None = None,
    ) -> Mount:
        mp = mountpoint or self.new_dir("mp")
        cache = cache_dir or self.base / f"cache{self._n}"
        self.mountpoints.append(mp)
        args: list[str] = ["mount", origin, ref, str(mp), "--cache-dir", str(cache), *extra]
        if read_timeout is not None:
            args += ["--read-timeout", str(read_timeout)]
        if cache_size is not None:
            args += ["--cache-size", cache_size]
        res = lazyfs(*args, prefix=prefix, env=env, check=False)
        if res.returncode != 0:
            log = (cache / "daemon.log").read_text(errors="replace")[-3000:] if (cache / "daemon.log").exists() else ""
            pytest.fail(f"mount failed ({res.returncode}): {res.stderr}\ndaemon log:\n{log}")
        m = re.search(r"daemon pid (\d+)", res.stderr)
        assert m is not None, res.stderr
        mount = Mount(mp, cache, origin, ref, int(m.group(1)), tuple(prefix), env)
        self.mounts.append(mount)
        assert mounted(mp), f"`lazyfs mount` returned but nothing is mounted at {mp}"
        return mount

    def umount(self, m: Mount) -> None:
        """``lazyfs umount``, then check the daemon exited and the mountpoint is empty again."""
        lazyfs("umount", m.mountpoint, prefix=m.prefix, env=m.env)
        assert not mounted(m.mountpoint)
        assert not pid_alive(m.pid), f"the daemon {m.pid} outlived `lazyfs umount`"
        assert os.listdir(m.mountpoint) == []

    def kill(self, m: Mount, sig: int = signal.SIGKILL) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(m.pid, sig)
        wait_until(lambda: not pid_alive(m.pid), 30, f"daemon {m.pid} to die of signal {sig}")

    def check_logs(self) -> None:
        """Fail if a daemon logged a traceback: every error it meets must be a deliberate one."""
        for log in {m.cache_dir / "daemon.log" for m in self.mounts}:
            text = log.read_text(errors="replace") if log.exists() else ""
            if "Traceback" in text:
                pytest.fail(f"the daemon logged a traceback in {log}:\n{text[-3000:]}")

    def cleanup(self) -> None:
        """Unmount everything (``fusermount3 -u``, lazily with ``-z`` if busy or dead), give each
        daemon a few seconds to finish, then kill what is left by its pid."""
        for mp in self.mountpoints:
            if mounted(mp) and shutil.which(FUSERMOUNT):
                with contextlib.suppress(subprocess.TimeoutExpired):
                    subprocess.run([FUSERMOUNT, "-u", str(mp)], capture_output=True, timeout=30)
            force_unmount(mp)
        deadline = time.monotonic() + 10
        for m in self.mounts:
            while pid_alive(m.pid) and time.monotonic() < deadline:
                time.sleep(0.02)
            if pid_alive(m.pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(m.pid, signal.SIGKILL)
        for mp in self.mountpoints:
            for pid in daemons_of(mp):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            force_unmount(mp)


@pytest.fixture
def mounter(tmp_path: Path, origins: Origins) -> Iterator[Mounter]:
    """Mount helper; torn down before ``origins`` so no daemon waits on a stopped origin."""
    m = Mounter(tmp_path)
    try:
        yield m
    finally:
        m.cleanup()
    m.check_logs()


# --- a runnable image (lazyfs run, startup traces) -------------------------------------------------

IMAGE_CONFIG = "org.opencontainers.image.config"
# Small chunks: a Python start then needs a few dozen of them, so traces have something to show.
IMAGE_CHUNK = 256 * KiB
IMAGE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# What `lazyfs run` is given a generous while for: a daemon start, the program, the cleanup.
RUN_TIMEOUT = 180.0


@dataclass
class ImageRef:
    ref: str
    digest: str
    manifest: Manifest


@dataclass
class Image:
    """A minimal Debian root with python3 (tools/rootfs.py, cached in /var/tmp) published once.

    :meth:`variant` publishes the same tree again under a new ref with another image config:
    only a new manifest (no chunk data), and a digest of its own, so the traces one test
    records never reach another test's mounts.
    """

    root: Path  # the unpacked root: read by tests, never written
    origin_dir: Path
    base: Manifest
    _n: int = 0

    @property
    def file_url(self) -> str:
        return f"file://{self.origin_dir}"

    def variant(self, config: dict[str, Any] | None, name: str = "img") -> ImageRef:
        from lazyfs.manifest import digest_of, encode

        self._n += 1
        annotations = {"org.lazyfs.test.variant": f"{name}-{self._n}-{time.monotonic_ns()}"}
        if config is not None:
            annotations[IMAGE_CONFIG] = json.dumps(config)
        m = dataclasses.replace(self.base, annotations=tuple(sorted(annotations.items())))
        data = encode(m)
        digest = digest_of(data)
        (self.origin_dir / "manifests" / digest).write_bytes(data)
        tag = f"v{self._n}"
        (self.origin_dir / "refs" / name).mkdir(parents=True, exist_ok=True)
        (self.origin_dir / "refs" / name / tag).write_text(digest + "\n")
        return ImageRef(f"{name}:{tag}", digest, m)


def image_config(**conf: Any) -> dict[str, Any]:
    """An OCI image config object with ``conf`` as its ``config`` (Env defaults to PATH + LANG)."""
    conf.setdefault("Env", [f"PATH={IMAGE_PATH}", "LANG=C.UTF-8"])
    return {"architecture": "amd64", "os": "linux", "config": conf}


@pytest.fixture(scope="session")
def debian_image(tmp_path_factory: pytest.TempPathFactory) -> Image:
    import asyncio

    from lazyfs.config import OriginConfig, SeedConfig
    from lazyfs.manifest import ManifestBuilder, parse_ref
    from lazyfs.origin import open_origin
    from lazyfs.seed import publish as publish_tree
    from lazyfs.seed import scan_tree
    from tools.rootfs import RootfsError, build_root

    try:
        root = build_root(["python3-minimal"])
    except RootfsError as exc:
        pytest.fail(f"cannot build the Debian test root: {exc}")
    origin_dir = tmp_path_factory.mktemp("image") / "origin"

    async def go() -> Manifest:
        config = SeedConfig(chunk_size=IMAGE_CHUNK)
        builder = ManifestBuilder(config.chunk_size)
        files = scan_tree(root, builder)
        origin = open_origin(f"file://{origin_dir}", OriginConfig())
        try:
            res = await publish_tree(origin, builder, files, parse_ref("debian:base"), config)
        finally:
            await origin.aclose()
        return res.manifest

    return Image(root, origin_dir, asyncio.run(go()))


def _pids_mentioning(text: str) -> list[int]:
    want = os.fsencode(text)
    out = []
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == os.getpid():
            continue
        try:
            with open(f"/proc/{name}/cmdline", "rb") as f:
                cmdline = f.read()
        except OSError:
            continue
        if want in cmdline and pid_alive(int(name)):
            out.append(int(name))
    return out


def host_mounts_under(path: str | os.PathLike[str]) -> list[str]:
    """Mount points at or under ``path`` in the test's (the host's) mount namespace."""
    prefix = os.path.abspath(path)
    out = []
    with open("/proc/self/mountinfo", "rb") as f:
        for line in f:
            mp = os.fsdecode(re.sub(rb"\\([0-7]{3})", lambda m: bytes([int(m.group(1), 8)]), line.split()[4]))
            if mp == prefix or mp.startswith(prefix + "/"):
                out.append(mp)
    return out


@dataclass
class Runner:
    """Runs ``lazyfs run`` (in a session of its own); checks that each run leaves nothing behind,
    and at teardown kills whatever a failed test left by its pid."""

    base: Path
    _n: int = 0

    def paths(self, cache: Path | None = None) -> tuple[Path, Path]:
        self._n += 1
        tmp = self.base / f"run{self._n}"
        tmp.mkdir(parents=True)
        return tmp, cache or self.base / f"cache{self._n}"

    def start(
        self, origin: str, ref: str, *args: str | os.PathLike[str], cache: Path | None = None, stdin: int | None = None
    ) -> tuple[subprocess.Popen[str], Path]:
        tmp, cache_dir = self.paths(cache)
        argv = [*LAZYFS, "run", origin, ref, "--cache-dir", os.fspath(cache_dir), "--tmp-dir", os.fspath(tmp),
                *(os.fspath(a) for a in args)]  # fmt: skip
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL if stdin is None else stdin,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            errors="surrogateescape",
            start_new_session=True,
            cwd="/",
        )
        return proc, tmp

    def __call__(
        self,
        origin: str,
        ref: str,
        *args: str | os.PathLike[str],
        cache: Path | None = None,
        timeout: float = RUN_TIMEOUT,
    ) -> subprocess.CompletedProcess[str]:
        proc, tmp = self.start(origin, ref, *args, cache=cache)
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
            pytest.fail(f"`lazyfs run {ref} {args}` did not finish within {timeout:g} s:\n{err}")
        self.assert_clean(tmp)
        return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)

    def assert_clean(self, tmp: Path) -> None:
        """No daemon left for this run, nothing mounted under its directory, the directory empty."""
        wait_until(lambda: not _pids_mentioning(os.fspath(tmp)), 30, f"the processes of the run in {tmp} to exit")
        assert host_mounts_under(tmp) == []
        assert os.listdir(tmp) == [], f"lazyfs run left {os.listdir(tmp)} in {tmp}"

    def cleanup(self) -> None:
        for pid in _pids_mentioning(os.fspath(self.base)):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for mp in host_mounts_under(self.base):
            force_unmount(mp)


@pytest.fixture
def runner(tmp_path: Path) -> Iterator[Runner]:
    r = Runner(tmp_path / "runs")
    r.base.mkdir()
    try:
        yield r
    finally:
        r.cleanup()
