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

A *cluster* (:func:`open_cluster`) is a star instead of one link: a ``PREFIX-switch``
namespace holds a Linux bridge, and each member (``origin``, ``node0`` ...) has its own
namespace ``PREFIX-MEMBER`` joined to the bridge by a veth pair.  Members get the addresses
``.1``, ``.2`` ... of a /24 (by default ``10.214.0.0/24``, checked against the host's
addresses), in the order given.  A ``tbf`` on the member's end (``eth0``) limits its upload,
one on the bridge's end limits its download: each member has a full-duplex link of the given
rate, like a NIC on a switch, and members sending to the same member share its download.
IPv6 is off in every cluster namespace, so the interface byte counters (:meth:`Cluster.counters`)
count only the traffic a test sends (plus ARP).

Cleanup: a :class:`Topology` or :class:`Cluster` is a context manager; leaving it (normally or
by an exception) stops the processes started through its ``spawn`` (by pid) and deletes the
namespaces it created (which destroys the veth pairs).  An ``atexit`` hook covers a
``sys.exit`` elsewhere; ``python tools/netns.py cleanup PREFIX`` removes what a killed run
left behind: the namespaces named ``PREFIX-*`` (after stopping, by pid, the processes still in them).

CLI::

    python tools/netns.py up NAME [--rate 1000] [--host-client]   # create NAME-origin (+ NAME-client)
    python tools/netns.py exec NAME-origin -- CMD...             # run CMD in a namespace
    python tools/netns.py measure [--rate 1000] [--mib 256]      # achieved TCP rate through a fresh link
    python tools/netns.py selftest                               # isolation, rate, mount visibility
    python tools/netns.py down NAME                              # delete what `up NAME` created
    python tools/netns.py cluster-up PREFIX [--nodes 4]          # PREFIX-switch, PREFIX-origin, PREFIX-node0..
    python tools/netns.py cluster-selftest [--nodes 4]           # reachability, isolation, per-link rates
    python tools/netns.py cleanup PREFIX                         # delete PREFIX-* namespaces a killed run left
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import ipaddress
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Self

__all__ = [
    "Cluster",
    "LinkCounters",
    "LinkSpec",
    "NetnsError",
    "Topology",
    "cleanup",
    "cluster_isolation_problems",
    "delete_namespace",
    "measure_streams",
    "measure_tcp",
    "namespace_exists",
    "ns_argv",
    "open_cluster",
    "open_topology",
]

NETNS_DIR = "/run/netns"
# Interface names hold at most 15 bytes (IFNAMSIZ - 1).
IFNAMSIZ = 15
DEFAULT_SUBNET = "10.213.0.0/30"
# A cluster's members live in their own /24 (a different one from the two-namespace link's /30).
DEFAULT_CLUSTER_SUBNET = "10.214.0.0/24"
# Reserved member name: the namespace holding the bridge.
SWITCH = "switch"
# The member's end of its veth (the namespace is private, so every member uses the same name).
MEMBER_DEV = "eth0"
BRIDGE_DEV = "br0"
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


class _Namespaces:
    """What a Topology and a Cluster share: running commands in one of their namespaces, and
    long-running processes that are stopped (by pid) when they close."""

    processes: list[subprocess.Popen[bytes]]

    def _ns(self, place: str) -> str | None:
        raise NotImplementedError

    def argv(self, place: str, argv: Sequence[str]) -> list[str]:
        """``argv`` run in ``place``'s network namespace (mounts stay shared with the host)."""
        return ns_argv(self._ns(place), argv)

    def run(self, place: str, argv: Sequence[str], *, timeout: float = PROCESS_TIMEOUT,
            check: bool = True) -> subprocess.CompletedProcess[str]:
        return _run(self.argv(place, argv), check=check, timeout=timeout)

    def spawn(self, place: str, argv: Sequence[str], **kwargs: object) -> subprocess.Popen[bytes]:
        """Start a long-running process in ``place``; it is stopped (by pid) when this closes."""
        proc: subprocess.Popen[bytes] = subprocess.Popen(self.argv(place, argv), **kwargs)  # type: ignore[call-overload]
        self.processes.append(proc)
        return proc


