"""``lazyfs run``: run an image's program from a lazy mount, the way ``docker run`` would (minus isolation).

What it does, in order (as root):

1. **A private mount namespace.**  The process unshares its mount namespace and makes every
   mount in it private, so nothing it mounts is visible to the host or can leak there: if it
   is killed, the kernel drops its mounts with the namespace.
2. **The lazy mount.**  A ``lazyfs mount --foreground`` daemon (the same daemon as ``lazyfs
   mount``; its log is ``CACHE_DIR/daemon.log``) mounts the ref at ``TMP/image`` inside the
   namespace.  It gets SIGTERM if ``lazyfs run`` dies (``PR_SET_PDEATHSIG``).
3. **The root.**  Writable (default): overlayfs with the lazy mount as its lower directory and
   ``TMP/upper`` + ``TMP/work`` on a real filesystem, at ``TMP/root``; the program's writes land
   in the upper directory and vanish with it.  ``--read-only``: a read-only bind of the mount.
   Then ``/proc``, ``/sys`` and ``/dev`` are bound in recursively, and the host's
   ``/etc/resolv.conf`` and ``/etc/hosts`` read-only over the image's (so the network works).
4. **The image config** (the manifest annotation ``org.opencontainers.image.config``, the OCI
   image config JSON), applied with Docker's rules: ``Env`` (``PATH`` defaults to the usual
   one, ``HOME`` to the user's home), ``WorkingDir`` (created if missing in a writable root),
   ``User`` (``uid[:gid]`` or names looked up in the image's ``/etc/passwd`` and ``/etc/group``,
   with the user's supplementary groups), ``Entrypoint`` + ``Cmd``; ``-- CMD...`` replaces
   ``Cmd``, ``--entrypoint`` replaces ``Entrypoint`` (and drops ``Cmd``).  A ref without an image
   config (a plain directory) runs with a command given after ``--``.
5. **The program** runs chrooted, with stdin/stdout/stderr passed through, in this process's
   process group (a terminal's Ctrl-C reaches it directly; SIGTERM and SIGHUP sent to
   ``lazyfs run`` are forwarded).  Its exit status is returned (128+N if killed by signal N).
6. **Cleanup**, on exit, error or signal: binds, the root, the lazy mount (SIGTERM to the
   daemon, which publishes a recorded trace and finishes its cache writes), then the
   temporary directory — only once nothing is mounted below it.

Exit statuses of ``lazyfs run``'s own failures follow ``docker run``: 125 (setup), 126 (the
command cannot be executed), 127 (the command is not found in the image).

Not a sandbox: the program runs as root (or the image's user) on the host's kernel, with the
host's network, PIDs, ``/proc``, ``/sys`` and ``/dev``.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import http.client
import json
import logging
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import FrameType
from typing import Any

from lazyfs.control import CONTROL_XATTR, STATUS_XATTR
from lazyfs.errors import RunError
from lazyfs.manifest import IMAGE_CONFIG_ANNOTATION, parse_ref

__all__ = [
    "DEFAULT_PATH",
    "IMAGE_CONFIG_ANNOTATION",
    "Identity",
    "ImageConfig",
    "RunConfig",
    "control_request",
    "program_argv",
    "program_env",
    "resolve_in_root",
    "resolve_user",
    "run_image",
    "summary",
    "trace_summary",
]

log = logging.getLogger(__name__)

# Docker's PATH for images that set none.
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
_CONTROL_XATTR = CONTROL_XATTR.decode()
_STATUS_XATTR = STATUS_XATTR.decode()
# The daemon gets this long after SIGTERM to publish a recorded trace and finish its cache writes.
DAEMON_STOP_TIMEOUT = 60.0
# /etc/passwd and /etc/group are image content (hostile): read at most this much of each.
_MAX_DB_BYTES = 4 * 1024 * 1024
_MAX_ID = (1 << 32) - 2  # (uid_t)-1 means "unchanged" to the kernel

# Linux constants (sched.h, sys/mount.h, sys/prctl.h).
CLONE_NEWNS = 0x00020000
MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_REMOUNT = 32
MS_BIND = 4096
MS_REC = 16384
MS_PRIVATE = 1 << 18
MNT_DETACH = 2
PR_SET_PDEATHSIG = 1


# --- the image config -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ImageConfig:
    """The parts of an OCI image config that decide how its program starts."""

    entrypoint: tuple[str, ...] = ()
    cmd: tuple[str, ...] = ()
    env: tuple[str, ...] = ()
    workdir: str = ""
    user: str = ""

    @classmethod
    def from_annotations(cls, annotations: Mapping[str, str]) -> ImageConfig | None:
        """The config kept in a manifest's annotations; None when the manifest has none."""
        text = annotations.get(IMAGE_CONFIG_ANNOTATION)
        return None if text is None else cls.from_json(text)

    @classmethod
    def from_json(cls, text: str) -> ImageConfig:
        """Parse the OCI image config JSON (``{"config": {"Entrypoint": [...], ...}, ...}``); hostile input."""
        try:
            obj = json.loads(text)
        except (ValueError, RecursionError) as exc:
            raise RunError(f"the image config is not valid JSON: {exc}") from exc
        if not isinstance(obj, dict):
            raise RunError("the image config is not a JSON object")
        conf = obj.get("config")
        if conf is None:
            return cls()
        if not isinstance(conf, dict):
            raise RunError("the image config's 'config' is not an object")

        def strings(key: str) -> tuple[str, ...]:
            v = conf.get(key)
            if v is None:
                return ()
            if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
                raise RunError(f"the image config's {key} must be a list of strings")
            if any("\0" in x for x in v):
                raise RunError(f"the image config's {key} contains a NUL byte")
            return tuple(v)

        def string(key: str) -> str:
            v = conf.get(key)
            if v is None:
                return ""
            if not isinstance(v, str) or "\0" in v:
                raise RunError(f"the image config's {key} must be a string")
            return v

        env = strings("Env")
        for e in env:
            if "=" not in e or e.startswith("="):
                raise RunError(f"the image config's Env entry {e!r} is not NAME=VALUE")
        return cls(strings("Entrypoint"), strings("Cmd"), env, string("WorkingDir"), string("User"))


