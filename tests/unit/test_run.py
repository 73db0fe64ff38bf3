"""``lazyfs run`` without mounting: the image config (hostile JSON), Docker's argv/env/user rules,
paths confined to the root, and the command line."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from lazyfs.cli import _split_run_command, build_parser, parse_env_overrides
from lazyfs.errors import RunError, UsageError
from lazyfs.run import (
    DEFAULT_PATH,
    IMAGE_CONFIG_ANNOTATION,
    Identity,
    ImageConfig,
    program_argv,
    program_env,
    resolve_in_root,
    resolve_user,
    summary,
    trace_summary,
)


def config(**conf: Any) -> str:
    return json.dumps({"architecture": "amd64", "os": "linux", "config": conf})


def test_image_config_from_annotations() -> None:
    text = config(Entrypoint=["/init"], Cmd=["serve", "--port", "80"], Env=["A=1", "B=x=y"], WorkingDir="/app",
                  User="www:www")  # fmt: skip
    c = ImageConfig.from_annotations({IMAGE_CONFIG_ANNOTATION: text, "other": "x"})
    assert c == ImageConfig(("/init",), ("serve", "--port", "80"), ("A=1", "B=x=y"), "/app", "www:www")
    assert ImageConfig.from_annotations({}) is None
    assert ImageConfig.from_json(json.dumps({"os": "linux"})) == ImageConfig()
    assert ImageConfig.from_json(config(Entrypoint=None, Cmd=None)) == ImageConfig()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{", "not valid JSON"),
        ("[1]", "not a JSON object"),
        (json.dumps({"config": []}), "'config' is not an object"),
        (config(Entrypoint="sh"), "Entrypoint must be a list of strings"),
        (config(Cmd=["a", 1]), "Cmd must be a list of strings"),
        (config(Env=["NOEQUALS"]), "not NAME=VALUE"),
        (config(Env=["=v"]), "not NAME=VALUE"),
        (config(Cmd=["a\0b"]), "NUL"),
        (config(WorkingDir=5), "WorkingDir must be a string"),
        (config(User=["root"]), "User must be a string"),
        ("[" * 100_000 + "]" * 100_000, "not valid JSON"),
    ],
)
def test_image_config_rejects_hostile_json(text: str, message: str) -> None:
    with pytest.raises(RunError, match=message):
        ImageConfig.from_json(text)


def test_argv_follows_docker() -> None:
    c = ImageConfig(entrypoint=("/bin/ep", "-x"), cmd=("default",))
    assert program_argv(c) == ["/bin/ep", "-x", "default"]
    assert program_argv(c, ["mine", "arg"]) == ["/bin/ep", "-x", "mine", "arg"]  # CMD replaces Cmd
    assert program_argv(c, [], ("/other",)) == ["/other"]  # --entrypoint drops Cmd
    assert program_argv(c, ["a"], ("/other",)) == ["/other", "a"]
    assert program_argv(c, ["sh"], ()) == ["sh"]  # --entrypoint ""
    assert program_argv(ImageConfig(cmd=("python3",))) == ["python3"]
    assert program_argv(None, ["ls"]) == ["ls"]
    assert program_argv(None) == []


def test_env() -> None:
    assert program_env(None) == {"PATH": DEFAULT_PATH, "HOME": "/"}
    c = ImageConfig(env=("PATH=/opt/bin", "A=1", "A=2", "E="))
    assert program_env(c, [("B", "3"), ("A", "4")], home="/root") == {
        "PATH": "/opt/bin", "A": "4", "E": "", "B": "3", "HOME": "/root",
    }  # fmt: skip
    assert program_env(ImageConfig(env=("HOME=/h",)), home="/root")["HOME"] == "/h"


def test_resolve_in_root_never_leaves_the_root(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "usr" / "bin").mkdir(parents=True)
    (root / "etc").mkdir()
    os.symlink("usr/bin", root / "bin")
    os.symlink("/etc", root / "usr" / "abs-etc")  # absolute: restarts at the root, not the host's /etc
    os.symlink("../../../../../../etc", root / "usr" / "dots")  # .. stops at the root
    os.symlink("loop2", root / "loop1")
    os.symlink("loop1", root / "loop2")
    r = str(root)
    assert resolve_in_root(r, "/bin/sh") == f"{r}/usr/bin/sh"
    assert resolve_in_root(r, "/usr/abs-etc/passwd") == f"{r}/etc/passwd"
    assert resolve_in_root(r, "/usr/dots/passwd") == f"{r}/etc/passwd"
    assert resolve_in_root(r, "/../../etc/./passwd") == f"{r}/etc/passwd"
    assert resolve_in_root(r, "/") == r
    assert resolve_in_root(r, "/missing/a/../b") == f"{r}/missing/a/b"
    with pytest.raises(RunError, match="too many levels"):
        resolve_in_root(r, "/loop1/x")


@pytest.fixture
def image_root(tmp_path: Path) -> str:
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "passwd").write_text(
        "root:x:0:0:root:/root:/bin/bash\n"
        "# a comment\n"
        "daemon:x:1:1:daemon:/usr/sbin:/usr/sbin/nologin\n"
        "app:x:1000:1000::/home/app:/bin/sh\n"
        "broken line\n"
        "weird:x:notanumber:1::/:/bin/sh\n"
        "nohome:x:1001:1001:::/bin/sh\n"
    )
    (root / "etc" / "group").write_text("root:x:0:\ndaemon:x:1:\napp:x:1000:\nstaff:x:50:app,other\nvideo:x:44:app\n")
    return str(root)


@pytest.mark.parametrize(
    ("spec", "want"),
    [
        ("", Identity(0, 0, (0,), "/root", "root")),
        ("root", Identity(0, 0, (0,), "/root", "root")),
        ("app", Identity(1000, 1000, (1000, 50, 44), "/home/app", "app")),
        ("1000", Identity(1000, 1000, (1000, 50, 44), "/home/app", "app")),
        ("app:staff", Identity(1000, 50, (50, 44), "/home/app", "app")),
        ("app:7", Identity(1000, 7, (7, 50, 44), "/home/app", "app")),
        ("4242", Identity(4242, 0, (0,), "/", None)),  # not in passwd: gid 0, HOME=/
        ("4242:4343", Identity(4242, 4343, (4343,), "/", None)),
        ("daemon:video", Identity(1, 44, (44,), "/usr/sbin", "daemon")),
        ("nohome", Identity(1001, 1001, (1001,), "/", "nohome")),
    ],
)
def test_resolve_user(image_root: str, spec: str, want: Identity) -> None:
    assert resolve_user(spec, image_root) == want


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("nobody", "unable to find user nobody"),
        ("app:nogroup", "unable to find group nogroup"),
        (":0", "bad user"),
        ("weird", "bad uid"),
        ("99999999999", "unable to find user"),  # over the uid range: not a number, so a missing name
    ],
)
def test_resolve_user_errors(image_root: str, spec: str, message: str) -> None:
    with pytest.raises(RunError, match=message):
        resolve_user(spec, image_root)


def test_resolve_user_without_passwd(tmp_path: Path) -> None:
    assert resolve_user("", str(tmp_path)) == Identity(0, 0, (0,), "/", None)
    assert resolve_user("5:6", str(tmp_path)) == Identity(5, 6, (6,), "/", None)
    with pytest.raises(RunError):
        resolve_user("root", str(tmp_path))


def test_command_line() -> None:
    assert _split_run_command(["run", "o", "r", "--stats", "--", "sh", "-c", "x", "--", "y"]) == (
        ["run", "o", "r", "--stats"], ["sh", "-c", "x", "--", "y"],
    )  # fmt: skip
    assert _split_run_command(["--debug", "run", "o", "r", "--"]) == (["--debug", "run", "o", "r"], [])
    assert _split_run_command(["mount", "o", "r", "mp"]) == (["mount", "o", "r", "mp"], None)
    assert _split_run_command(["seed", "--", "x"]) == (["seed", "--", "x"], None)
    args = build_parser().parse_args(["run", "o", "r", "-e", "A=1", "--read-only", "-u", "1:2", "-w", "/x"])
    assert (args.env, args.writable, args.user, args.workdir, args.cmd) == (["A=1"], False, "1:2", "/x", [])
    assert parse_env_overrides(["A=1", "B", "C", "D=x=y", "E="], {"B": "host"}) == (
        ("A", "1"), ("B", "host"), ("D", "x=y"), ("E", ""),
    )  # fmt: skip
    with pytest.raises(UsageError):
        parse_env_overrides(["=x"], {})


def test_summaries() -> None:
    trace = {
        "key": "traces/x", "recording": True, "recorded_chunks": 12, "published": None, "publish_error": None,
        "replay": "done", "replay_error": None, "replay_chunks": 10, "replay_done": 10, "replay_cached": 4,
        "replay_fetched": 6, "replay_failed": 0, "replay_bytes": 100, "first_reads": 11,
        "first_reads_prefetched": 9, "first_reads_in_flight": 1, "first_reads_other": 1,
    }  # fmt: skip
    line = trace_summary(trace)
    assert "recording: 12 chunks" in line and "replay done: 10 of 10" in line and "9 prefetched" in line
    assert trace_summary({**trace, "recording": False, "replay": "none", "first_reads": 0}) == (
        "no trace published for this manifest"
    )
    status = {
        "ref": "img:1", "digest": "ab" * 32, "bytes": 1 << 20, "trace": trace,
        "fetch": {"cache_misses": 3, "bytes_from_origin": 2048, "origin_requests": 2, "bytes_from_peers": 0,
                  "bytes_from_cache": 0},
    }  # fmt: skip
    lines = summary(status)
    assert lines[0].startswith("img:1 (abababababababab): 3 chunks fetched, 2.0 KiB from the origin in 2 requests")
    assert len(lines) == 2
