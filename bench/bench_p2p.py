"""Peer-to-peer benchmark: N nodes mount the same model at once; how often does each byte leave the origin,
and how long until the slowest node has read it all?  Every figure has a baseline from the same invocation:
the same nodes without peers (each node from the origin only).

Figures (goals from the p2p issue; DESIGN.md, "users": "origin egress ≈ 1× the model, every node done in
≈ one model-time at its NIC speed"):

1. **cluster**: ``--nodes`` (4) nodes and the origin, each in its own network namespace of a star
   (tools/netns.py ``open_cluster``: a bridge, one veth per member, tbf ``--rate`` (1 Gbit/s) on both
   ends, so each member has a full-duplex 1 Gbit/s NIC).  nginx in the origin namespace serves the
   ``file://`` origin; every node mounts the ref from a cold cache, then all read the whole ~1 GiB
   bf16 safetensors file at the same moment (4 MiB reads).  Origin egress is counted at the origin's
   interface (frames sent) and in nginx's access log (``$body_bytes_sent``).
   Goals: origin egress <= 1.05x the model; makespan <= 1.3x (model size / link rate);
   baseline ≈ nodes x stored size / link rate (the origin's upload is shared).
2. **loopback**: ``--loopback-nodes`` (8) daemons on 127.0.0.1 (distinct ports), nginx on loopback,
   no rate limit: origin egress (nginx access log) and makespan, with and without peers.  With
   nothing limiting the network, this measures what the 2 cores allow.
3. **cluster at a rate 2 cores keep up with**: figure 1 again at ``--slow-rate`` (200 Mbit/s) with a
   ``--slow-size`` (256 MiB) model, so the links, not the CPU, set the pace: the goals of figure 1 apply.

Each daemon's CPU seconds (``/proc/PID/stat``) and the whole machine's CPU use during each run are
recorded: on this 2-core VM, 4-8 daemons plus nginx can be CPU-bound, and the notes say so when they are.

Run as root (namespaces, mounts, drop_caches), from the repository root::

    .venv/bin/python -m bench.bench_p2p [--size 1GiB] [--nodes 4] [--loopback-nodes 8] [--only 1,2,3]
                                        [--no-peers-only | --peers-only] [--peer-timeout S] [--runs 1] [--no-write]

(about 12 minutes on a quiet machine; ``--peers-only`` prints the per-node detail and writes nothing).

Test data and the seeded ``file://`` origin are cached under ``--dir`` (/var/tmp/lazyfs-bench);
per-run caches, mountpoints and namespaces are removed at the end, also after Ctrl-C or an error.
Results go to the ``bench_p2p`` section of bench/RESULTS.md (``--no-write`` skips that).
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import json
import os
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (
    MiB,
    Mount,
    cpu_times,
    drop_caches,
    ensure_weights,
    median,
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
from tools.netns import Cluster, LinkSpec, measure_streams, open_cluster

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "RESULTS.md"
MACHINE = "2-core VM, 24 GiB"
SECTION_BEGIN = "<!-- bench_p2p:begin -->"
SECTION_END = "<!-- bench_p2p:end -->"
PEER_PORT = 7070
READ_BUFFER = 4 * MiB
# Bound on one run's reads (every node reading the whole file); a stuck run fails instead of hanging.
READ_TIMEOUT = 900.0
# The machine counts as CPU-bound during a run when all cores together were at least this busy.
CPU_BOUND = 0.85


# --- processes around the mounts --------------------------------------------------------------------

_READER = """
import json, os, sys, time
path, start_at = sys.argv[1], float(sys.argv[2])
buf = bytearray(int(sys.argv[3])); view = memoryview(buf)
fd = os.open(path, os.O_RDONLY)
while (left := start_at - time.time()) > 0:
    time.sleep(min(left, 0.01))
t0 = time.time(); c0 = time.process_time(); n = 0; error = ""; marks = []
try:
    while k := os.readv(fd, [view]):
        n += k
        marks.append(round(time.time() - t0, 4))
except OSError as exc:
    error = f"{type(exc).__name__}: {exc} after {n} bytes"
t1 = time.time()
print(json.dumps({"bytes": n, "start": t0, "end": t1, "cpu": time.process_time() - c0, "error": error,
                  "marks": marks}))
"""


def proc_cpu(pid: int) -> float:
    """User + system CPU seconds used so far by process ``pid`` (all its threads); 0 once it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def children_of(pid: int) -> list[int]:
    """Direct children of ``pid`` (nginx's workers)."""
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError, IndexError), open(f"/proc/{entry}/stat") as f:
                if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                    out.append(int(entry))
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def in_namespace(cluster: Cluster, member: str) -> Callable[[list[str]], list[str]]:
    """A ``Mount.wrap`` that runs the mount command in ``member``'s network namespace."""
    return lambda argv: cluster.argv(member, argv)


