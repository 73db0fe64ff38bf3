"""p2p pieces without a network: placement, membership and health, the protocol's checks, peer flags."""

from __future__ import annotations

import argparse
import asyncio
import os
from collections import Counter
from pathlib import Path
from typing import Any, cast

import pytest

from lazyfs.cli import _peer_config, build_parser
from lazyfs.config import PeerConfig, parse_host_port
from lazyfs.errors import DeadlineError, LazyfsError, UsageError
from lazyfs.fetch import Priority
from p2p.membership import Membership, format_key, is_local_ip, system_resolver
from p2p.placement import rank
from p2p.protocol import accepts_zstd, digest_from_hex, token_matches
from p2p.schedule import HomeFetches, PrioritySlots, urgency
from p2p.source import CpuGauge
from p2p.tier import PeerTier

DIGESTS = [os.urandom(32) for _ in range(6000)]


def test_rank_is_deterministic_and_independent_of_order() -> None:
    members = [f"10.0.0.{i}:7070" for i in range(8)]
    for d in DIGESTS[:200]:
        assert rank(members, d) == rank(list(reversed(members)), d)
        assert sorted(rank(members, d)) == sorted(members)


def test_homes_are_spread_evenly() -> None:
    members = [f"10.0.0.{i}:7070" for i in range(8)]
    homes = Counter(rank(members, d)[0] for d in DIGESTS)
    expected = len(DIGESTS) / len(members)
    assert set(homes) == set(members)
    assert all(abs(n - expected) < 0.15 * expected for n in homes.values()), homes


def test_a_member_leaving_moves_only_its_own_chunks() -> None:
    members = [f"10.0.0.{i}:7070" for i in range(8)]
    gone = members[3]
    rest = [m for m in members if m != gone]
    moved = 0
    for d in DIGESTS:
        before, after = rank(members, d), rank(rest, d)
        if before[0] == gone:
            moved += 1
            assert after[0] == before[1], "the next candidate takes over"
        else:
            assert after[0] == before[0], "everybody else's chunks stay put"
    assert moved == pytest.approx(len(DIGESTS) / 8, rel=0.15)


def test_digest_and_token_checks() -> None:
    d = os.urandom(32)
    assert digest_from_hex(d.hex()) == d
    for bad in (d.hex().upper(), d.hex()[:-1], d.hex() + "0", "../" + d.hex()[3:], "", "g" * 64):
        assert digest_from_hex(bad) is None
    assert token_matches("Bearer s3cret", b"s3cret")
    for header in (None, "", "Bearer", "Bearer ", "bearer s3cret", "Bearer s3cret ", "Basic s3cret", "Bearer s3crét"):
        assert not token_matches(header, b"s3cret")


def test_host_port_parsing() -> None:
    assert parse_host_port("10.0.0.1:7070") == ("10.0.0.1", 7070)
    assert parse_host_port("[::1]:80") == ("::1", 80)
    assert parse_host_port("peers.default.svc:7070") == ("peers.default.svc", 7070)
    for bad in ("10.0.0.1", ":80", "host:", "host:0", "host:65536", "host:http"):
        with pytest.raises(UsageError, match=r"HOST:PORT|port out of range"):
            parse_host_port(bad)
    assert format_key("::1", 80) == "[::1]:80" and format_key("10.0.0.1", 1) == "10.0.0.1:1"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def membership(clock: Clock, records: dict[str, list[str]], **kw: object) -> Membership:
    async def resolver(host: str, port: int) -> list[str]:
        if host not in records:
            raise OSError(f"{host}: name not known")
        return records[host]

    config = PeerConfig(token=b"t", **kw)  # type: ignore[arg-type]
    return Membership(config, resolver, clock)


