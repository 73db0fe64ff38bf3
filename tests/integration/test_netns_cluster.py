"""tools/netns.py's star cluster: members reach each other and nothing else, links are limited per
member and direction, counters count, and nothing is left behind.

Needs root and iproute2 (CI runs as root); without them these tests fail, they never skip.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tools.netns import (
    Cluster,
    LinkSpec,
    NetnsError,
    cluster_isolation_problems,
    measure_streams,
    namespace_exists,
    ns_argv,
    open_cluster,
)

REPO = Path(__file__).resolve().parents[2]
MEMBERS = ("origin", "node0", "node1")
RATE_BIT = 1_000_000_000


def _prefix(tag: str) -> str:
    """A namespace prefix unique to this test process (at most 8 characters)."""
    return f"lzc{os.getpid() % 10000}{tag}"


def _left(prefix: str) -> list[str]:
    return [n for n in os.listdir("/run/netns") if n.startswith(prefix + "-")] if os.path.isdir("/run/netns") else []


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    if os.geteuid() != 0:
        pytest.fail("run as root: network namespaces need it (CI runs as root)", pytrace=False)
    for tool in ("ip", "tc", "nsenter"):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} is not installed (apt-get install iproute2 util-linux)", pytrace=False)
    with open_cluster(_prefix("a"), MEMBERS, LinkSpec(rate_bit=RATE_BIT)) as cl:
        yield cl
    assert not _left(cl.prefix)


def test_members_get_distinct_addresses_in_the_subnet(cluster: Cluster) -> None:
    addrs = [cluster.address(m) for m in MEMBERS]
    assert addrs == ["10.214.0.1", "10.214.0.2", "10.214.0.3"]
    with pytest.raises(ValueError):
        cluster.address("node9")


def test_every_member_reaches_every_other(cluster: Cluster) -> None:
    reach = cluster.reachability()
    assert len(reach) == len(MEMBERS) * (len(MEMBERS) - 1)
    assert all(reach.values()), reach


def test_members_are_isolated_from_the_host(cluster: Cluster) -> None:
    # A positive control first: a listener in one member answers another member.
    server = cluster.spawn("node0", [sys.executable, "-c", _LISTEN, cluster.address("node0")], stdout=subprocess.PIPE)
    try:
        assert server.stdout is not None
        port = int(server.stdout.readline())
        res = cluster.run("origin", [sys.executable, "-c", _CONNECT, cluster.address("node0"), str(port)])
        assert res.stdout.strip() == "connected"
        # The host cannot reach that listener, and no member reaches the host (routes, addresses, loopback).
        with pytest.raises(OSError):
            socket.create_connection((cluster.address("node0"), port), timeout=0.5).close()
    finally:
        server.kill()
        server.wait(timeout=10)
        if server.stdout is not None:
            server.stdout.close()
    assert cluster_isolation_problems(cluster) == []


def test_one_stream_runs_at_the_link_rate(cluster: Cluster) -> None:
    (rate,) = measure_streams(cluster, [("origin", "node0")], seconds=1.0, warmup=0.3)
    assert 0.85 <= rate * 8 / RATE_BIT <= 1.15, f"{rate * 8 / 1e6:.0f} Mbit/s"


def test_two_senders_share_the_receivers_download(cluster: Cluster) -> None:
    a, b = measure_streams(cluster, [("origin", "node1"), ("node0", "node1")], seconds=1.5, warmup=0.3)
    fa, fb = a * 8 / RATE_BIT, b * 8 / RATE_BIT
    assert 0.85 <= fa + fb <= 1.15, (fa, fb)
    assert 0.3 <= fa <= 0.7 and 0.3 <= fb <= 0.7, (fa, fb)


def test_counters_count_at_least_the_bytes_sent(cluster: Cluster) -> None:
    n = 8 << 20
    before = {m: cluster.counters(m) for m in MEMBERS}
    down_before = cluster.counters("node1", switch_side=True)
    recv = cluster.spawn("node1", [sys.executable, "-c", _SINK, cluster.address("node1")],
                         stdout=subprocess.PIPE)
    assert recv.stdout is not None
    port = int(recv.stdout.readline())
    cluster.run("node0", [sys.executable, "-c", _SOURCE, cluster.address("node1"), str(port), str(n)], timeout=30)
    assert int(recv.stdout.readline()) == n
    recv.wait(timeout=10)
    recv.stdout.close()
    after = {m: cluster.counters(m) for m in MEMBERS}
    assert after["node0"].tx_bytes - before["node0"].tx_bytes >= n
    assert after["node1"].rx_bytes - before["node1"].rx_bytes >= n
    assert cluster.counters("node1", switch_side=True).tx_bytes - down_before.tx_bytes >= n
    # A bystander sees at most the odd broadcast (ARP), no share of the stream.
    assert after["origin"].tx_bytes - before["origin"].tx_bytes < 64 * 1024
    assert after["origin"].rx_bytes - before["origin"].rx_bytes < 64 * 1024


def test_close_stops_processes_and_deletes_namespaces() -> None:
    prefix = _prefix("b")
    with open_cluster(prefix, ["a", "b"], LinkSpec(rate_bit=100_000_000)) as cl:
        assert sorted(_left(prefix)) == sorted([f"{prefix}-a", f"{prefix}-b", f"{prefix}-switch"])
        proc = cl.spawn("a", ["sleep", "60"])
    assert proc.poll() is not None
    assert _left(prefix) == []


def test_a_failed_setup_removes_what_it_created() -> None:
    prefix = _prefix("c")
    with pytest.raises(NetnsError, match="mtu"):
        open_cluster(prefix, ["a", "b"], LinkSpec(mtu=1_000_000))  # `ip link set mtu` refuses it
    assert _left(prefix) == []


def test_a_subnet_overlapping_a_host_address_is_refused() -> None:
    with pytest.raises(NetnsError, match="overlaps"):
        open_cluster(_prefix("d"), ["a"], subnet="127.0.0.0/24")  # the host's loopback is 127.0.0.1/8
    assert _left(_prefix("d")) == []


def test_cli_cleanup_removes_a_killed_runs_cluster() -> None:
    prefix = _prefix("e")
    script = str(REPO / "tools" / "netns.py")
    try:
        up = subprocess.run([sys.executable, script, "cluster-up", prefix, "--nodes", "1"],
                            capture_output=True, text=True, timeout=60)
        assert up.returncode == 0, up.stderr
        assert sorted(_left(prefix)) == sorted(f"{prefix}-{m}" for m in ("origin", "node0", "switch"))
        leftover = subprocess.Popen(ns_argv(f"{prefix}-node0", ["sleep", "60"]))  # a daemon a killed run left
        res = subprocess.run([sys.executable, script, "cleanup", prefix], capture_output=True, text=True, timeout=60)
        assert res.returncode == 0, res.stderr
        assert leftover.wait(timeout=10) != 0
        assert _left(prefix) == []
        assert not namespace_exists(f"{prefix}-switch")
    finally:
        subprocess.run([sys.executable, script, "cleanup", prefix], capture_output=True, timeout=60)


_LISTEN = """
import socket, sys, time
s = socket.socket(); s.bind((sys.argv[1], 0)); s.listen(8)
print(s.getsockname()[1], flush=True)
time.sleep(60)
"""

_CONNECT = """
import socket, sys
socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=2).close()
print("connected")
"""

_SINK = """
import socket, sys
s = socket.socket(); s.bind((sys.argv[1], 0)); s.listen(1); s.settimeout(30)
print(s.getsockname()[1], flush=True)
c, _ = s.accept(); c.settimeout(30); got = 0
while k := len(c.recv(1 << 20)):
    got += k
print(got, flush=True)
"""

_SOURCE = """
import socket, sys
c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=30)
c.sendall(bytes(int(sys.argv[3]))); c.close()
"""
