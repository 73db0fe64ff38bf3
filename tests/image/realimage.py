"""A real container image built with Debian's tools, and a real registry, for the image integration tests.

:func:`build_real_image` makes an OCI layout with umoci from a debootstrapped minimal root
(``tools.rootfs``, python3-minimal, cached in /var/tmp):

* ``base``: the root as one layer, with a config (entrypoint python3, cmd, env, workdir, user);
* ``v2``: umoci unpack / modify / repack — umoci writes a ``.wh.NAME`` for every deleted name
  (``etc/issue``, everything in ``usr/share/doc``), plus new files, a hardlink pair, setuid,
  owners, xattrs (``user.*``, ``security.capability``), a symlink, a fifo and a device node;
* ``v3``: a hand-made layer added with ``umoci raw add-layer`` (umoci never writes opaque
  markers itself): ``etc/apt`` made opaque with one new file, a whiteout of one name of the
  v2 hardlink pair, a hardlink to a lower-layer file (``usr/bin/python3.11``), new files.

``umoci unpack`` of ``v3`` is the reference tree; ``skopeo copy`` writes the docker-archive.
:class:`DockerRegistry` runs Debian's ``docker-registry`` (the CNCF distribution server) on
127.0.0.1 with a free port, optionally behind htpasswd (bcrypt) auth.
"""

from __future__ import annotations

import ctypes
import importlib
import io
import os
import shutil
import signal
import stat
import subprocess
import sys
import tarfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

from tools.rootfs import build_root

__all__ = ["DockerRegistry", "RealImage", "bcrypt_hash", "build_real_image", "require_tools", "run"]

TOOLS = {"umoci": "umoci", "skopeo": "skopeo", "docker-registry": "docker-registry", "debootstrap": "debootstrap"}
# security.capability v2 for cap_net_raw (bit 13) permitted + effective: binary, not UTF-8.
CAP_NET_RAW = bytes([0x01, 0x00, 0x00, 0x02, 0x00, 0x20, 0x00, 0x00] + [0x00] * 12)
PYTHON = "usr/bin/python3.11"


def require_tools() -> None:
    """Fail (never skip) when a tool is missing, saying which Debian package brings it."""
    missing = [name for name in TOOLS if shutil.which(name) is None]
    if missing:
        pytest.fail(f"missing tools {missing}: apt-get install umoci skopeo docker-registry debootstrap "
                    "(tools/setup.sh installs them)")


def run(*argv: str | Path, timeout: float = 600) -> str:
    res = subprocess.run([str(a) for a in argv], capture_output=True, text=True, timeout=timeout,
                         stdin=subprocess.DEVNULL)
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, argv))} failed ({res.returncode}):\n{res.stdout}\n{res.stderr}")
    return res.stdout


@dataclass(frozen=True)
class RealImage:
    layout: Path  # OCI layout with tags base, v2, v3
    reference: Path  # umoci unpack of v3: the rootfs directory
    base_tree: Path  # the rootfs that became the base layer
    archive: Path  # skopeo's docker-archive of v3 (example/app:v3)


def _tarinfo(name: str, kind: bytes = tarfile.REGTYPE, mode: int = 0o644, linkname: str = "") -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.type, ti.mode, ti.linkname = kind, mode, linkname
    ti.mtime = 1_700_000_000
    return ti


def _layer3() -> bytes:
    buf = io.BytesIO()
    files = {
        "etc/apt/sources.list": b"deb http://deb.debian.org/debian bookworm main\n",
        "opt/app/main.py": b"print('hello from the image')\n",
        "opt/app/data.bin": bytes(range(256)) * 40,
    }
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        tf.addfile(_tarinfo("etc/apt", tarfile.DIRTYPE, 0o755))
        tf.addfile(_tarinfo("etc/apt/.wh..wh..opq"), io.BytesIO(b""))
        tf.addfile(_tarinfo("etc/.wh.new-file"), io.BytesIO(b""))
        tf.addfile(_tarinfo("usr/bin/py-hard", tarfile.LNKTYPE, 0o755, PYTHON))
        tf.addfile(_tarinfo("opt/app", tarfile.DIRTYPE, 0o750))
        for name, data in files.items():
            ti = _tarinfo(name)
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))
    return buf.getvalue()