@dataclass
class Topology(_Namespaces):
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

    def _ns(self, side: str) -> str | None:
        """``side`` is "origin" or "client"."""
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
    """Stop ``proc`` (SIGTERM, SIGKILL after 5 s) and close the pipes this side holds."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)
    for pipe in (proc.stdin, proc.stdout, proc.stderr):
        if pipe is not None:
            pipe.close()


_open: list[Topology | Cluster] = []


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


# --- a star of namespaces around one bridge ------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LinkCounters:
    """Byte and packet counters of one interface (``ip -s link``; frames as the device counts them)."""

    rx_bytes: int
    tx_bytes: int
    rx_packets: int
    tx_packets: int


@dataclass
class Cluster(_Namespaces):
    """Members in namespaces of their own, each joined to one bridge by its own limited link.

    ``members[i]`` lives in namespace ``PREFIX-MEMBER`` with address ``.i+1`` of the subnet on
    its ``eth0``; the bridge lives in ``PREFIX-switch`` (see the module docstring).
    """

    prefix: str
    members: tuple[str, ...]
    spec: LinkSpec
    subnet: ipaddress.IPv4Network
    addresses: dict[str, str]
    created: list[str] = field(default_factory=list)  # namespaces to delete
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list, repr=False)
    _closed: bool = False

    @property
    def switch(self) -> str:
        """The namespace holding the bridge."""
        return f"{self.prefix}-{SWITCH}"

    def namespace(self, member: str) -> str:
        """The namespace of ``member`` (or of the bridge for ``"switch"``)."""
        if member != SWITCH and member not in self.addresses:
            raise ValueError(f"{member!r} is not a member of cluster {self.prefix} ({', '.join(self.members)})")
        return f"{self.prefix}-{member}"

    def address(self, member: str) -> str:
        """``member``'s IPv4 address (the same from every other member)."""
        self.namespace(member)
        return self.addresses[member]

    def switch_port(self, member: str) -> str:
        """The bridge's end of ``member``'s veth (in the switch namespace)."""
        return f"p{self.members.index(member)}-{member}"[:IFNAMSIZ]

    def _ns(self, member: str) -> str | None:
        return self.namespace(member)

    def counters(self, member: str, *, switch_side: bool = False) -> LinkCounters:
        """Counters of ``member``'s ``eth0`` (its tx = what it uploaded), or of the bridge's end of
        its link with ``switch_side`` (tx = what the member downloaded)."""
        ns, dev = (self.switch, self.switch_port(member)) if switch_side else (self.namespace(member), MEMBER_DEV)
        out = _ip(ns, "-s", "-j", "link", "show", "dev", dev).stdout
        stats = json.loads(out)[0]["stats64"]
        return LinkCounters(int(stats["rx"]["bytes"]), int(stats["tx"]["bytes"]),
                            int(stats["rx"]["packets"]), int(stats["tx"]["packets"]))

    def tx_bytes(self, member: str) -> int:
        """Bytes ``member`` has sent on its link so far (frames, headers included)."""
        return self.counters(member).tx_bytes

    def rx_bytes(self, member: str) -> int:
        """Bytes ``member`` has received on its link so far (frames, headers included)."""
        return self.counters(member).rx_bytes

    def reachability(self, timeout: float = 1.0) -> dict[tuple[str, str], bool]:
        """Which member reaches which, by a TCP connect from each member to every other one
        (all sources at once; a RST counts as reachable)."""
        procs = {
            src: subprocess.Popen(
                self.argv(src, [sys.executable, "-c", _PROBE_MANY, str(timeout),
                                *(self.addresses[d] for d in self.members if d != src)]),
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for src in self.members
        }
        result: dict[tuple[str, str], bool] = {}
        for src, proc in procs.items():
            try:
                out, err = proc.communicate(timeout=timeout * len(self.members) + 30)
            except subprocess.TimeoutExpired as exc:
                proc.kill()
                proc.wait()
                raise NetnsError(f"the reachability probe from {src} did not finish") from exc
            if proc.returncode != 0:
                raise NetnsError(f"the reachability probe from {src} failed: {err.strip()}")
            answers: dict[str, bool] = json.loads(out)
            for dst in self.members:
                if dst != src:
                    result[(src, dst)] = answers[self.addresses[dst]]
        return result

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for proc in reversed(self.processes):
            _stop(proc)
        for ns in reversed(self.created):
            delete_namespace(ns)
        with contextlib.suppress(ValueError):
            _open.remove(self)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, t: type[BaseException] | None, v: BaseException | None, tb: TracebackType | None) -> None:
        self.close()


