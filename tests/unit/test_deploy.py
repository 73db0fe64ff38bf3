"""The deployment files in ``deploy/`` agree with the real CLI and with each other.

Kubernetes (``deploy/kubernetes/``): every document is a well-formed, namespace-less object; the
DaemonSet's ``lazyfs mount`` arguments, after Kubernetes' ``$(VAR)`` expansion, are accepted by
:func:`lazyfs.cli.build_parser` and by the checks ``lazyfs mount`` makes before it starts a daemon;
the peer DNS name, ports, token path, ``/dev/fuse``, the cache and the Bidirectional mount all point
at what the other documents define; the consumer pod sees the mount; the placeholder token is
refused; the shell wrappers (start, preStop, readiness) run, with stub ``lazyfs`` and ``umount``
commands, what they should.

systemd (``deploy/systemd/``): the template unit is parsed the way systemd reads it (repeated
keys, ``Key=`` resets, ``\\`` continuations, ``%i``, ``${X}`` versus ``$X``, ``$$``); its command
lines, filled in from the example environment file (and from a minimal one), pass the same CLI
checks; no option that would give the service its own mount namespace (hiding the FUSE mount) is
set; its start and readiness scripts behave; and ``systemd-analyze verify`` accepts it where that
tool exists.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import io
import json
import os
import re
import shlex
import shutil
import stat
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml  # type: ignore[import-untyped, unused-ignore]

from lazyfs import cli
from lazyfs.cli import build_parser, read_token_file
from lazyfs.config import MountConfig
from lazyfs.errors import UsageError

ROOT = Path(__file__).resolve().parents[2]
K8S_DIR = ROOT / "deploy" / "kubernetes"
MANIFEST = K8S_DIR / "lazyfs.yaml"
CONSUMER = K8S_DIR / "example-consumer.yaml"
UNIT = ROOT / "deploy" / "systemd" / "lazyfs@.service"
ENV_EXAMPLE = ROOT / "deploy" / "systemd" / "lazyfs.env.example"

NAMESPACE = "models-test"  # what the downward API (metadata.namespace) gives the DaemonSet's pods
INSTANCE = "llama3"  # the systemd instance name (lazyfs@llama3.service)
LAZYFS_BIN = "/usr/local/bin/lazyfs"  # where the unit expects the CLI

Doc = dict[str, Any]


def parse_cli(argv: list[str], what: str) -> argparse.Namespace:
    """``lazyfs ARGV`` as the real parser reads it; a rejection fails the test with argparse's message."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            return build_parser().parse_args(argv)
    except SystemExit:
        pytest.fail(f"{what}: lazyfs.cli rejects `lazyfs {shlex.join(argv)}`: {err.getvalue().strip()}")


def port_of(addr: str) -> int:
    host, sep, port = addr.rpartition(":")
    assert sep and host and port.isdigit(), f"{addr!r} is not HOST:PORT"
    return int(port)


def generated_token(tmp_path: Path) -> Path:
    """A token file as the docs say to make one: ``head -c 32 /dev/urandom | base64``."""
    path = tmp_path / "token"
    path.write_bytes(base64.b64encode(os.urandom(32)) + b"\n")
    return path


def check_mount_args(args: argparse.Namespace, origin: str, mountpoint: str, what: str, tmp_path: Path) -> MountConfig:
    """What every deployed ``lazyfs mount`` must be: foreground, and accepted by the checks the CLI makes
    before it starts a daemon (ref, sizes, addresses, peers with a token) — run with the token file
    replaced by a generated one, since the deployed path does not exist here."""
    assert args.command == "mount", what
    assert args.foreground, f"{what}: a supervised daemon must run with --foreground"
    assert args.origin == origin and args.mountpoint == mountpoint, what
    assert re.match(r"^(file|https?|s3)://", args.origin), f"{what}: unsupported origin {args.origin!r}"
    checked = argparse.Namespace(**vars(args))
    if checked.peer_token_file:
        checked.peer_token_file = str(generated_token(tmp_path))
    try:
        config = cli._mount_config(checked)
    except UsageError as exc:
        pytest.fail(f"{what}: `lazyfs mount` would refuse to start: {exc}")
    if config.peers is not None:
        assert args.peer_token_file, f"{what}: peers without a token"
    return config