def with_flags(wrap: Callable[[list[str]], list[str]], flags: list[str]) -> Callable[[list[str]], list[str]]:
    """A ``Mount.wrap`` that appends ``flags`` to the mount command, then applies ``wrap``."""
    return lambda argv: wrap([*argv, *flags])


def with_env(wrap: Callable[[list[str]], list[str]], env: dict[str, str]) -> Callable[[list[str]], list[str]]:
    """A ``Mount.wrap`` that runs the mount command with ``env`` added to its environment."""
    return lambda argv: wrap(["env", *(f"{k}={v}" for k, v in env.items()), *argv])


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


_own: list[subprocess.Popen[bytes]] = []  # processes this benchmark started outside a Cluster


@atexit.register
def _stop_own() -> None:
    for proc in reversed(_own):
        with contextlib.suppress(Exception):
            _stop(proc)


# --- nginx with an access log -----------------------------------------------------------------------


@dataclass
class Nginx:
    """nginx serving the origin directory; its access log counts the bytes it sent."""

    proc: subprocess.Popen[bytes]
    url: str
    log: Path

    def log_size(self) -> int:
        return self.log.stat().st_size if self.log.exists() else 0

    def sent_since(self, offset: int) -> tuple[int, int, int]:
        """(requests, body bytes, bytes with headers) logged after byte ``offset`` of the access log."""
        with open(self.log, "rb") as f:
            f.seek(offset)
            lines = f.read().decode(errors="replace").splitlines()
        body = total = 0
        for line in lines:
            parts = line.split()
            body += int(parts[0])
            total += int(parts[1])
        return len(lines), body, total

    def cpu(self) -> float:
        return sum(proc_cpu(p) for p in [self.proc.pid, *children_of(self.proc.pid)])


def counting_nginx(spawn: Callable[[list[str]], subprocess.Popen[bytes]], root: Path, workdir: Path, addr: str,
                   port: int, probe: Callable[[list[str]], subprocess.CompletedProcess[str]]) -> Nginx:
    """nginx (one worker, sendfile) serving ``root`` on ``addr:port`` with a byte-counting access log."""
    log = workdir / "access.log"
    proc, url = start_nginx(spawn, probe, root, workdir, addr, port, access_log=log)
    return Nginx(proc, url, log)


# --- one run: N nodes mount and read at once ---------------------------------------------------------


@dataclass
class NodeSpec:
    name: str
    wrap: Callable[[list[str]], list[str]]  # runs the mount command where the node lives (its netns)
    listen: str  # HOST:PORT of its peer server


@dataclass
class NodeResult:
    name: str
    bytes: int
    start: float
    end: float
    error: str
    daemon_cpu: float
    reader_cpu: float
    fetch: dict[str, Any]
    peers: dict[str, Any] | None
    rx: int | None = None  # link counters (cluster only): bytes the node received / sent
    tx: int | None = None

    @property
    def seconds(self) -> float:
        return self.end - self.start


@dataclass
class RunResult:
    mode: str  # "peers" or "origin only"
    nodes: list[NodeResult]
    origin_requests: int
    origin_body: int  # nginx $body_bytes_sent, summed
    origin_sent: int  # nginx $bytes_sent (with headers), summed
    origin_wire: int | None  # the origin's interface tx bytes (cluster only)
    nginx_cpu: float
    busy: float  # whole-machine CPU use during the reads (fraction of all cores)
    mount_s: float  # mounting all nodes at once

    @property
    def makespan(self) -> float:
        return max(n.end for n in self.nodes) - min(n.start for n in self.nodes)

    @property
    def errors(self) -> list[str]:
        return [f"{n.name}: {n.error}" for n in self.nodes if n.error]


@dataclass
class Model:
    ref: str
    filename: str
    size: int
    manifest: Manifest