_PROBE_MANY = """
import json, socket, sys
timeout = float(sys.argv[1]); out = {}
for addr in sys.argv[2:]:
    try:
        socket.create_connection((addr, 9), timeout=timeout).close()
        out[addr] = True
    except ConnectionRefusedError:
        out[addr] = True   # a RST came back: the path works
    except OSError:
        out[addr] = False  # no route, or nothing answered
print(json.dumps(out))
"""


def _valid_name(s: str, most: int) -> bool:
    return 0 < len(s) <= most and s.replace("-", "").isalnum() and s.isascii() and not s.startswith("-")


def _check_host_overlap(subnet: ipaddress.IPv4Network) -> None:
    """Refuse a subnet that overlaps an address of the root namespace (confusing if anything joins it)."""
    out = _run(["ip", "-o", "-4", "addr", "show"]).stdout
    for line in out.splitlines():
        parts = line.split()
        if "inet" in parts:
            net = ipaddress.ip_interface(parts[parts.index("inet") + 1]).network
            if net.overlaps(subnet):
                raise NetnsError(f"{subnet} overlaps {net} on {parts[1]}; choose another subnet")


def _sysctl(ns: str, *settings: str) -> None:
    """Set sysctls of namespace ``ns`` (``/proc/sys/net`` is per network namespace)."""
    _run(ns_argv(ns, ["sysctl", "-q", "-w", *settings]))


def open_cluster(
    prefix: str,
    members: Sequence[str],
    spec: LinkSpec = LinkSpec(),
    *,
    subnet: str = DEFAULT_CLUSTER_SUBNET,
) -> Cluster:
    """Create ``PREFIX-switch`` (a bridge) and one namespace ``PREFIX-MEMBER`` per member, each joined
    to the bridge by a veth limited to ``spec`` in both directions.

    Use as a context manager; on any failure during set-up everything created so far is removed.
    """
    if not _valid_name(prefix, 8):
        raise NetnsError(f"{prefix!r}: use 1-8 letters, digits or '-' for the prefix")
    names = tuple(members)
    if not names or len(set(names)) != len(names):
        raise NetnsError(f"members must be distinct and at least one: {names}")
    for m in names:
        if not _valid_name(m, 10) or m == SWITCH:
            raise NetnsError(f"member {m!r}: use 1-10 letters, digits or '-' (not {SWITCH!r})")
    if shutil.which("nsenter") is None:
        raise NetnsError("nsenter is not installed (apt-get install util-linux)")
    net = ipaddress.ip_network(subnet)
    if not isinstance(net, ipaddress.IPv4Network) or not net.is_private:
        raise NetnsError(f"{subnet}: use a private IPv4 network")
    if net.num_addresses - 2 < len(names):
        raise NetnsError(f"{subnet} has room for {net.num_addresses - 2} members, not {len(names)}")
    _check_host_overlap(net)
    hosts = net.hosts()
    cluster = Cluster(prefix, names, spec, net, {m: str(next(hosts)) for m in names})
    for ns in (cluster.switch, *(cluster.namespace(m) for m in names)):
        if namespace_exists(ns):
            raise NetnsError(f"namespace {ns} exists already (a previous run?): tools/netns.py cleanup {prefix}")
    _open.append(cluster)
    try:
        sw = cluster.switch
        _run(["ip", "netns", "add", sw])
        cluster.created.append(sw)
        # No IPv6 (no router solicitations or MLD reports in the counters); bridged frames skip
        # iptables (br_netfilter is loaded on some hosts: a cost per packet for nothing).
        _sysctl(sw, "net.ipv6.conf.all.disable_ipv6=1", "net.ipv6.conf.default.disable_ipv6=1")
        if os.path.exists("/proc/sys/net/bridge"):
            with contextlib.suppress(NetnsError):
                _sysctl(sw, "net.bridge.bridge-nf-call-iptables=0", "net.bridge.bridge-nf-call-ip6tables=0",
                        "net.bridge.bridge-nf-call-arptables=0")
        # STP off: a port forwards as soon as its link is up.
        _ip(sw, "link", "add", BRIDGE_DEV, "type", "bridge", "stp_state", "0", "forward_delay", "0")
        _ip(sw, "link", "set", BRIDGE_DEV, "up")
        for m in names:
            ns = cluster.namespace(m)
            _run(["ip", "netns", "add", ns])
            cluster.created.append(ns)
            _sysctl(ns, "net.ipv6.conf.all.disable_ipv6=1", "net.ipv6.conf.default.disable_ipv6=1")
            _ip(ns, "link", "set", "lo", "up")
            port = cluster.switch_port(m)
            # Created in the switch namespace with the member's end placed directly in the member's.
            _ip(sw, "link", "add", port, "type", "veth", "peer", "name", MEMBER_DEV, "netns", ns)
            _ip(sw, "link", "set", port, "master", BRIDGE_DEV)
            _ip(ns, "addr", "add", f"{cluster.addresses[m]}/{net.prefixlen}", "dev", MEMBER_DEV)
            _shape(ns, MEMBER_DEV, spec)  # upload
            _shape(sw, port, spec)  # download
            _ip(sw, "link", "set", port, "up")
            _ip(ns, "link", "set", MEMBER_DEV, "up")
        _wait_cluster(cluster)
    except BaseException:
        cluster.close()
        raise
    return cluster


