"""Network namespaces joined by a rate-limited veth link: a private "network" for tests and benchmarks.

Mechanism (all iproute2): ``ip netns add`` creates the namespaces, one ``veth`` pair joins
them, each end gets one address of a /30 (by default ``10.213.0.0/30``: ``.1`` on the client
side, ``.2`` on the origin side), and a ``tbf`` qdisc on *each* end's egress limits both
directions to the link rate.  Nothing is routed anywhere else: a namespace has only its
loopback and its end of the veth, so a process in it can reach the other side and nothing more.

The client side is either another namespace (the default: the host's network configuration
is untouched) or the root namespace (``client=None``: the host gets one veth end with one
address of the /30, which this module checks collides with no existing address).

Running a program in a namespace: :func:`ns_argv` prefixes ``nsenter --net=/run/netns/NAME``,
which switches the *network* namespace only.  ``ip netns exec`` is not used on purpose: it
also unshares the mount namespace (to remount ``/sys``) and makes it a slave, so a FUSE mount
made by a daemon started through it is invisible to the host (verified by ``selftest``).
Through ``nsenter --net`` a mount daemon's mount is visible everywhere, and its traffic to
the origin crosses the limited link.

Cleanup: a :class:`Topology` is a context manager; leaving it (normally or by an exception)
stops the processes started through :meth:`Topology.spawn` (by pid) and deletes the
namespaces it created (which destroys the veth pair).  An ``atexit`` hook covers a
``sys.exit`` elsewhere; ``python tools/netns.py cleanup PREFIX`` removes what a killed run
left behind (by name).

CLI::

    python tools/netns.py up NAME [--rate 1000] [--host-client]   # create NAME-origin (+ NAME-client)
    python tools/netns.py exec NAME-origin -- CMD...             # run CMD in a namespace
    python tools/netns.py measure [--rate 1000] [--mib 256]      # achieved TCP rate through a fresh link
    python tools/netns.py selftest                               # isolation, rate, mount visibility
    python tools/netns.py down NAME                              # delete what `up NAME` created
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import ipaddress
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Self

__all__ = [
    "LinkSpec",
    "NetnsError",
    "Topology",
    "delete_namespace",
    "measure_tcp",
    "ns_argv",
    "open_topology",
]

NETNS_DIR = "/run/netns"
# Interface names hold at most 15 bytes (IFNAMSIZ - 1).
IFNAMSIZ = 15
DEFAULT_SUBNET = "10.213.0.0/30"
# Port used by measure_tcp's sender inside the origin namespace (the namespace is private).
MEASURE_PORT = 5201
# Every wait here is bounded: a stuck helper process fails the run instead of hanging it.
PROCESS_TIMEOUT = 120.0


class NetnsError(RuntimeError):
    """A namespace, link or qdisc could not be set up (the message carries the tool's stderr)."""


@dataclass(frozen=True, slots=True)
class LinkSpec:
    """The emulated link; the same limit applies in both directions."""

    # Link rate in bits per second (1 Gbit/s: a common cloud NIC share per node).
    rate_bit: int = 1_000_000_000
    # Token-bucket depth.  It must hold at least one GSO super-packet (up to 64 KiB) or tbf
    # splits them into MTU packets (costly on 2 cores); 256 KiB is ~2 ms at 1 Gbit/s, so the
    # rate is still enforced on a millisecond scale.
    burst_bytes: int = 256 * 1024
    # Largest queueing delay tbf allows before dropping: 20 ms keeps one TCP stream at the
    # full rate (enough buffer for its window growth) without bufferbloat-sized queues.
    latency_ms: float = 20.0
    # Optional one-way propagation delay (netem under the tbf); 0 = none (a LAN).
    delay_ms: float = 0.0
    mtu: int = 1500


def _run(argv: Sequence[str], *, check: bool = True, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    try:
        res = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError as exc:
        raise NetnsError(f"{argv[0]} is not installed (apt-get install iproute2 util-linux)") from exc
    except subprocess.TimeoutExpired as exc:
        raise NetnsError(f"`{' '.join(argv)}` did not finish in {timeout:g} s") from exc
    if check and res.returncode != 0:
        raise NetnsError(f"`{' '.join(argv)}` failed ({res.returncode}): {res.stderr.strip()}")
    return res


def _ip(ns: str | None, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return _run(["ip", *(("-n", ns) if ns else ()), *args], check=check)


def ns_argv(ns: str | None, argv: Sequence[str]) -> list[str]:
    """``argv`` run in network namespace ``ns`` (None: the root namespace), sharing the host's mounts."""
    if ns is None:
        return list(argv)
    return ["nsenter", f"--net={NETNS_DIR}/{ns}", "--", *argv]


def namespace_exists(name: str) -> bool:
    return os.path.exists(os.path.join(NETNS_DIR, name))


def delete_namespace(name: str) -> None:
    """Delete namespace ``name`` if it exists (its interfaces, and so the veth pair, go with it)."""
    if namespace_exists(name):
        _run(["ip", "netns", "del", name], check=False)


def _check_subnet(subnet: ipaddress.IPv4Network, host_side: bool) -> None:
    if subnet.num_addresses < 4 or not subnet.is_private:
        raise NetnsError(f"{subnet}: use a private /30 (or larger) network")
    if not host_side:
        return  # both ends live in fresh namespaces: nothing can collide
    out = _run(["ip", "-o", "-4", "addr", "show"]).stdout
    for line in out.splitlines():
        parts = line.split()
        if "inet" in parts:
            net = ipaddress.ip_interface(parts[parts.index("inet") + 1]).network
            if net.overlaps(subnet):
                raise NetnsError(f"{subnet} overlaps {net} on {parts[1]}; choose another --subnet")


def _shape(ns: str | None, dev: str, spec: LinkSpec) -> None:
    """tbf at ``spec.rate_bit`` on ``dev``'s egress (plus netem delay under it when asked)."""
    _ip(ns, "link", "set", dev, "mtu", str(spec.mtu))
    tc = ["tc", *(("-n", ns) if ns else ())]
    _run([*tc, "qdisc", "replace", "dev", dev, "root", "handle", "1:", "tbf",
          "rate", f"{spec.rate_bit}bit", "burst", str(spec.burst_bytes), "latency", f"{spec.latency_ms}ms"])
    if spec.delay_ms > 0:
        _run([*tc, "qdisc", "replace", "dev", dev, "parent", "1:1", "handle", "10:", "netem",
              "delay", f"{spec.delay_ms}ms", "limit", "100000"])


@dataclass
class Topology:
    """Two sides of one veth link: ``origin`` (a namespace) and ``client`` (a namespace or the host)."""

    name: str
    origin: str  # namespace name
    client: str | None  # namespace name; None = the root namespace
    origin_addr: str
    client_addr: str
    spec: LinkSpec
    created: list[str] = field(default_factory=list)  # namespaces to delete
    host_dev: str | None = None  # the root namespace's veth end (client=None only)
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list, repr=False)
    _closed: bool = False

    def argv(self, side: str, argv: Sequence[str]) -> list[str]:
        """``argv`` run on ``side`` ("origin" or "client")."""
        return ns_argv(self._ns(side), argv)

    def run(self, side: str, argv: Sequence[str], *, timeout: float = PROCESS_TIMEOUT,
            check: bool = True) -> subprocess.CompletedProcess[str]:
        return _run(self.argv(side, argv), check=check, timeout=timeout)

    def spawn(self, side: str, argv: Sequence[str], **kwargs: object) -> subprocess.Popen[bytes]:
        """Start a long-running process on ``side``; it is stopped (by pid) when the topology closes."""
        proc: subprocess.Popen[bytes] = subprocess.Popen(self.argv(side, argv), **kwargs)  # type: ignore[call-overload]
        self.processes.append(proc)
        return proc

    def _ns(self, side: str) -> str | None:
        if side == "origin":
            return self.origin
        if side == "client":
            return self.client
        raise ValueError(f"side must be 'origin' or 'client', not {side!r}")

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for proc in reversed(self.processes):
            _stop(proc)
        if self.host_dev is not None:
            _run(["ip", "link", "del", self.host_dev], check=False)
        for ns in reversed(self.created):
            delete_namespace(ns)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, t: type[BaseException] | None, v: BaseException | None, tb: TracebackType | None) -> None:
        self.close()


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        proc.terminate()
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=5)