@dataclass
class Row:
    figure: str
    value: str
    baseline: str
    goal: str
    verdict: str
    reference: str


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.root = Path(args.dir)
        self.origin_dir = self.root / "origin-p2p"
        self.run_dir = self.root / f"p2p-run-{os.getpid()}"
        self.rows: list[Row] = []
        self.notes: list[str] = []
        self.details: list[str] = []
        self.busy_before: list[float] = []
        self.token = self.run_dir / "peer-token"
        self.chunks: dict[str, list[Any]] = {}  # ref -> the manifest's chunks (for --trace)

    def say(self, msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    def quiet(self) -> None:
        """Before a timed section: wait (bounded) for a quiet machine, then touch ``--prewarm-gib`` of
        memory so the page-cache fills find host-backed pages (see bench_mount: ~1.3 s/GiB otherwise)."""
        self.busy_before.append(wait_quiet(self.args.quiet_limit, self.args.quiet_timeout))
        if self.args.prewarm_gib > 0:
            warm_memory(self.args.prewarm_gib)

    def fresh(self, what: str) -> Path:
        d = self.run_dir / f"{what}-{time.monotonic_ns()}"
        d.mkdir(parents=True)
        return d

    def modes(self) -> list[bool]:
        """Peers on/off, baseline first (its caches are gone before the peer run starts)."""
        if self.args.peers_only:
            return [True]
        return [False] if self.args.no_peers_only else [False, True]

    # ------------------------------------------------------------------------------------------------
    def one_run(self, nodes: Sequence[NodeSpec], url: str, ref: str, filename: str, size: int, nginx: Nginx,
                peers: bool, counters: Callable[[], dict[str, tuple[int, int]]] | None = None,
                origin_member: str | None = None) -> RunResult:
        """Mount every node (at once, cold caches), then read ``filename`` on all of them at the same moment."""
        peer_list = ",".join(n.listen for n in nodes)
        trace_dir = None
        if self.args.trace is not None:
            trace_dir = self.args.trace / f"{'peers' if peers else 'origin'}-{time.strftime('%H%M%S')}"
            trace_dir.mkdir(parents=True)
        mounts: list[Mount] = []
        readers: list[subprocess.Popen[bytes]] = []
        try:
            def make(node: NodeSpec) -> Mount:
                extra = (["--listen", node.listen, "--peers", peer_list, "--peer-token-file", str(self.token)]
                         if peers else [])
                if peers and self.args.peer_timeout:
                    extra += ["--peer-timeout", str(self.args.peer_timeout)]
                wrap = with_flags(node.wrap, extra)
                if trace_dir is not None:
                    wrap = with_env(wrap, {"LAZYFS_P2P_TRACE": str(trace_dir / f"{node.name}.jsonl")})
                m = Mount(url, ref, self.fresh(f"mnt-{node.name}"), self.fresh(f"cache-{node.name}"), wrap=wrap)
                return m.__enter__()

            t = time.perf_counter()
            with ThreadPoolExecutor(len(nodes)) as ex:
                futures = [ex.submit(make, n) for n in nodes]
                for f in futures:
                    with contextlib.suppress(Exception):
                        mounts.append(f.result())
            mount_s = time.perf_counter() - t
            if len(mounts) != len(nodes):
                for f in futures:
                    f.result()  # raises the first failure
            self.quiet()
            drop_caches()
            before = counters() if counters else {}
            log_off = nginx.log_size()
            cpu0 = [proc_cpu(m.pid or 0) for m in mounts]
            nginx_cpu0 = nginx.cpu()
            busy0 = cpu_times()
            start_at = time.time() + 0.5 + 0.1 * len(nodes)  # every reader started and waiting by then
            for m in mounts:
                readers.append(subprocess.Popen(
                    [sys.executable, "-c", _READER, str(m.mountpoint / filename), repr(start_at), str(READ_BUFFER)],
                    stdout=subprocess.PIPE))
            samples: list[tuple[float, dict[str, tuple[int, int]]]] = []
            sampling = threading.Event()
            sampler = None
            if trace_dir is not None and counters is not None:
                def sample() -> None:
                    while not sampling.wait(0.5):
                        samples.append((time.time(), counters()))

                sampler = threading.Thread(target=sample, daemon=True)
                sampler.start()
            outs = []
            for r in readers:
                out, _ = r.communicate(timeout=READ_TIMEOUT)
                outs.append(json.loads(out) if out.strip() else {"bytes": 0, "start": start_at, "end": time.time(),
                                                                 "cpu": 0.0, "error": f"reader exit {r.returncode}"})
            sampling.set()
            if sampler is not None:
                sampler.join()
            busy1 = cpu_times()
            cpu1 = [proc_cpu(m.pid or 0) for m in mounts]
            nginx_cpu = nginx.cpu() - nginx_cpu0
            statuses = [m.status() for m in mounts]
            logs = [m.log_tail(200_000) for m in mounts]
        finally:
            for r in readers:
                if r.poll() is None:
                    r.kill()
                    r.wait()
            for m in mounts:
                m.close()
        # After the daemons are gone: every origin request has ended and is logged.
        after = counters() if counters else {}
        if trace_dir is not None:
            (trace_dir / "run.json").write_text(json.dumps({
                "nodes": {n.name: {"listen": n.listen, "reader": o} for n, o in zip(nodes, outs, strict=True)},
                "peers": [n.listen for n in nodes], "chunks": [c.digest.hex()[:12] for c in self.chunks[ref]],
                "links": samples}))
            self.say(f"trace: {trace_dir}")
        requests, body, sent = nginx.sent_since(log_off)
        results = []
        for spec, o, c0, c1, st, log in zip(nodes, outs, cpu0, cpu1, statuses, logs, strict=True):
            err = o["error"] or ("" if o["bytes"] == size else f"read {o['bytes']} of {size} bytes")
            if err:
                self.say(f"{spec.name}: {err}\n{log[-3000:]}")
            warnings = [line for line in log.splitlines() if "WARNING" in line or "ERROR" in line]
            if warnings:
                self.say(f"{spec.name}: {len(warnings)} warnings in the daemon log, the last: "
                         + "\n".join(warnings[-5:]))
            rx = tx = None
            if spec.name in after:
                rx = after[spec.name][0] - before[spec.name][0]
                tx = after[spec.name][1] - before[spec.name][1]
            results.append(NodeResult(spec.name, o["bytes"], o["start"], o["end"], err, c1 - c0, o["cpu"],
                                      st["fetch"], st.get("peers"), rx, tx))
        wire = None
        if origin_member is not None:
            wire = after[origin_member][1] - before[origin_member][1]
        busy = (busy1[0] - busy0[0]) / max(1, busy1[1] - busy0[1])
        res = RunResult("peers" if peers else "origin only", results, requests, body, sent, wire, nginx_cpu, busy,
                        mount_s)
        self.say(self.describe(res, size))
        for d in list(self.run_dir.glob("cache-*")):
            shutil.rmtree(d, ignore_errors=True)
        os.sync()  # the next run starts without this one's cache writes still going to the disk
        return res

    def describe(self, r: RunResult, size: int) -> str:
        lines = [f"{r.mode}: makespan {r.makespan:.2f} s; origin sent {r.origin_body / MiB:,.0f} MiB "
                 f"({r.origin_body / size:.2f}x the model) in {r.origin_requests} requests"
                 + (f", interface tx {r.origin_wire / MiB:,.0f} MiB" if r.origin_wire is not None else "")
                 + f"; machine CPU {r.busy:.0%} busy; nginx {r.nginx_cpu:.1f} CPU-s; mount {r.mount_s:.2f} s"]
        for n in r.nodes:
            f, p = n.fetch, n.peers or {}
            link = f", link rx {n.rx / MiB:,.0f} / tx {n.tx / MiB:,.0f} MiB" if n.rx is not None and n.tx else ""
            sv = p.get("server", {})
            peer = (f"; peers: received {p.get('bytes_received', 0) / MiB:,.0f} MiB in {p.get('requests_sent', 0)} "
                    f"requests, {p.get('errors', 0)} errors, {p.get('bad_chunks', 0)} bad; served "
                    f"{p.get('bytes_served', 0) / MiB:,.0f} MiB in {sv.get('requests_served', 0)} requests, "
                    f"{sv.get('not_found', 0)} not found, {sv.get('server_errors', 0)} server errors; "
                    f"{p.get('live', 0)}/{p.get('members', 0)} live"
                    if p else "")
            lines.append(
                f"  {n.name}: {n.bytes / MiB:,.0f} MiB in {n.seconds:.2f} s ({n.bytes / n.seconds / 1e6:,.0f} MB/s); "
                f"from origin {f['bytes_from_origin'] / MiB:,.0f} MiB in {f['origin_requests']} requests "
                f"({f['origin_errors']} errors), from peers {f['bytes_from_peers'] / MiB:,.0f} MiB, "
                f"from the disk cache {f.get('bytes_from_cache', 0) / MiB:,.0f} MiB "
                f"({f.get('cache_hits', 0)} reads); "
                f"deadline failures {f['deadline_failures']}, verify failures {f['verify_failures']}, "
                f"peer errors {f.get('peer_errors', 0)}; "
                f"daemon {n.daemon_cpu:.1f} CPU-s, reader {n.reader_cpu:.1f} CPU-s{link}{peer}"
                + (f"; ERROR {n.error}" if n.error else ""))
            for key, st in sorted(p.get("peers", {}).items()):
                if st.get("errors") or st.get("bad"):
                    lines.append(f"    {n.name} -> {key}: {st.get('errors', 0)} errors, {st.get('bad', 0)} bad, "
                                 f"state {st.get('state', '?')}, last error: {st.get('last_error', '')}")
        return "\n".join(lines)

    def cpu_note(self, what: str, r: RunResult, size: int) -> str:
        daemon = sum(n.daemon_cpu for n in r.nodes)
        reader = sum(n.reader_cpu for n in r.nodes)
        cores = os.cpu_count() or 1
        bound = r.busy >= CPU_BOUND
        ours = (daemon + reader + r.nginx_cpu) / r.makespan / cores
        return (f"{what}, {r.mode}: machine {r.busy:.0%} busy over the reads ({cores} cores"
                f"{', CPU-bound' if bound else ''}); daemons {daemon:.1f} CPU-s "
                f"({daemon / len(r.nodes) / (size / 2**30):.2f} per GiB per daemon), readers {reader:.1f}, "
                f"nginx {r.nginx_cpu:.1f}: these processes {ours:.0%} of the {cores} cores over the makespan, "
                f"the rest ({max(0.0, r.busy - ours):.0%}) kernel threads (softirq for the links, writeback) "
                "and anything else running")

    # figures 1 and 3 -------------------------------------------------------------------------------
    def cluster(self, fig: str, rate: float, model: Model) -> None:
        """Figure 1 (``--rate``) or 3 (``--slow-rate``, a smaller model): the star cluster."""
        a = self.args
        spec = LinkSpec(rate_bit=int(rate * 1e6))
        nodes = [f"node{i}" for i in range(a.nodes)]
        link = spec.rate_bit / 8  # bytes/s
        with open_cluster(f"lzp{os.getpid() % 10000}", ["origin", *nodes], spec) as cl:
            self.quiet()
            (tcp,) = measure_streams(cl, [("origin", nodes[0])], seconds=2.0)
            self.say(f"cluster {cl.prefix} at {rate:g} Mbit/s: one TCP stream origin -> {nodes[0]}: "
                     f"{tcp / 1e6:.1f} MB/s")
            nginx = self.cluster_nginx(cl)
            specs = [NodeSpec(n, in_namespace(cl, n), f"{cl.address(n)}:{PEER_PORT}") for n in nodes]

            def counters() -> dict[str, tuple[int, int]]:
                out = {}
                for m in cl.members:
                    c = cl.counters(m)
                    out[m] = (c.rx_bytes, c.tx_bytes)
                return out

            runs: dict[bool, list[RunResult]] = {False: [], True: []}
            for _ in range(a.runs):
                for peers in self.modes():
                    runs[peers].append(self.one_run(specs, nginx.url, model.ref, model.filename, model.size, nginx,
                                                    peers, counters, "origin"))
        self.notes.append(f"{fig}: star of network namespaces {cl.prefix}-* (tools/netns.py open_cluster): origin + "
                          f"{a.nodes} nodes, each on its own veth to a bridge, tbf {rate:g} Mbit/s on both ends "
                          f"(burst {spec.burst_bytes // 1024} KiB, latency {spec.latency_ms:g} ms); one TCP stream "
                          f"origin -> node0 measured {tcp / 1e6:.1f} MB/s; nginx (1 worker) in the origin "
                          f"namespace; daemons in the node namespaces (nsenter --net); "
                          f"model {model.size / MiB:,.0f} MiB")
        self.figure_rows(fig, f"{a.nodes} nodes, {rate:g} Mbit/s star, {model.size / MiB:,.0f} MiB", runs, model,
                         link, tcp)

    def cluster_nginx(self, cl: Cluster) -> Nginx:
        return counting_nginx(lambda argv: cl.spawn("origin", argv), self.origin_dir, self.fresh("nginx"),
                              cl.address("origin"), 80,
                              lambda argv: cl.run("node0", argv, check=False, timeout=10))

    # figure 2 ---------------------------------------------------------------------------------------
    def loopback(self, model: Model) -> None:
        a = self.args

        def spawn(argv: list[str]) -> subprocess.Popen[bytes]:
            proc = subprocess.Popen(argv)
            _own.append(proc)
            return proc

        def probe(argv: list[str]) -> subprocess.CompletedProcess[str]:
            return subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)

        nginx = counting_nginx(spawn, self.origin_dir, self.fresh("nginx"), "127.0.0.1", free_port(), probe)
        try:
            specs = [NodeSpec(f"l{i}", list, f"127.0.0.1:{free_port()}") for i in range(a.loopback_nodes)]
            runs: dict[bool, list[RunResult]] = {False: [], True: []}
            for _ in range(a.runs):
                for peers in self.modes():
                    runs[peers].append(self.one_run(specs, nginx.url, model.ref, model.filename, model.size, nginx,
                                                    peers))
        finally:
            _stop(nginx.proc)
            _own.remove(nginx.proc)
        self.notes.append(f"2: {a.loopback_nodes} daemons and nginx (1 worker) on 127.0.0.1, no rate limit; "
                          f"origin bytes from nginx's access log")
        self.figure_rows("2", f"{a.loopback_nodes} daemons, loopback", runs, model, None, None)

    # ------------------------------------------------------------------------------------------------
    def figure_rows(self, fig: str, title: str, runs: dict[bool, list[RunResult]], model: Model,
                    link: float | None, tcp: float | None) -> None:
        base = runs[False]
        p2p = runs[True]
        size = model.size
        if not base:  # --peers-only: the per-run detail only
            for r in p2p:
                self.details.append(f"{fig} ({title}), {r.mode}:")
                self.details += ["    " + x for x in self.describe(r, size).splitlines()]
                self.notes.append(self.balance_note(fig, r, link, len(model.manifest.chunks)))
            return
        stored = model.manifest.stored_size
        for r in base + p2p:
            self.details.append(f"{fig} ({title}), {r.mode}:")
            self.details += ["    " + line for line in self.describe(r, size).splitlines()]
            self.notes.append(self.cpu_note(f"{fig}", r, size))
            self.notes += [f"{fig}, {r.mode}: read error {e}" for e in r.errors]

        def med(rs: list[RunResult], fn: Callable[[RunResult], float]) -> float:
            return median([fn(r) for r in rs])

        def egress(r: RunResult) -> float:
            return float(r.origin_body)

        n = len(base[0].nodes)
        b_eg, b_ms = med(base, egress), med(base, lambda r: r.makespan)
        ideal = f"size / link: {size / link:.2f} s" if link else "—"
        if not p2p:
            self.rows.append(Row(f"{fig}a. origin egress / model size ({title})", "not run (--no-peers-only)",
                                 f"no peers: {b_eg / size:.2f}x", "<= 1.05x", "", f"stored / size {stored / size:.2f}"))
            ref_ms = f" = {b_ms / (size / link):.2f}x size/link" if link else ""
            self.rows.append(Row(f"{fig}b. makespan ({title})", "not run", f"no peers: {b_ms:.2f} s{ref_ms}",
                                 "<= 1.3x size/link" if link else "—", "", ideal))
            return
        p_eg, p_ms = med(p2p, egress), med(p2p, lambda r: r.makespan)
        self.rows.append(Row(
            f"{fig}a. origin egress / model size ({title}; nginx body bytes)", f"**{p_eg / size:.2f}x**",
            f"no peers: {b_eg / size:.2f}x", "<= 1.05x", "ok" if p_eg <= 1.05 * size else "MISSED",
            f"each pack byte once: {stored / size:.2f}x (stored/size); no peers ideal {n * stored / size:.2f}x"))
        self.rows.append(Row(
            f"{fig}a'. origin egress / stored bytes", f"{p_eg / stored:.2f}x", f"no peers: {b_eg / stored:.2f}x",
            "—", "", f"1.00x (each pack byte once); no peers {n:.0f}x"))
        wires = [r.origin_wire for r in p2p if r.origin_wire is not None]
        if wires:
            bw = median([float(r.origin_wire or 0) for r in base])
            self.rows.append(Row(
                f"{fig}a''. origin interface tx bytes / model size", f"{median([float(w) for w in wires]) / size:.2f}x",
                f"no peers: {bw / size:.2f}x", "<= 1.05x",
                "ok" if median([float(w) for w in wires]) <= 1.05 * size else "MISSED",
                "frames as the veth counts them (GSO: ~1 header per 64 KiB)"))
        if link:
            goal_ok = p_ms <= 1.3 * size / link
            self.rows.append(Row(
                f"{fig}b. makespan, slowest of {n} nodes ({title})",
                f"**{p_ms:.2f} s = {p_ms / (size / link):.2f}x** size/link",
                f"no peers: {b_ms:.2f} s = {b_ms / (size / link):.2f}x", "<= 1.3x size/link",
                "ok" if goal_ok else "MISSED",
                f"{ideal} ({link * 8 / 1e6:g} Mbit/s); one TCP stream {tcp / 1e6 if tcp else 0:.0f} MB/s; no peers "
                f"ideal {n} x stored / link = {n * stored / link:.2f} s"))
        else:
            self.rows.append(Row(
                f"{fig}b. makespan, slowest of {n} nodes ({title})", f"**{p_ms:.2f} s**",
                f"no peers: {b_ms:.2f} s", "—", "", "no network limit: CPU (see notes)"))
        self.rows.append(Row(f"{fig}c. speed-up: no-peer makespan / peer makespan", f"**{b_ms / p_ms:.2f}x**", "—",
                             "—", "", f"{n} nodes"))
        self.notes.append(self.balance_note(fig, p2p[-1], link, len(model.manifest.chunks)))
        cores = os.cpu_count() or 1
        cpu = median([sum(x.daemon_cpu + x.reader_cpu for x in r.nodes) + r.nginx_cpu for r in p2p])
        if link:
            self.notes.append(f"{fig}, peers: the daemons, readers and nginx alone needed {cpu:.1f} CPU-s, i.e. "
                              f"{cpu / cores:.1f} s on {cores} cores (kernel work for the links not counted), vs "
                              f"size/link {size / link:.1f} s and the goal 1.3 x size/link = {1.3 * size / link:.1f} s")

    def balance_note(self, fig: str, r: RunResult, link: float | None, chunks: int) -> str:
        """How evenly the chunks' homes spread: each node fetched its home chunks from the origin and
        served them to the others, so the busiest home's upload bounds a link-limited makespan."""
        homes = [float(x.fetch["bytes_from_origin"]) for x in r.nodes]
        served = [float((x.peers or {}).get("bytes_served", 0)) for x in r.nodes]
        # What left the busiest server (compressed where the asker took zstd; see p2p.server).
        sent = [float((x.peers or {}).get("server", {}).get("bytes_sent", s)) for x, s in zip(r.nodes, served,
                                                                                            strict=True)]
        mean = sum(homes) / len(homes)
        busiest = max(served)
        wire = sent[served.index(busiest)]
        at_link = f" = {wire / link:.1f} s at the link rate" if link else ""
        if wire < busiest:
            at_link = f" ({wire / MiB:,.0f} MiB as sent, compressed){at_link}"
        return (f"{fig}, peers: origin bytes per node (its home chunks) {min(homes) / MiB:,.0f}-"
                f"{max(homes) / MiB:,.0f} MiB (max/mean {max(homes) / mean:.2f}: rendezvous hashing of {chunks} "
                f"chunks over {len(r.nodes)} nodes); the busiest peer server sent {busiest / MiB:,.0f} MiB{at_link}")

    def model(self, size: int) -> Model:
        weights = ensure_weights(self.root, size)
        ref = seed_once(weights.parent, self.origin_dir, f"bench-weights:s{size}")
        manifest = manifest_of(self.origin_dir, ref)
        self.chunks[ref] = list(manifest.chunks)
        n = weights.stat().st_size
        self.notes.append(f"model of {size / MiB:,.0f} MiB: {weights.name}, {n:,} bytes of bf16 N(0, 0.02) in "
                          f"{len(manifest.chunks)} chunks, {manifest.stored_size:,} stored bytes in "
                          f"{len(manifest.packs)} packs (stored/size {manifest.stored_size / n:.2f})")
        return Model(ref, weights.name, n, manifest)

    def run(self) -> None:
        a = self.args
        only = set(a.only)
        self.run_dir.mkdir(parents=True)
        self.token.write_text(secrets.token_hex(32) + "\n")
        self.token.chmod(0o600)
        self.say(f"warming {a.warm_memory_gib:g} GiB of memory (first touch in a fresh VM is slow)")
        warm_memory(a.warm_memory_gib)
        self.notes.append(f"code: {code_version()}")
        model = self.model(parse_size(a.size)) if only & {"1", "2"} else None
        if "1" in only:
            assert model is not None
            self.cluster("1", a.rate, model)
        if "2" in only:
            assert model is not None
            self.loopback(model)
        if "3" in only:
            self.cluster("3", a.slow_rate, self.model(parse_size(a.slow_size)))

    def table(self) -> list[str]:
        head = ["figure", "lazyfs with peers", "baseline (same run)", "goal", "", "reference"]
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in self.rows:
            lines.append(f"| {r.figure} | {r.value} | {r.baseline} | {r.goal} | {r.verdict} | {r.reference} |")
        return lines