def _wait_cluster(cluster: Cluster) -> None:
    """Until every member reaches every other one (bounded; a bridge port forwards within moments)."""
    if len(cluster.members) < 2:
        return
    missing: list[tuple[str, str]] = []
    for _ in range(20):
        missing = [k for k, ok in cluster.reachability(timeout=0.5).items() if not ok]
        if not missing:
            return
        time.sleep(0.1)
    raise NetnsError(f"members do not reach each other: {missing[:5]}")


def _running(pid: int) -> bool:
    """``pid`` exists and is not a zombie (which only its parent can reap)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False


def cleanup(prefix: str) -> list[str]:
    """Remove what a killed run with ``prefix`` left behind; returns the namespaces deleted.

    Deletes every namespace named ``PREFIX-*`` (a Topology's or a Cluster's) after stopping the
    processes still running in it (by pid: SIGTERM, then SIGKILL after 5 s), and a host-side veth
    end ``PREFIX-c``.  A FUSE daemon stopped this way leaves its mountpoint for ``umount -l``.
    """
    if not _valid_name(prefix, 8):
        raise NetnsError(f"{prefix!r}: not a prefix this module creates")
    names = sorted(n for n in os.listdir(NETNS_DIR) if n.startswith(prefix + "-")) if os.path.isdir(NETNS_DIR) else []
    for ns in names:
        pids = [int(p) for p in _run(["ip", "netns", "pids", ns], check=False).stdout.split()]
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 5
        while pids and time.monotonic() < deadline:
            pids = [p for p in pids if _running(p)]
            time.sleep(0.05)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        delete_namespace(ns)
    host_dev = f"{prefix}-c"[:IFNAMSIZ]
    if _run(["ip", "link", "show", "dev", host_dev], check=False).returncode == 0:
        _run(["ip", "link", "del", host_dev], check=False)
    return names


# --- measuring streams between cluster members ---------------------------------------------------

_STREAM_SENDER = """
import socket, sys, time
buf = bytes(1 << 20)
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2]))); s.listen(1); s.settimeout(30)
print("ready", flush=True)
c, _ = s.accept()
end = time.monotonic() + float(sys.argv[3])
try:
    while time.monotonic() < end:
        c.sendall(buf)
except OSError:
    pass  # the receiver has what it needs and closed
"""

_STREAM_RECEIVER = """
import json, socket, sys, time
start, stop = float(sys.argv[3]), float(sys.argv[4])
c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=30)
buf = bytearray(1 << 20); got = 0; t0 = g0 = None
while True:
    k = c.recv_into(buf)
    if not k:
        raise SystemExit("the sender stopped early")
    got += k; now = time.time()
    if t0 is None and now >= start:
        t0, g0 = now, got
    if now >= stop:
        break
