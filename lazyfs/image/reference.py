"""Image references on the command line: ``oci:DIR[:TAG]``, ``docker-archive:FILE[:REF]``, ``docker://...``.

``docker://HOST[:PORT]/REPO[:TAG|@DIGEST]`` follows Docker's rule for the registry: the
first component is a host when it contains a ``.`` or a ``:`` or is ``localhost``;
otherwise the image is on Docker Hub (``docker://python:3.12`` is
``registry-1.docker.io/library/python:3.12``).  The tag defaults to ``latest``.
"""

from __future__ import annotations

import ipaddress
import os
import re
from dataclasses import dataclass

from lazyfs.errors import UsageError

__all__ = [
    "DockerArchiveRef",
    "ImageRef",
    "OciLayoutRef",
    "RegistryRef",
    "is_loopback_host",
    "parse_image_ref",
]

_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_REPO_RE = re.compile(rf"{_COMPONENT}(?:/{_COMPONENT})*")
_TAG_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
_DIGEST_RE = re.compile(r"sha256:[0-9a-f]{64}|sha512:[0-9a-f]{128}")
_HOST_RE = re.compile(r"(?:[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*"
                      r"|\[[0-9A-Fa-f:.]+\])(?::[0-9]{1,5})?")
DOCKER_HUB = "docker.io"
DOCKER_HUB_REGISTRY = "registry-1.docker.io"


@dataclass(frozen=True, slots=True)
class OciLayoutRef:
    path: str
    tag: str | None = None

    def __str__(self) -> str:
        return f"oci:{self.path}" + (f":{self.tag}" if self.tag else "")


@dataclass(frozen=True, slots=True)
class DockerArchiveRef:
    path: str
    selector: str | None = None  # REPO:TAG or @N

    def __str__(self) -> str:
        return f"docker-archive:{self.path}" + (f":{self.selector}" if self.selector else "")


@dataclass(frozen=True, slots=True)
class RegistryRef:
    host: str  # as written: host, host:port, [v6]:port; "docker.io" for Docker Hub
    repository: str
    tag: str | None = None
    digest: str | None = None

    @property
    def reference(self) -> str:
        """What goes after ``/manifests/``: the digest when there is one, else the tag."""
        return self.digest or self.tag or "latest"

    @property
    def endpoint(self) -> str:
        """host[:port] to connect to (Docker Hub's API is not at docker.io)."""
        return DOCKER_HUB_REGISTRY if self.host == DOCKER_HUB else self.host

    @property
    def hostname(self) -> str:
        """The host without port or brackets."""
        h = self.endpoint
        if h.startswith("["):
            return h[1 : h.index("]")]
        return h.rsplit(":", 1)[0] if ":" in h else h

    def __str__(self) -> str:
        ref = f"@{self.digest}" if self.digest else f":{self.tag or 'latest'}"
        return f"docker://{self.host}/{self.repository}{ref}"


ImageRef = OciLayoutRef | DockerArchiveRef | RegistryRef


def is_loopback_host(host: str) -> bool:
    """``localhost``, 127.0.0.0/8 or ::1 (brackets allowed): the only hosts plain http is fine for."""
    h = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if h.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(h).is_loopback
    except ValueError:
        return False


def _split_path(rest: str, kind: str) -> tuple[str, str | None]:
    """``PATH[:SUFFIX]``: an existing PATH wins; otherwise the last ``:`` separates (skopeo's rule)."""
    if not rest:
        raise UsageError(f"{kind}: give a path, like {kind}:./image")
    if os.path.exists(rest) or ":" not in rest:
        return rest, None
    path, _, suffix = rest.rpartition(":") if kind == "oci" else rest.partition(":")
    if kind == "docker-archive":
        # FILE:REPO:TAG: the file is the longest prefix that exists.
        for i in [i for i, c in enumerate(rest) if c == ":"][::-1]:
            if os.path.exists(rest[:i]):
                return rest[:i], rest[i + 1 :] or None
    return path, suffix or None


def parse_registry_ref(text: str) -> RegistryRef:
    """``HOST[:PORT]/REPO[:TAG|@DIGEST]`` (after ``docker://``)."""
    orig = f"docker://{text}"
    name, digest = text, None
    if "@" in text:
        name, _, digest = text.partition("@")
        if not _DIGEST_RE.fullmatch(digest):
            raise UsageError(f"bad image reference {orig!r}: the digest must be sha256:<64 hex>")
    tag = None
    last = name.rsplit("/", 1)[-1]
    if ":" in last:
        name, _, tag = name.rpartition(":")
        if not _TAG_RE.fullmatch(tag):
            raise UsageError(f"bad image reference {orig!r}: bad tag {tag!r}")
    first, sep, rest = name.partition("/")
    if sep and ("." in first or ":" in first or first == "localhost" or first.startswith("[")):
        host, repo = first, rest
        if not _HOST_RE.fullmatch(host):
            raise UsageError(f"bad image reference {orig!r}: bad registry host {host!r}")
    else:
        host, repo = DOCKER_HUB, name
    if host == DOCKER_HUB and "/" not in repo:
        repo = f"library/{repo}"
    if not repo or len(repo) > 255 or not _REPO_RE.fullmatch(repo):
        raise UsageError(
            f"bad image reference {orig!r}: the repository must be lowercase components "
            "separated by '/', like docker://registry.example.com/team/app:1.0"
        )
    if tag is None and digest is None:
        tag = "latest"
    return RegistryRef(host, repo, tag, digest)


def parse_image_ref(text: str) -> ImageRef | None:
    """The image ``text`` names, or None when it is not an image reference (a plain path)."""
    if text.startswith("docker://"):
        return parse_registry_ref(text[len("docker://") :])
    if text.startswith("oci:"):
        path, tag = _split_path(text[len("oci:") :], "oci")
        if tag is not None and not _TAG_RE.fullmatch(tag) and "/" in tag:
            path, tag = f"{path}:{tag}", None
        return OciLayoutRef(path, tag)
    if text.startswith("docker-archive:"):
        path, sel = _split_path(text[len("docker-archive:") :], "docker-archive")
        return DockerArchiveRef(path, sel)
    return None