async def test_self_is_found_by_listen_address_and_local_ips() -> None:
    clock = Clock()
    records = {"peers.test": ["127.0.0.1", "192.0.2.7", "192.0.2.8"]}
    m = membership(clock, records, listen="0.0.0.0:7070", peers_dns="peers.test:7070")
    await m.refresh()
    assert m.members == {"127.0.0.1:7070", "192.0.2.7:7070", "192.0.2.8:7070"}
    assert m.self_key == "127.0.0.1:7070"  # the only one of them this host owns
    assert is_local_ip("127.0.0.1") and not is_local_ip("192.0.2.7")
    specific = membership(clock, records, listen="192.0.2.8:7070", peers_dns="peers.test:7070")
    await specific.refresh()
    assert specific.self_key == "192.0.2.8:7070"
    asker = membership(clock, records, peers_dns="peers.test:7070")  # no --listen: never a member
    await asker.refresh()
    assert asker.self_key is None and len(asker.live()) == 3


async def test_dns_changes_and_failures() -> None:
    clock = Clock()
    records = {"peers.test": ["10.0.0.1", "10.0.0.2"]}
    m = membership(clock, records, peers_dns="peers.test:7070", peers=("10.0.0.9:7070",))
    await m.refresh()
    assert m.members == {"10.0.0.1:7070", "10.0.0.2:7070", "10.0.0.9:7070"}
    records["peers.test"] = ["10.0.0.2", "10.0.0.3"]
    m.failed("10.0.0.1:7070", "refused")
    await m.refresh()
    assert m.members == {"10.0.0.2:7070", "10.0.0.3:7070", "10.0.0.9:7070"}
    assert "10.0.0.1:7070" not in m.health, "a member that left is forgotten"
    del records["peers.test"]  # a DNS blip keeps the last answer
    await m.refresh()
    assert m.members == {"10.0.0.2:7070", "10.0.0.3:7070", "10.0.0.9:7070"}


@pytest.mark.allow_warnings
async def test_backoff_doubles_and_bad_peers_are_held() -> None:
    clock = Clock()
    m = membership(clock, {}, peers=("10.0.0.1:1", "10.0.0.2:1"), backoff_initial=1.0, backoff_max=4.0, bad_hold=60)
    await m.refresh()
    a, b = "10.0.0.1:1", "10.0.0.2:1"
    waits = []
    for _ in range(4):
        m.failed(a, "timeout")
        waits.append(m.health[a].skip_until - clock.now)
        m.failed(a, "timeout")  # another request that was in flight: the same failure, no escalation
        assert m.health[a].skip_until - clock.now == waits[-1]
        assert m.live() == [b] and m.state(a) == "backoff"
        clock.now += waits[-1]
        assert sorted(m.live()) == [a, b]
    assert waits == [1.0, 2.0, 4.0, 4.0]
    assert m.health[a].errors == 8
    m.succeeded(a, 10)
    m.failed(a, "timeout")
    assert m.health[a].skip_until - clock.now == 1.0, "a success resets the backoff"
    m.sent_bad(b, "digest mismatch")
    assert m.state(b) == "bad" and b not in m.live()
    clock.now += 59
    assert b not in m.live()
    clock.now += 2
    assert b in m.live() and m.health[b].bad == 1