c.close()
print(json.dumps({"bytes": got - g0, "seconds": now - t0}))
"""


def measure_streams(cluster: Cluster, pairs: Sequence[tuple[str, str]], *, seconds: float = 2.0,
                    warmup: float = 0.5) -> list[float]:
    """Run one TCP stream per ``(sender, receiver)`` pair, all at once; returns each stream's payload
    bytes/s over the same window of ``seconds`` (after ``warmup`` s of slow start and settling)."""
    py = sys.executable
    senders: list[subprocess.Popen[bytes]] = []
    receivers: list[subprocess.Popen[str]] = []
    try:
        for k, (src, _dst) in enumerate(pairs):
            proc = cluster.spawn(src, [py, "-c", _STREAM_SENDER, cluster.address(src), str(MEASURE_PORT + k),
                                       str(warmup + seconds + 30)], stdout=subprocess.PIPE)
            senders.append(proc)
            assert proc.stdout is not None
            if proc.stdout.readline().strip() != b"ready":
                raise NetnsError(f"the TCP sender in {src} did not start")
        start = time.time() + 0.3 + warmup  # time for every receiver to start, then the warm-up
        for k, (src, dst) in enumerate(pairs):
            receivers.append(subprocess.Popen(
                cluster.argv(dst, [py, "-c", _STREAM_RECEIVER, cluster.address(src), str(MEASURE_PORT + k),
                                   repr(start), repr(start + seconds)]),
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
        rates = []
        for (src, dst), rcv in zip(pairs, receivers, strict=True):
            out, err = rcv.communicate(timeout=warmup + seconds + 60)
            if rcv.returncode != 0:
                raise NetnsError(f"TCP stream {src} -> {dst} failed: {err.strip()[-500:]}")
            res = json.loads(out)
            rates.append(res["bytes"] / res["seconds"])
        return rates
    finally:
        for r in receivers:
            if r.poll() is None:
                r.kill()
                r.wait()
        for s in senders:
            _stop(s)
            with contextlib.suppress(ValueError):
                cluster.processes.remove(s)


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


def _host_addresses() -> list[str]:
    """The root namespace's IPv4 addresses other than loopback."""
    out = _run(["ip", "-o", "-4", "addr", "show"]).stdout
    addrs = []
    for line in out.splitlines():
        parts = line.split()
        if "inet" in parts and parts[1] != "lo":
            addrs.append(str(ipaddress.ip_interface(parts[parts.index("inet") + 1]).ip))
    return addrs


def cluster_isolation_problems(cluster: Cluster) -> list[str]:
    """What a member can reach outside the cluster, or the host inside it (empty: isolated).

    Checks: no member has a route other than the cluster's subnet; no member reaches any host
    address, nor a TCP listener on the host's loopback (a member's 127.0.0.1 is its own); the host
    reaches no member (a listener in the first member); the switch has no IPv4 address.
    """
    problems = []
    subnet = str(cluster.subnet)
    for m in cluster.members:
        routes = cluster.run(m, ["ip", "-4", "route", "show"]).stdout.strip().splitlines()
        extra = [r for r in routes if not r.startswith(subnet + " ")]
        if extra:
            problems.append(f"{m} has routes outside {subnet}: {extra}")
    with socket.socket() as lsn:
        lsn.bind(("127.0.0.1", 0))
        lsn.listen(8)
        port = lsn.getsockname()[1]
        targets = [*(f"{a}:{port}" for a in _host_addresses()), f"127.0.0.1:{port}"]
        for m in cluster.members:
            res = cluster.run(m, [sys.executable, "-c", _CONNECT, "0.5", *targets], check=False, timeout=30)
            for line in res.stdout.splitlines():
                target, outcome = line.split()
                if outcome == "connected":
                    problems.append(f"{m} reaches the host's listener at {target}")
    first = cluster.members[0]
    server = cluster.spawn(first, [sys.executable, "-c", _LISTEN, cluster.address(first)], stdout=subprocess.PIPE)
    try:
        assert server.stdout is not None
        port = int(server.stdout.readline())
        res = _run([sys.executable, "-c", _CONNECT, "0.5", f"{cluster.address(first)}:{port}"], check=False)
        if "connected" in res.stdout.split():
            problems.append(f"the host reaches {first} at {cluster.address(first)}:{port}")
    finally:
        _stop(server)
        cluster.processes.remove(server)
    addrs = _ip(cluster.switch, "-4", "-o", "addr", "show").stdout.strip()
    if addrs:
        problems.append(f"the switch namespace has addresses: {addrs}")
    return problems


