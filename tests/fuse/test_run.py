"""``lazyfs run`` and the root-filesystem recipes, with a real Debian root (python3-minimal) seeded as an image.

Every run goes through the command line as a user runs it; :class:`Runner` checks after each one that
no daemon is left, nothing is mounted under its temporary directory (in the test's, the host's, mount
namespace) and the directory is empty.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import signal
import subprocess
from pathlib import Path

import pytest

from tests.fuse.conftest import (
    IMAGE_PATH,
    LAZYFS,
    Image,
    Mounter,
    Runner,
    host_mounts_under,
    image_config,
    pid_alive,
    read_file,
    wait_until,
)

pytestmark = pytest.mark.fuse

DOCS = Path(__file__).resolve().parents[2] / "docs" / "images.md"

# What the comparison prints: everything a difference between the mount and the unpacked root would
# change (names, modes, owners, sizes, times, link targets, file bytes), via the stdlib of python3-minimal.
# Not compared: a directory's st_size and a file's block count, which each filesystem reports its own
# way (ext4: 4096 for a directory, 8 blocks for a 1-byte file; the mount: 0 and 1).
PROBE = r"""
import hashlib, os, stat, sys, subprocess, email.utils, random, tempfile
print("version", sys.version)
print("argv", sys.argv[1:])
print("cwd", os.getcwd(), "ids", os.getuid(), os.getgid())
print("env", sorted((k, v) for k, v in os.environ.items() if k != "PWD"))
for d in ("/", "/usr/lib/python3.11", "/usr/lib/python3.11/encodings", "/etc", "/usr/bin"):
    print("ls", d, sorted(os.listdir(d)))
for p in ("/usr/bin/python3.11", "/etc/passwd", "/usr/lib/os-release", "/bin", "/usr/bin/sh", "/etc/shadow",
          "/usr/lib/python3.11/os.py", "/usr/bin/passwd", "/tmp", "/usr/share/zoneinfo"):
    st = os.lstat(p)
    isdir = stat.S_ISDIR(st.st_mode)
    print("stat", p, oct(st.st_mode), st.st_uid, st.st_gid, "-" if isdir else st.st_size, st.st_mtime_ns,
          "-" if isdir else st.st_nlink)
    if stat.S_ISREG(st.st_mode):
        print("sha", p, hashlib.sha256(open(p, "rb").read()).hexdigest())
    if stat.S_ISLNK(st.st_mode):
        print("link", p, os.readlink(p))