def stub_commands(bin_dir: Path, log: Path, umount_rc: int = 1) -> Path:
    """Stand-ins for ``lazyfs`` and ``umount`` in ``bin_dir`` that record their argv (one JSON list
    per line, the command's name first).  Unmounting exits ``umount_rc`` (1: "not mounted")."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    for name in ("lazyfs", "umount"):
        stub = bin_dir / name
        stub.write_text(
            f"#!{sys.executable}\n"
            "import json, os, sys\n"
            f"with open({str(log)!r}, 'a') as f:\n"
            "    f.write(json.dumps([os.path.basename(sys.argv[0]), *sys.argv[1:]]) + '\\n')\n"
            f"unmounting = {name == 'umount'} or sys.argv[1:2] == ['umount']\n"
            f"sys.exit({umount_rc} if unmounting else 0)\n"
        )
        stub.chmod(stub.stat().st_mode | stat.S_IXUSR)
    return bin_dir / "lazyfs"


def logged_calls(log: Path) -> list[list[str]]:
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def run_sh(argv: list[str], env: Mapping[str, str], bin_dir: Path) -> subprocess.CompletedProcess[str]:
    full_env = {"PATH": f"{bin_dir}:{os.environ.get('PATH', '/usr/bin:/bin')}", **env}
    return subprocess.run(argv, env=full_env, capture_output=True, text=True, timeout=30)


# --- Kubernetes -------------------------------------------------------------------------------


def load_docs(path: Path) -> list[Doc]:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    assert docs, f"{path}: no documents"
    for d in docs:
        assert isinstance(d, dict), f"{path}: a document that is not a mapping: {d!r}"
    return docs


@pytest.fixture(scope="module")
def k8s() -> list[Doc]:
    return load_docs(MANIFEST)


@pytest.fixture(scope="module")
def consumer() -> list[Doc]:
    return load_docs(CONSUMER)


def the(docs: list[Doc], kind: str) -> Doc:
    found = [d for d in docs if d.get("kind") == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def pod_spec(ds: Doc) -> Doc:
    spec: Doc = ds["spec"]["template"]["spec"]
    return spec


def lazyfs_container(docs: list[Doc]) -> Doc:
    containers: list[Doc] = pod_spec(the(docs, "DaemonSet"))["containers"]
    assert len(containers) == 1, "the DaemonSet runs one container: the lazyfs daemon"
    return containers[0]


def container_env(container: Doc) -> dict[str, str]:
    """The container's environment as Kubernetes gives it (downward-API namespace: NAMESPACE)."""
    env: dict[str, str] = {}
    for e in container.get("env", []):
        name = e["name"]
        if "value" in e:
            assert isinstance(e["value"], str), f"env {name}: Kubernetes wants a string, got {e['value']!r}"
            env[name] = e["value"]
        else:
            field = e["valueFrom"].get("fieldRef", {}).get("fieldPath")
            env[name] = NAMESPACE if field == "metadata.namespace" else f"<{name} from {e['valueFrom']}>"
    return env


def k8s_expand(text: str, env: Mapping[str, str]) -> str:
    """Kubernetes' expansion in command/args: ``$(VAR)`` if VAR is defined (else kept), ``$$`` is ``$``."""

    def sub(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        return env.get(m.group(1), m.group(0))

    return re.sub(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_]*)\)", sub, text)