def code_version() -> str:
    """The commit the daemons ran, and which source files differed from it (the tree is shared)."""
    def git(*args: str) -> str:
        res = subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True, timeout=30)
        return res.stdout.rstrip("\n")

    head = git("log", "-1", "--format=%h %s")
    changed = [line[3:] for line in git("status", "--porcelain", "--", "lazyfs", "p2p").splitlines()]
    return f"commit {head[:90]}" + (f"; uncommitted changes in {', '.join(changed)}" if changed else "")


def manifest_of(origin_dir: Path, name: str) -> Manifest:
    ref_name, tag = name.split(":")
    digest = (origin_dir / "refs" / ref_name / tag).read_text().strip()
    return verify_manifest((origin_dir / "manifests" / digest).read_bytes(), digest)


def write_results(path: Path, bench: Bench, command: str) -> None:
    about = (
        f"Machine: {MACHINE} (kernel {os.uname().release}); every node, the origin and the network run on it. "
        "Date: {date}."
    )
    title = "bench_p2p — N nodes mount the same model at once, with and without peers"
    details = ["", "<details><summary>per-node detail</summary>", "", "```", *bench.details, "```", "", "</details>"]
    write_section(path, (SECTION_BEGIN, SECTION_END), title, about, command, bench.table(), bench.notes, details)


