"""Shared benchmark helpers: test data, cache control, timing, mounts and an nginx origin.

Everything a benchmark needs that is not the thing being measured:

* :func:`ensure_weights` — a deterministic safetensors file of bf16 weights drawn from
  N(0, 0.02) (the statistics of trained transformer weights: zstd saves ~22 % on them, like on
  real checkpoints), laid out like a Llama-style model; cached by its parameters.
* :func:`ensure_tree` — a tree of many small files (the metadata benchmark).
* :func:`seed_once` — publish a source to a ``file://`` origin once (the ref is the cache key).
* :func:`drop_caches` / :func:`resident_bytes` — cold-cache runs, and the check that dropping works.
* :func:`read_file` — one sequential read with a fixed buffer, timed.
* :class:`Mount` — ``lazyfs mount``/``umount`` through the CLI (optionally in a network namespace),
  always unmounted on exit, daemon stopped by pid if it lingers.
* :func:`start_nginx` — a static origin inside a namespace of :mod:`tools.netns`.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import json
import mmap
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, NamedTuple, Self

import numpy as np

__all__ = [
    "GiB",
    "MiB",
    "Mount",
    "NginxProcess",
    "cpu_times",
    "drop_caches",
    "ensure_tree",
    "ensure_weights",
    "lazyfs_argv",
    "machine_busy",
    "median",
    "read_file",
    "resident_bytes",
    "seed_once",
    "start_nginx",
    "timed",
    "unmount_all",
    "wait_quiet",
    "warm_memory",
    "write_safetensors",
]

MiB = 1024 * 1024
GiB = 1024 * MiB
# Reads through the mount and natively use one buffer size: 1 MiB is the FUSE request size
# (read_ahead_kb=1024, max_pages=256), and per-call overhead is noise at that size.
READ_BUFFER = 1 * MiB
# Bound on every wait for a daemon or server (a broken run fails instead of hanging).
PROCESS_TIMEOUT = 120.0


# --- test data ---------------------------------------------------------------------------------


def _llama_like_shapes(target: int) -> list[tuple[str, tuple[int, ...]]]:
    """Tensor names and shapes of a Llama-style model (TinyLlama-1.1B dimensions) of about ``target`` bytes."""
    vocab, hidden, inter, kv = 32000, 2048, 5632, 256
    layer: list[tuple[str, tuple[int, ...]]] = [
        ("input_layernorm.weight", (hidden,)),
        ("self_attn.q_proj.weight", (hidden, hidden)),
        ("self_attn.k_proj.weight", (kv, hidden)),
        ("self_attn.v_proj.weight", (kv, hidden)),
        ("self_attn.o_proj.weight", (hidden, hidden)),
        ("post_attention_layernorm.weight", (hidden,)),
        ("mlp.gate_proj.weight", (inter, hidden)),
        ("mlp.up_proj.weight", (inter, hidden)),
        ("mlp.down_proj.weight", (hidden, inter)),
    ]
    layer_bytes = 2 * sum(int(np.prod(s)) for _, s in layer)
    head: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (vocab, hidden))]
    tail: list[tuple[str, tuple[int, ...]]] = [("model.norm.weight", (hidden,)), ("lm_head.weight", (vocab, hidden))]
    fixed = 2 * sum(int(np.prod(s)) for _, s in head + tail)
    n_layers = max(0, (target - fixed) // layer_bytes)
    shapes = list(head)
    for i in range(n_layers):
        shapes += [(f"model.layers.{i}.{name}", shape) for name, shape in layer]
    rest = target - fixed - n_layers * layer_bytes
    if rest >= 2 * hidden:  # fill up to the target with one more (partial) MLP matrix
        shapes.append((f"model.layers.{n_layers}.mlp.gate_proj.weight", (rest // (2 * hidden), hidden)))
    return shapes + tail


def _bf16(x: np.ndarray[Any, np.dtype[np.float32]]) -> np.ndarray[Any, np.dtype[np.uint16]]:
    """float32 -> bf16 bit patterns, rounding to nearest even (what torch does)."""
    u = x.view(np.uint32)
    rounded = u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))
    return (rounded >> np.uint32(16)).astype(np.uint16)


def write_safetensors(path: Path, size: int, seed: int = 0, std: float = 0.02) -> int:
    """Write a safetensors file of about ``size`` bytes of bf16 weights ~ N(0, std); returns its size.

    Streams in 16 Mi-value blocks: memory stays ~100 MB whatever the size.  Norm weights are
    ones, as in a freshly initialised RMSNorm.  Deterministic for a given (size, seed, std).
    """
    shapes = _llama_like_shapes(size)
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    off = 0
    for name, shape in shapes:
        n = 2 * int(np.prod(shape))
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [off, off + n]}
        off += n
    hbytes = json.dumps(header, separators=(",", ":")).encode()
    hbytes += b" " * (-len(hbytes) % 8)  # the data starts 8-byte aligned
    rng = np.random.default_rng(seed)
    block = 16 * MiB
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as f:
        f.write(len(hbytes).to_bytes(8, "little"))
        f.write(hbytes)
        for name, shape in shapes:
            left = int(np.prod(shape))
            while left:
                k = min(block, left)
                if name.endswith("norm.weight"):
                    f.write(np.full(k, 0x3F80, dtype=np.uint16).tobytes())  # 1.0 in bf16
                else:
                    f.write(_bf16(rng.standard_normal(k, dtype=np.float32) * np.float32(std)).tobytes())
                left -= k
        f.flush()
        os.fsync(f.fileno())
    tmp.rename(path)
    return path.stat().st_size


def ensure_weights(root: Path, size: int, seed: int = 0) -> Path:
    """``root/weights-<size>/model.safetensors``, generated once per (size, seed)."""
    d = root / f"weights-{size}"
    path = d / "model.safetensors"
    stamp = d.parent / f"weights-{size}.stamp"
    want = json.dumps({"size": size, "seed": seed, "std": 0.02, "version": 1})
    if path.exists() and stamp.exists() and stamp.read_text() == want:
        return path
    d.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    n = write_safetensors(path, size, seed)
    stamp.write_text(want)
    print(f"generated {path} ({n:,} bytes) in {time.perf_counter() - t:.1f} s", file=sys.stderr)
    return path


def ensure_tree(root: Path, nfiles: int, per_dir: int = 100) -> tuple[Path, list[str]]:
    """``root/tree-<n>``: ``nfiles`` small files (0-4 KiB), ``per_dir`` per directory; returns (dir, paths)."""
    d = root / f"tree-{nfiles}"
    rels = [f"d{i // per_dir:04d}/f{i % per_dir:04d}.txt" for i in range(nfiles)]
    stamp = root / f"tree-{nfiles}.stamp"
    if d.exists() and stamp.exists():
        return d, rels
    if d.exists():
        shutil.rmtree(d)
    rng = np.random.default_rng(1)
    sizes = rng.integers(0, 4096, nfiles)
    for rel, n in zip(rels, sizes, strict=True):
        p = d / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(rel.encode() * (int(n) // len(rel) + 1))
    stamp.write_text(str(nfiles))
    return d, rels


def lazyfs_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "lazyfs", *args]


def seed_once(src: Path, origin_dir: Path, name: str) -> str:
    """Publish ``src`` as ``name`` (``NAME:TAG``) to ``file://origin_dir`` unless the ref exists."""
    ref_name, tag = name.split(":")
    if (origin_dir / "refs" / ref_name / tag).exists():
        return name
    origin_dir.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    subprocess.run(lazyfs_argv("seed", str(src), f"file://{origin_dir}", "--name", name, "-q"),
                   check=True, stdout=subprocess.DEVNULL, timeout=1800)
    print(f"seeded {src} as {name} in {time.perf_counter() - t:.1f} s", file=sys.stderr)
    return name


