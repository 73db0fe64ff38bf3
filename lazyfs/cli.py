"""The ``lazyfs`` command.

The only module that reads environment variables: it turns flags and the
environment into frozen config objects and hands them to the library.  Every
deliberate error (:class:`~lazyfs.errors.LazyfsError`) is printed as one line
on stderr with a non-zero exit; ``--debug`` adds tracebacks.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import errno
import gc
import json
import logging
import os
import re
import shutil
import stat
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from lazyfs import __version__
from lazyfs.config import MountConfig, OriginConfig, PeerConfig, SeedConfig, parse_host_port, s3_config_from_env
from lazyfs.errors import LazyfsError, UsageError
from lazyfs.manifest.schema import parse_ref

if TYPE_CHECKING:
    from lazyfs.manifest import EntryType, Manifest
    from lazyfs.seed import SeedResult

# Start-up time matters here: ``lazyfs mount`` and ``lazyfs run`` start a daemon and wait for it,
# and the daemon is this module run again.  So only light modules are imported at the top; what
# a command needs (uvloop, origins, the codec, rich, the seeder, the daemon) is imported by the
# command (``lazyfs mount`` went from 0.29 s of imports to ~0.07 s before starting its daemon).

__all__ = ["main", "origin_config_from_env", "parse_size"]

log = logging.getLogger("lazyfs")
T = TypeVar("T")

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgtp]?)(i?b?)\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """``4MiB``, ``64M``, ``10G``, ``1073741824`` -> bytes (binary multiples)."""
    m = _SIZE_RE.match(text)
    if not m:
        raise UsageError(f"bad size {text!r}: use a number with an optional K/M/G/T suffix, like 4MiB")
    n, unit = float(m.group(1)), m.group(2).lower()
    mult = 1024 ** " kmgtp".index(unit) if unit else 1
    return int(n * mult)


def origin_config_from_env(env: Mapping[str, str]) -> OriginConfig:
    return s3_config_from_env(env, OriginConfig())


def _run(coro_fn: Callable[[], Awaitable[T]]) -> T:
    import uvloop

    async def wrapper() -> T:
        return await coro_fn()

    return uvloop.run(wrapper())


# --- seed ---------------------------------------------------------------------


def _cmd_seed(args: argparse.Namespace) -> int:
    ref = parse_ref(args.name, allow_digest=False)
    chunk_size = parse_size(args.chunk_size)
    if chunk_size < 64 * 1024 or chunk_size > 256 * 1024 * 1024 or chunk_size % 4096:
        raise UsageError("--chunk-size must be a multiple of 4 KiB between 64 KiB and 256 MiB")
    if not -7 <= args.zstd_level <= 22:
        raise UsageError("--zstd-level must be between -7 and 22")
    config = SeedConfig(
        chunk_size=chunk_size,
        zstd_level=args.zstd_level,
        upload_concurrency=args.jobs,
    )
    from lazyfs.seed import keep_freed_memory

    keep_freed_memory()
    from lazyfs.image.reference import parse_image_ref

    image = parse_image_ref(args.src)
    if image is not None:
        return _seed_image(args, image, ref, config)
    if args.platform or args.insecure_registry:
        raise UsageError("--platform and --insecure-registry apply to image sources (oci:, docker-archive:, docker://)")
    src = Path(args.src)
    if not os.path.lexists(src):
        raise UsageError(f"{src}: no such file or directory")
    origin_config = origin_config_from_env(os.environ)
    from lazyfs.origin import open_origin
    from lazyfs.progress import open_progress
    from lazyfs.seed import seed

    async def go() -> int:
        origin = open_origin(args.origin, origin_config)
        try:
            progress = open_progress(f"seed {ref}", quiet=args.quiet)
            result = await seed(src, origin, ref, config, progress)
        finally:
            await origin.aclose()
        _report_seed(result, args.quiet)
        return 0

    return _run(go)


def _report_seed(result: SeedResult, quiet: bool) -> None:
    """The summary on stderr (unless quiet), then ``NAME:TAG DIGEST`` on stdout."""
    from lazyfs.progress import human_bytes

    if not quiet:
        print(
            f"published {result.files} files, {human_bytes(result.bytes_total)} "
            f"({result.chunks_new} new chunks, {result.chunks_reused} reused; "
            f"uploaded {human_bytes(result.bytes_uploaded)} in {result.packs_uploaded} packs, "
            f"{result.packs_skipped} already there) in {result.seconds:.1f} s",
            file=sys.stderr,
        )
    print(f"{result.ref} {result.digest}")


def docker_config_dir(env: Mapping[str, str]) -> str:
    """Where registry credentials are: ``$DOCKER_CONFIG``, else ``~/.docker`` (docker's own rule)."""
    if env.get("DOCKER_CONFIG"):
        return env["DOCKER_CONFIG"]
    return os.path.join(env.get("HOME") or os.path.expanduser("~"), ".docker")


def _seed_image(args: argparse.Namespace, image: Any, ref: Any, config: SeedConfig) -> int:
    """``lazyfs seed oci:DIR | docker-archive:FILE | docker://REG/REPO:TAG ORIGIN --name NAME:TAG``."""
    from lazyfs.image import ImageOptions, Platform, seed_image

    try:
        platform = Platform.parse(args.platform) if args.platform else None
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    options = ImageOptions(
        platform=platform,
        docker_config_dir=docker_config_dir(os.environ),
        insecure_registry=args.insecure_registry,
    )
    origin_config = origin_config_from_env(os.environ)
    from lazyfs.origin import open_origin
    from lazyfs.progress import human_bytes, open_progress

    async def go() -> int:
        origin = open_origin(args.origin, origin_config)
        try:
            pull = open_progress(f"pull {image}", quiet=args.quiet)
            progress = open_progress(f"seed {ref}", quiet=args.quiet)
            out = await seed_image(image, origin, ref, config, options, progress, pull)
        finally:
            await origin.aclose()
        result = out.result
        if not args.quiet:
            print(
                f"image {out.image.platform}, {len(out.image.layers)} layers, "
                f"{human_bytes(out.layer_bytes)} read, flattened in {out.flatten_seconds:.1f} s",
                file=sys.stderr,
            )
        _report_seed(result, args.quiet)
        return 0

    return _run(go)


# --- inspect ------------------------------------------------------------------

# ls's type letter by EntryType value (DIR=1, REG, SYMLINK, HARDLINK, CHR, BLK, FIFO, SOCK=8).
_TYPE_CHAR = "?d-lhcbps"


def _mode_string(et: EntryType, mode: int) -> str:
    return _TYPE_CHAR[et] + stat.filemode(mode)[1:]


def _show_path(p: bytes) -> str:
    text = p.decode("utf-8", "backslashreplace")
    return "/" + text.replace("\n", "\\n")


def format_tree(m: Manifest) -> list[str]:
    from lazyfs.manifest import EntryType

    lines = []
    for e in m.entries:
        target = m.resolve(e)
        nchunks = len(target.chunks) if target.type is EntryType.REG else 0
        size = target.size if e.type is EntryType.HARDLINK else e.size
        suffix = ""
        if e.type is EntryType.SYMLINK:
            suffix = " -> " + e.target.decode("utf-8", "backslashreplace")
        elif e.type is EntryType.HARDLINK:
            suffix = " => " + _show_path(e.target)
        elif e.type in (EntryType.CHR, EntryType.BLK):
            suffix = f" [{os.major(e.rdev)},{os.minor(e.rdev)}]"
        lines.append(
            f"{_mode_string(e.type, e.mode)} {e.uid:>5} {e.gid:>5} {size:>14,} {nchunks:>6}  "
            f"{_show_path(e.path)}{suffix}"
        )
    return lines


def _cmd_inspect(args: argparse.Namespace) -> int:
    ref = parse_ref(args.ref)
    origin_config = origin_config_from_env(os.environ)
    from lazyfs.catalog import load_manifest, resolve_ref
    from lazyfs.manifest import EntryType
    from lazyfs.origin import open_origin
    from lazyfs.progress import human_bytes

    async def go() -> int:
        origin = open_origin(args.origin, origin_config)
        try:
            digest = await resolve_ref(origin, ref)
            _, m = await load_manifest(origin, digest)
        finally:
            await origin.aclose()
        print(f"{ref}  manifest {digest}")
        files = sum(1 for e in m.entries if e.type is EntryType.REG)
        print(
            f"{len(m.entries)} entries, {files} files, {human_bytes(m.total_size)} "
            f"in {len(m.chunks)} chunks of up to {human_bytes(m.chunk_size)}, "
            f"{human_bytes(m.stored_size)} stored in {len(m.packs)} packs"
        )
        from lazyfs.image.config import CONFIG_ANNOTATION, ImageConfig

        image_config = ImageConfig.from_manifest(m)
        if image_config is not None:
            for line in image_config.summary_lines():
                print(line)
        for k, v in m.annotations:
            if k != CONFIG_ANNOTATION:
                print(f"annotation {k}: {v}")
        print(f"{'mode':10} {'uid':>5} {'gid':>5} {'size':>14} {'chunks':>6}  path")
        for line in format_tree(m):
            print(line)
        return 0

    return _run(go)


def _cmd_refs(args: argparse.Namespace) -> int:
    origin_config = origin_config_from_env(os.environ)
    from lazyfs.catalog import list_refs
    from lazyfs.origin import open_origin

    async def go() -> int:
        origin = open_origin(args.origin, origin_config)
        try:
            for r in await list_refs(origin):
                print(r)
        finally:
            await origin.aclose()
        return 0

    return _run(go)


# --- mount / umount / status / prefetch / cache ---------------------------------


def default_cache_dir(env: Mapping[str, str]) -> str:
    if os.geteuid() == 0:
        return "/var/cache/lazyfs"
    base = env.get("XDG_CACHE_HOME") or os.path.join(env.get("HOME") or os.path.expanduser("~"), ".cache")
    return os.path.join(base, "lazyfs")


def default_runtime_dir(env: Mapping[str, str]) -> str:
    if os.geteuid() == 0:
        return "/run/lazyfs"
    xdg = env.get("XDG_RUNTIME_DIR")
    return os.path.join(xdg, "lazyfs") if xdg else f"/tmp/lazyfs-{os.getuid()}"


def _mount_config(args: argparse.Namespace) -> MountConfig:
    env = os.environ
    parse_ref(args.ref)  # a bad ref fails here, before any daemon starts
    if args.read_timeout <= 0:
        raise UsageError("--read-timeout must be positive")
    metrics = args.metrics_addr
    if metrics is not None and not re.match(r"^[^:]*:\d{1,5}$", metrics):
        raise UsageError(f"bad --metrics-addr {metrics!r}: use HOST:PORT")
    allow_other = args.allow_other if args.allow_other is not None else os.geteuid() == 0
    peers = _peer_config(args)
    return MountConfig(
        origin=args.origin,
        ref=args.ref,
        mountpoint=os.path.abspath(args.mountpoint),
        cache_dir=os.path.abspath(args.cache_dir or default_cache_dir(env)),
        cache_size=parse_size(args.cache_size),
        read_timeout=args.read_timeout,
        allow_other=allow_other,
        metrics_addr=metrics,
        runtime_dir=default_runtime_dir(env),
        origin_config=origin_config_from_env(env),
        peers=peers,
        record_trace=args.record_trace,
        replay_trace=args.replay_trace,
    )


_TOKEN = re.compile(rb"[\x21-\x7e]+")


def read_token_file(path: str) -> bytes:
    """The cluster secret: the file's content without surrounding whitespace, printable ASCII only."""
    try:
        with open(path, "rb") as f:
            token = f.read(4097).strip()
    except OSError as exc:
        raise UsageError(f"cannot read the peer token file {path}: {exc.strerror or exc}") from exc
    if not token:
        raise UsageError(f"the peer token file {path} is empty")
    if len(token) > 4096 or not _TOKEN.fullmatch(token):
        raise UsageError(f"the peer token in {path} must be one word of printable ASCII, at most 4096 bytes")
    return token


def _peer_config(args: argparse.Namespace) -> PeerConfig | None:
    peers = tuple(p.strip() for p in (args.peers or "").split(",") if p.strip())
    tls = (args.peer_tls_cert, args.peer_tls_key, args.peer_tls_ca)
    if not (args.listen or peers or args.peers_dns):
        if args.peer_token_file or any(tls):
            raise UsageError("peer options need --peers or --peers-dns")
        return None
    if not (peers or args.peers_dns):
        raise UsageError("--listen needs --peers or --peers-dns (who the other nodes are)")
    for p in peers:
        parse_host_port(p, "peer")
    if args.peers_dns:
        parse_host_port(args.peers_dns, "--peers-dns")
    if args.listen:
        parse_host_port(args.listen, "--listen address")
    if not args.peer_token_file:
        raise UsageError("peers need a shared secret: --peer-token-file FILE")
    if args.peer_timeout <= 0:
        raise UsageError("--peer-timeout must be positive")
    cert, key, ca = (os.path.abspath(p) if p else None for p in tls)
    return PeerConfig(
        token=read_token_file(args.peer_token_file),
        listen=args.listen,
        peers=peers,
        peers_dns=args.peers_dns,
        timeout=args.peer_timeout,
        tls_cert=cert,
        tls_key=key,
        tls_ca=ca,
    )


def _peer_argv(args: argparse.Namespace) -> list[str]:
    """The peer flags again, for the detached daemon (paths made absolute: it starts elsewhere)."""
    out: list[str] = []
    for flag, value, is_path in (
        ("--listen", args.listen, False),
        ("--peers", args.peers, False),
        ("--peers-dns", args.peers_dns, False),
        ("--peer-token-file", args.peer_token_file, True),
        ("--peer-tls-cert", args.peer_tls_cert, True),
        ("--peer-tls-key", args.peer_tls_key, True),
        ("--peer-tls-ca", args.peer_tls_ca, True),
    ):
        if value:
            out += [flag, os.path.abspath(value) if is_path else value]
    return [*out, "--peer-timeout", str(args.peer_timeout)]


def _cmd_mount(args: argparse.Namespace) -> int:
    config = _mount_config(args)
    if not os.path.isdir(config.mountpoint):
        raise UsageError(f"{config.mountpoint}: mountpoint is not a directory")
    if os.path.ismount(config.mountpoint):
        raise UsageError(f"{config.mountpoint}: something is already mounted there")
    if args.foreground:
        return _mount_foreground(config, args.ready_fd)
    return _mount_background(args, config)


def _mount_foreground(config: MountConfig, ready_fd: int | None) -> int:
    from lazyfs.daemon import run_mount

    def ready(m: object) -> None:
        log.info("mounted %s at %s", config.ref, config.mountpoint)
        # What start-up built (the manifest, the inode table, every module) lives as long as
        # the daemon: moved out of the collector's generations, full collections later do not
        # walk 100k objects (a pause of every FUSE request in flight) to find them alive.
        gc.freeze()
        if ready_fd is not None:
            os.write(ready_fd, b"ok\n")
            os.close(ready_fd)

    try:
        _run(lambda: run_mount(config, ready))
    except LazyfsError as exc:
        if ready_fd is not None:
            with contextlib.suppress(OSError):
                os.write(ready_fd, f"error: {exc}\n".encode())
        raise
    return 0


def _mount_background(args: argparse.Namespace, config: MountConfig) -> int:
    """Start the daemon detached and return once the mount is ready (or report its error)."""
    os.makedirs(config.cache_dir, exist_ok=True)
    log_path = os.path.join(config.cache_dir, "daemon.log")
    r, w = os.pipe()
    argv = [sys.executable, "-m", "lazyfs"]
    if args.debug:
        argv.append("--debug")
    argv += ["mount", config.origin, config.ref, config.mountpoint, "--foreground", "--ready-fd", str(w),
             "--cache-dir", config.cache_dir, "--cache-size", str(config.cache_size),
             "--read-timeout", str(config.read_timeout),
             "--allow-other" if config.allow_other else "--no-allow-other"]
    if config.metrics_addr:
        argv += ["--metrics-addr", config.metrics_addr]
    if config.record_trace:
        argv.append("--record-trace")
    if not config.replay_trace:
        argv.append("--no-trace-replay")
    argv += _peer_argv(args)
    with open(log_path, "ab") as logf:
        proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=logf, stderr=logf, pass_fds=(w,), start_new_session=True
        )
    os.close(w)
    with os.fdopen(r, "rb") as rf:
        msg = rf.read().decode(errors="replace").strip()  # EOF when the child writes or exits
    if msg == "ok":
        print(f"mounted {config.ref} at {config.mountpoint} (daemon pid {proc.pid}, log {log_path})",
              file=sys.stderr)
        return 0
    rc = proc.wait(timeout=60)
    raise LazyfsError(msg.removeprefix("error: ") if msg else f"the mount daemon exited ({rc}); see {log_path}")


