"""Loader benchmark: ``lazyfs.loader.load_file`` against safetensors, on the CPU, in one invocation.

Figures (every one against a baseline measured in the same run; limits from DESIGN.md):

1. **Cold, through a 1 Gbit/s link.**  A ~2 GiB bf16 model (N(0, 0.02), bench/common.py) is
   published to a ``file://`` origin served by nginx in a network namespace behind a tbf-limited
   veth (tools/netns.py); the mount's daemon runs in the client namespace.  lazyfs: a fresh mount
   with an empty cache, then ``iter_tensors`` of the file (the loader's plan goes to the daemon):
   time to the first tensor (goal < 0.5 s) and to the last (goal <= 1.1 x size / link + 0.5 s).
   Baseline: ``curl`` downloads the same file over the same link to the same disk, then
   ``safetensors.torch.load_file`` — first tensor after the download, last after the load.
2. **Warm, page cache dropped.**  The chunks are in the lazyfs cache; each repeat starts a fresh
   daemon on that cache (a node that restarted) and drops the page cache before every load:
   lazyfs ``load_file`` through the mount (fast path) vs ``safetensors.torch.load_file`` of the
   original file on the same disk (goal >= 1.0x), and lazyfs ``load_file`` of that plain local
   file, off any mount, vs the same safetensors load (goal >= 1.0x).

safetensors maps the file and returns tensors backed by that mapping: its ``load_file`` returns
before reading anything.  So that both sides have the bytes in memory when the clock stops, every
load here is followed by touching one byte of every 4 KiB page of every tensor (for the lazyfs
tensors, already in memory, that costs a few ms); the untouched safetensors time is reported too.

Run as root (namespaces, mounts, drop_caches), from the repository root::

    .venv/bin/python bench/bench_loader.py [--dir /var/tmp/lazyfs-bench] [--size 2GiB] [--repeat 3]

Prints the figures and replaces the ``bench_loader`` section of bench/RESULTS.md (``--no-write``
leaves it alone).  ``--cold-runs 0`` runs figure 2 only, without namespaces or nginx (the cache is
filled with ``lazyfs prefetch`` from the ``file://`` origin), and writes nothing: for iterating on
the warm path.  The test data and the seeded origin are cached under ``--dir`` (shared with
bench_mount.py); mounts and caches of the run are removed at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import safetensors.torch
import torch

import lazyfs.loader
from bench.common import (
    MiB,
    Mount,
    drop_caches,
    ensure_weights,
    lazyfs_argv,
    median,
    resident_bytes,
    seed_once,
    start_nginx,
    unmount_all,
    wait_quiet,
    warm_memory,
    write_section,
)
from lazyfs.cli import parse_size
from lazyfs.loader.readers import PlainReader
from tools.netns import LinkSpec, Topology, measure_tcp, open_topology

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "RESULTS.md"
MACHINE = "2-core VM, 24 GiB"
SECTION_BEGIN = "<!-- bench_loader:begin -->"
SECTION_END = "<!-- bench_loader:end -->"
PAGE = 4096
# DESIGN.md, "Measured limits" (this machine).
DISK_GBPS = 1.2
MEMCPY_GBPS = 13.6

Tensors = dict[str, torch.Tensor]


def touch(tensors: Tensors) -> int:
    """Read one byte of every page of every tensor (faults in a lazily mapped file); returns a checksum."""
    total = 0
    for t in tensors.values():
        if t.numel():
            total += int(t.reshape(-1).view(torch.uint8)[::PAGE].sum())
    return total


def same(a: Tensors, b: Tensors) -> bool:
    return a.keys() == b.keys() and all(
        a[k].dtype == b[k].dtype and a[k].shape == b[k].shape
        and torch.equal(a[k].reshape(-1).view(torch.uint8), b[k].reshape(-1).view(torch.uint8))
        for k in a
    )  # fmt: skip


# Disk traffic (bytes/s) below which the disk counts as idle before a timed section.
DISK_QUIET = 20e6


def other_benchmarks() -> list[str]:
    """Command lines of other benchmark processes (bench/*.py) running now."""
    mine = {os.getpid()}  # this process and its ancestors (a `timeout` or shell wrapping it)
    pid = os.getpid()
    while pid > 1:
        try:
            pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            break
        mine.add(pid)
    found = []
    for d in os.listdir("/proc"):
        if not d.isdigit() or int(d) in mine:
            continue
        try:
            cmd = Path(f"/proc/{d}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if "bench/bench_" in cmd or "bench.bench_" in cmd or "gpu_check" in cmd:
            found.append(cmd.strip())
    return found


def _disk_bytes() -> int:
    total = 0
    for line in Path("/proc/diskstats").read_text().splitlines():
        f = line.split()
        if len(f) > 9 and not f[2].startswith(("loop", "ram", "dm-")) and not f[2][-1].isdigit():
            total += (int(f[5]) + int(f[9])) * 512  # sectors read + written (whole disks only)
    return total


def disk_busy(interval: float = 0.5) -> float:
    """Bytes/s read and written on the machine's disks over ``interval`` seconds."""
    b0 = _disk_bytes()
    time.sleep(interval)
    return (_disk_bytes() - b0) / interval


def gbps(n: float, s: float) -> str:
    return f"{n / s / 1e9:.2f} GB/s"


@dataclass
class Row:
    figure: str
    lazyfs: str
    baseline: str
    ratio: float | None  # baseline time / lazyfs time (> 1: lazyfs is faster)
    goal: str
    met: bool | None
    limit: str


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.root = Path(args.dir)
        self.run_dir = self.root / f"loader-run-{os.getpid()}"
        self.origin_dir = self.root / "origin"
        self.rows: list[Row] = []
        self.notes: list[str] = []
        self.busy: list[float] = []
        self.topo: Topology | None = None
        self.url = ""

    def say(self, msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    def quiet(self) -> None:
        """Before a timed section: wait (bounded) until no other benchmark runs (they drop the page
        cache under us), the disk is idle and nothing else keeps the 2 cores busy."""
        deadline = time.monotonic() + self.args.quiet_timeout
        while time.monotonic() < deadline and (other_benchmarks() or disk_busy() > DISK_QUIET):
            time.sleep(1.0)
        others = other_benchmarks()
        if others:
            self.notes.append(f"another benchmark was running during a timed section: {others[0][:80]}")
        self.busy.append(wait_quiet(self.args.quiet_limit, max(1.0, deadline - time.monotonic())))

    def fresh(self, what: str) -> Path:
        d = self.run_dir / f"{what}-{time.monotonic_ns()}"
        d.mkdir(parents=True)
        return d

    def in_client(self, argv: list[str]) -> list[str]:
        assert self.topo is not None
        return self.topo.argv("client", argv)

    def mount(self, ref: str, cache: Path) -> Mount:
        if self.topo is None:  # figure 2 only: no link to model, the daemon reads the origin directory
            return Mount(f"file://{self.origin_dir.resolve()}", ref, self.fresh("mnt"), cache)
        return Mount(f"{self.url}/origin", ref, self.fresh("mnt"), cache, wrap=self.in_client)

    def fill_cache(self, ref: str) -> Path:
        """A cache holding every chunk of the model (what figure 1 leaves behind), via ``lazyfs prefetch``."""
        cache = self.fresh("cache")
        with self.mount(ref, cache) as m:
            subprocess.run(lazyfs_argv("prefetch", str(m.mountpoint), "-q"), check=True, timeout=1800)
        return cache

    # -------------------------------------------------------------------------------------------
    def run(self) -> None:
        a = self.args
        size = parse_size(a.size)
        weights = ensure_weights(self.root, size)
        ref = seed_once(weights.parent, self.origin_dir, f"bench-weights:s{size}")
        self.size = weights.stat().st_size
        self.weights = weights
        self.say(f"warming {a.warm_memory_gib:g} GiB of memory (a fresh VM's first touch is slow)")
        warm_memory(a.warm_memory_gib)
        self.check_drop_caches(weights)
        if a.cold_runs <= 0:
            self.notes.append("figure 1 not run (--cold-runs 0); the warm cache was filled with lazyfs prefetch "
                              "from a file:// origin")
            self.warm(ref, self.fill_cache(ref))
            return
        # nginx serves the origin and, for the baseline download, the original file.
        www = self.fresh("www")
        (www / "origin").symlink_to(self.origin_dir.resolve())
        (www / "model.safetensors").symlink_to(weights.resolve())
        spec = LinkSpec(rate_bit=int(a.rate * 1e6))
        with open_topology(f"lzl{os.getpid() % 10000}", spec) as topo:
            self.topo = topo
            self.url = start_nginx(lambda argv: topo.spawn("origin", argv),
                                   lambda argv: topo.run("client", argv, check=False, timeout=10),
                                   www, self.fresh("nginx"), topo.origin_addr).url
            self.notes.append(f"origin: nginx in netns {topo.origin}, daemon in netns {topo.client}; tbf "
                              f"{a.rate:g} Mbit/s both ways (burst {spec.burst_bytes // 1024} KiB, "
                              f"latency {spec.latency_ms:g} ms)")
            cache = self.cold(ref)
            self.warm(ref, cache)

    def check_drop_caches(self, path: Path) -> None:
        with open(path, "rb") as f:
            f.read(64 * MiB)
        before = resident_bytes(path)
        drop_caches()
        after = resident_bytes(path)
        if before < 64 * MiB or after > MiB:
            raise RuntimeError(f"drop_caches does not empty the page cache here ({before} -> {after} bytes)")

    # figure 1 ------------------------------------------------------------------------------------
    def cold(self, ref: str) -> Path:
        assert self.topo is not None
        a = self.args
        size = self.size
        self.quiet()
        tcp = measure_tcp(self.topo, 256 * MiB)
        self.say(f"link: one TCP stream {tcp / 1e6:.0f} MB/s")
        # The origin's files come from its page cache: the origin is never the bottleneck.
        for p in [self.weights, *sorted((self.origin_dir / "packs").iterdir())]:
            with open(p, "rb") as f:
                while f.read(16 * MiB):
                    pass
        base_first, base_total, base_load, lz_first, lz_total, wire = [], [], [], [], [], []
        cache = self.fresh("cache")
        reference: Tensors | None = None
        for i in range(a.cold_runs):
            # Baseline: download, then safetensors.
            dest = self.fresh("download") / "model.safetensors"
            self.quiet()
            t0 = time.perf_counter()
            self.topo.run("client", ["curl", "-s", "-f", "-o", str(dest), f"{self.url}/model.safetensors"],
                          timeout=1800)
            t_dl = time.perf_counter() - t0
            sd = safetensors.torch.load_file(dest)
            t_lazy = time.perf_counter() - t0
            touch(sd)
            t_all = time.perf_counter() - t0
            if dest.stat().st_size != size:
                raise RuntimeError(f"downloaded {dest.stat().st_size} bytes, expected {size}")
            base_first.append(t_lazy)  # the first tensor is usable once load_file returns
            base_total.append(t_all)
            base_load.append(t_lazy - t_dl)
            self.say(f"baseline: download {t_dl:.2f} s ({gbps(size, t_dl)}), + safetensors load_file "
                     f"{t_lazy - t_dl:.3f} s, + touching every page {t_all - t_lazy:.2f} s = {t_all:.2f} s")
            if reference is None:
                reference = sd
            del sd
            shutil.rmtree(dest.parent)
            gc.collect()
            # lazyfs: fresh daemon, empty cache.
            if i:
                shutil.rmtree(cache)
                cache = self.fresh("cache")
            with self.mount(ref, cache) as m:
                path = m.mountpoint / self.weights.name
                self.quiet()
                got: Tensors = {}
                t0 = time.perf_counter()
                it = lazyfs.loader.iter_tensors(path)
                for name, t in it:
                    if not got:
                        lz_first.append(time.perf_counter() - t0)
                    got[name] = t
                touch(got)
                lz_total.append(time.perf_counter() - t0)
                stats = lazyfs.loader.last_statistics()
                fetch = m.status()["fetch"]
            assert stats is not None
            wire.append(fetch["bytes_from_origin"])
            if not same(got, reference):
                raise RuntimeError("the lazyfs load differs from safetensors")
            self.say(f"lazyfs cold: first tensor {lz_first[-1]:.3f} s, all {lz_total[-1]:.2f} s "
                     f"({gbps(size, lz_total[-1])} file bytes, {gbps(wire[-1], lz_total[-1])} wire bytes); "
                     f"{stats.chunks_from_cache} chunks from the cache, {fetch['origin_requests']} origin requests, "
                     f"{fetch['origin_errors']} errors")
            del got
            gc.collect()
        link = a.rate * 1e6 / 8
        goal_total = 1.1 * size / link + 0.5
        lf, lt, bf, bt = median(lz_first), median(lz_total), median(base_first), median(base_total)
        limit = f"link {a.rate:g} Mbit/s = {link / 1e6:.0f} MB/s (one TCP stream: {tcp / 1e6:.0f} MB/s)"
        reader = PlainReader(str(self.weights))
        try:
            first = reader.read_header().tensors[0]
        finally:
            reader.close()
        wire_ratio = median(wire) / size
        bound = first.nbytes * wire_ratio / link
        self.rows.append(Row("1a. cold via 1 Gbit/s link: time to first tensor", f"{lf:.3f} s",
                             f"download, then safetensors: {bf:.2f} s", bf / lf, "< 0.5 s", lf < 0.5,
                             f"the first tensor in the file ({first.name}, {first.nbytes / MiB:.0f} MiB, "
                             f"~{first.nbytes * wire_ratio / MiB:.0f} MiB on the wire) needs >= {bound:.2f} s "
                             f"at {link / 1e6:.0f} MB/s"))
        self.rows.append(Row("1b. cold via 1 Gbit/s link: all tensors in memory",
                             f"{lt:.2f} s ({gbps(size, lt)})", f"{bt:.2f} s ({gbps(size, bt)})", bt / lt,
                             f"<= {goal_total:.1f} s (1.1 x size/link + 0.5 s)", lt <= goal_total, limit))
        self.notes.append(f"cold: the daemon fetched {median(wire) / 1e9:.2f} GB of zstd packs for the "
                          f"{size / 1e9:.2f} GB file (bf16 N(0, 0.02) compresses to ~0.78); the baseline "
                          f"downloads the raw file. Runs: lazyfs first tensor {fmt(lz_first)} s, all {fmt(lz_total)} "
                          f"s; baseline {fmt(base_total)} s (of which safetensors' load_file after the download "
                          f"{fmt(base_load)} s)")
        return cache

    # figure 2 ------------------------------------------------------------------------------------
    def warm(self, ref: str, cache: Path) -> None:
        size = self.size
        mount_t, st_t, st_lazy, plain_t = [], [], [], []
        for _ in range(self.args.repeat):
            with self.mount(ref, cache) as m:  # a fresh daemon on the warm cache
                path = m.mountpoint / self.weights.name
                self.quiet()
                drop_caches()
                dt, got = self.timed(lambda: lazyfs.loader.load_file(path))  # noqa: B023
                stats = lazyfs.loader.last_statistics()
                fetch = m.status()["fetch"]
            assert stats is not None
            if fetch["bytes_from_origin"] or not stats.chunks_from_cache:
                raise RuntimeError(f"warm load: {fetch['bytes_from_origin']} bytes from the origin, "
                                   f"{stats.chunks_from_cache} chunks from the cache")
            mount_t.append(dt)
            del got
            self.quiet()
            drop_caches()
            t0 = time.perf_counter()
            sd = safetensors.torch.load_file(self.weights)
            st_lazy.append(time.perf_counter() - t0)
            touch(sd)
            st_t.append(time.perf_counter() - t0)
            del sd
            gc.collect()
            self.quiet()
            drop_caches()
            dt, got = self.timed(lambda: lazyfs.loader.load_file(self.weights))
            plain_t.append(dt)
            del got
            gc.collect()
            self.say(f"warm: lazyfs via mount {mount_t[-1]:.2f} s ({gbps(size, mount_t[-1])}), safetensors "
                     f"{st_t[-1]:.2f} s ({gbps(size, st_t[-1])}; untouched {st_lazy[-1]:.3f} s), lazyfs "
                     f"off-mount {plain_t[-1]:.2f} s ({gbps(size, plain_t[-1])})")
        m_, s_, p_ = median(mount_t), median(st_t), median(plain_t)
        limit = f"disk {DISK_GBPS:g} GB/s (cold), memcpy {MEMCPY_GBPS:g} GB/s"
        self.rows.append(Row("2a. warm lazyfs cache, page cache dropped: through the mount",
                             f"{m_:.2f} s ({gbps(size, m_)})", f"safetensors, original file: {s_:.2f} s "
                             f"({gbps(size, s_)})", s_ / m_, ">= 1.0x", s_ / m_ >= 1.0, limit))
        self.rows.append(Row("2b. plain local file, page cache dropped: off-mount",
                             f"{p_:.2f} s ({gbps(size, p_)})", f"safetensors: {s_:.2f} s ({gbps(size, s_)})",
                             s_ / p_, ">= 1.0x", s_ / p_ >= 1.0, limit))
        self.notes.append(f"warm runs (s): through the mount {fmt(mount_t)}; safetensors + touch {fmt(st_t)} "
                          f"(load_file alone {fmt(st_lazy)}); off-mount {fmt(plain_t)}")

    def timed(self, fn: Callable[[], Tensors]) -> tuple[float, Tensors]:
        t0 = time.perf_counter()
        out = fn()
        touch(out)
        return time.perf_counter() - t0, out

    def table(self) -> list[str]:
        head = ["figure", "lazyfs", "baseline (same run)", "baseline / lazyfs", "goal", "limit (DESIGN.md)"]
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in self.rows:
            ratio = f"**{r.ratio:.2f}x**" if r.ratio is not None else ""
            verdict = "" if r.met is None else (" met" if r.met else " **missed**")
            lines.append(f"| {r.figure} | {r.lazyfs} | {r.baseline} | {ratio} | {r.goal}{verdict} | {r.limit} |")
        return lines


def fmt(xs: Sequence[float]) -> str:
    return ", ".join(f"{x:.2f}" for x in xs)


def write_results(path: Path, bench: Bench, command: str) -> None:
    about = (
        f"Machine: {MACHINE} (kernel {os.uname().release}), torch {torch.__version__}, safetensors "
        f"{safetensors.__version__}. Date: {{date}}. Medians of the runs listed below."
    )
    title = "bench_loader — lazyfs.loader vs safetensors (CPU)"
    write_section(path, (SECTION_BEGIN, SECTION_END), title, about, command, bench.table(), bench.notes)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dir", default="/var/tmp/lazyfs-bench", help="test data, origin and per-run state")
    p.add_argument("--size", default="2GiB", help="size of the safetensors file (default 2GiB)")
    p.add_argument("--rate", type=float, default=1000.0, help="link rate in Mbit/s (default 1000)")
    p.add_argument("--cold-runs", type=int, default=1,
                   help="runs of figure 1 (median); 0: only figure 2, without the network (implies --no-write)")
    p.add_argument("--repeat", type=int, default=3, help="runs of figure 2 (median)")
    p.add_argument("--quiet-limit", type=float, default=0.10,
                   help="before each timed section wait until the machine is at most this busy (default 0.10)")
    p.add_argument("--quiet-timeout", type=float, default=120.0, help="longest wait for a quiet machine (s)")
    p.add_argument("--warm-memory-gib", type=float, default=8.0)
    p.add_argument("--no-write", action="store_true", help="do not update bench/RESULTS.md")
    p.add_argument("--results", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    if os.geteuid() != 0:
        p.error("run as root: network namespaces, mounts and drop_caches need it")
    for sig in (signal.SIGTERM, signal.SIGHUP):  # run the cleanup (finally, atexit) on these too
        signal.signal(sig, lambda s, f: sys.exit(128 + s))
    bench = Bench(args)
    try:
        bench.run()
    finally:
        unmount_all()
        still = [d for d in bench.run_dir.glob("mnt-*") if os.path.ismount(d)]
        if still:
            print(f"not removing {bench.run_dir}: {still} still mounted", file=sys.stderr)
        else:
            with contextlib.suppress(FileNotFoundError):
                shutil.rmtree(bench.run_dir)
    if bench.busy:
        bench.notes.append(f"machine load just before the {len(bench.busy)} timed sections: median "
                           f"{median(bench.busy):.0%}, max {max(bench.busy):.0%}")
    print()
    for line in bench.table():
        print(line)
    for n in dict.fromkeys(bench.notes):
        print(f"- {n}")
    if not args.no_write and args.cold_runs > 0:  # never replace the stored figures with half of them
        command = ".venv/bin/python bench/bench_loader.py " + shlex.join(argv if argv is not None else sys.argv[1:])
        write_results(args.results, bench, command.strip())
        print(f"\nwrote the bench_loader section of {args.results}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