def program_argv(
    image: ImageConfig | None, command: Sequence[str] = (), entrypoint: Sequence[str] | None = None
) -> list[str]:
    """Docker's rule: Entrypoint + Cmd; a command replaces Cmd; ``--entrypoint`` replaces Entrypoint and drops Cmd."""
    image = image or ImageConfig()
    if entrypoint is not None:
        return [*entrypoint, *command]
    return [*image.entrypoint, *(command or image.cmd)]


def program_env(
    image: ImageConfig | None, overrides: Sequence[tuple[str, str]] = (), home: str = "/"
) -> dict[str, str]:
    """The image's Env, then ``overrides``; PATH and HOME filled in when neither sets them."""
    env: dict[str, str] = {}
    for e in (image or ImageConfig()).env:
        k, _, v = e.partition("=")
        env[k] = v
    env.setdefault("PATH", DEFAULT_PATH)
    for k, v in overrides:
        env[k] = v
    env.setdefault("HOME", home)
    return env


# --- paths inside the root ------------------------------------------------------------------------


def resolve_in_root(root: str, path: str, max_links: int = 40) -> str:
    """``path`` (inside the image) as a host path under ``root``, following symlinks without leaving it.

    Absolute link targets restart at ``root``, ``..`` stops at it (what the kernel does after
    chroot).  Components past a missing one are joined as they are.
    """
    parts = [p for p in path.split("/") if p not in ("", ".")]
    parts.reverse()  # a stack: the next component is at the end
    done: list[str] = []
    links = 0
    while parts:
        name = parts.pop()
        if name == "..":
            if done:
                done.pop()
            continue
        here = os.path.join(root, *done, name)
        try:
            st = os.lstat(here)
        except (FileNotFoundError, NotADirectoryError):
            done.append(name)
            done += [p for p in reversed(parts) if p != ".."]
            break
        if stat.S_ISLNK(st.st_mode):
            links += 1
            if links > max_links:
                raise RunError(f"{path}: too many levels of symbolic links in the image")
            target = os.readlink(here)
            if target.startswith("/"):
                done = []
            parts += reversed([p for p in target.split("/") if p not in ("", ".")])
            continue
        done.append(name)
    return os.path.join(root, *done)