print("realpath", os.path.realpath("/usr/bin/python3"))
ls = subprocess.run(["ls", "-lnA", "--time-style=full-iso", "/etc/pam.d", "/usr/bin"], capture_output=True, text=True)
print("ls -ln", [line for line in ls.stdout.splitlines() if not line.startswith("total ")])
print("date", email.utils.format_datetime(email.utils.parsedate_to_datetime("Mon, 20 Nov 1995 19:12:08 -0500")))
"""


def baseline(root: Path, argv: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """The same program chrooted into the unpacked root, with the environment lazyfs run gives it."""
    return subprocess.run(
        ["/usr/sbin/chroot", str(root), *argv], env=env, capture_output=True, text=True, timeout=60, cwd="/"
    )


def one_line_error(res: subprocess.CompletedProcess[str], status: int, text: str) -> None:
    assert res.returncode == status, (res.returncode, res.stderr)
    assert res.stderr.startswith("lazyfs: error: ") and res.stderr.count("\n") == 1, res.stderr
    assert text in res.stderr, res.stderr
    assert "Traceback" not in res.stderr


def tree_digest(path: Path) -> dict[str, str]:
    """Every file under ``path`` -> sha256 (what an untouched origin directory keeps)."""
    out = {}
    for dirpath, _, files in os.walk(path):
        for f in files:
            p = os.path.join(dirpath, f)
            out[os.path.relpath(p, path)] = hashlib.sha256(read_file(p)).hexdigest()
    return out


# --- the program and its config ----------------------------------------------------------------------


def test_run_matches_chroot_of_the_unpacked_root(debian_image: Image, runner: Runner) -> None:
    img = debian_image.variant(image_config(Cmd=["python3"]), "probe")
    res = runner(debian_image.file_url, img.ref, "--", "python3", "-B", "-c", PROBE, "x y", "")
    assert res.returncode == 0, res.stderr
    assert res.stderr == ""
    base = baseline(
        debian_image.root,
        ["python3", "-B", "-c", PROBE, "x y", ""],
        {"PATH": IMAGE_PATH, "LANG": "C.UTF-8", "HOME": "/root"},
    )
    assert base.returncode == 0, base.stderr
    assert res.stdout == base.stdout
    assert "sha /usr/bin/python3.11" in res.stdout and "link /bin usr/bin" in res.stdout


def test_exit_statuses_propagate(debian_image: Image, runner: Runner, tmp_path: Path) -> None:
    img = debian_image.variant(image_config(Cmd=["sh", "-c", "exit 3"]), "exits")
    cache = tmp_path / "cache"  # shared: the later runs start from a warm cache
    assert runner(debian_image.file_url, img.ref, cache=cache).returncode == 3
    assert runner(debian_image.file_url, img.ref, "--", "true", cache=cache).returncode == 0
    res = runner(debian_image.file_url, img.ref, "--", "python3", "-c", "import sys; sys.exit(77)", cache=cache)
    assert res.returncode == 77
    res = runner(debian_image.file_url, img.ref, "--", "sh", "-c", "kill -TERM $$", cache=cache)
    assert res.returncode == 128 + signal.SIGTERM


APP = (
    "import os, sys; print(repr((os.getcwd(), os.getuid(), os.getgid(), sorted(os.getgroups()), "
    "os.environ.get('GREETING'), os.environ.get('NEW'), os.environ['HOME'], os.environ['PATH'], sys.argv[1:])))"
)


def test_image_config_and_overrides(debian_image: Image, runner: Runner, tmp_path: Path) -> None:
    img = debian_image.variant(
        image_config(
            Entrypoint=["python3", "-B", "-c", APP],
            Cmd=["default", "args"],
            Env=["GREETING=hello", "PATH=/usr/bin:/bin"],
            WorkingDir="/srv/app",  # not in the image: created, like Docker does
            User="daemon",
        ),
        "app",
    )
    cache = tmp_path / "cache"
    url = debian_image.file_url

    def run(*args: str) -> tuple[object, ...]:
        res = runner(url, img.ref, *args, cache=cache)
        assert res.returncode == 0, res.stderr
        value: tuple[object, ...] = eval(res.stdout)  # the program prints a repr of plain values
        return value

    assert run() == ("/srv/app", 1, 1, [1], "hello", None, "/usr/sbin", "/usr/bin:/bin", ["default", "args"])
    assert run("--env", "GREETING=override", "-e", "NEW=1", "--workdir", "/tmp", "--user", "1234:5678",
               "--", "a", "b") == (
        "/tmp", 1234, 5678, [5678], "override", "1", "/", "/usr/bin:/bin", ["a", "b"],
    )  # fmt: skip
    assert run("--user", "nobody:users")[1:4] == (65534, 100, [100])
    res = runner(url, img.ref, "--entrypoint", "/bin/sh", "--", "-c", "echo $GREETING $0 $HOME", cache=cache)
    assert (res.returncode, res.stdout) == (0, "hello /bin/sh /usr/sbin\n")  # --entrypoint drops Cmd

    plain = debian_image.variant(None, "plain")  # a plain tree: runs with a command, PATH and HOME default
    res = runner(url, plain.ref, "--", "sh", "-c", 'echo "$PATH $HOME $(id -u) $(pwd)"', cache=cache)
    assert (res.returncode, res.stdout) == (0, f"{IMAGE_PATH} /root 0 /\n")


def test_writable_overlay_leaves_mount_and_origin_untouched(
    debian_image: Image, runner: Runner, mounter: Mounter, tmp_path: Path
) -> None:
    img = debian_image.variant(image_config(Cmd=["sh"]), "rw")
    before = tree_digest(debian_image.origin_dir)
    script = (
        "set -e; echo data > /etc/new-file; echo 'extra:x:9:9::/:/bin/sh' >> /etc/passwd; rm /etc/shells;"
        " mkdir -p /var/lib/app && echo state > /var/lib/app/s; cat /etc/new-file; tail -n1 /etc/passwd;"
        " ls /etc/shells 2>/dev/null || echo no-shells"
    )
    cache = tmp_path / "cache"
    res = runner(debian_image.file_url, img.ref, "--", "sh", "-c", script, cache=cache)
    assert (res.returncode, res.stdout) == (0, "data\nextra:x:9:9::/:/bin/sh\nno-shells\n"), res.stderr
    # A second run starts from the image again: the first run's writes are gone.
    res = runner(debian_image.file_url, img.ref, "--", "sh", "-c",
                 "ls /etc/new-file 2>&1; tail -n1 /etc/passwd; ls /etc/shells", cache=cache)  # fmt: skip
    assert "No such file" in res.stdout and "extra:x" not in res.stdout and "/etc/shells" in res.stdout
    assert tree_digest(debian_image.origin_dir) == before, "the origin changed"
    m = mounter.mount(debian_image.file_url, img.ref, cache_dir=cache)
    assert not os.path.lexists(m.path("etc/new-file"))
    assert read_file(m.path("etc/passwd")) == (debian_image.root / "etc" / "passwd").read_bytes()
    assert os.path.exists(m.path("etc/shells"))

    # --read-only: writes fail, the status is the program's.
    res = runner(debian_image.file_url, img.ref, "--read-only", "--", "sh", "-c", "echo x > /etc/new-file",
                 cache=cache)  # fmt: skip
    assert res.returncode == 2 and "Read-only file system" in res.stderr


# --- nothing leaks -----------------------------------------------------------------------------------


def test_mounts_are_private_and_gone_afterwards(debian_image: Image, runner: Runner) -> None:
    """While the program runs, the host sees no mount of it; stdin and stdout pass through; afterwards
    no daemon, no mount, no temporary files."""
    img = debian_image.variant(image_config(Cmd=["sh"]), "private")
    fsname = "lazyfs:" + img.ref
    before = Path("/proc/self/mountinfo").read_text().count(fsname)  # a reused machine may hold stale ones
    proc, tmp = runner.start(
        debian_image.file_url, img.ref, "--", "sh", "-c", "echo started; grep -c . /proc/self/mountinfo; read x; "
        "echo got $x; exit 5", stdin=subprocess.PIPE,
    )  # fmt: skip
    assert proc.stdout is not None and proc.stdin is not None
    try:
        assert proc.stdout.readline() == "started\n"
        inside = int(proc.stdout.readline())
        assert inside > 0
        assert host_mounts_under(tmp) == [], "the run's mounts leaked into the host namespace"
        assert Path("/proc/self/mountinfo").read_text().count(fsname) == before
        daemon = [p for p in os.listdir("/proc") if p.isdigit() and os.fspath(tmp).encode() in _cmdline(p)]
        assert daemon, "the mount daemon runs while the program does"
        out, err = proc.communicate("hello\n", timeout=60)
    finally:
        _kill_group(proc)
    assert (proc.returncode, out, err) == (5, "got hello\n", "")
    runner.assert_clean(tmp)


def _kill_group(proc: subprocess.Popen[str]) -> None:
    """If ``proc`` still runs (a failed test), kill its process group; always close its pipes, so a
    failure here does not become an unclosed-file warning in the next test."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    for pipe in (proc.stdin, proc.stdout, proc.stderr):
        if pipe is not None:
            pipe.close()


