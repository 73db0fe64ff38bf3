"""The peer tier with real daemons: several ``lazyfs mount --listen ... --peers ...`` on loopback.

Every node is a real mount started through the CLI (``mounter`` / :class:`Mounter` from the
conftest), all of them pulling from one counting HTTP origin (``tools/test_origin.py``).
What the in-process tests (tests/integration/test_p2p.py) cannot see is checked here: the
flags as a user types them, the daemons finding each other and themselves in ``--peers``,
``lazyfs status`` and the metrics endpoint of a running daemon, CLI errors, a daemon killed
with SIGKILL and a node with the wrong token.

Nodes listen on distinct ports of 127.0.0.1; every node gets the same ``--peers`` list, itself
included.  Each test leaves nothing mounted and no daemon alive (Mounter.cleanup, by pid).
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from p2p.placement import rank
from tests.fuse.conftest import (
    Mount,
    Mounter,
    Origins,
    Published,
    daemons_of,
    lazyfs,
    mounted,
    read_file,
    wait_until,
)
from tests.integration.servers import free_port
from tools.test_origin import OriginProcess

pytestmark = pytest.mark.fuse

TOKEN = "cluster-secret-0123456789abcdef"
# Generous bound for reading the whole `bulk` tree (~4 MiB) on a loaded 2-core machine;
# a healthy cluster takes well under a second.
READ_BOUND = 30.0


# --- helpers ----------------------------------------------------------------------------------


def distinct_ports(n: int) -> list[int]:
    ports: list[int] = []
    while len(ports) < n:
        p = free_port()
        if p not in ports:
            ports.append(p)
    return ports


def token_file(directory: Path, token: str, name: str = "token") -> Path:
    path = directory / name
    path.write_text(token + "\n")
    path.chmod(0o600)
    return path


@dataclass
class Cluster:
    origin: OriginProcess
    nodes: list[Mount]
    addrs: list[str]  # "127.0.0.1:PORT" of each node, in the order of ``nodes``
    metrics_url: str | None = None  # of nodes[0]


def start_cluster(
    mounter: Mounter,
    origin: OriginProcess,
    published: Published,
    tokens: Sequence[Path],
    *,
    extra: Sequence[str] = (),
    metrics_port: int | None = None,
) -> Cluster:
    """One node per token file, all with the same ``--peers`` list (themselves included)."""
    addrs = [f"127.0.0.1:{p}" for p in distinct_ports(len(tokens))]
    nodes = []
    for i, (addr, tok) in enumerate(zip(addrs, tokens, strict=True)):
        args = ["--listen", addr, "--peers", ",".join(addrs), "--peer-token-file", str(tok), *extra]
        if i == 0 and metrics_port is not None:
            args += ["--metrics-addr", f"127.0.0.1:{metrics_port}"]
        nodes.append(mounter.mount(origin.url + "/", published.ref, extra=args))
    url = None if metrics_port is None else f"http://127.0.0.1:{metrics_port}/metrics"
    return Cluster(origin, nodes, addrs, url)


def read_concurrently(
    mounts: Sequence[Mount], published: Published, rels: Sequence[bytes] | None = None, bound: float = READ_BOUND
) -> float:
    """Every mount reads ``rels`` (all files: None) at the same time, one thread per (mount, file);
    fails on a wrong byte, an error or a read still running after ``bound`` s.  Returns the seconds taken."""
    want = list(published.contents) if rels is None else list(rels)
    problems: list[str] = []
    lock = threading.Lock()

    def reader(m: Mount, rel: bytes) -> None:
        try:
            data = read_file(m.path(rel))
        except OSError as exc:
            with lock:
                problems.append(f"{m.mountpoint}/{rel!r}: {exc}")
            return
        if data != published.contents[rel]:
            with lock:
                problems.append(f"{m.mountpoint}/{rel!r}: wrong bytes ({len(data)} bytes read)")

    threads = [threading.Thread(target=reader, args=(m, rel), daemon=True) for m in mounts for rel in want]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(max(0.0, bound - (time.monotonic() - t0)))
    took = time.monotonic() - t0
    if any(t.is_alive() for t in threads):
        pytest.fail(f"reads still running after {bound:g} s (a hang); logs:\n" + "\n".join(m.log() for m in mounts))
    assert not problems, problems
    return took


def scrape(url: str) -> list[tuple[str, dict[str, str], float]]:
    """Prometheus text exposition -> (name, labels, value) per sample."""
    with urllib.request.urlopen(url, timeout=10) as resp:
        text = resp.read().decode()
    out = []
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = re.fullmatch(r"([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)", line)
        assert m is not None, f"unparsable metrics line {line!r}"
        labels = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m.group(2) or ""))
        out.append((m.group(1), labels, float(m.group(3))))
    return out


# --- 1, 2: a healthy three-node cluster ---------------------------------------------------------


@pytest.fixture(scope="module")
def trio(bulk: Published, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """Three nodes sharing one origin and one token; node 0 exports metrics.

    Module-scoped (daemon start-ups are the slow part); the tests below only read from it,
    and every count they check is cumulative, so they hold in any order.
    """
    base = tmp_path_factory.mktemp("trio")
    origins = Origins(base)
    mounter = Mounter(base / "mounts")
    try:
        origin = origins(bulk)
        tok = token_file(base, TOKEN)
        yield start_cluster(mounter, origin, bulk, [tok, tok, tok], metrics_port=free_port())
    finally:
        mounter.cleanup()
        origins.stop_all()
    mounter.check_logs()


def test_three_nodes_read_once_from_the_origin_and_share(trio: Cluster, bulk: Published) -> None:
    read_concurrently(trio.nodes, bulk)
    for m in trio.nodes:
        m.wait_idle()

    # Each byte left the origin about once for the three nodes together.
    stored = bulk.manifest.stored_size
    egress = trio.origin.stats().bytes_for("packs/")
    assert stored <= egress <= 1.05 * stored, f"origin served {egress / stored:.3f}x the {stored} stored bytes"

    statuses = [m.cli_status() for m in trio.nodes]
    from_origin = sum(st["fetch"]["bytes_from_origin"] for st in statuses)
    assert stored <= from_origin <= 1.05 * stored
    for addr, m, st in zip(trio.addrs, trio.nodes, statuses, strict=True):
        p = st["peers"]
        assert p is not None, f"{m.mountpoint}: no peers section in the status"
        assert p["self"] == addr and p["listen"] == addr
        assert (p["members"], p["live"]) == (3, 3)
        assert set(p["peers"]) == set(trio.addrs)
        assert p["bytes_served"] > 0 and p["requests_served"] > 0, f"{addr} served nothing: {p}"
        assert p["bytes_received"] > 0 and st["fetch"]["bytes_from_peers"] > 0
        assert (p["errors"], p["bad_chunks"], p["requests_refused"]) == (0, 0, 0), p
        assert p["server"]["server_errors"] == 0, p["server"]
        assert st["fetch"]["peer_errors"] == 0 and st["fetch"]["verify_failures"] == 0
        for key, peer in p["peers"].items():
            assert peer["state"] == ("self" if key == addr else "ok"), (addr, key, peer)
            assert (peer["errors"], peer["bad"], peer["last_error"]) == (0, 0, ""), f"{addr} sees {key}: {peer}"
            if key != addr:
                assert peer["bytes"] > 0, f"{addr} received nothing from {key}"
    # What one node served, the others received (served can be more: a node stops asking a peer
    # for a chunk once another peer asks it for that chunk, and drops an answer already on its way).
    served = sum(st["peers"]["bytes_served"] for st in statuses)
    received = sum(st["peers"]["bytes_received"] for st in statuses)
    assert received <= served <= 1.25 * received

    human = lazyfs("status", trio.nodes[1].mountpoint).stdout
    line = re.search(r"^  peers +3 of 3 live, this node (\S+); received .+, served .+ in (\d+) requests, refused 0$",
                     human, re.MULTILINE)  # fmt: skip
    assert line is not None, human
    assert line.group(1) == trio.addrs[1] and int(line.group(2)) > 0
    for addr in trio.addrs:
        state = "self" if addr == trio.addrs[1] else "ok"
        assert re.search(rf"^    {re.escape(addr)} +{state} ", human, re.MULTILINE), (addr, human)


def test_metrics_export_peer_counters_per_peer(trio: Cluster, bulk: Published) -> None:
    read_concurrently(trio.nodes, bulk)
    for m in trio.nodes:
        m.wait_idle()  # the counters stand still while compared
    assert trio.metrics_url is not None
    samples = scrape(trio.metrics_url)
    mp = str(trio.nodes[0].mountpoint)

    served = [v for n, lab, v in samples if n in ("lazyfs_peers_bytes_served", "lazyfs_peers_bytes_served_total")]
    assert served == [trio.nodes[0].status()["peers"]["bytes_served"]] and served[0] > 0, served
    assert all(lab.get("mountpoint") == mp for n, lab, _ in samples if n.startswith("lazyfs_peers_")), samples
    lookups = [v for n, lab, v in samples if n in ("lazyfs_metadata_lookups", "lazyfs_metadata_lookups_total")]
    assert lookups == [trio.nodes[0].status()["metadata"]["lookups"]] and lookups[0] > 0, lookups

    per_peer_bytes = {
        lab["peer"]: v for n, lab, v in samples if n.startswith("lazyfs_peers_per_peer_bytes") and "peer" in lab
    }
    per_peer_errors = {
        lab["peer"]: v for n, lab, v in samples if n.startswith("lazyfs_peers_per_peer_errors") and "peer" in lab
    }
    others = set(trio.addrs[1:])
    assert set(per_peer_bytes) >= others and all(per_peer_bytes[a] > 0 for a in others), per_peer_bytes
    assert set(per_peer_errors) >= others and all(v == 0 for v in per_peer_errors.values()), per_peer_errors
    assert all(re.fullmatch(r"127\.0\.0\.1:\d+", peer) for peer in per_peer_errors)


# --- 3: CLI errors ------------------------------------------------------------------------------


@dataclass
class BadFlags:
    args: list[str]
    message: str  # part of the one error line
    busy_port: int | None = None  # bind and listen on it first


def _bad_flags(case: str, tmp: Path) -> BadFlags:
    tok = token_file(tmp, TOKEN)
    empty = tmp / "empty"
    empty.write_text(" \n")
    me, other = free_port(), free_port()
    peers = f"127.0.0.1:{me},127.0.0.1:{other}"
    if case == "peers-without-token":
        return BadFlags(["--peers", peers], "--peer-token-file")
    if case == "empty-token":
        return BadFlags(["--peers", peers, "--peer-token-file", str(empty)], "is empty")
    if case == "missing-token":
        return BadFlags(["--peers", peers, "--peer-token-file", str(tmp / "nope")], "cannot read the peer token file")
    if case == "listen-without-peers":
        return BadFlags(["--listen", f"127.0.0.1:{me}", "--peer-token-file", str(tok)], "--listen needs --peers")
    if case == "bad-peer-address":
        return BadFlags(["--peers", f"127.0.0.1:{me},127.0.0.1", "--peer-token-file", str(tok)], "bad peer")
    if case == "bad-peer-port":
        return BadFlags(["--peers", "127.0.0.1:70000", "--peer-token-file", str(tok)], "port out of range")
    if case == "listen-port-in-use":
        return BadFlags(
            ["--listen", f"127.0.0.1:{me}", "--peers", peers, "--peer-token-file", str(tok)],
            f"cannot listen for peers on 127.0.0.1:{me}",
            busy_port=me,
        )
    if case == "tls-cert-only":
        return BadFlags(
            ["--listen", f"127.0.0.1:{me}", "--peers", peers, "--peer-token-file", str(tok),
             "--peer-tls-cert", str(tok)],
            "--peer-tls-key",
        )  # fmt: skip
    raise AssertionError(case)


@pytest.mark.parametrize(
    "case",
    [
        "peers-without-token",
        "empty-token",
        "missing-token",
        "listen-without-peers",
        "bad-peer-address",
        "bad-peer-port",
        "listen-port-in-use",
        "tls-cert-only",
    ],
)
def test_bad_peer_flags_are_one_line_and_mount_nothing(
    case: str, bulk: Published, mounter: Mounter, tmp_path: Path
) -> None:
    bad = _bad_flags(case, tmp_path)
    mp = mounter.new_dir("mp")
    mounter.mountpoints.append(mp)  # cleaned up should the mount succeed after all
    cache = tmp_path / "cache"
    with socket.socket() as busy:
        if bad.busy_port is not None:
            busy.bind(("127.0.0.1", bad.busy_port))
            busy.listen()
        res = lazyfs("mount", bulk.file_url, bulk.ref, mp, "--cache-dir", cache, *bad.args, check=False)
    assert res.returncode != 0, f"mounted with {bad.args}: {res.stderr}"
    assert res.stderr.startswith("lazyfs: error: ") and res.stderr.count("\n") == 1, res.stderr
    assert bad.message in res.stderr, res.stderr
    assert "Traceback" not in res.stderr and res.stdout == ""
    assert not mounted(mp) and daemons_of(mp) == [] and os.listdir(mp) == []
    log = cache / "daemon.log"
    if log.exists():  # the errors found by the daemon itself
        assert "Traceback" not in log.read_text(errors="replace")


# --- 4: a peer killed mid-way -------------------------------------------------------------------


def test_a_peer_killed_mid_read_is_skipped_and_reads_stay_correct(
    bulk: Published, origins: Origins, mounter: Mounter, tmp_path: Path
) -> None:
    """SIGKILL a node while the others wait on it (it is fetching for them from a hung origin)."""
    origin = origins(bulk)
    tok = token_file(tmp_path, TOKEN)
    # Longer than the hang below (no healthy peer times out); on loopback a dead node costs less:
    # its connections are reset and new ones refused at once.
    peer_timeout = 3.0
    cluster = start_cluster(
        mounter, origin, bulk, [tok, tok, tok], extra=["--peer-timeout", str(peer_timeout), "--read-timeout", "15"]
    )
    first = [b"data/f0.bin"]
    rest = [rel for rel in bulk.contents if rel not in first]
    # The victim is the home (rendezvous placement, as every node computes it) of a chunk read
    # before the kill and of chunks read after it: it serves, then dies with work left.
    homes_first = {rank(cluster.addrs, ch.digest)[0] for rel in first for ch in bulk.chunks_of(rel)}
    victim = next(i for i, addr in enumerate(cluster.addrs) if addr in homes_first)
    dead = cluster.addrs[victim]
    c = cluster.nodes[victim]
    a, b = (m for i, m in enumerate(cluster.nodes) if i != victim)
    probe_rel, probe_off = next(
        (rel, k * bulk.manifest.chunk_size)
        for rel in rest
        for k, ch in enumerate(bulk.chunks_of(rel))
        if rank(cluster.addrs, ch.digest)[0] == dead
    )
    read_concurrently(cluster.nodes, bulk, first)
    assert c.status()["peers"]["bytes_served"] > 0, "the node to kill takes part before it dies"

    # Pack reads hang: the victim, home of the probe chunk, is stuck fetching it for a and b.
    origin.set_faults(hang=True)
    seen: dict[str, set[str]] = {"a": set(), "b": set()}
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            for name, m in (("a", a), ("b", b)):
                with contextlib.suppress(OSError, KeyError):
                    seen[name].add(m.status()["peers"]["peers"][dead]["state"])
            time.sleep(0.02)

    def probe(m: Mount) -> bytes:
        with open(m.path(probe_rel), "rb") as f:
            return os.pread(f.fileno(), bulk.manifest.chunk_size, probe_off)

    results: dict[str, object] = {}

    def run(name: str, fn: Callable[[], object]) -> None:
        try:
            results[name] = fn()
        except BaseException as exc:  # pytest.fail's exception too
            results[name] = exc

    threads = [
        threading.Thread(target=run, args=("probe a", lambda: probe(a)), daemon=True),
        threading.Thread(target=run, args=("probe b", lambda: probe(b)), daemon=True),
        threading.Thread(target=run, args=("rest", lambda: read_concurrently([a, b], bulk, rest)), daemon=True),
    ]
    watcher = threading.Thread(target=watch, daemon=True)
    try:
        for t in threads:
            t.start()
        wait_until(
            lambda: c.status()["fetch"]["inflight_chunks"] > 0, 2, "the victim to fetch for its peers"
        )  # well within --peer-timeout
        time.sleep(0.3)  # the probes of both a and b reach it
        assert not results, f"reads finished while the origin hangs: {results}"
        watcher.start()
        mounter.kill(c)
        t_kill = time.monotonic()
        origin.heal()
        for t in threads:
            t.join(READ_BOUND)
        took = time.monotonic() - t_kill
    finally:
        origin.heal()
        time.sleep(0.1)
        stop.set()
        if watcher.is_alive():
            watcher.join(10)
    for name, r in results.items():
        if isinstance(r, BaseException):
            raise AssertionError(f"{name} failed") from r
    assert set(results) == {"probe a", "probe b", "rest"}, f"reads still running {READ_BOUND:g} s after the kill"
    want = bulk.contents[probe_rel][probe_off : probe_off + bulk.manifest.chunk_size]
    assert results["probe a"] == want and results["probe b"] == want
    # A read pays for the dead node at most a reset or refused connection, then it is skipped:
    # nothing waits out a --peer-timeout (~0.3 s here for the whole rest of the tree).
    assert took < peer_timeout, f"the reads took {took:.1f} s after the kill"

    for name, m in (("a", a), ("b", b)):
        p = m.status()["peers"]
        assert "backoff" in seen[name], f"{name} never put the dead peer {dead} in backoff: {seen[name]}"
        assert p["peers"][dead]["errors"] > 0 and p["peers"][dead]["last_error"], p["peers"][dead]
        assert p["peers"][dead]["bad"] == 0 and p["bad_chunks"] == 0
        (other,) = [k for k in cluster.addrs if k not in (dead, p["self"])]
        assert p["peers"][other]["errors"] == 0, p["peers"]
        assert p["peers"][other]["state"] == "ok"
    # The survivors agree on each orphaned chunk's new home: no fall-back to "everyone asks the origin".
    stored = bulk.manifest.stored_size
    egress = origin.stats().bytes_for("packs/")
    assert egress <= 1.5 * stored, f"origin served {egress / stored:.2f}x the stored bytes"


# --- 5: a node with the wrong token -------------------------------------------------------------


def test_a_node_with_the_wrong_token_is_refused_and_reads_from_the_origin(
    bulk: Published, origins: Origins, mounter: Mounter, tmp_path: Path
) -> None:
    origin = origins(bulk)
    good = token_file(tmp_path, TOKEN)
    wrong = token_file(tmp_path, "not-the-cluster-secret", "wrong-token")
    cluster = start_cluster(mounter, origin, bulk, [good, good, wrong])
    w = cluster.nodes[2]
    a_key, b_key, w_key = cluster.addrs
    read_concurrently(cluster.nodes, bulk)

    st: dict[str, dict[str, Any]] = {key: m.wait_idle() for key, m in zip(cluster.addrs, cluster.nodes, strict=True)}
    stored = bulk.manifest.stored_size
    # The outsider got nothing from anyone: everything came from the origin, and it served nobody.
    ws, wp = st[w_key], st[w_key]["peers"]
    assert ws["fetch"]["bytes_from_peers"] == 0 and wp["bytes_received"] == 0
    assert ws["fetch"]["bytes_from_origin"] >= stored
    assert wp["bytes_served"] == 0 and wp["requests_refused"] > 0, wp
    for key in (a_key, b_key):
        assert wp["peers"][key]["errors"] > 0 and "401" in wp["peers"][key]["last_error"], wp["peers"][key]
    # Every request of the outsider was refused, and each request to it failed: the good nodes
    # refused nothing else and failed on nothing else.
    refused = st[a_key]["peers"]["requests_refused"] + st[b_key]["peers"]["requests_refused"]
    assert refused == wp["requests_sent"] == wp["errors"] > 0
    # (each status is read at its own moment: w's own count may include a late request)
    assert (
        wp["requests_refused"]
        >= st[a_key]["peers"]["peers"][w_key]["errors"] + st[b_key]["peers"]["peers"][w_key]["errors"]
        > 0
    )
    # The two good nodes still shared with each other.
    for key, other in ((a_key, b_key), (b_key, a_key)):
        p = st[key]["peers"]
        assert p["peers"][other]["errors"] == 0, f"{key} failed on the good peer {other}: {p['peers'][other]}"
        assert p["peers"][other]["bytes"] > 0 and p["bytes_served"] > 0, p
        assert p["peers"][w_key]["errors"] > 0 and "401" in p["peers"][w_key]["last_error"], p["peers"][w_key]
        assert p["peers"][w_key]["bytes"] == 0 and p["errors"] == p["peers"][w_key]["errors"]
        assert st[key]["fetch"]["verify_failures"] == 0
    # a and b together pulled about one copy (the outsider pulled its own).
    good_egress = st[a_key]["fetch"]["bytes_from_origin"] + st[b_key]["fetch"]["bytes_from_origin"]
    assert stored <= good_egress <= 1.05 * stored
    assert origin.stats().bytes_for("packs/") == good_egress + ws["fetch"]["bytes_from_origin"]
    # and the human status shows the refusals
    human = lazyfs("status", w.mountpoint).stdout
    assert re.search(rf"^    {re.escape(a_key)} .*last error: HTTP 401 \(token refused\)$", human, re.MULTILINE), human
