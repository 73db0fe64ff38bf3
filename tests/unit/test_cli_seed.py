"""``lazyfs seed`` / ``inspect`` / ``refs`` as a user runs them: ``python -m lazyfs`` in a subprocess.

Successful runs print ``ref digest`` on stdout and a summary on stderr.  Every bad
input gives exactly one stderr line starting ``lazyfs: error:``, a non-zero exit
status, no traceback, and it does so quickly (the error cases run concurrently,
once per module, to keep the suite fast).
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.helpers import Run, Tree, assert_one_line_error, build_tree, clean_env, random_bytes, run_lazyfs

CHUNK_ARG = "64KiB"


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])  # nothing listens once the socket is closed


# --- success ----------------------------------------------------------------------------------------


@pytest.fixture
def tree(tmp_path: Path) -> Tree:
    return build_tree(tmp_path / "src")


def test_seed_prints_the_ref_and_digest(tree: Tree, tmp_path: Path) -> None:
    origin_dir = tmp_path / "origin"
    url = origin_dir.as_uri()
    first = run_lazyfs("seed", str(tree.root), url, "--name", "org/model:v1", "--chunk-size", CHUNK_ARG)
    assert first.returncode == 0, first.stderr
    ref, digest = first.stdout.split()
    assert first.stdout == f"org/model:v1 {digest}\n" and ref == "org/model:v1"
    assert (origin_dir / "refs/org/model/v1").read_text() == f"{digest}\n"
    assert (origin_dir / "manifests" / digest).is_file()
    assert "Traceback" not in first.stderr
    summary = first.stderr.splitlines()[-1]
    assert summary.startswith(f"published {len(tree.contents) - 2} files"), summary  # hard-b, hard-c: links
    assert "0 already there" in summary
    # stderr is not a terminal: progress comes as plain lines (at least the final one).
    progress = [line for line in first.stderr.splitlines() if line.startswith("seed org/model:v1: ")]
    assert progress and "(100%)" in progress[-1], first.stderr

    # Canonical and idempotent: the same digest, nothing uploaded.
    again = run_lazyfs("seed", str(tree.root), url, "--name", "org/model:v1", "--chunk-size", CHUNK_ARG)
    assert again.returncode == 0 and again.stdout == first.stdout
    assert "uploaded 0 B in 0 packs" in again.stderr.splitlines()[-1]

    # --quiet: only the ref line; NAME alone means the tag "latest".
    quiet = run_lazyfs("seed", str(tree.root), url, "--name", "org/model", "--chunk-size", CHUNK_ARG, "-q")
    assert quiet.returncode == 0 and quiet.stderr == "" and quiet.stdout == f"org/model:latest {digest}\n"

    refs = run_lazyfs("refs", url)
    assert refs.returncode == 0 and refs.stdout.split() == ["org/model:latest", "org/model:v1"]


def test_seed_a_single_file(tmp_path: Path) -> None:
    src = tmp_path / "weights.bin"
    src.write_bytes(random_bytes(200_000))
    url = (tmp_path / "origin").as_uri()
    run = run_lazyfs("seed", str(src), url, "--name", "w", "-q")
    assert run.returncode == 0, run.stderr
    shown = run_lazyfs("inspect", url, "w")
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.splitlines()[-1].split() == ["-rw-r--r--", "0", "0", "200,000", "1", "/weights.bin"]


def test_seeding_a_directory_to_a_file_origin_loads_no_network_client(tmp_path: Path) -> None:
    """aiohttp and obstore take ~0.3 s to import: a ``file://`` seed of a directory needs neither."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "a").write_bytes(b"x")
    code = (
        "import sys\n"
        "from lazyfs.cli import main\n"
        f"rc = main(['seed', {str(src)!r}, {(tmp_path / 'origin').as_uri()!r}, '--name', 'm', '-q'])\n"
        "print(rc, sorted(m for m in ('aiohttp', 'obstore', 'lazyfs.image.registry') if m in sys.modules))\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=clean_env(), timeout=60)
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines()[-1] == "0 []"


_ROW = re.compile(r"^(\S{10}) +(\d+) +(\d+) +([\d,]+) +(\d+)  (/.*?)(?: (-> .*|=> .*|\[\d+,\d+\]))?$")


def _rows(stdout: str) -> dict[str, list[str]]:
    """inspect's table: path -> [mode, uid, gid, size, chunks(, "-> target" | "=> /path" | "[major,minor]")]."""
    rows = {}
    for line in stdout.splitlines():
        m = _ROW.match(line)
        if m:
            mode, uid, gid, size, chunks, path, suffix = m.groups()
            assert path not in rows, f"{path} listed twice"
            rows[path] = [mode, uid, gid, size, chunks] + ([suffix] if suffix else [])
    return rows


def test_inspect_lists_the_tree(tree: Tree, tmp_path: Path) -> None:
    url = (tmp_path / "origin").as_uri()
    seeded = run_lazyfs("seed", str(tree.root), url, "--name", "m:1", "--chunk-size", CHUNK_ARG, "-q")
    assert seeded.returncode == 0, seeded.stderr
    digest = seeded.stdout.split()[1]
    for ref in ("m:1", f"m@{digest}"):
        run = run_lazyfs("inspect", url, ref)
        assert run.returncode == 0, run.stderr
        lines = run.stdout.splitlines()
        assert lines[0] == f"{ref}  manifest {digest}"
        assert lines[1].startswith(f"{len(_rows(run.stdout))} entries, ")
        rows = _rows(run.stdout)
        root = "0" if tree.as_root else str(os.getuid())
        assert rows["/multi.bin"] == ["-rw-r--r--", root, root, "229,376", "4"]
        assert rows["/exact-chunk"][3:] == ["65,536", "1"]
        assert rows["/chunk-plus-one"][3:] == ["65,537", "2"]
        assert rows["/empty"][3:] == ["0", "0"]
        assert rows["/sub"][0] == "drwxr-xr-x"
        assert rows["/sticky"][0] == "drwxrwxrwt"
        assert rows["/setuid"][0] == "-rwsr-xr-x"
        assert rows["/link-dangling"][0].startswith("l") and rows["/link-dangling"][-1] == "-> does/not/exist"
        assert rows["/link-absolute"][-1] == "-> /etc/hostname"
        assert rows["/sub/hard-b"][0].startswith("h") and rows["/sub/hard-b"][-1] == "=> /hard-a"
        assert rows["/sub/hard-b"][3:5] == ["32,768", "1"]  # a hardlink shows its inode's size
        assert rows["/fifo"][0].startswith("p") and rows["/socket"][0].startswith("s")
        assert "/names/new\\nline" in rows  # one entry, one line
        assert "/names/latin1-\\xe9\\xff" in rows
        if tree.as_root:
            assert rows["/dev-null"][0].startswith("c") and rows["/dev-null"][-1] == "[1,3]"
            assert rows["/text.txt"][1:3] == ["1234", "5678"]


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None, reason="needs root and setpriv")
def test_an_unreadable_source_as_an_unprivileged_user() -> None:
    # pytest's temporary directories are private to root: use a world-readable one.
    base = Path(tempfile.mkdtemp(prefix="lazyfs-cli-"))
    try:
        base.chmod(0o755)
        src, origin = base / "src", base / "origin"
        src.mkdir()
        origin.mkdir(mode=0o777)
        origin.chmod(0o777)
        (src / "readable").write_text("ok")
        secret = src / "se\ncret"  # a newline in the name: the error is still one line
        secret.write_text("no")
        secret.chmod(0o000)
        run = run_lazyfs("seed", str(src), origin.as_uri(), "--name", "x", user=65534)
        assert_one_line_error(run, f"{src}/se\\ncret", "ermission denied")
        secret.chmod(0o644)
        (src / "closed").mkdir(mode=0o000)
        (src / "closed").chmod(0o000)
        run = run_lazyfs("seed", str(src), origin.as_uri(), "--name", "x", user=65534)
        assert_one_line_error(run, f"{src / 'closed'}", "ermission denied")
        assert not (origin / "refs").exists() and not (origin / "manifests").exists()
    finally:
        shutil.rmtree(base)