def mount_args(container: Doc) -> tuple[list[str], str]:
    """``(argv after 'lazyfs', wrapper script)``: the DaemonSet runs ``sh -c SCRIPT NAME ARGS...``."""
    command = container["command"]
    assert command[:2] == ["/bin/sh", "-c"] and len(command) == 4, command
    script = command[2]
    assert script.rstrip().endswith('exec lazyfs mount "$@"'), f"the wrapper must exec lazyfs mount: {script!r}"
    env = container_env(container)
    args = [k8s_expand(a, env) for a in container["args"]]
    for a in args:
        assert isinstance(a, str) and "$(" not in a, f"unexpanded or non-string argument {a!r}"
    return ["mount", *args], script


def mounts_by_path(container: Doc, spec: Doc) -> dict[str, tuple[Doc, Doc]]:
    """mountPath -> (volumeMount, volume)."""
    volumes = {v["name"]: v for v in spec.get("volumes", [])}
    out = {}
    for vm in container.get("volumeMounts", []):
        assert vm["name"] in volumes, f"volumeMount {vm['name']!r} has no volume"
        out[vm["mountPath"]] = (vm, volumes[vm["name"]])
    return out


def mount_holding(path: str, mounts: Mapping[str, tuple[Doc, Doc]]) -> tuple[Doc, Doc]:
    """The volume mount whose directory contains ``path`` (the deepest one)."""
    best = max((p for p in mounts if path == p or path.startswith(p.rstrip("/") + "/")), key=len, default=None)
    assert best is not None, f"{path} is on no volume of the container"
    return mounts[best]


@pytest.mark.parametrize("path", [MANIFEST, CONSUMER], ids=lambda p: p.name)
def test_every_document_is_a_namespace_less_object(path: Path) -> None:
    for d in load_docs(path):
        assert isinstance(d.get("apiVersion"), str) and d["apiVersion"], d
        assert isinstance(d.get("kind"), str) and d["kind"], d
        meta = d.get("metadata")
        assert isinstance(meta, dict) and isinstance(meta.get("name"), str), d
        assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", meta["name"]), meta["name"]
        assert "namespace" not in meta, f"{d['kind']}/{meta['name']}: the files are namespace-less"
        assert d["kind"] != "Namespace"
        for key in ("labels", "annotations"):
            for k, v in (meta.get(key) or {}).items():
                assert isinstance(v, str), f"{d['kind']}/{meta['name']} {key} {k}: not a string: {v!r}"