# --- cache control and timing ------------------------------------------------------------------


def drop_caches() -> None:
    """Write back dirty pages, then drop the page cache, dentries and inodes (root only)."""
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def resident_bytes(path: Path) -> int:
    """Bytes of ``path`` in the page cache (mincore via util-linux ``fincore``)."""
    out = subprocess.run(["fincore", "--bytes", "--noheadings", "--output", "RES", str(path)],
                         capture_output=True, text=True, check=True, timeout=30).stdout
    return int(out.split()[0])


def read_file(path: Path, buffer: int = READ_BUFFER) -> tuple[int, float]:
    """Read ``path`` sequentially into one reused buffer; returns (bytes, seconds)."""
    buf = bytearray(buffer)
    view = memoryview(buf)
    total = 0
    fd = os.open(path, os.O_RDONLY)
    try:
        t = time.perf_counter()
        while True:
            n = os.readv(fd, [view])
            if not n:
                break
            total += n
        dt = time.perf_counter() - t
    finally:
        os.close(fd)
    return total, dt


def warm_memory(gib: float) -> None:
    """Touch ``gib`` GiB of anonymous memory once and free it.

    A fresh VM backs guest memory on first touch, which makes the first page-cache fills
    slow; doing that here keeps it out of the timed reads.
    """
    n = int(gib * GiB)
    with mmap.mmap(-1, n) as m:
        page = b"\1" * MiB
        for off in range(0, n, MiB):
            m[off : off + MiB] = page


