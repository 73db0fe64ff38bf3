"""What every image source hands the flattener: the image config and its layers, in order.

An :class:`ImageSource` (an OCI layout, a docker-archive, a registry) resolves its
reference to a :class:`ResolvedImage` — the config bytes, verified against their
digest, and the layers as :class:`LayerRef` descriptors — and opens each layer's
blob as a blocking byte stream (:class:`Readable`) that the flattener reads in a
worker thread.  Sources never decompress or interpret layers; verification of the
blob digest and the uncompressed ``diff_id`` happens while the flattener streams.
"""

from __future__ import annotations

import platform as _platform
from collections.abc import Mapping
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import Any, Protocol

__all__ = [
    "ImageLimits",
    "ImageOptions",
    "ImageSource",
    "LayerRef",
    "Platform",
    "Readable",
    "ResolvedImage",
    "host_platform",
]

MiB = 1024 * 1024


class Readable(Protocol):
    """A blocking byte stream: ``read(n)`` returns up to ``n`` bytes, ``b""`` at the end."""

    def read(self, size: int = ..., /) -> bytes: ...


@dataclass(frozen=True, slots=True)
class ImageLimits:
    """Bounds on untrusted image metadata and layer contents; generous for real images, fatal for bombs."""

    # containerd refuses manifests and indexes over 4 MiB; real ones are a few KiB.
    max_manifest_bytes: int = 4 * MiB
    # A config holds history, env and labels: real ones are KiB, a few hundred KiB at most.
    max_config_bytes: int = 8 * MiB
    # docker's overlay2 stops at 128 layers; leave room for other builders but not unbounded work.
    max_layers: int = 1024
    # One regular file in a layer: a size field over this is refused before a byte is spooled.
    max_file_size: int = 1 << 40  # 1 TiB
    # Names in the flattened tree (the manifest format allows 4 million entries).
    max_entries: int = 4_000_000


@dataclass(frozen=True, slots=True)
class Platform:
    os: str
    architecture: str
    variant: str = ""

    def __str__(self) -> str:
        return "/".join(p for p in (self.os, self.architecture, self.variant) if p)

    @classmethod
    def parse(cls, text: str) -> Platform:
        """``os/arch[/variant]``, e.g. ``linux/arm64/v8``; ValueError for anything else."""
        parts = text.split("/")
        if not 2 <= len(parts) <= 3 or not all(parts):
            raise ValueError(f"bad platform {text!r}: use OS/ARCH[/VARIANT], like linux/amd64")
        return cls(parts[0], parts[1], parts[2] if len(parts) == 3 else "")


# uname -m -> the GOARCH names OCI platforms use.
_ARCH = {
    "x86_64": ("amd64", ""),
    "amd64": ("amd64", ""),
    "aarch64": ("arm64", ""),
    "arm64": ("arm64", ""),
    "armv7l": ("arm", "v7"),
    "armv6l": ("arm", "v6"),
    "i386": ("386", ""),
    "i686": ("386", ""),
    "ppc64le": ("ppc64le", ""),
    "s390x": ("s390x", ""),
    "riscv64": ("riscv64", ""),
}


def host_platform() -> Platform:
    """``linux`` and this machine's architecture, in OCI (GOARCH) spelling."""
    machine = _platform.machine().lower()
    arch, variant = _ARCH.get(machine, (machine, ""))
    return Platform("linux", arch, variant)


@dataclass(frozen=True, slots=True)
class ImageOptions:
    """How images are fetched and flattened (built by the CLI, or directly by library users)."""

    # Which image of a multi-platform index to take; None: linux and the host's architecture.
    platform: Platform | None = None
    # The directory holding ``config.json`` with registry credentials (``$DOCKER_CONFIG`` or
    # ``~/.docker``, resolved by the CLI); None: anonymous only.
    docker_config_dir: str | None = None
    # Allow plain http to a registry that is not on loopback (loopback registries always may).
    insecure_registry: bool = False
    limits: ImageLimits = ImageLimits()
    # Where regular files' contents are spooled while layers are applied; None: the system
    # temporary directory.  Needs room for the image's uncompressed size.
    spool_dir: str | None = None
    # A registry that does not connect in this time is down; reads stall at most read_timeout.
    connect_timeout: float = 10.0
    read_timeout: float = 60.0


@dataclass(frozen=True, slots=True)
class LayerRef:
    """One layer of an image, as its source describes it."""

    index: int  # 0-based, in application order
    count: int  # layers in the image
    locator: str  # how the source finds the blob (a digest, an archive member)
    digest: str  # of the blob as stored ("sha256:..."); "" when the source does not say
    size: int | None  # of the blob as stored; None when unknown
    media_type: str  # "" when unknown (docker-archive): the compression is sniffed
    diff_id: str  # sha256 of the uncompressed tar, from the config's rootfs.diff_ids

    @property
    def label(self) -> str:
        """How errors name the layer: its position and a digest prefix."""
        d = self.digest or self.diff_id
        return f"layer {self.index + 1}/{self.count} {d[:19]}" if d else f"layer {self.index + 1}/{self.count}"


@dataclass(frozen=True)
class ResolvedImage:
    description: str  # what the user asked for, for messages
    manifest_digest: str  # the image manifest's digest ("" for a legacy docker-archive)
    config: bytes  # the config blob, verified
    config_json: Mapping[str, Any]
    layers: tuple[LayerRef, ...]
    platform: Platform
    annotations: Mapping[str, str] = field(default_factory=dict)

    @property
    def compressed_size(self) -> int:
        return sum(layer.size or 0 for layer in self.layers)


class ImageSource(Protocol):
    """An image to flatten: resolve it once, then open its layers in order."""

    description: str

    async def resolve(self) -> ResolvedImage: ...

    def open_layer(self, layer: LayerRef) -> AbstractAsyncContextManager[Readable]: ...

    async def aclose(self) -> None: ...