def test_selectors_match_the_pod_labels(k8s: list[Doc]) -> None:
    ds, svc = the(k8s, "DaemonSet"), the(k8s, "Service")
    labels = ds["spec"]["template"]["metadata"]["labels"]
    assert ds["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert svc["spec"]["selector"].items() <= labels.items()


def test_the_service_is_headless_and_lists_pods_that_are_not_ready(k8s: list[Doc]) -> None:
    spec = the(k8s, "Service")["spec"]
    assert spec["clusterIP"] == "None"
    assert spec["publishNotReadyAddresses"] is True
    ports = {p["name"]: p for p in spec["ports"]}
    assert ports["peer"]["port"] == 7070 and ports["metrics"]["port"] == 9100
    container_ports = {p["name"]: p["containerPort"] for p in lazyfs_container(k8s)["ports"]}
    for p in ports.values():
        target = p.get("targetPort", p["port"])
        assert target in container_ports or target in container_ports.values(), f"targetPort {target} is not served"


def test_the_daemonset_command_parses(k8s: list[Doc], tmp_path: Path) -> None:
    c = lazyfs_container(k8s)
    argv, _ = mount_args(c)
    args = parse_cli(argv, "DaemonSet")
    env = container_env(c)
    config = check_mount_args(args, env["ORIGIN"], env["MOUNTPOINT"], "DaemonSet", tmp_path)
    assert config.allow_other, "consumer pods run as other users: the mount needs --allow-other"
    assert config.peers is not None and config.peers.listen and config.peers.peers_dns


def test_the_placeholder_token_is_refused_and_a_generated_one_accepted(k8s: list[Doc], tmp_path: Path) -> None:
    """An unedited manifest must not start peers with a secret everybody can read on GitHub."""
    secret = next(d for d in k8s if d["kind"] == "Secret" and "token" in d.get("stringData", {}))
    placeholder = tmp_path / "placeholder"
    placeholder.write_text(secret["stringData"]["token"])
    with pytest.raises(UsageError):
        read_token_file(str(placeholder))
    assert len(read_token_file(str(generated_token(tmp_path)))) == 44


def test_the_peer_flags_agree_with_the_service_and_the_ports(k8s: list[Doc]) -> None:
    c = lazyfs_container(k8s)
    args = parse_cli(mount_args(c)[0], "DaemonSet")
    svc = the(k8s, "Service")
    svc_ports = {p["name"]: p["port"] for p in svc["spec"]["ports"]}
    container_ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert args.peers_dns == f"{svc['metadata']['name']}.{NAMESPACE}.svc.cluster.local:{svc_ports['peer']}"
    assert port_of(args.listen) == container_ports["peer"] == svc_ports["peer"]
    assert port_of(args.metrics_addr) == container_ports["metrics"] == svc_ports["metrics"]
    annotations = the(k8s, "DaemonSet")["spec"]["template"]["metadata"].get("annotations", {})
    if "prometheus.io/port" in annotations:
        assert int(annotations["prometheus.io/port"]) == container_ports["metrics"]


def test_the_token_file_comes_from_the_secret(k8s: list[Doc]) -> None:
    c = lazyfs_container(k8s)
    args = parse_cli(mount_args(c)[0], "DaemonSet")
    token = args.peer_token_file
    vm, vol = mount_holding(token, mounts_by_path(c, pod_spec(the(k8s, "DaemonSet"))))
    assert vm.get("readOnly") is True
    assert "secret" in vol, f"{token} must come from a Secret volume, not {vol}"
    secret_name = vol["secret"]["secretName"]
    secrets = {d["metadata"]["name"]: d for d in k8s if d["kind"] == "Secret"}
    assert secret_name in secrets, f"{token}: Secret {secret_name} is not defined here"
    secret = secrets[secret_name]
    keys = set(secret.get("stringData", {})) | set(secret.get("data", {}))
    rel = os.path.relpath(token, vm["mountPath"])
    items = vol["secret"].get("items")
    key = next((i["key"] for i in items if i["path"] == rel), None) if items else rel
    assert key in keys, f"{token}: Secret {secret_name} has no key for it (keys {sorted(keys)})"
    assert vol["secret"].get("defaultMode", 0o644) & 0o077 == 0, "the token file should be readable by root only"


def test_fuse_cache_and_bidirectional_mount(k8s: list[Doc]) -> None:
    ds = the(k8s, "DaemonSet")
    c, spec = lazyfs_container(k8s), pod_spec(ds)
    mounts = mounts_by_path(c, spec)
    args = parse_cli(mount_args(c)[0], "DaemonSet")

    vm, vol = mounts["/dev/fuse"]
    assert vol["hostPath"]["path"] == "/dev/fuse" and vol["hostPath"].get("type") == "CharDevice"

    vm, vol = mount_holding(args.cache_dir, mounts)
    assert "hostPath" in vol, "the cache must outlive the pod: a hostPath"

    vm, vol = mount_holding(args.mountpoint, mounts)
    assert args.mountpoint != vm["mountPath"], "mount below the volume, not over it (a leftover mount is cleared)"
    assert "hostPath" in vol and vm.get("mountPropagation") == "Bidirectional", (
        "the FUSE mount reaches the host (and other pods) only through a Bidirectional hostPath mount"
    )
    assert c["securityContext"]["privileged"] is True, "FUSE and Bidirectional propagation need privileged"
    assert spec["terminationGracePeriodSeconds"] > 60, "preStop's `lazyfs umount` waits up to 60 s"
    assert c["resources"]["requests"]["cpu"] and c["resources"]["requests"]["memory"]
    for ref in c.get("envFrom", []):
        name = ref["secretRef"]["name"]
        assert ref["secretRef"].get("optional") or any(
            d["kind"] == "Secret" and d["metadata"]["name"] == name for d in k8s
        ), f"envFrom Secret {name} is neither defined nor optional"


@pytest.mark.parametrize("leftover", ["nothing", "dead mount"])
def test_the_start_wrapper_clears_a_leftover_mount_then_execs_the_mount(
    k8s: list[Doc], tmp_path: Path, leftover: str
) -> None:
    c = lazyfs_container(k8s)
    argv, script = mount_args(c)
    mountpoint = str(tmp_path / "models" / "llama3")  # stands in for the real MOUNTPOINT
    args = [mountpoint if a == container_env(c)["MOUNTPOINT"] else a for a in argv[1:]]
    log, bin_dir = tmp_path / "calls", tmp_path / "bin"
    # Nothing mounted: both unmounts fail, which must not stop the start.
    stub_commands(bin_dir, log, umount_rc=1 if leftover == "nothing" else 0)
    res = run_sh([*c["command"][:2], script, c["command"][3], *args], {"MOUNTPOINT": mountpoint}, bin_dir)
    assert res.returncode == 0, res.stderr
    calls = logged_calls(log)
    assert calls[0] == ["lazyfs", "umount", mountpoint]
    parse_cli(calls[0][1:], "the start wrapper's umount")
    lazy = [["umount", "-l", mountpoint]] if leftover == "nothing" else []
    assert calls[1:] == [*lazy, ["lazyfs", "mount", *args]], "lazy umount only when `lazyfs umount` failed"
    assert os.path.isdir(mountpoint)


@pytest.mark.parametrize("hook", ["preStop", "readinessProbe"])
def test_the_hooks_run_lazyfs_on_the_mountpoint(k8s: list[Doc], hook: str, tmp_path: Path) -> None:
    c = lazyfs_container(k8s)
    command = c["lifecycle"]["preStop"]["exec"]["command"] if hook == "preStop" else c[hook]["exec"]["command"]
    expected = "umount" if hook == "preStop" else "status"
    log, bin_dir = tmp_path / "calls", tmp_path / "bin"
    stub_commands(bin_dir, log, umount_rc=0)
    res = run_sh(command, container_env(c), bin_dir)  # exec hooks run with the container's environment
    assert res.returncode == 0, res.stderr
    ((name, *call),) = logged_calls(log)
    assert name == "lazyfs"
    args = parse_cli(call, hook)
    assert args.command == expected and args.mountpoint == container_env(c)["MOUNTPOINT"]


def test_the_consumer_sees_the_mount(k8s: list[Doc], consumer: list[Doc]) -> None:
    c = lazyfs_container(k8s)
    args = parse_cli(mount_args(c)[0], "DaemonSet")
    ds_vm, ds_vol = mount_holding(args.mountpoint, mounts_by_path(c, pod_spec(the(k8s, "DaemonSet"))))
    pod = the(consumer, "Pod")
    spec = pod["spec"]
    for cc in [*spec.get("initContainers", []), *spec["containers"]]:
        vm, vol = mount_holding(args.mountpoint, mounts_by_path(cc, spec))
        assert vol["hostPath"]["path"] == ds_vol["hostPath"]["path"], cc["name"]
        assert vm["mountPath"] == ds_vm["mountPath"], f"{cc['name']}: the model's path differs from the daemon's"
        assert vm.get("mountPropagation") == "HostToContainer", f"{cc['name']}: later mounts would stay invisible"
        assert vm.get("readOnly") is True, cc["name"]


# --- systemd ----------------------------------------------------------------------------------

Unit = dict[str, dict[str, list[str]]]


def parse_unit(text: str) -> Unit:
    """systemd's unit syntax: sections, repeated keys (a list), ``Key=`` empties it, ``\\`` continues a line."""
    unit: Unit = {}
    section: dict[str, list[str]] | None = None
    lines = iter(text.splitlines())
    for raw in lines:
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        while line.endswith("\\"):
            nxt = next(lines, "").strip()
            if nxt and nxt[0] in "#;":
                continue  # a comment inside a continuation is skipped
            line = line[:-1] + " " + nxt
        if line.startswith("["):
            assert line.endswith("]"), line
            section = unit.setdefault(line[1:-1], {})
            continue
        assert section is not None, f"{line!r} before any section"
        key, sep, value = line.partition("=")
        assert sep, f"not KEY=VALUE: {line!r}"
        values = section.setdefault(key.strip(), [])
        if value.strip():
            values.append(value.strip())
        else:
            values.clear()
    return unit


def parse_env_file(text: str) -> dict[str, str]:
    """systemd's EnvironmentFile=: KEY=VALUE lines, ``#`` comments, optionally quoted values."""
    env = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        key, sep, value = line.partition("=")
        assert sep and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key), f"bad line {raw!r}"
        value = value.strip()
        if value[:1] in ("'", '"'):
            words = shlex.split(value)
            assert len(words) == 1, f"{key}: one quoted value expected: {value!r}"
            value = words[0]
        env[key] = value
    return env