# --- bad input: one line, non-zero, no traceback -------------------------------------------------------


@dataclass(frozen=True)
class Case:
    args: tuple[str, ...]
    fragments: tuple[str, ...]
    env: tuple[tuple[str, str], ...] = ()


def _cases(base: Path, seeded_url: str) -> dict[str, Case]:
    src = str(base / "src")
    out = (base / "out").as_uri()
    port = closed_port()
    dead_s3 = (
        ("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}"),
        ("AWS_REGION", "us-east-1"),
        ("AWS_ACCESS_KEY_ID", "k"),
        ("AWS_SECRET_ACCESS_KEY", "s"),
    )
    return {
        "missing-src": Case(("seed", str(base / "nope"), out, "--name", "a"), ("nope", "no such file")),
        "fifo-src": Case(("seed", str(base / "fifo"), out, "--name", "a"), ("not a directory or a regular file",)),
        "ftp-url": Case(("seed", src, "ftp://x", "--name", "a"), ("unknown origin scheme 'ftp'",)),
        "s3-no-bucket": Case(("seed", src, "s3://", "--name", "a"), ("needs a bucket",)),
        "s3-bad-bucket": Case(("seed", src, "s3://B_/x", "--name", "a"), ("not a valid S3 bucket name",)),
        "no-scheme": Case(("seed", src, "relative/dir", "--name", "a"), ("has no scheme",)),
        "file-two-slashes": Case(("seed", src, "file://host/dir", "--name", "a"), ("three slashes",)),
        "origin-is-a-file": Case(("seed", src, (base / "src" / "f").as_uri(), "--name", "a"), ("not a directory",)),
        "bad-name": Case(("seed", src, out, "--name", "Bad:Name"), ("bad reference 'Bad:Name'",)),
        "digest-name": Case(("seed", src, out, "--name", "x@" + "a" * 64), ("digest cannot be published",)),
        "bad-tag": Case(("seed", src, out, "--name", "x:bad tag"), ("tag",)),
        "bad-chunk-size": Case(("seed", src, out, "--name", "a", "--chunk-size", "1k"), ("--chunk-size",)),
        "http-read-only": Case(("seed", src, f"http://127.0.0.1:{port}/m", "--name", "a"), ("read-only",)),
        "http-unreachable": Case(("inspect", f"http://127.0.0.1:{port}/m", "a"), (f"127.0.0.1:{port}",)),
        "s3-unreachable": Case(("seed", src, "s3://bucket/p", "--name", "a"), ("s3://bucket/p",), dead_s3),
        "inspect-missing-ref": Case(("inspect", seeded_url, "other:v9"), ("other:v9 is not published",)),
        "inspect-missing-digest": Case(("inspect", seeded_url, "m@" + "b" * 64), ("missing",)),
        "inspect-empty-origin": Case(("inspect", (base / "none").as_uri(), "m"), ("m:latest is not published",)),
        "inspect-corrupt-manifest": Case(("inspect", seeded_url, "m:1"), ("does not match",)),
        "inspect-bad-ref": Case(("inspect", seeded_url, "M"), ("bad reference",)),
    }