_open: list[Topology] = []


@atexit.register
def _close_all() -> None:
    for topo in reversed(_open):
        with contextlib.suppress(Exception):
            topo.close()


def open_topology(
    name: str,
    spec: LinkSpec = LinkSpec(),
    *,
    host_client: bool = False,
    subnet: str = DEFAULT_SUBNET,
) -> Topology:
    """Create ``NAME-origin`` (and ``NAME-client`` unless ``host_client``) joined by a limited veth.

    Use as a context manager; on any failure during set-up everything created so far is removed.
    """
    if not name or len(name) > 8 or not name.replace("-", "").isalnum():
        raise NetnsError(f"{name!r}: use 1-8 letters, digits or '-' (interface names are short)")
    if shutil.which("nsenter") is None:
        raise NetnsError("nsenter is not installed (apt-get install util-linux)")
    net = ipaddress.ip_network(subnet)
    if not isinstance(net, ipaddress.IPv4Network):
        raise NetnsError("only IPv4 subnets are supported")
    _check_subnet(net, host_client)
    hosts = list(net.hosts())
    client_addr, origin_addr = str(hosts[0]), str(hosts[1])
    origin = f"{name}-origin"
    client = None if host_client else f"{name}-client"
    for ns in (origin, client):
        if ns is not None and namespace_exists(ns):
            raise NetnsError(f"namespace {ns} exists already (a previous run?): tools/netns.py down {name}")
    topo = Topology(name, origin, client, origin_addr, client_addr, spec)
    _open.append(topo)
    try:
        for ns in (origin, client):
            if ns is not None:
                _run(["ip", "netns", "add", ns])
                topo.created.append(ns)
                _ip(ns, "link", "set", "lo", "up")
        dev_o, dev_c = f"{name}-o"[:IFNAMSIZ], f"{name}-c"[:IFNAMSIZ]
        # Create the pair inside the origin namespace, then move the client end: nothing named
        # like it ever appears in the root namespace unless the host is the client.
        _ip(origin, "link", "add", dev_o, "type", "veth", "peer", "name", dev_c)
        if client is not None:
            _ip(origin, "link", "set", dev_c, "netns", client)
        else:
            _ip(origin, "link", "set", dev_c, "netns", "1")
            topo.host_dev = dev_c
        prefix = net.prefixlen
        _ip(origin, "addr", "add", f"{origin_addr}/{prefix}", "dev", dev_o)
        _ip(client, "addr", "add", f"{client_addr}/{prefix}", "dev", dev_c)
        _shape(origin, dev_o, spec)
        _shape(client, dev_c, spec)
        _ip(origin, "link", "set", dev_o, "up")
        _ip(client, "link", "set", dev_c, "up")
        _wait_reachable(topo)
    except BaseException:
        topo.close()
        raise
    return topo