def specifiers(text: str, instance: str = INSTANCE) -> str:
    known = {"i": instance, "I": instance, "%": "%", "n": f"lazyfs@{instance}.service"}

    def sub(m: re.Match[str]) -> str:
        assert m.group(1) in known, f"unexpected specifier %{m.group(1)} in {text!r}"
        return known[m.group(1)]

    return re.sub(r"%(.)", sub, text)


def exec_argv(line: str, env: Mapping[str, str]) -> list[str]:
    """An Exec*= line as systemd runs it: words, prefixes off, ``${X}`` one word, lone ``$X`` split, ``$$`` is $."""
    words = shlex.split(specifiers(line))
    words[0] = words[0].lstrip("-@:+!")
    out: list[str] = []
    for w in words:
        lone = re.fullmatch(r"\$([A-Za-z_][A-Za-z0-9_]*)", w)
        if lone:
            out += env.get(lone.group(1), "").split()
            continue

        def sub(m: re.Match[str]) -> str:
            if m.group(0) == "$$":
                return "$"
            assert m.group(1) in env, f"${{{m.group(1)}}} is not set: systemd would pass an empty argument"
            return env[m.group(1)]

        out.append(re.sub(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)\}", sub, w))
    return out


@pytest.fixture(scope="module")
def unit() -> Unit:
    return parse_unit(UNIT.read_text())