def _cmdline(pid: str) -> bytes:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read()
    except OSError:
        return b""


SLEEPER = "import signal, sys, time; print('started', flush=True); time.sleep(120)"


@pytest.mark.parametrize("how", ["sigterm", "ctrl-c"])
def test_signals_end_the_program_and_clean_up(debian_image: Image, runner: Runner, how: str) -> None:
    img = debian_image.variant(image_config(Cmd=["python3", "-c", SLEEPER]), "signals")
    proc, tmp = runner.start(debian_image.file_url, img.ref)
    assert proc.stdout is not None
    try:
        assert proc.stdout.readline() == "started\n"
        if how == "sigterm":
            proc.send_signal(signal.SIGTERM)  # to lazyfs run: forwarded to the program
        else:
            os.killpg(proc.pid, signal.SIGINT)  # a terminal's Ctrl-C: the whole foreground group
        _, err = proc.communicate(timeout=60)
    finally:
        _kill_group(proc)
    if how == "sigterm":
        assert proc.returncode == 128 + signal.SIGTERM, err
    else:
        assert proc.returncode == 128 + signal.SIGINT and "KeyboardInterrupt" in err, err
    runner.assert_clean(tmp)


def test_sigkill_of_lazyfs_run_leaves_no_mount_and_no_process(debian_image: Image, runner: Runner) -> None:
    """Killed outright, lazyfs run cannot clean up; the kernel does: the program dies with it, the daemon
    is told to stop, and the mounts go away with the private namespace.  Only the empty scaffolding of
    its temporary directory stays."""
    img = debian_image.variant(image_config(Cmd=["python3", "-c", SLEEPER]), "sigkill")

    def sleepers() -> set[int]:
        return {int(p) for p in os.listdir("/proc") if p.isdigit() and b"time.sleep(120)" in _cmdline(p)}

    earlier = sleepers()  # of an earlier run on a reused machine: not this test's to judge
    proc, tmp = runner.start(debian_image.file_url, img.ref)
    assert proc.stdout is not None
    assert proc.stdout.readline() == "started\n"
    pids = [int(p) for p in os.listdir("/proc") if p.isdigit() and os.fspath(tmp).encode() in _cmdline(p)]
    program = sorted(sleepers() - earlier - {proc.pid})
    assert pids and program
    proc.kill()
    proc.communicate(timeout=30)
    wait_until(lambda: not any(pid_alive(p) for p in [*pids, *program]), 30, "its processes to exit")
    assert host_mounts_under(tmp) == []
    run_dir = next(tmp.iterdir())
    assert sorted(os.listdir(run_dir)) == ["image", "root", "upper", "work"]
    assert os.listdir(run_dir / "image") == [] and os.listdir(run_dir / "root") == []