def _read_db(root: str, path: str) -> list[list[str]]:
    """The colon-separated records of an image's /etc/passwd or /etc/group (missing: none)."""
    try:
        with open(resolve_in_root(root, path), "rb") as f:
            data = f.read(_MAX_DB_BYTES)
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
        return []
    except OSError as exc:
        raise RunError(f"cannot read {path} in the image: {exc.strerror}") from exc
    out = []
    for raw in data.decode("utf-8", "replace").splitlines():
        if raw and not raw.startswith("#"):
            out.append(raw.split(":"))
    return out


def _parse_id(text: str) -> int | None:
    if not text.isdigit():
        return None
    n = int(text)
    return n if n <= _MAX_ID else None


@dataclass(frozen=True, slots=True)
class Identity:
    uid: int
    gid: int
    groups: tuple[int, ...]
    home: str
    name: str | None


def resolve_user(spec: str, root: str) -> Identity:
    """``user``, ``uid``, ``user:group``, ``uid:gid`` (any mix) -> ids, looked up in the image like Docker does.

    A name must exist in the image's /etc/passwd (/etc/group for a group name); a numeric uid
    that is not there runs with gid 0 and HOME=/.  Supplementary groups: every group of
    /etc/group that lists the user's name.
    """
    user, _, group = (spec or "0").partition(":")
    if not user:
        raise RunError(f"bad user {spec!r}: use NAME or UID, optionally with :GROUP or :GID")
    passwd = [r for r in _read_db(root, "/etc/passwd") if len(r) >= 7]
    uid = _parse_id(user)
    entry = None
    for r in passwd:
        if (uid is None and r[0] == user) or (uid is not None and _parse_id(r[2]) == uid):
            entry = r
            break
    if uid is None:
        if entry is None:
            raise RunError(f"unable to find user {user}: no matching entries in the image's /etc/passwd")
        uid = _parse_id(entry[2])
        if uid is None:
            raise RunError(f"user {user} has a bad uid {entry[2]!r} in the image's /etc/passwd")
    name = entry[0] if entry is not None else None
    home = entry[5] if entry is not None and entry[5] else "/"
    gid = _parse_id(entry[3]) if entry is not None else 0
    if gid is None:
        gid = 0
    groups_db = [r for r in _read_db(root, "/etc/group") if len(r) >= 4]
    if group:
        gid = _parse_id(group)
        if gid is None:
            found = next((r for r in groups_db if r[0] == group), None)
            if found is None:
                raise RunError(f"unable to find group {group}: no matching entries in the image's /etc/group")
            gid = _parse_id(found[2])
            if gid is None:
                raise RunError(f"group {group} has a bad gid {found[2]!r} in the image's /etc/group")
    extra: list[int] = [gid]
    if name is not None:
        for r in groups_db:
            g = _parse_id(r[2])
            if g is not None and name in r[3].split(",") and g not in extra:
                extra.append(g)
    return Identity(uid, gid, tuple(extra), home, name)


# --- configuration ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RunConfig:
    origin: str
    ref: str
    cache_dir: str
    cache_size: int
    read_timeout: float = 30.0
    command: tuple[str, ...] = ()
    entrypoint: tuple[str, ...] | None = None
    env: tuple[tuple[str, str], ...] = ()  # applied over the image's Env
    workdir: str | None = None
    user: str | None = None
    writable: bool = True
    # Where the temporary directory (mountpoints, the overlay's upper and work dirs) is made.
    tmp_dir: str = "/var/tmp"
    record_trace: bool = False
    replay_trace: bool = True
    stats: bool = False  # print a summary of where the bytes came from on stderr
    stats_json: str | None = None  # write the daemon's final status (JSON) here
    debug: bool = False


# --- system calls ---------------------------------------------------------------------------------

_libc = ctypes.CDLL(None, use_errno=True)


def _check(rc: int, what: str) -> None:
    if rc != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"{what}: {os.strerror(e)}")


def _mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    enc = [None if x is None else os.fsencode(x) for x in (source, target, fstype, data)]
    _check(_libc.mount(enc[0], enc[1], enc[2], ctypes.c_ulong(flags), enc[3]), f"mount {target}")


def _umount(target: str, flags: int = 0) -> None:
    _check(_libc.umount2(os.fsencode(target), flags), f"umount {target}")