def unit_env(unit: Unit, env_file: Mapping[str, str]) -> dict[str, str]:
    """Environment= defaults, overridden by the EnvironmentFile (systemd's order)."""
    env: dict[str, str] = {}
    for line in unit["Service"].get("Environment", []):
        for assignment in shlex.split(specifiers(line)):
            key, sep, value = assignment.partition("=")
            assert sep, assignment
            env[key] = value
    return env | dict(env_file)


def example_env() -> dict[str, str]:
    return parse_env_file(ENV_EXAMPLE.read_text())


def minimal_env() -> dict[str, str]:
    ex = example_env()
    return {k: ex[k] for k in ("ORIGIN", "REF", "MOUNTPOINT")}


def test_the_unit_is_a_template_started_after_the_network(unit: Unit) -> None:
    assert set(unit) == {"Unit", "Service", "Install"}
    assert "network-online.target" in " ".join(unit["Unit"]["After"]).split()
    assert "network-online.target" in " ".join(unit["Unit"]["Wants"]).split()
    svc = unit["Service"]
    assert [specifiers(f) for f in svc["EnvironmentFile"]] == [f"/etc/lazyfs/{INSTANCE}.env"]
    assert svc["Restart"] == ["on-failure"]
    assert svc.get("Type", ["simple"])[-1] in ("simple", "exec"), "the daemon stays in the foreground"
    assert svc.get("User", ["root"])[-1] == "root", "FUSE mounts with allow_other need root"
    assert unit["Install"]["WantedBy"] == ["multi-user.target"]


