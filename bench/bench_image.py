"""bench_image — start a program from a container image: lazyfs vs pulling and unpacking it.

The image: a Debian bookworm root with Python, numpy and scipy (tools/rootfs.py), one OCI layer
made with umoci.  The program imports numpy and prints a line.  The registry (Debian's
docker-registry) and the lazyfs origin (nginx serving a ``file://`` origin the image was seeded
to beforehand) sit in one network namespace, the node in another, each behind its own
1 Gbit/s link (tools/netns.py star, tbf on both ends).

Figures (every run from a dropped page cache and an empty lazyfs cache):

1. time from nothing to the program's output: ``lazyfs run`` vs ``skopeo copy`` + ``umoci unpack``
   + ``chroot`` (the baseline, same link, same run);
2. bytes that crossed the origin's link vs the bytes the program read (page-cache residency of
   the unpacked image after the same program ran in it from a cold cache: what it really read,
   at page granularity, kernel read-ahead included);
3. the second node: a start recorded with ``--record-trace`` published ``traces/<digest>``; a
   fresh node replays it while the program starts.

Run as root from the repository root: ``.venv/bin/python -m bench.bench_image``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from bench.common import (
    MiB,
    drop_caches,
    lazyfs_argv,
    median,
    replace_section,
    resident_bytes,
    start_nginx,
    wait_quiet,
)
from lazyfs.manifest import Manifest, decode
from lazyfs.trace import decode as decode_trace
from tools.netns import Cluster, LinkSpec, open_cluster
from tools.rootfs import build_root

WORK = Path("/var/tmp/lazyfs-bench/image")
PACKAGES = ["python3-minimal", "python3-numpy", "python3-scipy"]
PROGRAM = "import numpy; print('numpy', numpy.__version__, float(numpy.linalg.norm(numpy.arange(1000.0))))"
RESULTS = Path(__file__).with_name("RESULTS.md")
BEGIN, END = "<!-- bench_image:begin -->", "<!-- bench_image:end -->"
REF = "img:1"


def sh(argv: Sequence[str], timeout: float = 1800) -> str:
    res = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout)
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(argv[:4])}... failed ({res.returncode}): {res.stderr.strip()[-2000:]}")
    return res.stdout


def tree_bytes(root: Path) -> int:
    total = 0
    for dirpath, _, files in os.walk(root):
        for f in files:
            p = os.path.join(dirpath, f)
            if os.path.isfile(p) and not os.path.islink(p):
                total += os.lstat(p).st_size
    return total


def tree_resident(root: Path) -> int:
    total = 0
    for dirpath, _, files in os.walk(root):
        for f in files:
            p = Path(dirpath) / f
            if p.is_file() and not p.is_symlink() and p.stat().st_size:
                with contextlib.suppress(OSError):
                    total += resident_bytes(p)
    return total


def ensure_layout(root: Path) -> Path:
    """An OCI layout ``WORK/layout`` with tag ``img``: the root as one layer (cached)."""
    layout = WORK / "layout"
    stamp = WORK / "layout.done"
    if stamp.exists() and stamp.read_text() == str(root):
        return layout
    shutil.rmtree(layout, ignore_errors=True)
    bundle = WORK / "bundle"
    shutil.rmtree(bundle, ignore_errors=True)
    t = time.perf_counter()
    sh(["umoci", "init", "--layout", str(layout)])
    sh(["umoci", "new", "--image", f"{layout}:img"])
    sh(["umoci", "unpack", "--image", f"{layout}:img", str(bundle)])
    sh(["cp", "-a", f"{root}/.", str(bundle / "rootfs")])
    sh(["umoci", "repack", "--image", f"{layout}:img", str(bundle)])
    sh(["umoci", "config", "--image", f"{layout}:img", "--config.cmd", "python3"])
    sh(["umoci", "gc", "--layout", str(layout)])
    shutil.rmtree(bundle)
    stamp.write_text(str(root))
    print(f"made the OCI layout in {time.perf_counter() - t:.0f} s", file=sys.stderr)
    return layout


def ensure_seeded(layout: Path) -> tuple[Path, str, Manifest]:
    origin = WORK / "origin"
    if not (origin / "refs" / "img" / "1").exists():
        t = time.perf_counter()
        sh(lazyfs_argv("seed", f"oci:{layout}:img", f"file://{origin}", "--name", REF, "-q"))
        print(f"seeded the image in {time.perf_counter() - t:.0f} s", file=sys.stderr)
    digest = (origin / "refs" / "img" / "1").read_text().strip()
    manifest = decode((origin / "manifests" / digest).read_bytes())
    return origin, digest, manifest


def registry_config(path: Path, storage: Path, addr: str) -> Path:
    path.write_text(
        "version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n"
        f"    rootdirectory: {storage}\nhttp:\n  addr: {addr}\n"
    )
    return path


@dataclass
class Run:
    seconds: float
    origin_tx: int
    output: str


@dataclass
class Bench:
    cluster: Cluster
    origin_url: str
    registry: str
    layout: Path
    runs: dict[str, list[Run]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def timed(self, name: str, steps: Sequence[Sequence[str]], cleanup: Sequence[Path] = ()) -> Run:
        for p in cleanup:
            shutil.rmtree(p, ignore_errors=True)
            p.mkdir(parents=True)
        drop_caches()
        load = wait_quiet(0.15, timeout=60)
        tx0 = self.cluster.tx_bytes("origin")
        t = time.perf_counter()
        out = ""
        for argv in steps:
            out = sh(self.cluster.argv("node", argv), timeout=900)
        seconds = time.perf_counter() - t
        run = Run(seconds, self.cluster.tx_bytes("origin") - tx0, out.strip().splitlines()[-1] if out else "")
        self.runs.setdefault(name, []).append(run)
        print(f"{name}: {seconds:.2f} s, origin sent {run.origin_tx / MiB:.1f} MiB (load before {load:.0%}): "
              f"{run.output}", file=sys.stderr)
        for p in cleanup:
            shutil.rmtree(p, ignore_errors=True)
        return run

    def baseline(self) -> Run:
        pull = WORK / "pull"
        return self.timed(
            "pull + unpack + chroot",
            [
                ["skopeo", "copy", "-q", "--src-tls-verify=false", f"docker://{self.registry}/bench/img:1",
                 f"oci:{pull}/layout:img"],
                ["umoci", "unpack", "--image", f"{pull}/layout:img", f"{pull}/bundle"],
                ["chroot", f"{pull}/bundle/rootfs", "python3", "-c", PROGRAM],
            ],
            cleanup=[pull],
        )

    def lazyfs(self, name: str) -> Run:
        cache = WORK / "node-cache"
        return self.timed(
            name,
            [lazyfs_argv("run", self.origin_url, REF, "--cache-dir", str(cache), "--", "python3", "-c", PROGRAM)],
            cleanup=[cache],
        )


def program_read_bytes(layout: Path) -> int:
    """Page-cache residency of the unpacked image after the program ran in it from a cold cache."""
    bundle = WORK / "read-bundle"
    shutil.rmtree(bundle, ignore_errors=True)
    sh(["umoci", "unpack", "--image", f"{layout}:img", str(bundle)])
    drop_caches()
    sh(["chroot", str(bundle / "rootfs"), "python3", "-c", PROGRAM])
    n = tree_resident(bundle / "rootfs")
    shutil.rmtree(bundle, ignore_errors=True)
    return n


def record_trace(origin: Path, digest: str, manifest: Manifest) -> tuple[int, int, int]:
    """Record a start on the host (file:// origin: writable) and publish ``traces/<digest>``."""
    trace_key = origin / "traces" / digest
    trace_key.unlink(missing_ok=True)
    cache = WORK / "record-cache"
    shutil.rmtree(cache, ignore_errors=True)
    sh(lazyfs_argv("run", f"file://{origin}", REF, "--cache-dir", str(cache), "--record-trace", "--",
                   "python3", "-c", PROGRAM))
    shutil.rmtree(cache, ignore_errors=True)
    trace = decode_trace(trace_key.read_bytes(), digest)
    chunks = [manifest.chunks[i] for i in trace.chunks]
    return len(chunks), sum(c.size for c in chunks), sum(c.stored_size for c in chunks)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="lazyfs run vs pull+unpack for a numpy image over 1 Gbit/s")
    p.add_argument("--rate", type=int, default=1000, help="link rate in Mbit/s (default 1000)")
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--no-write", action="store_true", help="do not update bench/RESULTS.md")
    args = p.parse_args(argv)
    if os.geteuid() != 0:
        print("bench_image: run as root (namespaces, mounts, chroot)", file=sys.stderr)
        return 2
    WORK.mkdir(parents=True, exist_ok=True)
    root = build_root(PACKAGES)
    layout = ensure_layout(root)
    origin, digest, manifest = ensure_seeded(layout)
    (origin / "traces" / digest).unlink(missing_ok=True)  # the cold runs start without a trace
    image_bytes = tree_bytes(root)
    layer_bytes = sum(f.stat().st_size for f in (layout / "blobs" / "sha256").iterdir())
    read_bytes = program_read_bytes(layout)
    prefix = f"lzi{os.getpid() % 10000}"
    with open_cluster(prefix, ["origin", "node"], LinkSpec(rate_bit=args.rate * 1_000_000)) as c:
        ip = c.address("origin")
        url = start_nginx(lambda a: c.spawn("origin", a), lambda a: c.run("node", a), origin, WORK / "nginx", ip).url
        storage = WORK / "registry"
        shutil.rmtree(storage, ignore_errors=True)
        conf = registry_config(WORK / "registry.yml", storage, f"{ip}:5000")
        with open(WORK / "registry.log", "wb") as reglog:
            c.spawn("origin", ["/usr/bin/docker-registry", "serve", str(conf)], stdout=reglog, stderr=reglog)
        for _ in range(100):
            probe = ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", f"http://{ip}:5000/v2/"]
            if c.run("node", probe, check=False).stdout.strip() == "200":
                break
            time.sleep(0.1)
        else:
            raise RuntimeError("the registry did not answer within 10 s")
        sh(c.argv("node", ["skopeo", "copy", "-q", "--dest-tls-verify=false", f"oci:{layout}:img",
                           f"docker://{ip}:5000/bench/img:1"]))
        b = Bench(c, url, f"{ip}:5000", layout)
        for _ in range(args.repeat):
            b.baseline()
            b.lazyfs("lazyfs run, cold")
        n_chunks, traced_raw, traced_stored = record_trace(origin, digest, manifest)
        for _ in range(args.repeat):
            b.lazyfs("lazyfs run, second node (trace)")
        (origin / "traces" / digest).unlink(missing_ok=True)
    outputs = {r.output for runs in b.runs.values() for r in runs}
    if len(outputs) != 1:
        raise RuntimeError(f"the program printed different things: {outputs}")
    base = median([r.seconds for r in b.runs["pull + unpack + chroot"]])
    cold = b.runs["lazyfs run, cold"]
    warm = b.runs["lazyfs run, second node (trace)"]
    cold_s, warm_s = median([r.seconds for r in cold]), median([r.seconds for r in warm])
    cold_tx, warm_tx = median([r.origin_tx for r in cold]), median([r.origin_tx for r in warm])
    base_tx = median([r.origin_tx for r in b.runs["pull + unpack + chroot"]])
    link = args.rate * 1e6 / 8
    command = ".venv/bin/python -m bench.bench_image" + (f" --rate {args.rate}" if args.rate != 1000 else "")
    body = [
        BEGIN,
        "## bench_image — a numpy program started from a container image over a 1 Gbit/s link",
        "",
        f"Machine: 2-core VM, 24 GiB ({os.uname().release}). "
        f"Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.",
        "",
        f"Command (as root, from the repository root): `{command}` (medians of {args.repeat} runs each).",
        "",
        "| figure | lazyfs | baseline (same run) | ratio | goal | limit |",
        "|---|---|---|---|---|---|",
        f"| 1. nothing to the program's output | `lazyfs run`: {cold_s:.2f} s | `skopeo copy` + `umoci unpack` + "
        f"`chroot`: {base:.2f} s | **{cold_s / base:.2f}x** | <= 0.2x {'met' if cold_s / base <= 0.2 else 'MISSED'} "
        f"| layer over the link: {layer_bytes / link:.2f} s |",
        f"| 2. origin bytes / bytes the program read | {cold_tx / MiB:.1f} MiB / {read_bytes / MiB:.1f} MiB | "
        f"pull: {base_tx / MiB:.1f} MiB | **{cold_tx / read_bytes:.2f}x** | <= 1.5x "
        f"{'met' if cold_tx / read_bytes <= 1.5 else 'MISSED'} | — |",
        f"| 3. second node, replaying the recorded trace | {warm_s:.2f} s, {warm_tx / MiB:.1f} MiB from the origin | "
        f"first node: {cold_s:.2f} s | **{warm_s / cold_s:.2f}x** of the first node, {warm_s / base:.2f}x of the pull "
        "| faster than the first | — |",
        "",
        f"- image: Debian bookworm minbase + {', '.join(PACKAGES[1:])}: {image_bytes / MiB:.0f} MiB of files, one "
        f"gzip layer of {layer_bytes / MiB:.0f} MiB; seeded as {len(manifest.chunks)} chunks, "
        f"{manifest.stored_size / MiB:.0f} MiB stored",
        f"- program: `python3 -c \"{PROGRAM}\"` printed `{outputs.pop()}` in every run",
        f"- bytes the program read: {read_bytes / MiB:.1f} MiB resident in the page cache after it ran in the "
        "unpacked image from a cold cache (pages, kernel read-ahead included)",
        f"- the recorded trace: {n_chunks} chunks, {traced_raw / MiB:.1f} MiB raw, "
        f"{traced_stored / MiB:.1f} MiB stored",
        "- origin bytes: the origin's veth tx counter (frames, headers included); registry and nginx share it",
        f"- runs (s): baseline {', '.join(f'{r.seconds:.2f}' for r in b.runs['pull + unpack + chroot'])}; "
        f"lazyfs cold {', '.join(f'{r.seconds:.2f}' for r in cold)}; second node "
        f"{', '.join(f'{r.seconds:.2f}' for r in warm)}",
        *[f"- {n}" for n in b.notes],
        END,
    ]
    print("\n".join(body))
    if not args.no_write:
        replace_section(RESULTS, BEGIN, END, body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