_CONNECT = """
import socket, sys
for target in sys.argv[2:]:
    host, port = target.rsplit(":", 1)
    try:
        socket.create_connection((host, int(port)), timeout=float(sys.argv[1])).close()
        print(target, "connected")
    except ConnectionRefusedError:
        print(target, "refused")
    except OSError as exc:
        print(target, type(exc).__name__)
"""

_LISTEN = """
import socket, sys, time
s = socket.socket(); s.bind((sys.argv[1], 0)); s.listen(8)
print(s.getsockname()[1], flush=True)
time.sleep(120)
"""


def cluster_selftest(spec: LinkSpec, nodes: int = 4) -> int:
    """Reachability, isolation, the per-link rate, full duplex and a shared download link."""
    ok = True
    members = ["origin", *(f"node{i}" for i in range(nodes))]
    prefix = f"lzs{os.getpid() % 10000}"
    rate_bit = spec.rate_bit

    def frac(r: float) -> float:
        return r * 8 / rate_bit

    def check(what: str, good: bool) -> None:
        nonlocal ok
        print(f"{'ok  ' if good else 'FAIL'} {what}")
        ok = ok and good

    with open_cluster(prefix, members, spec) as cl:
        print("members: " + ", ".join(f"{m} {cl.address(m)}" for m in members))
        reach = cl.reachability()
        check(f"every pair of the {len(members)} members reachable ({len(reach)} ordered pairs)", all(reach.values()))
        problems = cluster_isolation_problems(cl)
        for p in problems:
            print(f"     {p}")
        check("nothing outside the cluster reachable, and the host reaches no member", not problems)
        a, b, c = members[0], members[1], members[2 % len(members)]
        (r,) = measure_streams(cl, [(a, b)])
        check(f"one TCP stream {a} -> {b}: {r / 1e6:.1f} MB/s = {frac(r):.2f}x of {rate_bit / 1e6:g} Mbit/s "
              "(expected 0.85-1.15x)", 0.85 <= frac(r) <= 1.15)
        fwd, back = measure_streams(cl, [(a, b), (b, a)])
        check(f"full duplex {a} <-> {b} at once: {frac(fwd):.2f}x and {frac(back):.2f}x (each 0.85-1.15x)",
              all(0.85 <= frac(x) <= 1.15 for x in (fwd, back)))
        if len(members) >= 3:
            x, y = measure_streams(cl, [(a, c), (b, c)])
            check(f"{a} and {b} both sending to {c}: {frac(x):.2f}x + {frac(y):.2f}x = {frac(x + y):.2f}x "
                  "(each 0.35-0.65x, together 0.85-1.15x)",
                  all(0.35 <= frac(v) <= 0.65 for v in (x, y)) and 0.85 <= frac(x + y) <= 1.15)
    leftover = [n for n in os.listdir(NETNS_DIR) if n.startswith(prefix + "-")] if os.path.isdir(NETNS_DIR) else []
    check(f"no namespace left after close ({leftover})", not leftover)
    return 0 if ok else 1


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
    s = sub.add_parser("cluster-up", help="create PREFIX-switch, PREFIX-origin, PREFIX-node0.. (remove: cleanup)")
    s.add_argument("prefix")
    s.add_argument("--nodes", type=int, default=4)
    s.add_argument("--subnet", default=DEFAULT_CLUSTER_SUBNET)
    s = sub.add_parser("cluster-selftest", help="star cluster: reachability, isolation, per-link rates")
    s.add_argument("--nodes", type=int, default=4, help="nodes besides the origin (default 4)")
    s = sub.add_parser("cleanup", help="delete the PREFIX-* namespaces (and their processes) a killed run left")
    s.add_argument("prefix")
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
        elif args.cmd == "cluster-up":
            members = ["origin", *(f"node{i}" for i in range(args.nodes))]
            cluster = open_cluster(args.prefix, members, spec, subnet=args.subnet)
            _open.remove(cluster)  # keep it: `cleanup` removes it
            for m in members:
                print(f"{m} {cluster.namespace(m)} {cluster.address(m)}")
        elif args.cmd == "cluster-selftest":
            return cluster_selftest(spec, args.nodes)
        elif args.cmd == "cleanup":
            print("deleted: " + (" ".join(cleanup(args.prefix)) or "nothing"))
    except NetnsError as exc:
        print(f"netns: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