def enter_private_mount_namespace() -> None:
    """Give this process its own mount namespace in which no mount propagates anywhere."""
    try:
        _check(_libc.unshare(CLONE_NEWNS), "unshare(CLONE_NEWNS)")
        _mount(None, "/", None, MS_REC | MS_PRIVATE)
    except OSError as exc:
        raise RunError(f"cannot make a private mount namespace: {exc.strerror}") from exc


def _set_pdeathsig(sig: int) -> None:
    _libc.prctl(PR_SET_PDEATHSIG, ctypes.c_ulong(sig), 0, 0, 0)


def _mounts_below(path: str) -> list[str]:
    """Mount points at or below ``path`` in this mount namespace (deepest first)."""
    prefix = os.path.realpath(path)
    out = []
    with open("/proc/self/mountinfo", "rb") as f:
        for line in f:
            mp = re.sub(rb"\\([0-7]{3})", lambda m: bytes([int(m.group(1), 8)]), line.split()[4])
            p = os.fsdecode(mp)
            if p == prefix or p.startswith(prefix + "/"):
                out.append(p)
    return sorted(out, key=len, reverse=True)


# --- the control socket ---------------------------------------------------------------------------


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("lazyfs", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(self.timeout)
        s.connect(self._path)
        self.sock = s


def control_request(sock: str, method: str, path: str, timeout: float = 120.0) -> dict[str, Any]:
    """One JSON request to a mount daemon's control socket (plain http.client: no threads, no event loop)."""
    conn = _UnixHTTPConnection(sock, timeout)
    try:
        conn.request(method, path, body=b"{}" if method == "POST" else None)
        resp = conn.getresponse()
        body = json.loads(resp.read() or b"{}")
    except (OSError, http.client.HTTPException, ValueError) as exc:
        raise RunError(f"cannot talk to the mount daemon ({path}): {exc}") from exc
    finally:
        conn.close()
    if not isinstance(body, dict):
        raise RunError(f"the mount daemon answered {path} with something else than an object")
    if resp.status != 200:
        raise RunError(str(body.get("error") or f"the mount daemon answered {path} with {resp.status}"))
    return body


# --- the run --------------------------------------------------------------------------------------


class _Terminated(BaseException):
    """SIGTERM or SIGHUP arrived before the program started."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _stderr(msg: str) -> None:
    print(f"lazyfs: {msg}", file=sys.stderr, flush=True)


def run_image(config: RunConfig) -> int:
    """Run the program of ``config.ref`` (see the module docstring); returns its exit status.

    Raises :class:`RunError` (with ``exit_status``) when lazyfs cannot start it.
    """
    if os.geteuid() != 0:
        raise RunError("lazyfs run needs root: it mounts overlayfs, binds /proc, /sys and /dev, and chroots")
    parse_ref(config.ref)  # a bad ref fails before anything is mounted
    if not os.path.exists("/dev/fuse"):
        raise RunError("/dev/fuse is missing: modprobe fuse (in a container: --device /dev/fuse)")
    if not os.path.isdir(config.tmp_dir):
        raise RunError(f"{config.tmp_dir}: the temporary directory does not exist")
    if config.workdir is not None and not config.workdir.startswith("/"):
        raise RunError(f"the working directory {config.workdir!r} must be an absolute path")
    enter_private_mount_namespace()
    session = _Session(config)
    previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT, signal.SIGQUIT)}

    def terminated(signum: int, frame: FrameType | None) -> None:
        raise _Terminated(signum)

    signal.signal(signal.SIGTERM, terminated)
    signal.signal(signal.SIGHUP, terminated)
    try:
        return session.run()
    except _Terminated as t:
        _stderr(f"terminated by signal {t.signum} before the program started")
        return 128 + t.signum
    finally:
        # Cleanup runs to the end whatever arrives now (every step is bounded).
        for s in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT, signal.SIGQUIT):
            signal.signal(s, signal.SIG_IGN)
        try:
            session.cleanup()
        finally:
            for s, h in previous.items():
                signal.signal(s, h)


class _Session:
    def __init__(self, config: RunConfig) -> None:
        self.config = config
        self.tmp: str | None = None
        self.image = ""  # the lazy mount
        self.root = ""  # the program's root
        self.daemon: subprocess.Popen[bytes] | None = None
        self.program: subprocess.Popen[bytes] | None = None
        self.mounts: list[str] = []  # made here, unmounted in reverse order
        self.socket = ""

    # -- setup -----------------------------------------------------------------

    def run(self) -> int:
        cfg = self.config
        self.tmp = tempfile.mkdtemp(prefix="lazyfs-run-", dir=cfg.tmp_dir)
        if any(c in self.tmp for c in ",:\\"):
            raise RunError(f"{self.tmp}: the temporary directory's path must not contain ',', ':' or '\\\\'")
        self.image = os.path.join(self.tmp, "image")
        self.root = os.path.join(self.tmp, "root")
        for d in ("image", "root", "upper", "work"):
            os.mkdir(os.path.join(self.tmp, d), 0o755)
        self._start_daemon()
        info = control_request(self.socket, "GET", "/manifest")
        annotations = info.get("annotations") or {}
        image = ImageConfig.from_annotations(annotations)
        argv = program_argv(image, cfg.command, cfg.entrypoint)
        if not argv:
            if image is None:
                raise RunError(
                    f"{cfg.ref} has no image config (it was not seeded from an image): give the command after --"
                )
            raise RunError(f"the image {cfg.ref} has no Entrypoint or Cmd: give the command after --")
        self._make_root()
        ident = resolve_user(cfg.user if cfg.user is not None else (image.user if image else ""), self.root)
        env = program_env(image, cfg.env, ident.home)
        workdir = cfg.workdir or (image.workdir if image else "") or "/"
        workdir = "/" + workdir.lstrip("/")
        self._check_workdir(workdir)
        status = self._run_program(argv, env, workdir, ident)
        self._report()
        return status

    def _start_daemon(self) -> None:
        cfg = self.config
        os.makedirs(cfg.cache_dir, exist_ok=True)
        log_path = os.path.join(cfg.cache_dir, "daemon.log")
        r, w = os.pipe()
        argv = [sys.executable, "-m", "lazyfs"]
        if cfg.debug:
            argv.append("--debug")
        argv += ["mount", cfg.origin, cfg.ref, self.image, "--foreground", "--ready-fd", str(w),
                 "--cache-dir", cfg.cache_dir, "--cache-size", str(cfg.cache_size),
                 "--read-timeout", str(cfg.read_timeout), "--allow-other"]  # fmt: skip
        if cfg.record_trace:
            argv.append("--record-trace")
        if not cfg.replay_trace:
            argv.append("--no-trace-replay")
        try:
            with open(log_path, "ab") as logf:
                self.daemon = subprocess.Popen(
                    argv,
                    stdin=subprocess.DEVNULL,
                    stdout=logf,
                    stderr=logf,
                    pass_fds=(w,),
                    start_new_session=True,  # a terminal's Ctrl-C is for the program, not the daemon
                    preexec_fn=lambda: _set_pdeathsig(signal.SIGTERM),
                )
        finally:
            os.close(w)
        with os.fdopen(r, "rb") as rf:
            msg = rf.read().decode(errors="replace").strip()  # EOF once the daemon answered or died
        if msg != "ok":
            rc = self.daemon.wait(timeout=60)
            raise RunError(msg.removeprefix("error: ") if msg else f"the mount daemon exited ({rc}); see {log_path}")
        try:
            self.socket = os.getxattr(self.image, _CONTROL_XATTR).decode()
        except OSError as exc:
            raise RunError(f"cannot reach the mount daemon: {exc.strerror}") from exc

    def _make_root(self) -> None:
        assert self.tmp is not None
        cfg = self.config
        try:
            if cfg.writable:
                upper, work = os.path.join(self.tmp, "upper"), os.path.join(self.tmp, "work")
                _mount("overlay", self.root, "overlay", 0, f"lowerdir={self.image},upperdir={upper},workdir={work}")
                self.mounts.append(self.root)
            else:
                _mount(self.image, self.root, None, MS_BIND)
                self.mounts.append(self.root)
                _mount(None, self.root, None, MS_REMOUNT | MS_BIND | MS_RDONLY)
        except OSError as exc:
            kind = "an overlayfs root" if cfg.writable else "a read-only root"
            raise RunError(f"cannot make {kind} over the mount: {exc.strerror}") from exc
        for src, dst in (("/proc", "/proc"), ("/sys", "/sys"), ("/dev", "/dev")):
            self._bind(src, dst, directory=True)
        for f in ("/etc/resolv.conf", "/etc/hosts"):
            if os.path.isfile(f):
                self._bind(f, f, directory=False, read_only=True)

    def _bind(self, src: str, dst: str, *, directory: bool, read_only: bool = False) -> None:
        target = resolve_in_root(self.root, dst)
        try:
            st = os.stat(target)
            ok = stat.S_ISDIR(st.st_mode) if directory else stat.S_ISREG(st.st_mode)
            if not ok:
                log.info("not binding %s: %s in the image is not a %s", src, dst, "directory" if directory else "file")
                return
        except FileNotFoundError:
            # A missing /proc, /sys or /dev is made in a writable root; a file the image lacks
            # (/etc/hosts) is not added: the root stays the image.
            if not (directory and self.config.writable):
                log.info("not binding %s: the image has no %s", src, dst)
                return
            try:
                os.makedirs(target, 0o755, exist_ok=True)
            except OSError as exc:
                log.info("not binding %s: cannot create %s in the root: %s", src, dst, exc.strerror)
                return
        try:
            _mount(src, target, None, MS_BIND | (0 if read_only else MS_REC))
            self.mounts.append(target)
            if read_only:
                _mount(None, target, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV)
        except OSError as exc:
            raise RunError(f"cannot bind {src} into the root: {exc.strerror}") from exc

    def _check_workdir(self, workdir: str) -> None:
        target = resolve_in_root(self.root, workdir)
        if os.path.isdir(target):
            return
        if os.path.lexists(target) or not self.config.writable:
            raise RunError(f"the working directory {workdir} does not exist in the image (or is not a directory)")
        try:
            os.makedirs(target, 0o755, exist_ok=True)  # Docker creates a missing WorkingDir
        except OSError as exc:
            raise RunError(f"cannot create the working directory {workdir}: {exc.strerror}") from exc

    # -- the program -----------------------------------------------------------

    def _run_program(self, argv: list[str], env: dict[str, str], workdir: str, ident: Identity) -> int:
        root = self.root

        def enter() -> None:  # in the child, between fork and exec: no threads, no locks
            _set_pdeathsig(signal.SIGKILL)  # the program does not outlive lazyfs run
            for s in (signal.SIGINT, signal.SIGQUIT, signal.SIGTERM, signal.SIGHUP):
                signal.signal(s, signal.SIG_DFL)
            os.chroot(root)
            os.chdir(workdir)
            os.setgroups(list(ident.groups))
            os.setgid(ident.gid)
            os.setuid(ident.uid)

        # Ctrl-C and Ctrl-\ reach the program straight from the terminal (same process group), so
        # lazyfs run ignores them -- from before the fork: a Ctrl-C that lands while Popen is still
        # returning (the program may already be running) must not interrupt lazyfs run half-way.
        # The child goes back to the default dispositions in ``enter`` before it execs.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGQUIT, signal.SIG_IGN)
        try:
            self.program = subprocess.Popen(argv, env=env, preexec_fn=enter, close_fds=True)
        except FileNotFoundError as exc:
            raise RunError(
                f"{argv[0]}: not found in the image (PATH={env.get('PATH', '')}), or its interpreter is missing", 127
            ) from exc
        except PermissionError as exc:
            raise RunError(f"{argv[0]}: permission denied", 126) from exc
        except subprocess.SubprocessError as exc:
            raise RunError(f"cannot start {argv[0]} in the image: {exc}") from exc
        except OSError as exc:
            raise RunError(f"{argv[0]}: cannot be executed: {exc.strerror}", 126) from exc
        program = self.program

        def forward(signum: int, frame: FrameType | None) -> None:
            with contextlib.suppress(ProcessLookupError):
                program.send_signal(signum)

        # SIGTERM and SIGHUP are for lazyfs run, which passes them on.
        signal.signal(signal.SIGTERM, forward)
        signal.signal(signal.SIGHUP, forward)
        rc = program.wait()
        return 128 - rc if rc < 0 else rc

    def _report(self) -> None:
        cfg = self.config
        if cfg.record_trace:
            try:
                res = control_request(self.socket, "POST", "/trace/publish")
                _stderr(
                    f"published a startup trace of {res['chunks']} chunks to "
                    f"{str(res['origin']).rstrip('/')}/{res['key']}"
                )
            except RunError as exc:
                _stderr(f"warning: could not publish the startup trace: {exc}")
        if not (cfg.stats or cfg.stats_json):
            return
        try:
            status: dict[str, Any] = json.loads(os.getxattr(self.image, _STATUS_XATTR))
        except (OSError, ValueError) as exc:
            _stderr(f"warning: could not read the mount's statistics: {exc}")
            return
        if cfg.stats_json:
            with open(cfg.stats_json, "w") as f:
                json.dump(status, f, indent=2)
        if cfg.stats:
            for line in summary(status):
                _stderr(line)

    # -- cleanup ---------------------------------------------------------------

    def cleanup(self) -> None:
        """Undo everything, in reverse; each step bounded and independent of the others."""
        if self.program is not None and self.program.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.program.kill()
            self.program.wait()
        for target in reversed(self.mounts):
            try:
                _umount(target, MNT_DETACH)
            except OSError as exc:
                if exc.errno != errno.EINVAL:  # EINVAL: not mounted (gone with its parent)
                    _stderr(f"warning: {exc.strerror}")
        self.mounts.clear()
        self._stop_daemon()
        if self.tmp is None:
            return
        left = _mounts_below(self.tmp)
        for p in left:
            with contextlib.suppress(OSError):
                _umount(p, MNT_DETACH)
        left = _mounts_below(self.tmp)
        if left:
            # Never delete through a mount (it could be a bind of /dev): leave the directory.
            _stderr(f"warning: {left[0]} is still mounted; leaving {self.tmp} in place")
            return
        shutil.rmtree(self.tmp, ignore_errors=True)

    def _stop_daemon(self) -> None:
        d = self.daemon
        if d is None:
            return
        if d.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                d.send_signal(signal.SIGTERM)  # unmounts, publishes a recorded trace, finishes cache writes
            try:
                d.wait(timeout=DAEMON_STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                _stderr(f"warning: the mount daemon (pid {d.pid}) did not stop in {DAEMON_STOP_TIMEOUT:g} s; killed")
                d.kill()
                d.wait()
        if self.image and self.image in _mounts_below(self.image):
            with contextlib.suppress(OSError):
                _umount(self.image, MNT_DETACH)


# --- reporting ------------------------------------------------------------------------------------


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def summary(status: Mapping[str, Any]) -> list[str]:
    """A few lines on where a run's bytes came from (``lazyfs run --stats``)."""
    f = status["fetch"]
    lines = [
        f"{status['ref']} ({str(status['digest'])[:16]}): {f['cache_misses']} chunks fetched, "
        f"{_human(f['bytes_from_origin'])} from the origin in {f['origin_requests']} requests, "
        f"{_human(f['bytes_from_peers'])} from peers, {_human(f['bytes_from_cache'])} from the cache "
        f"({_human(status['bytes'])} in the image)"
    ]
    t = status.get("trace")
    if t:
        lines.append(trace_summary(t))
    return lines


def trace_summary(t: Mapping[str, Any]) -> str:
    """One line on a mount's startup traces (``lazyfs status``, ``lazyfs run --stats``)."""
    parts = []
    if t["recording"] or t["published"] or t["publish_error"]:
        if t["published"]:
            parts.append(f"recorded {t['recorded_chunks']} chunks, published to {t['published']}")
        elif t["publish_error"]:
            parts.append(f"recorded {t['recorded_chunks']} chunks, publishing failed: {t['publish_error']}")
        else:
            parts.append(f"recording: {t['recorded_chunks']} chunks so far")
    state = t["replay"]
    if state in ("running", "done", "failed", "stopped"):
        parts.append(
            f"replay {state}: {t['replay_done']} of {t['replay_chunks']} chunks "
            f"({t['replay_cached']} were cached, {t['replay_fetched']} fetched, {t['replay_failed']} failed)"
        )
    elif state == "none":
        parts.append("no trace published for this manifest")
    elif state in ("invalid", "unavailable"):
        parts.append(f"trace {state}: {t['replay_error']}")
    elif state != "off":
        parts.append(f"replay {state}")
    if t["first_reads"]:
        parts.append(
            f"first reads {t['first_reads']}: {t['first_reads_prefetched']} prefetched, "
            f"{t['first_reads_in_flight']} in flight, {t['first_reads_other']} other"
        )
    return "; ".join(parts) or "off"