@contextlib.contextmanager
def _cleanup(bench: Bench) -> Iterator[None]:
    try:
        yield
    finally:
        unmount_all()
        _stop_own()
        still = [d for d in bench.run_dir.glob("mnt-*") if os.path.ismount(d)]
        if still:
            print(f"not removing {bench.run_dir}: {still} still mounted", file=sys.stderr)
        else:
            shutil.rmtree(bench.run_dir, ignore_errors=True)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dir", default="/var/tmp/lazyfs-bench", help="test data, origin and per-run state")
    p.add_argument("--size", default="1GiB", help="size of the safetensors file (default 1GiB)")
    p.add_argument("--nodes", type=int, default=4, help="nodes in the cluster of figure 1 (default 4)")
    p.add_argument("--loopback-nodes", type=int, default=8, help="daemons on loopback in figure 2 (default 8)")
    p.add_argument("--rate", type=float, default=1000.0, help="link rate in Mbit/s (default 1000)")
    p.add_argument("--runs", type=int, default=1, help="runs of each figure and mode (median)")
    p.add_argument("--only", default="1,2,3", type=lambda s: s.split(","), help="figures to run (default 1,2,3)")
    p.add_argument("--slow-rate", type=float, default=200.0,
                   help="link rate of figure 3 in Mbit/s, one 2 cores keep up with (default 200)")
    p.add_argument("--slow-size", default="256MiB", help="model size of figure 3 (default 256MiB)")
    p.add_argument("--no-peers-only", action="store_true", help="only the baselines (daemons without peers)")
    p.add_argument("--peers-only", action="store_true", help="only the runs with peers (no table; implies --no-write)")
    p.add_argument("--peer-timeout", type=float, default=None, help="--peer-timeout for the daemons (default theirs)")
    p.add_argument("--quiet-limit", type=float, default=0.10,
                   help="before each timed section wait until the machine is at most this busy (default 0.10)")
    p.add_argument("--quiet-timeout", type=float, default=120.0, help="longest wait for a quiet machine (s)")
    p.add_argument("--prewarm-gib", type=float, default=4.0,
                   help="memory touched right before each timed section (default 4; 0: none)")
    p.add_argument("--warm-memory-gib", type=float, default=8.0)
    p.add_argument("--trace", type=Path, default=None,
                   help="write per-node peer traces (LAZYFS_P2P_TRACE) and reader timelines under this directory")
    p.add_argument("--no-write", action="store_true", help="do not update bench/RESULTS.md")
    p.add_argument("--results", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    if os.geteuid() != 0:
        p.error("run as root: network namespaces, mounts and drop_caches need it")
    for sig in (signal.SIGTERM, signal.SIGHUP):  # run the cleanup (finally, atexit) on these too
        signal.signal(sig, lambda s, f: sys.exit(128 + s))
    bench = Bench(args)
    with _cleanup(bench):
        bench.run()
    if bench.busy_before:
        bench.notes.append(f"machine load just before the {len(bench.busy_before)} timed sections: median "
                           f"{median(bench.busy_before):.0%}, max {max(bench.busy_before):.0%}")
    print()
    for line in bench.table():
        print(line)
    for n in bench.notes:
        print(f"- {n}")
    if not args.no_write and not args.peers_only:
        cmd = ".venv/bin/python -m bench.bench_p2p " + " ".join(shlex.quote(x) for x in (argv or sys.argv[1:]))
        write_results(args.results, bench, cmd.strip())
    return 0


if __name__ == "__main__":
    sys.exit(main())