@pytest.mark.allow_warnings
async def test_a_bad_peer_stays_held_when_it_leaves_and_rejoins(monkeypatch: pytest.MonkeyPatch) -> None:
    """The hold is kept by address: dropping out of DNS for a refresh (or restarting at the same
    address) does not clear it; and the holds kept are bounded, the oldest going first."""
    clock = Clock()
    records = {"peers.test": ["10.0.0.1", "10.0.0.2"]}
    m = membership(clock, records, peers_dns="peers.test:7070", bad_hold=60)
    await m.refresh()
    a, b = "10.0.0.1:7070", "10.0.0.2:7070"
    m.sent_bad(a, "digest mismatch")
    records["peers.test"] = ["10.0.0.2"]
    await m.refresh()
    assert a not in m.members and a not in m.health
    clock.now += 30
    records["peers.test"] = ["10.0.0.1", "10.0.0.2"]
    await m.refresh()
    assert a in m.members
    assert m.state(a) == "bad" and m.live() == [b], "rejoining cleared the bad hold"
    clock.now += 31
    assert m.state(a) == "ok" and sorted(m.live()) == [a, b]

    monkeypatch.setattr("p2p.membership.MAX_BAD_HOLDS", 3)
    for i in range(10):
        clock.now += 1
        m.sent_bad(f"10.0.1.{i}:7070", "digest mismatch")
    assert list(m.bad_holds) == ["10.0.1.7:7070", "10.0.1.8:7070", "10.0.1.9:7070"]
    m.sent_bad("10.0.1.8:7070", "again")  # a new hold moves to the back: it ends last
    clock.now += 58.5  # .7's hold has ended, .9's ends in 1.5 s
    m.sent_bad(b, "digest mismatch")
    assert list(m.bad_holds) == ["10.0.1.9:7070", "10.0.1.8:7070", b], "an ended hold is dropped"
    m.sent_bad(a, "digest mismatch")
    assert list(m.bad_holds) == ["10.0.1.8:7070", b, a], "over the bound, the hold that ends first goes"
    assert m.state("10.0.1.8:7070") == "bad" and m.state("10.0.1.9:7070") == "ok"


async def test_a_peer_whose_origin_failed_is_held_from_fetching_for_a_short_while() -> None:
    from p2p.membership import ORIGIN_HOLD

    clock = Clock()
    m = membership(clock, {}, peers=("10.0.0.1:1", "10.0.0.2:1"))
    await m.refresh()
    a = "10.0.0.1:1"
    m.origin_failed(a, "HTTP 503")
    assert m.origin_held(a) and not m.origin_held("10.0.0.2:1")
    assert a in m.live() and m.state(a) == "ok", "still live: asked for copies it holds"
    clock.now += ORIGIN_HOLD
    assert not m.origin_held(a)


def parse(argv: list[str]) -> argparse.Namespace:
    return build_parser().parse_args(["mount", "file:///o", "m:1", "/mnt", *argv])