def cpu_times() -> tuple[int, int]:
    """(busy, total) jiffies of the whole machine from /proc/stat."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:9]]
    idle = v[3] + v[4]
    return sum(v) - idle, sum(v)


def _disk_ticks() -> int:
    """Milliseconds any whole disk had I/O in flight (``io_ticks`` of /proc/diskstats), summed."""
    total = 0
    with open("/proc/diskstats") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 13 and os.path.exists(f"/sys/block/{parts[2]}/device"):
                total += int(parts[12])
    return total


def machine_busy(interval: float = 0.5) -> float:
    """How busy the machine is over ``interval`` s: the larger of CPU (all cores) and disk utilisation.

    Someone else's work skews timings: on 2 cores another process halves what the daemon
    gets, and another writer halves what the disk gives.
    """
    b0, t0 = cpu_times()
    d0 = _disk_ticks()
    time.sleep(interval)
    b1, t1 = cpu_times()
    d1 = _disk_ticks()
    return max((b1 - b0) / max(1, t1 - t0), (d1 - d0) / 1000 / interval)


def wait_quiet(limit: float = 0.10, timeout: float = 120.0) -> float:
    """Wait (bounded) until the machine is at most ``limit`` busy; returns the last busy fraction.

    This machine has 2 cores: another process's work during a timed read halves what
    the daemon gets.  After ``timeout`` the run goes on and the caller records the load.
    """
    deadline = time.monotonic() + timeout
    busy = machine_busy()
    while busy > limit and time.monotonic() < deadline:
        busy = machine_busy()
    return busy


def median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs))


# --- mounts ------------------------------------------------------------------------------------


@dataclass
class Mount:
    """``lazyfs mount ORIGIN REF MOUNTPOINT`` through the CLI, as a user would run it.

    ``wrap`` turns the mount command into the one actually run (e.g. ``tools.netns.ns_argv``
    for a daemon inside a network namespace; its mount stays visible to the host).
    """

    origin: str
    ref: str
    mountpoint: Path
    cache_dir: Path
    wrap: Callable[[list[str]], list[str]] = list
    pid: int | None = None

    def __enter__(self) -> Self:
        self.mountpoint.mkdir(parents=True, exist_ok=True)
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        _mounted.append(self)
        argv = self.wrap(lazyfs_argv("mount", self.origin, self.ref, str(self.mountpoint),
                                     "--cache-dir", str(self.cache_dir)))
        res = subprocess.run(argv, capture_output=True, text=True, timeout=PROCESS_TIMEOUT)
        if res.returncode != 0:
            _mounted.remove(self)
            raise RuntimeError(f"mount failed: {res.stderr.strip()}\n{self.log_tail()}")
        self.pid = int(self.status()["pid"])
        return self

    def status(self) -> dict[str, Any]:
        res = subprocess.run(lazyfs_argv("status", "--json", str(self.mountpoint)),
                             capture_output=True, text=True, check=True, timeout=30)
        data: dict[str, Any] = json.loads(res.stdout)
        return data

    def log_tail(self, n: int = 3000) -> str:
        with contextlib.suppress(OSError):
            return (self.cache_dir / "daemon.log").read_text(errors="replace")[-n:]
        return ""

    def close(self) -> None:
        if self in _mounted:
            _mounted.remove(self)
        if os.path.ismount(self.mountpoint):
            res = subprocess.run(lazyfs_argv("umount", str(self.mountpoint)), capture_output=True,
                                 text=True, timeout=PROCESS_TIMEOUT)
            if res.returncode != 0 and os.path.ismount(self.mountpoint):
                subprocess.run(["umount", "-l", str(self.mountpoint)], check=False, timeout=30)
        if self.pid is not None:
            _stop_pid(self.pid)

    def __exit__(self, t: type[BaseException] | None, v: BaseException | None, tb: TracebackType | None) -> None:
        self.close()


def _stop_pid(pid: int) -> None:
    """Wait (bounded) for a daemon to exit after its unmount; SIGTERM, then SIGKILL it if it lingers."""
    for sig in (0, 15, 9):
        if sig:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        for _ in range(200):
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.05)


_mounted: list[Mount] = []


@atexit.register
def unmount_all() -> None:
    """Unmount every :class:`Mount` still open (also run at exit)."""
    for m in reversed(list(_mounted)):
        with contextlib.suppress(Exception):
            m.close()


# --- nginx in a namespace ----------------------------------------------------------------------


def _nginx_conf(root: Path, workdir: Path, addr: str, port: int, access_log: Path | None) -> str:
    log = "access_log off;" if access_log is None else (
        "log_format bytes '$body_bytes_sent $bytes_sent $status';\n"
        f"    access_log {access_log} bytes;"
    )
    return f"""