_PROBE = """
import socket, sys
try:
    socket.create_connection((sys.argv[1], 9), timeout=1).close()
except ConnectionRefusedError:
    pass  # a RST came back: the other side is reachable
"""


def _wait_reachable(topo: Topology) -> None:
    """Probe the origin address from the client side until it answers (bounded; a veth is usable at once).

    A TCP connect to a closed port is the probe: the RST proves the path works (no ping here).
    """
    for _ in range(50):
        res = topo.run("client", [sys.executable, "-c", _PROBE, topo.origin_addr], check=False, timeout=5)
        if res.returncode == 0:
            return
        time.sleep(0.1)
    raise NetnsError(f"{topo.origin_addr} does not answer from the client side")


# --- measuring the link ------------------------------------------------------------------------

_SENDER = """
import socket, sys
n = int(sys.argv[2]); buf = bytes(1 << 20)
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[3]))); s.listen(1); s.settimeout(60)
print("ready", flush=True)
c, _ = s.accept()
with c:
    sent = 0
    while sent < n:
        sent += c.send(buf[: min(len(buf), n - sent)])
"""

_RECEIVER = """
import socket, sys, time
n = int(sys.argv[2]); got = 0; buf = bytearray(1 << 20)
c = socket.create_connection((sys.argv[1], int(sys.argv[3])), timeout=60)
t = time.perf_counter()
while got < n:
    k = c.recv_into(buf)
    if not k: break
    got += k
dt = time.perf_counter() - t
print(got, dt)
"""


def measure_tcp(topo: Topology, nbytes: int = 256 << 20) -> float:
    """One plain TCP stream origin -> client of ``nbytes``; returns the achieved payload bytes/s."""
    py = sys.executable
    sender = topo.spawn("origin", [py, "-c", _SENDER, topo.origin_addr, str(nbytes), str(MEASURE_PORT)],
                        stdout=subprocess.PIPE)
    try:
        assert sender.stdout is not None
        if sender.stdout.readline().strip() != b"ready":
            raise NetnsError("the TCP sender did not start")
        res = topo.run("client", [py, "-c", _RECEIVER, topo.origin_addr, str(nbytes), str(MEASURE_PORT)])
        got, dt = res.stdout.split()
        if int(got) != nbytes:
            raise NetnsError(f"TCP transfer ended early: {got} of {nbytes} bytes")
        return nbytes / float(dt)
    finally:
        _stop(sender)


# --- self test ---------------------------------------------------------------------------------


