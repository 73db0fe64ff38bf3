"""Synthetic container images for tests: layer tars built entry by entry, written as an OCI
layout or a docker-archive.

A :class:`Layer` collects tar entries (files with any metadata, dirs, symlinks, hardlinks,
devices, fifos, whiteouts, PAX records, raw :class:`tarfile.TarInfo` for hostile cases);
:func:`write_layout` / :func:`write_docker_archive` turn a list of layers (each compressed
with gzip, zstd or not at all) and a config into what ``oci:`` / ``docker-archive:`` read.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import zstandard

__all__ = ["BuiltImage", "Layer", "compress", "sha256", "write_docker_archive", "write_layout"]

MTIME = 1_700_000_000


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@dataclass
class Layer:
    """Tar entries in order; ``tar()`` gives the uncompressed layer."""

    compression: str = "gzip"  # "gzip", "zstd" or "" (plain)
    items: list[tuple[tarfile.TarInfo, bytes | None]] = field(default_factory=list)

    def _info(self, name: str, kind: bytes, mode: int, uid: int = 0, gid: int = 0, mtime: float = MTIME,
              pax: dict[str, str] | None = None, xattrs: dict[str, bytes] | None = None) -> tarfile.TarInfo:
        ti = tarfile.TarInfo(name)
        ti.type = kind
        ti.mode = mode
        ti.uid, ti.gid = uid, gid
        ti.mtime = mtime
        headers = dict(pax or {})
        for k, v in (xattrs or {}).items():
            headers["SCHILY.xattr." + k] = v.decode("utf-8", "surrogateescape")
        ti.pax_headers = headers
        return ti

    def file(self, name: str, data: bytes = b"", mode: int = 0o644, **kw: Any) -> Layer:
        ti = self._info(name, tarfile.REGTYPE, mode, **kw)
        ti.size = len(data)
        self.items.append((ti, data))
        return self

    def dir(self, name: str, mode: int = 0o755, **kw: Any) -> Layer:
        self.items.append((self._info(name, tarfile.DIRTYPE, mode, **kw), None))
        return self

    def symlink(self, name: str, target: str, **kw: Any) -> Layer:
        ti = self._info(name, tarfile.SYMTYPE, 0o777, **kw)
        ti.linkname = target
        self.items.append((ti, None))
        return self

    def hardlink(self, name: str, target: str, **kw: Any) -> Layer:
        ti = self._info(name, tarfile.LNKTYPE, 0o644, **kw)
        ti.linkname = target
        self.items.append((ti, None))
        return self

    def device(self, name: str, kind: str, major: int, minor: int, mode: int = 0o666, **kw: Any) -> Layer:
        ti = self._info(name, tarfile.CHRTYPE if kind == "c" else tarfile.BLKTYPE, mode, **kw)
        ti.devmajor, ti.devminor = major, minor
        self.items.append((ti, None))
        return self

    def fifo(self, name: str, mode: int = 0o644, **kw: Any) -> Layer:
        self.items.append((self._info(name, tarfile.FIFOTYPE, mode, **kw), None))
        return self

    def whiteout(self, name: str) -> Layer:
        head, _, base = name.rpartition("/")
        return self.file(f"{head}/.wh.{base}" if head else f".wh.{base}")

    def opaque(self, directory: str) -> Layer:
        return self.file(f"{directory}/.wh..wh..opq")

    def raw(self, ti: tarfile.TarInfo, data: bytes | None = None) -> Layer:
        self.items.append((ti, data))
        return self

    def tar(self) -> bytes:
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT, encoding="utf-8",
                          errors="surrogateescape") as tf:
            for ti, data in self.items:
                tf.addfile(ti, io.BytesIO(data) if data is not None else None)
        return buf.getvalue()


def compress(data: bytes, kind: str) -> bytes:
    if kind == "gzip":
        return gzip.compress(data, mtime=0)
    if kind == "zstd":
        return zstandard.ZstdCompressor().compress(data)
    return data


_MEDIA = {
    "gzip": "application/vnd.oci.image.layer.v1.tar+gzip",
    "zstd": "application/vnd.oci.image.layer.v1.tar+zstd",
    "": "application/vnd.oci.image.layer.v1.tar",
}


def image_config(diff_ids: list[str], config: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "architecture": "amd64",
        "os": "linux",
        "created": "2024-01-01T00:00:00Z",
        "config": config if config is not None else {
            "Entrypoint": ["/bin/app"],
            "Cmd": ["--serve", "two words"],
            "Env": ["PATH=/usr/local/bin:/usr/bin:/bin", "LANG=C.UTF-8"],
            "WorkingDir": "/srv",
            "User": "1000:1000",
        },
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
        "history": [{"created_by": f"layer {i}"} for i in range(len(diff_ids))],
    }


@dataclass
class BuiltImage:
    manifest: bytes
    manifest_digest: str
    config: bytes
    blobs: dict[str, bytes]  # digest -> bytes (layers as stored, config, manifest)
    layer_digests: list[str]
    diff_ids: list[str]
    tars: list[bytes]


def build_image(layers: list[Layer], config: dict[str, Any] | None = None,
                raw_config: bytes | None = None, platform: str = "linux/amd64") -> BuiltImage:
    tars = [layer.tar() for layer in layers]
    stored = [compress(t, layer.compression) for t, layer in zip(tars, layers, strict=True)]
    diff_ids = [sha256(t) for t in tars]
    cfg = raw_config if raw_config is not None else json.dumps(image_config(diff_ids, config)).encode()
    blobs = {sha256(b): b for b in stored}
    blobs[sha256(cfg)] = cfg
    manifest = json.dumps({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": sha256(cfg), "size": len(cfg)},
        "layers": [
            {"mediaType": _MEDIA[layer.compression], "digest": sha256(b), "size": len(b)}
            for b, layer in zip(stored, layers, strict=True)
        ],
    }).encode()
    blobs[sha256(manifest)] = manifest
    return BuiltImage(manifest, sha256(manifest), cfg, blobs, [sha256(b) for b in stored], diff_ids, tars)


def write_blobs(root: Path, blobs: dict[str, bytes]) -> None:
    for digest, data in blobs.items():
        algo, hexd = digest.split(":")
        (root / "blobs" / algo).mkdir(parents=True, exist_ok=True)
        (root / "blobs" / algo / hexd).write_bytes(data)


def write_layout(root: Path, images: dict[str, BuiltImage] | BuiltImage) -> Path:
    """An OCI image layout at ``root`` holding ``images`` (tag -> image; a bare image is ``latest``)."""
    if isinstance(images, BuiltImage):
        images = {"latest": images}
    root.mkdir(parents=True, exist_ok=True)
    (root / "oci-layout").write_text(json.dumps({"imageLayoutVersion": "1.0.0"}))
    manifests = []
    for tag, img in images.items():
        write_blobs(root, img.blobs)
        manifests.append({
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": img.manifest_digest,
            "size": len(img.manifest),
            "annotations": {"org.opencontainers.image.ref.name": tag},
        })
    (root / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": manifests}))
    return root


def _add(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    ti = tarfile.TarInfo(name)
    ti.size = len(data)
    ti.mtime = MTIME
    tf.addfile(ti, io.BytesIO(data))


def write_docker_archive(path: Path, image: BuiltImage, repo_tags: list[str] | None = None, *,
                         dedup_symlink: bool = False) -> Path:
    """A legacy ``docker save`` archive: ``<id>/layer.tar`` (uncompressed), ``<hex>.json``, manifest.json.

    ``dedup_symlink`` makes a repeated layer a symlink to the first copy, as docker does.
    """
    with tarfile.open(path, "w") as tf:
        names: list[str] = []
        seen: dict[str, str] = {}
        for i, t in enumerate(image.tars):
            d = image.diff_ids[i].split(":")[1]
            name = f"{d}/layer.tar" if not (dedup_symlink and d in seen) else f"dup{i}/layer.tar"
            if dedup_symlink and d in seen:
                ti = tarfile.TarInfo(name)
                ti.type = tarfile.SYMTYPE
                ti.linkname = f"../{seen[d]}"
                tf.addfile(ti)
            elif name not in names:
                _add(tf, name, t)
                seen[d] = name
            names.append(name)
        config_name = sha256(image.config).split(":")[1] + ".json"
        _add(tf, config_name, image.config)
        manifest = [{"Config": config_name, "RepoTags": repo_tags or ["example/app:latest"], "Layers": names}]
        _add(tf, "manifest.json", json.dumps(manifest).encode())
    return path


def write_oci_archive(path: Path, image: BuiltImage, tag: str = "latest") -> Path:
    """A docker-archive that holds only an OCI layout (index.json, blobs/): what newer tools write."""
    with tarfile.open(path, "w") as tf:
        _add(tf, "oci-layout", json.dumps({"imageLayoutVersion": "1.0.0"}).encode())
        for digest, data in image.blobs.items():
            _add(tf, "blobs/" + digest.replace(":", "/"), data)
        index = {"schemaVersion": 2, "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": image.manifest_digest,
            "size": len(image.manifest), "annotations": {"org.opencontainers.image.ref.name": tag}}]}
        _add(tf, "index.json", json.dumps(index).encode())
    return path