daemon off;
user root;
# One worker: at 1 Gbit/s the origin is not the bottleneck, and this machine has 2 cores.
worker_processes 1;
pid {workdir / "nginx.pid"};
error_log {workdir / "error.log"} warn;
events {{ worker_connections 1024; }}
http {{
    default_type application/octet-stream;
    {log}
    sendfile on;
    tcp_nopush on;
    keepalive_requests 100000;
    server {{
        listen {addr}:{port};
        root {root};
        location / {{ try_files $uri =404; }}
    }}
}}
"""


class NginxProcess(NamedTuple):
    proc: subprocess.Popen[bytes]
    url: str


def start_nginx(
    spawn: Callable[[list[str]], subprocess.Popen[bytes]],
    probe: Callable[[list[str]], subprocess.CompletedProcess[str]],
    root: Path,
    workdir: Path,
    addr: str,
    port: int = 80,
    access_log: Path | None = None,
) -> NginxProcess:
    """Start nginx serving ``root`` on ``addr:port`` through ``spawn`` (e.g. ``Topology.spawn`` on
    the origin side); waits (bounded) until ``probe`` (a curl run on the client side) gets an answer.
    ``access_log`` logs ``$body_bytes_sent $bytes_sent $status`` per request (a benchmark's count of
    origin egress).  The caller owns the process (a Topology stops it on close).
    """
    workdir.mkdir(parents=True, exist_ok=True)
    for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (workdir / kind).mkdir(exist_ok=True)
    conf = workdir / "nginx.conf"
    conf.write_text(_nginx_conf(root.resolve(), workdir.resolve(), addr, port, access_log))
    proc = spawn(["nginx", "-p", str(workdir), "-c", str(conf), "-e", str(workdir / "error.log")])
    url = f"http://{addr}:{port}"
    for _ in range(100):
        if proc.poll() is not None:
            raise RuntimeError(f"nginx exited ({proc.returncode}): {(workdir / 'error.log').read_text()[-2000:]}")
        res = probe(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "-m", "2", url + "/"])
        if res.stdout.strip() not in ("", "000"):
            return NginxProcess(proc, url)
        time.sleep(0.1)
    raise RuntimeError("nginx did not answer within 10 s")


@contextlib.contextmanager
def timed() -> Iterator[list[float]]:
    """``with timed() as t: ...`` then ``t[0]`` is the elapsed seconds."""
    out: list[float] = []
    t = time.perf_counter()
    try:
        yield out
    finally:
        out.append(time.perf_counter() - t)


RESULTS_PREAMBLE = (
    "# Benchmark results\n\nThe latest figures of each benchmark in bench/, one section per benchmark.\n"
    "Every figure is a ratio against a baseline measured in the same invocation, next to the physical\n"
    'limit from DESIGN.md ("Measured limits").\n\n'
)


def replace_section(path: Path, begin: str, end: str, body: Sequence[str]) -> None:
    """Write ``body`` (which starts with ``begin`` and ends with ``end``) into ``path``.

    The text between an existing ``begin``/``end`` pair is replaced; otherwise the section is
    appended.  Other benchmarks' sections are left as they are.
    """
    text = path.read_text() if path.exists() else RESULTS_PREAMBLE
    if begin in text and end in text:
        pre, rest = text.split(begin, 1)
        post = rest.split(end, 1)[1]
        text = pre + "\n".join(body) + post
    else:
        text = text.rstrip("\n") + "\n\n" + "\n".join(body) + "\n"
    path.write_text(text)


def write_section(
    path: Path,
    markers: tuple[str, str],
    title: str,
    about: str,
    command: str,
    table: Sequence[str],
    notes: Sequence[str],
    extra: Sequence[str] = (),
) -> None:
    """Write one benchmark's section of RESULTS.md: title, machine and date line (``about``, to
    which the date is added), the exact command, the table, the notes (each once), then ``extra``."""
    begin, end = markers
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    body = [
        begin,
        f"## {title}",
        "",
        about.replace("{date}", now),
        "",
        "Command (as root, from the repository root):",
        "",
        "```",
        command,
        "```",
        "",
        *table,
        "",
        *[f"- {n}" for n in dict.fromkeys(notes)],
        *extra,
        end,
    ]
    replace_section(path, begin, end, body)