@pytest.mark.parametrize("env_name", ["example", "minimal"])
def test_exec_start_parses(unit: Unit, env_name: str, tmp_path: Path) -> None:
    env_file = example_env() if env_name == "example" else minimal_env()
    env = unit_env(unit, env_file)
    (start,) = unit["Service"]["ExecStart"]
    argv = exec_argv(start, env)
    assert argv[0] == LAZYFS_BIN
    args = parse_cli(argv[1:], f"ExecStart with the {env_name} environment file")
    config = check_mount_args(args, env["ORIGIN"], env["MOUNTPOINT"], "ExecStart", tmp_path)
    assert config.ref == env["REF"] and config.cache_dir == env["CACHE_DIR"]
    assert config.cache_size == cli.parse_size(env["CACHE_SIZE"]) and config.read_timeout == float(env["READ_TIMEOUT"])
    if env_name == "example":
        assert config.peers is not None and config.peers.listen and config.peers.peers  # the example shares
    else:
        assert config.peers is None  # peers are opt-in


def test_exec_stop_unmounts_the_mountpoint(unit: Unit) -> None:
    env = unit_env(unit, example_env())
    (stop,) = unit["Service"]["ExecStop"]
    stop_argv = exec_argv(stop, env)
    assert stop_argv[0] == LAZYFS_BIN
    args = parse_cli(stop_argv[1:], "ExecStop")
    assert args.command == "umount" and args.mountpoint == env["MOUNTPOINT"]


@pytest.mark.parametrize("leftover", ["nothing", "dead mount"])
def test_exec_start_pre_clears_a_leftover_mount_and_makes_the_directory(
    unit: Unit, tmp_path: Path, leftover: str
) -> None:
    env = unit_env(unit, example_env())
    pre = unit["Service"]["ExecStartPre"]
    assert ["/bin/mkdir", "-p", env["MOUNTPOINT"]] in [exec_argv(line, env) for line in pre]
    clear = [line for line in pre if "umount" in line]
    assert len(clear) == 1 and clear[0].startswith("-"), "unmounting fails when nothing is mounted: ignore that"
    log, bin_dir = tmp_path / "calls", tmp_path / "bin"
    stub = stub_commands(bin_dir, log, umount_rc=1 if leftover == "nothing" else 0)
    argv = [str(stub) if a == LAZYFS_BIN else a.replace(LAZYFS_BIN, str(stub)) for a in exec_argv(clear[0], env)]
    mountpoint = str(tmp_path / "mnt")
    run_sh(argv, {**env, "MOUNTPOINT": mountpoint}, bin_dir)
    calls = logged_calls(log)
    assert calls[0] == ["lazyfs", "umount", mountpoint]
    parse_cli(calls[0][1:], "ExecStartPre's umount")
    assert calls[1:] == ([["umount", "-l", mountpoint]] if leftover == "nothing" else [])


def test_every_variable_is_defined_and_every_setting_used(unit: Unit) -> None:
    svc = unit["Service"]
    lines = [line for key in svc if key.startswith("Exec") for line in svc[key]]
    used = {m.group(1) or m.group(2) for line in lines for m in re.finditer(r"\$\{(\w+)\}|(?<!\$)\$(\w+)", line)}
    defaults = unit_env(unit, {})
    assert used - defaults.keys() - example_env().keys() == set()
    unused = {k for k in example_env() if k not in used and not k.startswith("AWS_")}
    assert not unused, f"lazyfs.env.example sets variables the unit never uses: {sorted(unused)}"