def _control(mountpoint: str, name: bytes) -> bytes:
    from lazyfs.control import CONTROL_XATTR

    mp = os.path.abspath(mountpoint)
    if not os.path.ismount(mp):
        raise UsageError(f"{mp} is not a mount point")
    try:
        return os.getxattr(mp, name.decode())
    except OSError as exc:
        if name == CONTROL_XATTR or exc.errno in (errno.ENODATA, errno.ENOTSUP):
            raise UsageError(f"{mp} is not a lazyfs mount") from exc
        raise LazyfsError(f"cannot query {mp}: {exc.strerror}") from exc


def _status(mountpoint: str) -> dict[str, Any]:
    from lazyfs.control import STATUS_XATTR

    data: dict[str, Any] = json.loads(_control(mountpoint, STATUS_XATTR))
    return data


def _cmd_umount(args: argparse.Namespace) -> int:
    mp = os.path.abspath(args.mountpoint)
    if not os.path.ismount(mp):
        raise UsageError(f"{mp} is not mounted")
    try:
        pid: int | None = int(_status(mp)["pid"])
    except (LazyfsError, KeyError, ValueError):
        pid = None
    cmd = ["fusermount3", "-u", mp] if shutil.which("fusermount3") else ["umount", mp]
    # The daemon itself holds a directory open for a moment after a first lookup in it (it
    # lists it ahead): a "busy" right after use is tried again briefly before it is reported.
    busy_until = time.monotonic() + 2
    while True:
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0 and os.geteuid() == 0:
            res = subprocess.run(["umount", mp], capture_output=True, text=True)
        if res.returncode == 0 or "busy" not in res.stderr.lower() or time.monotonic() > busy_until:
            break
        time.sleep(0.05)
    if res.returncode != 0:
        raise LazyfsError(f"cannot unmount {mp}: {res.stderr.strip() or 'busy?'}")
    # Wait for the daemon to finish its cache writes so a remount finds them.
    deadline = time.monotonic() + 60
    while pid is not None and time.monotonic() < deadline and _daemon_running(pid):
        time.sleep(0.05)
    return 0