def test_peer_flags(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_bytes(b"  s3cret-token\n")
    assert _peer_config(parse([])) is None
    cfg = _peer_config(parse(["--listen", "0.0.0.0:7070", "--peers", "a:7070, b:7070,", "--peer-token-file",
                              str(token), "--peer-timeout", "2.5"]))
    assert cfg == PeerConfig(token=b"s3cret-token", listen="0.0.0.0:7070", peers=("a:7070", "b:7070"), timeout=2.5)
    errors = {
        "shared secret": ["--peers", "a:1"],
        "is empty": ["--peers", "a:1", "--peer-token-file", str(tmp_path / "empty")],
        "cannot read": ["--peers", "a:1", "--peer-token-file", str(tmp_path / "missing")],
        "printable ASCII": ["--peers", "a:1", "--peer-token-file", str(tmp_path / "spaces")],
        "--listen needs": ["--listen", "0.0.0.0:7070", "--peer-token-file", str(token)],
        "HOST:PORT": ["--peers", "a", "--peer-token-file", str(token)],
        "--peer-timeout": ["--peers", "a:1", "--peer-token-file", str(token), "--peer-timeout", "0"],
        "need --peers": ["--peer-token-file", str(token)],
    }
    (tmp_path / "empty").write_bytes(b"\n")
    (tmp_path / "spaces").write_bytes(b"two words")
    for message, argv in errors.items():
        with pytest.raises(UsageError, match=message):
            _peer_config(parse(argv))


def test_tier_rejects_incomplete_tls(tmp_path: Path) -> None:
    cert = tmp_path / "cert.pem"
    cert.write_text("x")
    with pytest.raises(UsageError, match="needs all of"):
        PeerTier(PeerConfig(token=b"t", peers=("a:1",), tls_cert=str(cert)), store=None)  # type: ignore[arg-type]
    with pytest.raises(UsageError, match="no such file"):
        PeerTier(
            PeerConfig(token=b"t", peers=("a:1",), tls_cert=str(cert), tls_key=str(cert), tls_ca="/nonexistent"),
            store=None,  # type: ignore[arg-type]
        )
    with pytest.raises(UsageError, match="cannot load"):
        PeerTier(
            PeerConfig(token=b"t", peers=("a:1",), listen="127.0.0.1:1", tls_cert=str(cert), tls_key=str(cert),
                       tls_ca=str(cert)),
            store=None,  # type: ignore[arg-type]
        )


async def test_the_system_resolver_resolves_through_the_os() -> None:
    assert "127.0.0.1" in await system_resolver("localhost", 7070)
    with pytest.raises(OSError):
        await system_resolver("no-such-host.invalid", 7070)


# --- scheduling: the most urgent work first, a few at a time -----------------------------------------


async def test_priority_slots_admit_the_lowest_key_first_and_demand_never_waits() -> None:
    slots = PrioritySlots(1)
    order: list[int] = []

    async def job(index: int, priority: Priority) -> None:
        async with slots.hold(urgency(priority, index), bypass=priority is Priority.DEMAND):
            order.append(index)
            await asyncio.sleep(0.01)

    first = asyncio.create_task(job(9, Priority.READAHEAD))  # takes the free slot
    await asyncio.sleep(0)
    rest = [asyncio.create_task(job(i, Priority.READAHEAD)) for i in (7, 3, 5)]
    await asyncio.sleep(0)
    demand = asyncio.create_task(job(8, Priority.DEMAND))
    await asyncio.gather(first, demand, *rest)
    assert order == [9, 8, 3, 5, 7]
    assert slots.busy == 0 and slots.waiting == 0


async def test_priority_slots_survive_cancelled_waiters() -> None:
    slots = PrioritySlots(1)
    await slots.acquire((1, 0))
    waiter = asyncio.create_task(slots.acquire((1, 1)))
    await asyncio.sleep(0)
    waiter.cancel()
    slots.release()  # the cancelled waiter must not keep the slot
    await asyncio.sleep(0)
    assert slots.busy == 0
    await asyncio.wait_for(slots.acquire((1, 2)), 1)


class FakeProvider:
    """Chunks that take ``delay`` to fetch; records which fetches ran at once."""

    def __init__(self, delay: float = 0.02) -> None:
        self.delay = delay
        self.started: list[int] = []
        self.running = 0
        self.most = 0
        self.calls: list[tuple[int, bool]] = []

    async def get(
        self,
        index: int,
        priority: Priority = Priority.DEMAND,
        deadline: float | None = None,
        *,
        use_sources: bool = True,
    ) -> bytes:
        self.calls.append((index, use_sources))
        self.started.append(index)
        self.running += 1
        self.most = max(self.most, self.running)
        try:
            await asyncio.sleep(self.delay)
        finally:
            self.running -= 1
        return bytes([index])


async def test_home_fetches_run_a_few_at_a_time_in_file_order() -> None:
    provider = FakeProvider()
    home = HomeFetches(provider, 2)
    deadline = asyncio.get_running_loop().time() + 10
    got = await asyncio.gather(*(home.get(i, Priority.READAHEAD, deadline) for i in (10, 11, 5, 1, 7, 3)))
    assert got == [bytes([i]) for i in (10, 11, 5, 1, 7, 3)]
    assert provider.most == 2
    assert provider.started == [10, 11, 1, 3, 5, 7]  # the first two at once, then by index
    assert all(not use for _, use in provider.calls), "a fetch for a peer never asks peers"
    # Fetched once: later asks skip the queue.
    await home.get(5, Priority.READAHEAD, deadline)
    home.aclose()


async def test_home_fetches_let_demand_pass_and_own_reads_wait_their_turn() -> None:
    provider = FakeProvider(delay=0.05)
    home = HomeFetches(provider, 1)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 10
    queued = [asyncio.create_task(home.get(i, Priority.READAHEAD, deadline)) for i in (1, 2, 3)]
    await asyncio.sleep(0.01)
    t = loop.time()
    await home.get(3, Priority.DEMAND, deadline)  # promoted past 2, and past the busy slot
    assert loop.time() - t < 0.09
    turn = asyncio.create_task(home.turn(9, Priority.READAHEAD, deadline))
    await asyncio.gather(*queued)
    await asyncio.wait_for(turn, 1)
    assert (9, True) in provider.calls, "this node's own flight is joined, not restarted without sources"
    with pytest.raises(DeadlineError):
        await home.get(20, Priority.READAHEAD, loop.time())
    home.aclose()



async def test_home_fetches_order_demand_readahead_background() -> None:
    """Warming (BACKGROUND) never queues ahead of read-ahead, whatever the chunk index."""
    provider = FakeProvider()
    home = HomeFetches(provider, 1)
    deadline = asyncio.get_running_loop().time() + 10
    first = asyncio.create_task(home.get(0, Priority.READAHEAD, deadline))  # takes the one slot
    await asyncio.sleep(0)
    rest = [
        asyncio.create_task(home.get(i, p, deadline))
        for i, p in ((1, Priority.BACKGROUND), (2, Priority.BACKGROUND), (50, Priority.READAHEAD))
    ]
    await asyncio.gather(first, *rest)
    assert provider.started == [0, 50, 1, 2]
    assert urgency(Priority.DEMAND, 99) < urgency(Priority.READAHEAD, 0) < urgency(Priority.BACKGROUND, 0)
    home.aclose()


async def test_home_fetches_close_fails_queued_askers_at_once() -> None:
    provider = FakeProvider(delay=0.5)
    home = HomeFetches(provider, 1)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 30
    running = asyncio.create_task(home.get(1, Priority.READAHEAD, deadline))
    queued = asyncio.create_task(home.get(2, Priority.READAHEAD, deadline))
    turn = asyncio.create_task(home.turn(3, Priority.READAHEAD, deadline))
    await asyncio.sleep(0.05)
    t = loop.time()
    home.aclose()
    for task in (running, queued):
        with pytest.raises(LazyfsError):
            await asyncio.wait_for(task, 2)
    await asyncio.wait_for(turn, 2)  # released: the fetcher goes its own way
    assert loop.time() - t < 1.0, "queued askers waited for their deadline"

def test_zstd_negotiation() -> None:
    assert accepts_zstd("zstd") and accepts_zstd("gzip, zstd;q=0.5") and accepts_zstd("ZSTD")
    for header in (None, "", "gzip", "zstd;q=0", "zstdx", "zstd; q=0.0"):
        assert not accepts_zstd(header), header


def test_cpu_gauge_reads_the_machine_busy_fraction(tmp_path: Path) -> None:
    stat = tmp_path / "stat"
    now = [0.0]

    def write(busy: int, idle: int) -> None:  # user nice system idle iowait irq softirq steal
        stat.write_text(f"cpu  {busy} 0 0 {idle} 0 0 0 0 0 0\ncpu0 1 2 3 4\n")

    write(100, 100)
    gauge = CpuGauge(str(stat), clock=lambda: now[0])
    assert gauge.busy() == 0.0  # one sample: nothing known yet
    write(190, 110)
    assert gauge.busy() == 0.0, "sampled at most every CPU_SAMPLE seconds"
    now[0] += 1
    assert gauge.busy() == pytest.approx(0.9)
    assert CpuGauge(str(tmp_path / "missing")).busy() == 0.0


def test_the_tier_refuses_a_token_that_is_not_printable_ascii() -> None:
    """The CLI checks the token file; an embedding program gets the same check (a non-ASCII token
    made every request raise inside the peer client)."""
    for token in (b"\xffsecret", b"two words", b"tab\tbed"):
        with pytest.raises(UsageError, match="printable ASCII"):
            PeerTier(PeerConfig(token=token, peers=("127.0.0.1:9",)), cast(Any, None))