def _modify_v2(rootfs: Path) -> None:
    (rootfs / "etc/issue").unlink()
    doc = rootfs / "usr/share/doc"
    for child in doc.iterdir():
        shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
    (doc / "mine").mkdir()
    (doc / "mine/readme").write_text("mine\n")
    (rootfs / "etc/new-file").write_text("hello\n")
    os.link(rootfs / "etc/new-file", rootfs / "etc/new-link")
    os.setxattr(rootfs / "etc/new-file", "user.lazyfs", b"kept")
    local = rootfs / "usr/local/bin"
    shutil.copy2(rootfs / "usr/bin/true", local / "suid-true")
    os.chown(local / "suid-true", 0, 0)
    os.chmod(local / "suid-true", 0o4755)
    shutil.copy2(rootfs / "usr/bin/true", local / "cap-true")
    os.setxattr(local / "cap-true", "security.capability", CAP_NET_RAW)
    (local / "owned").write_text("owned\n")
    os.chown(local / "owned", 1234, 5678)
    os.symlink("../../../etc/new-link", rootfs / "usr/local/lib/link-to-new")
    os.mkfifo(rootfs / "usr/local/fifo", 0o600)
    os.mknod(rootfs / "usr/local/null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    with open(rootfs / "etc/hostname", "a") as f:
        f.write("changed\n")


def build_real_image(work: Path) -> RealImage:
    require_tools()
    root = build_root(["python3-minimal"])
    layout = work / "layout"
    run("umoci", "init", "--layout", layout)
    run("umoci", "new", "--image", f"{layout}:base")
    b1 = work / "b1"
    run("umoci", "unpack", "--image", f"{layout}:base", b1)
    run("cp", "-a", f"{root}/.", f"{b1}/rootfs/")
    run("umoci", "repack", "--image", f"{layout}:base", b1)
    run("umoci", "config", "--image", f"{layout}:base",
        "--config.entrypoint", "/usr/bin/python3", "--config.cmd", "-c", "--config.cmd", "print(6 * 7)",
        "--config.env", "LANG=C.UTF-8", "--config.env", "PYTHONDONTWRITEBYTECODE=1",
        "--config.workingdir", "/root", "--config.user", "0:0")
    b2 = work / "b2"
    run("umoci", "unpack", "--image", f"{layout}:base", b2)
    _modify_v2(b2 / "rootfs")
    run("umoci", "repack", "--image", f"{layout}:v2", b2)
    shutil.rmtree(b2)
    layer3 = work / "layer3.tar"
    layer3.write_bytes(_layer3())
    run("umoci", "raw", "add-layer", "--image", f"{layout}:v2", "--tag", "v3", layer3)
    ref = work / "ref"
    run("umoci", "unpack", "--image", f"{layout}:v3", ref)
    archive = work / "image.tar"
    run("skopeo", "copy", "--quiet", f"oci:{layout}:v3", f"docker-archive:{archive}:example/app:v3")
    return RealImage(layout, ref / "rootfs", b1 / "rootfs", archive)


# --- htpasswd ------------------------------------------------------------------------------------


def bcrypt_hash(password: str) -> str:
    """A bcrypt hash for the registry's htpasswd: python ``bcrypt``, else ``htpasswd -B``, else libxcrypt.

    Debian's libcrypt1 (libxcrypt, always installed) implements ``$2b$``; the registry's Go
    bcrypt accepts it.  If none of the three is there the test fails saying what to install.
    """
    try:
        bcrypt = importlib.import_module("bcrypt")
        return str(bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=5)).decode())
    except ImportError:
        pass
    if shutil.which("htpasswd"):
        return run("htpasswd", "-nbB", "-C", "5", "u", password).strip().split(":", 1)[1]
    try:
        lib = ctypes.CDLL("libcrypt.so.1")
        lib.crypt_gensalt.restype = ctypes.c_char_p
        lib.crypt_gensalt.argtypes = [ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p, ctypes.c_int]
        lib.crypt.restype = ctypes.c_char_p
        lib.crypt.argtypes = [ctypes.c_char_p, ctypes.c_char_p]
        salt = lib.crypt_gensalt(b"$2b$", 5, None, 0)
        out = lib.crypt(password.encode(), salt) if salt else None
        if out and out.startswith(b"$2b$"):
            return str(out.decode())
    except OSError:
        pass
    pytest.fail("cannot make a bcrypt hash for htpasswd: pip install bcrypt, or apt-get install apache2-utils")


# --- the registry ---------------------------------------------------------------------------------


def _die_with_parent() -> None:
    if sys.platform == "linux":
        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG: never outlive the tests


class DockerRegistry:
    """``docker-registry serve`` on 127.0.0.1:<free port>, storage in ``work``; stop() ends it by pid."""

    def __init__(self, work: Path, users: dict[str, str] | None = None) -> None:
        from tests.integration.servers import free_port

        self.work = work
        self.port = free_port()
        self.host = f"127.0.0.1:{self.port}"
        self.users = users or {}
        work.mkdir(parents=True, exist_ok=True)
        auth = ""
        if self.users:
            (work / "htpasswd").write_text("".join(f"{u}:{bcrypt_hash(p)}\n" for u, p in self.users.items()))
            auth = f"auth:\n  htpasswd:\n    realm: lazyfs-test\n    path: {work / 'htpasswd'}\n"
        (work / "config.yml").write_text(
            "version: 0.1\n"
            "log:\n  level: error\n  accesslog:\n    disabled: true\n"
            f"storage:\n  filesystem:\n    rootdirectory: {work / 'data'}\n"
            f"http:\n  addr: {self.host}\n" + auth
        )
        self.log = work / "registry.log"
        with open(self.log, "wb") as logf:
            self.process = subprocess.Popen(
                ["docker-registry", "serve", str(work / "config.yml")], stdout=logf, stderr=logf,
                stdin=subprocess.DEVNULL, start_new_session=True, preexec_fn=_die_with_parent,
            )
        self._wait()

    def _wait(self) -> None:
        deadline = time.monotonic() + 20
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"docker-registry exited ({self.process.returncode}):\n{self.log.read_text()}")
            try:
                urllib.request.urlopen(f"http://{self.host}/v2/", timeout=2).close()
                return
            except urllib.error.HTTPError:
                return  # 401: up, and asking for credentials
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"docker-registry did not answer:\n{self.log.read_text()}") from None
                time.sleep(0.05)

    def push(self, src: str, repo_tag: str, *extra: str) -> str:
        creds = []
        if self.users:
            user, password = next(iter(self.users.items()))
            creds = ["--dest-creds", f"{user}:{password}"]
        dest = f"docker://{self.host}/{repo_tag}"
        run("skopeo", "copy", "--quiet", "--dest-tls-verify=false", *creds, *extra, src, dest)
        return dest

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