def _daemon_running(pid: int) -> bool:
    """Whether ``pid`` still runs.  A zombie has exited: the daemon is detached, so its parent
    is init (or a container's PID 1), which may reap it late or never."""
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rsplit(b")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in (b"Z", b"X")


def _cmd_status(args: argparse.Namespace) -> int:
    from lazyfs.progress import human_bytes

    st = _status(args.mountpoint)
    if args.json:
        print(json.dumps(st, indent=2))
        return 0
    f, c = st["fetch"], st["cache"]
    print(f"{st['ref']} at {st['mountpoint']} (pid {st['pid']}, up {st['uptime_s']} s)")
    print(f"  manifest   {st['digest']}  from {st['origin']}")
    print(f"  files      {st['files']}, {human_bytes(st['bytes'])}")
    print(f"  reads      {f['requests']} chunk requests: {f['memory_hits']} memory, {f['cache_hits']} cache hits, "
          f"{f['cache_misses']} misses")
    print(f"  bytes      cache {human_bytes(f['bytes_from_cache'])}, peers {human_bytes(f['bytes_from_peers'])}, "
          f"origin {human_bytes(f['bytes_from_origin'])}")
    print(f"  in flight  {f['inflight_chunks']} chunks ({f['queued_chunks']} queued), "
          f"write-back {human_bytes(f['writeback_pending'])}")
    print(f"  failures   origin errors {f['origin_errors']}, verification {f['verify_failures']}, "
          f"deadlines {f['deadline_failures']}, cache writes {f['cache_write_errors']}")
    print(f"  cache      {st['cache_dir']}: " + ", ".join(f"{k} {v}" for k, v in c.items()))
    md = st.get("metadata")
    if md:
        print(f"  metadata   {md['lookups']} lookups ({md['lookups_missing']} not found), {md['readdirs']} listings, "
              f"{md['dirs_listed_ahead']} directories listed ahead ({md['list_ahead_errors']} failed)")
    p = st.get("peers")
    if p:
        print(f"  peers      {p['live']} of {p['members']} live, this node {p['self'] or '(not a member)'}; "
              f"received {human_bytes(p['bytes_received'])}, served {human_bytes(p['bytes_served'])} "
              f"in {p['requests_served']} requests, refused {p['requests_refused']}")
        for key, peer in p["peers"].items():
            err = f", last error: {peer['last_error']}" if peer["last_error"] else ""
            print(f"    {key:<22} {peer['state']:<8} {human_bytes(peer['bytes'])} received, "
                  f"{peer['errors']} errors, {peer['bad']} bad chunks{err}")
    if st.get("trace"):
        from lazyfs.run import trace_summary

        print(f"  trace      {trace_summary(st['trace'])}")
    for note in st.get("notes", []):
        print(f"  note       {note}")
    return 0


def _cmd_prefetch(args: argparse.Namespace) -> int:
    import aiohttp

    from lazyfs.control import CONTROL_XATTR
    from lazyfs.progress import human_bytes, open_progress

    mp = os.path.abspath(args.mountpoint)
    sock = _control(mp, CONTROL_XATTR).decode()
    rel: list[str] | None = None
    if args.trace and args.paths:
        raise UsageError("prefetch --trace replays the published startup trace: give no paths with it")
    if args.paths:
        rel = []
        for p in args.paths:
            ap = os.path.abspath(p if os.path.isabs(p) or p.startswith(".") else os.path.join(mp, p))
            if not (ap == mp or ap.startswith(mp + "/")):
                raise UsageError(f"{p} is not inside {mp}")
            rel.append(os.path.relpath(ap, mp) if ap != mp else "")
    progress = open_progress(f"prefetch {os.path.basename(mp)}", quiet=args.quiet)

    async def go() -> int:
        conn = aiohttp.UnixConnector(path=sock)
        timeout = aiohttp.ClientTimeout(total=None, sock_read=None)
        async with aiohttp.ClientSession(connector=conn, timeout=timeout) as session:
            try:
                body: dict[str, Any] = {"trace": True} if args.trace else {"paths": rel}
                resp = await session.post("http://lazyfs/prefetch", json=body)
            except aiohttp.ClientError as exc:
                raise LazyfsError(f"cannot reach the daemon of {mp}: {exc}") from exc
            async with resp:
                if resp.status != 200:
                    raise LazyfsError(f"prefetch refused: {(await resp.json()).get('error')}")
                started = False
                done = 0
                async for line in resp.content:
                    msg = json.loads(line)
                    if "error" in msg:
                        raise LazyfsError(f"prefetch failed: {msg['error']}")
                    if not started:
                        progress.start(int(msg["total"]))
                        started = True
                    progress.advance(int(msg["done"]) - done)
                    done = int(msg["done"])
                    if msg.get("ok"):
                        progress.finish()
                        if not args.quiet:
                            print(f"prefetched {human_bytes(done)}", file=sys.stderr)
                        return 0
        raise LazyfsError("the daemon closed the connection before prefetch finished")

    return _run(go)


def _cmd_cache_verify(args: argparse.Namespace) -> int:
    from lazyfs.store import ChunkStore

    cache_dir = os.path.abspath(args.cache_dir or default_cache_dir(os.environ))
    if not os.path.isdir(cache_dir):
        raise UsageError(f"{cache_dir}: no cache here")
    with ChunkStore.open(Path(cache_dir)) as store:
        report = store.verify(repair=args.repair)
    print(", ".join(f"{k} {v}" for k, v in dataclasses.asdict(report).items()))
    if not report.clean and not args.repair:
        print("lazyfs: the cache has problems; run `lazyfs cache verify --repair` to fix them", file=sys.stderr)
        return 1
    return 0


# --- run / trace --------------------------------------------------------------


def parse_env_overrides(items: Sequence[str], env: Mapping[str, str]) -> tuple[tuple[str, str], ...]:
    """``run --env``: ``NAME=VALUE``, or ``NAME`` for this environment's value (skipped when unset, like Docker)."""
    out = []
    for item in items:
        name, sep, value = item.partition("=")
        if not name or "\0" in item:
            raise UsageError(f"bad --env {item!r}: use NAME=VALUE (or NAME to pass on this environment's value)")
        if not sep:
            if name not in env:
                continue
            value = env[name]
        out.append((name, value))
    return tuple(out)


def _cmd_run(args: argparse.Namespace) -> int:
    from lazyfs.errors import RunError
    from lazyfs.run import RunConfig, run_image

    env = os.environ
    try:
        if args.read_timeout <= 0:
            raise UsageError("--read-timeout must be positive")
        command = list(args.cmd)
        if command[:1] == ["--"]:
            command = command[1:]
        config = RunConfig(
            origin=args.origin,
            ref=args.ref,
            cache_dir=os.path.abspath(args.cache_dir or default_cache_dir(env)),
            cache_size=parse_size(args.cache_size),
            read_timeout=args.read_timeout,
            command=tuple(command),
            entrypoint=None if args.entrypoint is None else tuple(x for x in [args.entrypoint] if x),
            env=parse_env_overrides(args.env or [], env),
            workdir=args.workdir,
            user=args.user,
            writable=args.writable,
            tmp_dir=os.path.abspath(args.tmp_dir or env.get("TMPDIR") or "/var/tmp"),
            record_trace=args.record_trace,
            replay_trace=args.replay_trace,
            stats=args.stats,
            stats_json=os.path.abspath(args.stats_json) if args.stats_json else None,
            debug=args.debug,
        )
        return run_image(config)
    except LazyfsError as exc:  # lazyfs's own failures: 125/126/127 like `docker run`, never the program's status
        if args.debug:
            log.exception("failed")
        print(f"lazyfs: error: {exc}", file=sys.stderr)
        return exc.exit_status if isinstance(exc, RunError) else 125


def _cmd_trace_publish(args: argparse.Namespace) -> int:
    from lazyfs.control import CONTROL_XATTR
    from lazyfs.run import control_request

    mp = os.path.abspath(args.mountpoint)
    res = control_request(_control(mp, CONTROL_XATTR).decode(), "POST", "/trace/publish")
    print(f"published a startup trace of {res['chunks']} chunks to {str(res['origin']).rstrip('/')}/{res['key']}",
          file=sys.stderr)
    print(res["key"])
    return 0


def _cmd_trace_show(args: argparse.Namespace) -> int:
    from lazyfs.catalog import load_manifest, resolve_ref
    from lazyfs.manifest import EntryType
    from lazyfs.origin import open_origin
    from lazyfs.progress import human_bytes
    from lazyfs.trace import load_trace, trace_key

    ref = parse_ref(args.ref)
    origin_config = origin_config_from_env(os.environ)

    async def go() -> int:
        origin = open_origin(args.origin, origin_config)
        try:
            digest = await resolve_ref(origin, ref)
            _, m = await load_manifest(origin, digest)
            trace = await load_trace(origin, digest, len(m.chunks))
        finally:
            await origin.aclose()
        if trace is None:
            raise LazyfsError(f"no startup trace is published for {ref} ({digest[:16]}) at {args.origin}")
        where: dict[int, tuple[bytes, int]] = {}
        want = set(trace.chunks)
        for e in m.entries:
            if e.type is EntryType.REG:
                for pos, i in enumerate(e.chunks):
                    if i in want and i not in where:
                        where[i] = (e.path, pos * m.chunk_size)
        size = sum(m.chunks[i].size for i in trace.chunks)
        span = trace.times_ms[-1] / 1000 if trace.times_ms else 0.0
        print(f"{ref}  manifest {digest}  {trace_key(digest)}")
        print(f"{len(trace.chunks)} chunks, {human_bytes(size)} of {human_bytes(m.total_size)}, "
              f"first needed over {span:.1f} s")
        print(f"{'ms':>8} {'chunk':>8} {'size':>10}  path @ offset")
        for i, t in zip(trace.chunks, trace.times_ms, strict=True):
            path, off = where.get(i, (b"?", 0))
            print(f"{t:>8} {i:>8} {m.chunks[i].size:>10}  {_show_path(path)} @ {off}")
        return 0

    return _run(go)


# --- parser -------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lazyfs", description="Lazily mounted, content-addressed models and images.")
    p.add_argument("--version", action="version", version=f"lazyfs {__version__}")
    p.add_argument("--debug", action="store_true", help="debug logging and tracebacks")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser("seed", help="chunk, pack and publish a directory, a file or a container image")
    s.add_argument("src", metavar="SRC",
                   help="a directory, a single file, or an image: oci:DIR[:TAG], docker-archive:FILE, "
                        "docker://HOST[:PORT]/REPO:TAG")
    s.add_argument("origin", metavar="ORIGIN", help="file:///dir, s3://bucket/prefix")
    s.add_argument("--name", required=True, metavar="NAME[:TAG]", help="the ref to publish (tag: latest)")
    s.add_argument("--chunk-size", default="4MiB", help="chunk size (default 4MiB)")
    s.add_argument("--zstd-level", type=int, default=SeedConfig().zstd_level, help="zstd level (default 1)")
    s.add_argument("--jobs", type=int, default=SeedConfig().upload_concurrency, help="parallel uploads")
    s.add_argument("-q", "--quiet", action="store_true", help="print only the ref and digest")
    s.add_argument("--platform", metavar="OS/ARCH[/VARIANT]",
                   help="image sources: which image of a multi-platform index (default linux/<this machine>)")
    s.add_argument("--insecure-registry", action="store_true",
                   help="docker://: allow plain http to a registry that is not on loopback")
    s.set_defaults(fn=_cmd_seed)

    s = sub.add_parser("inspect", help="list a published tree (and an image's config)")
    s.add_argument("origin", metavar="ORIGIN")
    s.add_argument("ref", metavar="REF", help="name[:tag] or name@digest")
    s.set_defaults(fn=_cmd_inspect)

    s = sub.add_parser("mount", help="mount a published ref (returns once mounted)")
    s.add_argument("origin", metavar="ORIGIN")
    s.add_argument("ref", metavar="REF", help="name[:tag] or name@digest")
    s.add_argument("mountpoint", metavar="MOUNTPOINT")
    s.add_argument("--cache-dir", help="cache directory (default $XDG_CACHE_HOME/lazyfs, /var/cache/lazyfs as root)")
    s.add_argument("--cache-size", default="64GiB", help="cache bound, LRU-evicted (default 64GiB)")
    s.add_argument("--read-timeout", type=float, default=30.0, help="seconds before a read fails with EIO")
    s.add_argument("--allow-other", dest="allow_other", action="store_true", default=None,
                   help="let other users read the mount (default: on as root)")
    s.add_argument("--no-allow-other", dest="allow_other", action="store_false")
    s.add_argument("--metrics-addr", metavar="HOST:PORT", help="serve Prometheus metrics here")
    s.add_argument("--foreground", action="store_true", help="do not detach")
    s.add_argument("--record-trace", action="store_true",
                   help="record the chunks reads need, in order, and publish the trace to the origin at unmount")
    s.add_argument("--no-trace-replay", dest="replay_trace", action="store_false",
                   help="do not prefetch the manifest's published startup trace")
    g = s.add_argument_group("peers (share chunks with other nodes; see deploy/README.md)")
    g.add_argument("--listen", metavar="HOST:PORT", help="serve verified chunks to peers here")
    g.add_argument("--peers", metavar="H:P,...", help="the peers (every node gets the same list; may include itself)")
    g.add_argument("--peers-dns", metavar="NAME:PORT", help="a DNS name whose addresses are the peers (re-resolved)")
    g.add_argument("--peer-token-file", metavar="FILE", help="the cluster secret (required with peers)")
    g.add_argument("--peer-tls-cert", metavar="FILE", help="TLS certificate for the peer server and client")
    g.add_argument("--peer-tls-key", metavar="FILE", help="its private key")
    g.add_argument("--peer-tls-ca", metavar="FILE", help="the cluster CA: peers must present a certificate it signed")
    g.add_argument("--peer-timeout", type=float, default=5.0, metavar="S",
                   help="seconds one peer may take for a chunk before the next source (default 5)")
    s.add_argument("--ready-fd", type=int, help=argparse.SUPPRESS)
    s.set_defaults(fn=_cmd_mount)

    s = sub.add_parser("umount", help="unmount a lazyfs mount and wait for its daemon")
    s.add_argument("mountpoint", metavar="MOUNTPOINT")
    s.set_defaults(fn=_cmd_umount)

    s = sub.add_parser("status", help="what a mount's daemon is doing")
    s.add_argument("mountpoint", metavar="MOUNTPOINT")
    s.add_argument("--json", action="store_true")
    s.set_defaults(fn=_cmd_status)

    s = sub.add_parser("prefetch", help="warm the cache with everything or the given paths")
    s.add_argument("mountpoint", metavar="MOUNTPOINT")
    s.add_argument("paths", metavar="PATH", nargs="*", help="files or directories (inside the mount)")
    s.add_argument("--trace", action="store_true",
                   help="replay the manifest's published startup trace (fetched again from the origin)")
    s.add_argument("-q", "--quiet", action="store_true")
    s.set_defaults(fn=_cmd_prefetch)

    s = sub.add_parser("cache", help="local cache maintenance")
    cs = s.add_subparsers(dest="cache_command", required=True, metavar="ACTION")
    v = cs.add_parser("verify", help="check (and with --repair fix) the cache")
    v.add_argument("--cache-dir")
    v.add_argument("--repair", action="store_true")
    v.set_defaults(fn=_cmd_cache_verify)

    s = sub.add_parser("refs", help="list the refs published at an origin")
    s.add_argument("origin", metavar="ORIGIN")
    s.set_defaults(fn=_cmd_refs)

    s = sub.add_parser("run", help="run an image's program from a lazy mount (root; chroot + the image's config)",
                       description="Mount REF, give it a writable overlayfs root (or --read-only), bind /proc, /sys "
                                   "and /dev in, chroot and run the image's Entrypoint + Cmd with its Env, "
                                   "WorkingDir and User; everything is unmounted when the program exits. "
                                   "Exit status: the program's; 125/126/127 when lazyfs cannot start it.")
    s.add_argument("origin", metavar="ORIGIN")
    s.add_argument("ref", metavar="REF", help="name[:tag] or name@digest")
    s.add_argument("cmd", metavar="CMD", nargs="*", help="after --: the command, replacing the image's Cmd")
    s.add_argument("--cache-dir", help="cache directory (default as for mount)")
    s.add_argument("--cache-size", default="64GiB", help="cache bound (default 64GiB)")
    s.add_argument("--read-timeout", type=float, default=30.0, help="seconds before a read fails with EIO")
    g = s.add_mutually_exclusive_group()
    g.add_argument("--writable", dest="writable", action="store_true", default=True,
                   help="an overlayfs root whose writes are thrown away at exit (default)")
    g.add_argument("--read-only", dest="writable", action="store_false", help="a read-only root")
    s.add_argument("-e", "--env", action="append", metavar="NAME[=VALUE]",
                   help="set a variable (NAME alone: this environment's value); repeatable")
    s.add_argument("-w", "--workdir", metavar="DIR", help="working directory (absolute), instead of WorkingDir")
    s.add_argument("-u", "--user", metavar="USER[:GROUP]", help="name or uid, optionally :group or :gid")
    s.add_argument("--entrypoint", metavar="PROGRAM", help="replace the image's Entrypoint (and drop its Cmd)")
    s.add_argument("--tmp-dir", metavar="DIR", help="where the overlay's upper directory goes (default $TMPDIR "
                                                    "or /var/tmp)")
    s.add_argument("--record-trace", action="store_true",
                   help="record the chunks the program reads and publish the startup trace when it exits")
    s.add_argument("--no-trace-replay", dest="replay_trace", action="store_false",
                   help="do not prefetch the published startup trace")
    s.add_argument("--stats", action="store_true", help="print where the bytes came from when the program exits")
    s.add_argument("--stats-json", metavar="FILE", help="write the mount's final status (JSON) to FILE")
    s.set_defaults(fn=_cmd_run)

    s = sub.add_parser("trace", help="startup traces: publish a mount's recording, show a published trace")
    ts = s.add_subparsers(dest="trace_command", required=True, metavar="ACTION")
    t = ts.add_parser("publish", help="publish the trace a mount records (mount --record-trace) now")
    t.add_argument("mountpoint", metavar="MOUNTPOINT")
    t.set_defaults(fn=_cmd_trace_publish)
    t = ts.add_parser("show", help="list a published trace: chunks in the order they were needed, with their files")
    t.add_argument("origin", metavar="ORIGIN")
    t.add_argument("ref", metavar="REF", help="name[:tag] or name@digest")
    t.set_defaults(fn=_cmd_trace_show)
    return p


def _split_run_command(argv: list[str]) -> tuple[list[str], list[str] | None]:
    """``lazyfs run ... -- CMD...``: everything after the first ``--`` is the program's command line, as is.

    (argparse would take the CMD positional as empty when options follow ORIGIN REF.)
    """
    first = next((a for a in argv if not a.startswith("-")), None)
    if first == "run" and "--" in argv:
        i = argv.index("--")
        return argv[:i], argv[i + 1 :]
    return argv, None


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    head, run_command = _split_run_command(list(sys.argv[1:] if argv is None else argv))
    args = parser.parse_args(head)
    if run_command is not None:
        args.cmd = [*args.cmd, *run_command]
    logging.basicConfig(
        level=logging.DEBUG if args.debug else logging.WARNING,
        format="lazyfs: %(levelname)s: %(message)s",
    )
    try:
        rc: int = args.fn(args)
        return rc
    except LazyfsError as exc:
        if args.debug:
            log.exception("failed")
        print(f"lazyfs: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("lazyfs: interrupted", file=sys.stderr)
        return 130
    except BaseException as exc:
        # asyncio.CancelledError, matched without importing asyncio (commands that never use it
        # start faster); if asyncio was never imported, nothing can have been cancelled.
        aio = sys.modules.get("asyncio")
        if aio is None or not isinstance(exc, aio.CancelledError):
            raise
        print("lazyfs: cancelled", file=sys.stderr)
        return 130
