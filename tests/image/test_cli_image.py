"""``lazyfs seed IMAGE`` and ``lazyfs inspect`` for images, as a user runs them (``python -m lazyfs``).

Success prints ``NAME:TAG DIGEST`` on stdout and an image summary on stderr; every bad
input is one ``lazyfs: error:`` line, no traceback, nothing published.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.helpers import Run, assert_one_line_error, run_lazyfs
from tests.image.imagebuild import Layer, build_image, write_layout
from tests.unit.test_cli_seed import closed_port


@pytest.fixture(scope="module")
def layout(tmp_path_factory: pytest.TempPathFactory) -> Path:
    img = build_image([
        Layer("gzip").dir("usr/bin").file("usr/bin/app", b"#!/bin/sh\necho hi\n", mode=0o755),
        Layer("zstd").file("etc/app.conf", b"x=1\n").device("dev/null", "c", 1, 3),
    ])
    return write_layout(tmp_path_factory.mktemp("cli") / "layout", {"v1": img})


def test_seed_and_inspect_an_image(layout: Path, tmp_path: Path) -> None:
    url = (tmp_path / "origin").as_uri()
    run = run_lazyfs("seed", f"oci:{layout}:v1", url, "--name", "team/app:v1")
    assert run.returncode == 0, run.stderr
    ref, digest = run.stdout.split()
    assert ref == "team/app:v1" and len(digest) == 64
    assert "image linux/amd64, 2 layers" in run.stderr
    assert run.stderr.splitlines()[-1].startswith("published 2 files")
    quiet = run_lazyfs("seed", f"oci:{layout}:v1", url, "--name", "team/app:v2", "-q")
    assert quiet.returncode == 0 and quiet.stderr == "" and quiet.stdout == f"team/app:v2 {digest}\n"

    shown = run_lazyfs("inspect", url, "team/app:v1")
    assert shown.returncode == 0, shown.stderr
    lines = shown.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("mode "))
    assert lines[2:header] == [
        "Platform: linux/amd64",
        'Entrypoint: ["/bin/app"]',
        'Cmd: ["--serve", "two words"]',
        "Env: PATH=/usr/local/bin:/usr/bin:/bin",
        "Env: LANG=C.UTF-8",
        "WorkingDir: /srv",
        "User: 1000:1000",
    ]
    assert ["-rw-r--r--", "0", "0", "4", "1", "/etc/app.conf"] in [line.split() for line in lines]
    assert any(line.endswith("/dev/null [1,3]") for line in lines)


def _errors(layout: Path, tmp_path: Path) -> list[tuple[Run, tuple[str, ...]]]:
    hostile = write_layout(tmp_path / "hostile", build_image([Layer().file("ok", b"1"),
                                                              Layer().hardlink("etc/passwd", "../../etc/passwd")]))
    url = (tmp_path / "origin").as_uri()
    cases: list[tuple[tuple[str, ...], tuple[str, ...]]] = [
        (("seed", f"oci:{hostile}", url, "--name", "x"),
         ("layer 2/2 sha256:", "entry 'etc/passwd'", "hardlink target has a '..' component")),
        (("seed", f"oci:{tmp_path}/missing", url, "--name", "x"), ("is not a directory",)),
        (("seed", f"oci:{layout}:v9", url, "--name", "x"), ("no image tagged 'v9' (tags: v1)",)),
        (("seed", f"docker-archive:{tmp_path}/missing.tar", url, "--name", "x"), ("no such file",)),
        (("seed", "docker://127.0.0.1:5000/Bad:v1", url, "--name", "x"), ("bad image reference",)),
        (("seed", f"docker://127.0.0.1:{closed_port()}/app:v1", url, "--name", "x"), ("cannot reach 127.0.0.1:",)),
        (("seed", f"oci:{layout}", url, "--name", "x", "--platform", "linux"), ("bad platform 'linux'",)),
        (("seed", str(tmp_path), url, "--name", "x", "--platform", "linux/amd64"), ("apply to image sources",)),
        (("seed", f"oci:{layout}", url, "--name", "x@" + "0" * 64), ("a digest cannot be published to",)),
    ]
    with ThreadPoolExecutor(4) as pool:
        runs = list(pool.map(lambda args: run_lazyfs(*args), [c[0] for c in cases]))
    return [(r, c[1]) for r, c in zip(runs, cases, strict=True)]


def test_errors_are_one_line(layout: Path, tmp_path: Path) -> None:
    for run, fragments in _errors(layout, tmp_path):
        assert_one_line_error(run, *fragments)
    assert not (tmp_path / "origin" / "refs").exists()
    assert not (tmp_path / "origin" / "manifests").exists()
