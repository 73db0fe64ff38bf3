"""Typed configuration, read once.

Frozen dataclasses only; the CLI builds them from flags and environment
variables (the only place lazyfs reads the environment), library users build
them directly.  No ``**kwargs`` bags.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass

from lazyfs.errors import UsageError

__all__ = ["MountConfig", "OriginConfig", "PeerConfig", "SeedConfig", "parse_host_port", "s3_config_from_env"]

MiB = 1024 * 1024


@dataclass(frozen=True, slots=True)
class OriginConfig:
    # A stalled TCP connect to a dead host should fail well inside a read deadline.
    connect_timeout: float = 5.0
    # Per request; a 64 MiB pack over a slow link needs minutes, not seconds.
    request_timeout: float = 300.0
    # Connections per origin: enough to fill a fast link with 4 MiB ranges.
    max_connections: int = 16
    # S3: endpoint override for S3-compatible stores (MinIO, moto, R2) and region.
    s3_endpoint: str | None = None
    s3_region: str | None = None
    # Allow plain http:// S3 endpoints (loopback test servers, private networks).
    s3_allow_http: bool = True


@dataclass(frozen=True, slots=True)
class SeedConfig:
    # 4 MiB: large enough that per-chunk overhead (index, request, hash call) is noise,
    # small enough that a random read fetches little it does not need.
    chunk_size: int = 4 * MiB
    # ~64 MiB packs: few objects at the origin, yet a range GET still addresses one chunk.
    pack_size: int = 64 * MiB
    # zstd level 1: 0.68 GB/s per core on bf16 weights for the same 0.78 ratio as level 3 (0.51 GB/s);
    # compression must not be what limits seeding on a 2-core machine.
    zstd_level: int = 1
    # Store compressed only where it saves at least this fraction.
    min_saving: float = 0.10
    # Parallel pack uploads.
    upload_concurrency: int = 4
    # Threads hashing and compressing chunks (they release the GIL).
    workers: int = 0  # 0: one per CPU


@dataclass(frozen=True, slots=True)
class PeerConfig:
    """The peer tier (package ``p2p``): who the peers are and how to talk to them.

    Addresses are ``HOST:PORT`` strings.  ``peers`` and ``peers_dns`` may both be
    given; the member set is their union, re-resolved every ``refresh_interval``.
    A node whose own address is in the set takes part in placement (it is the
    home of some chunks); one that is not only asks.
    """

    # The cluster secret every request carries (read from --peer-token-file by the CLI).
    token: bytes
    # HOST:PORT the peer server listens on; None: this node only asks, it serves nobody.
    listen: str | None = None
    peers: tuple[str, ...] = ()
    # NAME:PORT resolved periodically; every address it resolves to is a peer.
    peers_dns: str | None = None
    refresh_interval: float = 10.0
    # One peer's allowance for one chunk (including its own origin fetch, if it is the
    # home) before the next candidate is tried.
    timeout: float = 5.0
    # A peer that fails is skipped for a while (doubling from backoff_initial up to
    # backoff_max); one that sends bad bytes is skipped for bad_hold seconds.
    backoff_initial: float = 1.0
    backoff_max: float = 30.0
    bad_hold: float = 300.0
    # Candidates (in rendezvous order) that may fetch from the origin on our behalf
    # before we go to the origin ourselves.
    candidates: int = 2
    # TLS: server certificate and key; with a CA, peers must present a certificate it signed.
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_ca: str | None = None
    # Connections per peer: HTTP/1.1 carries one request at a time, and a node's read-ahead
    # (32 chunks) may all be homed at one peer; a request queued for a connection spends its
    # peer timeout waiting, so the pool must not be the bottleneck.
    max_connections: int = 32


@dataclass(frozen=True, slots=True)
class MountConfig:
    origin: str
    ref: str
    mountpoint: str
    cache_dir: str
    # 0: unbounded.  Default (set by the CLI) is 64 GiB: a few large models.
    cache_size: int
    read_timeout: float = 30.0
    allow_other: bool = False
    # HOST:PORT for the Prometheus exporter; None: no exporter.
    metrics_addr: str | None = None
    # Directory for the daemon's control socket (short path: sun_path holds 108 bytes).
    runtime_dir: str = "/tmp"
    origin_config: OriginConfig = OriginConfig()
    # The peer tier; None: no peers (the cache, then the origin).
    peers: PeerConfig | None = None
    # Startup traces (lazyfs.trace): record the chunks reads need, in order, and publish them
    # to the origin at unmount; replay the manifest's published trace when mounting.
    record_trace: bool = False
    replay_trace: bool = True


def s3_config_from_env(env: Mapping[str, str], base: OriginConfig | None = None) -> OriginConfig:
    """``base`` with the S3 endpoint and region taken from the usual AWS variables.

    ``AWS_ENDPOINT_URL_S3`` beats ``AWS_ENDPOINT_URL``; ``AWS_REGION`` beats
    ``AWS_DEFAULT_REGION`` (the AWS CLI's precedence).  Values already set in ``base``
    win over the environment.  Credentials are not read here: lazyfs.origin.s3 uses
    the standard AWS credential chain.
    """
    base = base if base is not None else OriginConfig()
    endpoint = base.s3_endpoint or env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL") or None
    region = base.s3_region or env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or None
    return dataclasses.replace(base, s3_endpoint=endpoint, s3_region=region)


def parse_host_port(text: str, what: str = "address") -> tuple[str, int]:
    """``HOST:PORT`` or ``[V6]:PORT`` -> ``(host, port)``; a one-line UsageError for anything else."""
    host, sep, port_s = text.strip().rpartition(":")
    if not sep or not host or not port_s.isdigit():
        raise UsageError(f"bad {what} {text!r}: expected HOST:PORT")
    port = int(port_s)
    if not 0 < port < 65536:
        raise UsageError(f"bad {what} {text!r}: port out of range")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, port