def selftest(spec: LinkSpec) -> int:
    """Check isolation, the rate limit in both directions, and which way of entering keeps mounts visible."""
    ok = True
    with open_topology(f"lzt{os.getpid() % 10000}", spec) as topo:
        # 1. isolation: the client namespace reaches the origin and nothing else.
        routes = topo.run("client", ["ip", "-4", "route", "show"]).stdout.strip().splitlines()
        print(f"client routes: {routes}")
        if any(r.startswith("default") for r in routes):
            print("FAIL: the client namespace has a default route")
            ok = False
        # 2. rate, origin -> client.
        rate = measure_tcp(topo)
        print(f"TCP origin->client: {rate / 1e6:.1f} MB/s = {rate * 8 / 1e9:.3f} Gbit/s "
              f"({rate * 8 / spec.rate_bit:.2f}x of the {spec.rate_bit / 1e9:g} Gbit/s tbf rate)")
        # 3. rate, client -> origin (the link is limited both ways).
        rev = Topology(topo.name, topo.client or "", topo.origin, topo.client_addr, topo.origin_addr, spec)
        if topo.client is not None:
            rate2 = measure_tcp(rev)
            print(f"TCP client->origin: {rate2 / 1e6:.1f} MB/s ({rate2 * 8 / spec.rate_bit:.2f}x)")
        # 4. mounts: nsenter --net shares the host's mount namespace, `ip netns exec` does not.
        assert topo.client is not None
        with tempfile.TemporaryDirectory() as d:
            expect = {"nsenter --net": True, "ip netns exec": False}
            for how, argv in (("nsenter --net", topo.argv("client", ["mount", "-t", "tmpfs", "none", d])),
                              ("ip netns exec", ["ip", "netns", "exec", topo.client, "mount", "-t", "tmpfs",
                                                 "none", d])):
                _run(argv)
                visible = os.path.ismount(d)
                print(f"mount made through `{how}` visible to the host: {visible} (expected {expect[how]})")
                if visible:
                    _run(["umount", d])
                ok = ok and visible == expect[how]
    leftover = [n for n in os.listdir(NETNS_DIR) if n.startswith(topo.name)] if os.path.isdir(NETNS_DIR) else []
    print(f"namespaces left after close: {leftover}")
    return 0 if ok and not leftover else 1


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="netns.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--rate", type=float, default=1000.0, help="link rate in Mbit/s (default 1000)")
    p.add_argument("--delay-ms", type=float, default=0.0, help="one-way delay (netem), default none")
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("up", help="create NAME-origin (+ NAME-client) and the link; prints the addresses")
    s.add_argument("name")
    s.add_argument("--host-client", action="store_true", help="the root namespace is the client side")
    s.add_argument("--subnet", default=DEFAULT_SUBNET)
    s = sub.add_parser("down", help="delete NAME-origin, NAME-client (and the link)")
    s.add_argument("name")
    s = sub.add_parser("exec", help="run a command in a namespace (network only; mounts stay shared)")
    s.add_argument("ns")
    s.add_argument("command", nargs=argparse.REMAINDER)
    s = sub.add_parser("measure", help="TCP throughput through a fresh link")
    s.add_argument("--mib", type=int, default=256)
    sub.add_parser("selftest", help="isolation, rate both ways, mount visibility")
    args = p.parse_args(argv)
    spec = LinkSpec(rate_bit=int(args.rate * 1e6), delay_ms=args.delay_ms)
    # SIGTERM/SIGHUP run the finally blocks (and so the cleanup) like Ctrl-C does.
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, lambda s, f: sys.exit(128 + s))
    try:
        if args.cmd == "up":
            topo = open_topology(args.name, spec, host_client=args.host_client, subnet=args.subnet)
            _open.remove(topo)  # keep it: `down` removes it
            print(f"origin {topo.origin} {topo.origin_addr}; client {topo.client or '(host)'} {topo.client_addr}")
        elif args.cmd == "down":
            for suffix in ("-client", "-origin"):
                delete_namespace(args.name + suffix)
            _run(["ip", "link", "del", f"{args.name}-c"[:IFNAMSIZ]], check=False)
        elif args.cmd == "exec":
            cmd = args.command[1:] if args.command[:1] == ["--"] else args.command
            if not cmd:
                p.error("exec needs a command")
            return subprocess.run(ns_argv(args.ns, cmd)).returncode
        elif args.cmd == "measure":
            with open_topology(f"lzm{os.getpid() % 10000}", spec) as topo:
                rate = measure_tcp(topo, args.mib << 20)
                print(f"{rate / 1e6:.1f} MB/s = {rate * 8 / 1e9:.3f} Gbit/s "
                      f"({rate * 8 / spec.rate_bit:.3f}x of the tbf rate)")
        elif args.cmd == "selftest":
            return selftest(spec)
    except NetnsError as exc:
        print(f"netns: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