# Options that give the service a mount namespace of its own: a FUSE mount made inside it is
# invisible to the rest of the system.  PrivateNetwork would cut the peers off.
NAMESPACING = {
    "PrivateTmp", "PrivateDevices", "PrivateMounts", "PrivateNetwork", "PrivateUsers", "ProtectSystem",
    "ProtectHome", "ProtectKernelTunables", "ProtectKernelModules", "ProtectKernelLogs", "ProtectControlGroups",
    "ProtectProc", "ProcSubset", "ProtectHostname", "ReadOnlyPaths", "ReadWritePaths", "InaccessiblePaths",
    "ExecPaths", "NoExecPaths", "TemporaryFileSystem", "BindPaths", "BindReadOnlyPaths", "RootDirectory",
    "RootImage", "MountImages", "ExtensionImages", "DynamicUser", "MountFlags", "NetworkNamespacePath",
    "LogNamespace", "MountAPIVFS",
}  # fmt: skip


def test_hardening_leaves_the_mount_visible_and_fuse_usable(unit: Unit) -> None:
    svc = unit["Service"]
    set_ = {k: v[-1] for k, v in svc.items() if k in NAMESPACING and v and v[-1] not in ("no", "false", "0")}
    assert not set_, f"these give the service its own mount namespace (or network): {set_}"
    if svc.get("DevicePolicy", ["auto"])[-1] in ("closed", "strict") or "DeviceAllow" in svc:
        assert any(d.split()[0] == "/dev/fuse" and "w" in d.split()[1] for d in svc["DeviceAllow"])
    if "CapabilityBoundingSet" in svc:
        assert "CAP_SYS_ADMIN" in " ".join(svc["CapabilityBoundingSet"]).split()
    if "RestrictAddressFamilies" in svc:
        assert {"AF_UNIX", "AF_INET", "AF_INET6"} <= set(" ".join(svc["RestrictAddressFamilies"]).split())
    for line in svc.get("SystemCallFilter", []):
        assert "@mount" in line or line.startswith("~"), "mount(2) must stay allowed"
    assert int(svc["TimeoutStopSec"][-1]) > 60, "`lazyfs umount` waits up to 60 s for the daemon"


@pytest.fixture
def dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_exec_start_post_waits_for_the_mount(unit: Unit, tmp_path: Path, dead_pid: int) -> None:
    """Active once mounted; failed (not stuck) if the daemon exits before mounting."""
    (post,) = unit["Service"]["ExecStartPost"]
    argv = exec_argv(post, unit_env(unit, example_env()))
    assert argv[:2] == ["/bin/sh", "-c"], argv
    mounted = run_sh(argv, {"MOUNTPOINT": "/", "MAINPID": str(os.getpid())}, tmp_path)
    assert mounted.returncode == 0, mounted.stderr
    died = run_sh(argv, {"MOUNTPOINT": str(tmp_path), "MAINPID": str(dead_pid)}, tmp_path)
    assert died.returncode != 0


def test_systemd_analyze_verify(tmp_path: Path) -> None:
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze is not installed (package systemd): the unit is not verified by systemd")
    # verify insists that commands exist: point the unit at this environment's lazyfs.
    here = Path(sys.executable).parent / "lazyfs"
    assert here.exists(), f"{here}: lazyfs is not installed in this environment"
    copy = tmp_path / UNIT.name
    copy.write_text(UNIT.read_text().replace(LAZYFS_BIN, str(here)))
    res = subprocess.run([tool, "verify", "--man=no", str(copy)], capture_output=True, text=True, timeout=60)
    ours = [line for line in (res.stdout + res.stderr).splitlines() if "lazyfs" in line]
    assert res.returncode == 0 and not ours, res.stdout + res.stderr