# --- errors ------------------------------------------------------------------------------------------


def test_errors_are_one_line(debian_image: Image, runner: Runner, tmp_path: Path) -> None:
    url = debian_image.file_url
    img = debian_image.variant(image_config(Cmd=["true"]), "errors")
    plain = debian_image.variant(None, "errors-plain")
    bare = debian_image.variant(image_config(), "errors-bare")
    cache = tmp_path / "cache"
    one_line_error(runner(url, plain.ref, cache=cache), 125, "has no image config")
    one_line_error(runner(url, bare.ref, cache=cache), 125, "has no Entrypoint or Cmd")
    one_line_error(runner(url, "no-such:ref", cache=cache), 125, "not published")
    one_line_error(runner(url, "Bad Ref!", cache=cache), 125, "")
    one_line_error(runner(url, img.ref, "--", "no-such-program", cache=cache), 127, "no-such-program: not found")
    one_line_error(runner(url, img.ref, "--", "/etc/passwd", cache=cache), 126, "permission denied")
    one_line_error(runner(url, img.ref, "--user", "nosuchuser", cache=cache), 125, "unable to find user nosuchuser")
    one_line_error(runner(url, img.ref, "--env", "=x", cache=cache), 125, "bad --env")
    one_line_error(runner(url, img.ref, "--workdir", "rel", cache=cache), 125, "must be an absolute path")
    one_line_error(runner(url, img.ref, "--read-only", "--workdir", "/nope", cache=cache), 125,
                   "working directory /nope does not exist")  # fmt: skip
    # Not root: refused before anything happens.
    res = subprocess.run(
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *LAZYFS, "run", url, img.ref,
         "--cache-dir", str(tmp_path / "c2"), "--tmp-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=60, cwd="/",
    )  # fmt: skip
    one_line_error(res, 125, "needs root")


# --- the documented recipes --------------------------------------------------------------------------


def recipe(name: str) -> str:
    """The shell block that follows ``<!-- recipe: NAME -->`` in docs/images.md."""
    text = DOCS.read_text()
    m = re.search(rf"<!-- recipe: {re.escape(name)} -->\s*```sh\n(.*?)```", text, re.S)
    assert m is not None, f"docs/images.md has no recipe {name!r}"
    return m.group(1)


def test_overlay_chroot_recipe_from_the_docs(debian_image: Image, tmp_path: Path) -> None:
    """The README's writable-root recipe, run as written (in a private mount namespace, so that a
    failure half-way leaks nothing), gives the program a writable root over the read-only mount."""
    img = debian_image.variant(image_config(Cmd=["sh"]), "recipe")
    base = tmp_path / "img"
    script = "lazyfs() { " + " ".join(LAZYFS) + ' "$@"; }\nset -eux\n' + recipe("overlay")
    env = {**os.environ, "ORIGIN": debian_image.file_url, "REF": img.ref, "IMG": str(base),
           "CACHE": str(tmp_path / "cache")}  # fmt: skip
    try:
        res = subprocess.run(
            ["unshare", "--mount", "--propagation", "private", "bash", "-c", script],
            env=env, capture_output=True, text=True, timeout=180, cwd="/",
        )  # fmt: skip
        assert res.returncode == 0, res.stderr[-3000:]
        assert "hello from the overlay" in res.stdout
        assert "Python 3.11" in res.stdout
    finally:
        for pid in [int(p) for p in os.listdir("/proc") if p.isdigit() and os.fspath(base).encode() in _cmdline(p)]:
            os.kill(pid, signal.SIGKILL)
    assert host_mounts_under(base) == []
    assert not (base / "lower" / "etc").exists(), "the lazy mount is gone"
    # The program's writes are in the upper directory, nowhere else.
    assert (base / "upper" / "root" / "hello").read_text() == "hello from the overlay\n"
    wait_until(lambda: not _daemon_of(base), 30, "the recipe's daemon to exit")


def _daemon_of(base: Path) -> bool:
    return any(os.fspath(base).encode() in _cmdline(p) for p in os.listdir("/proc") if p.isdigit())