@pytest.fixture(scope="module")
def error_runs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, tuple[Case, Run]]]:
    base = tmp_path_factory.mktemp("cli-errors")
    (base / "src").mkdir()
    (base / "src" / "f").write_text("data")
    os.mkfifo(base / "fifo")
    seeded = base / "seeded"
    run = run_lazyfs("seed", str(base / "src"), seeded.as_uri(), "--name", "m:1", "-q")
    assert run.returncode == 0, run.stderr
    digest = run.stdout.split()[1]
    manifest = seeded / "manifests" / digest
    manifest.write_bytes(manifest.read_bytes() + b"\0")  # corrupt: no longer matches its name
    cases = _cases(base, seeded.as_uri())
    # Concurrently: each run is mostly interpreter start-up.
    with ThreadPoolExecutor(max_workers=4) as pool:
        futures = {
            name: pool.submit(run_lazyfs, *case.args, env=clean_env(**dict(case.env))) for name, case in cases.items()
        }
        yield {name: (cases[name], f.result()) for name, f in futures.items()}


CASE_NAMES = list(_cases(Path("/x"), "file:///x"))


@pytest.mark.parametrize("name", CASE_NAMES)
def test_bad_input_is_one_clear_line(name: str, error_runs: dict[str, tuple[Case, Run]]) -> None:
    case, run = error_runs[name]
    # Errors are fast, an unreachable origin included (connection refused, two quick retries); the
    # bound is loose because the cases run concurrently on a small, shared machine.
    assert_one_line_error(run, *case.fragments, max_seconds=20.0)
