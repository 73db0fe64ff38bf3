"""OCI / Docker image metadata (indexes, manifests, configs) and the OCI image layout source.

Everything here is parsed as hostile input: size limits before parsing, every field
type-checked, digests verified before a blob is trusted.  Both the OCI media types and
Docker's schema 2 (manifest list, manifest) are read; schema 1 is refused.

An *OCI image layout* is a directory (or, inside a docker-archive written by Docker 25+,
a tar) holding ``oci-layout``, ``index.json`` and ``blobs/<alg>/<hex>``.  The image is
chosen by its ``org.opencontainers.image.ref.name`` annotation (the TAG of ``oci:DIR:TAG``),
or, without a TAG, the only image in the index or the one tagged ``latest``.
"""

from __future__ import annotations

import asyncio
import json
import os
import tarfile
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Protocol

from lazyfs.errors import IntegrityError, SeedError
from lazyfs.image.layers import check_digest, show
from lazyfs.image.source import ImageOptions, LayerRef, Platform, Readable, ResolvedImage, host_platform
from lazyfs.manifest import IMAGE_CONFIG_ANNOTATION

__all__ = [
    "CONFIG_ANNOTATION",
    "DOCKER_MANIFEST",
    "DOCKER_MANIFEST_LIST",
    "INDEX_TYPES",
    "MANIFEST_TYPES",
    "OCI_INDEX",
    "OCI_MANIFEST",
    "REF_NAME",
    "BlobStore",
    "Descriptor",
    "DirStore",
    "LayoutSource",
    "TarStore",
    "canonical_config",
    "image_from_manifest",
    "parse_json_object",
    "select_platform",
    "sha256_digest",
]

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
INDEX_TYPES = (OCI_INDEX, DOCKER_MANIFEST_LIST)
MANIFEST_TYPES = (OCI_MANIFEST, DOCKER_MANIFEST)
_SCHEMA1 = (
    "application/vnd.docker.distribution.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v1+prettyjws",
)
REF_NAME = "org.opencontainers.image.ref.name"
# The manifest annotation holding the image config (canonical JSON): what `lazyfs inspect`
# shows and what `lazyfs run` starts.
CONFIG_ANNOTATION = IMAGE_CONFIG_ANNOTATION
# How deep an index may nest other indexes before we call it a loop.
_MAX_INDEX_DEPTH = 4
# The manifest format bounds one annotation value at 1 MiB.
_MAX_ANNOTATION = 1 << 20


def sha256_digest(data: bytes) -> str:
    import hashlib

    return "sha256:" + hashlib.sha256(data).hexdigest()


def verify_blob(data: bytes, digest: str, what: str) -> None:
    import hashlib

    algo, hexd = check_digest(digest, what)
    actual = hashlib.new(algo, data).hexdigest()
    if actual != hexd:
        raise IntegrityError(f"{what}: content is {algo}:{actual[:12]}..., expected {digest[:19]}...")


def parse_json_object(data: bytes, what: str) -> dict[str, Any]:
    try:
        obj = json.loads(data)
    except (ValueError, RecursionError) as exc:
        raise SeedError(f"{what}: not valid JSON ({exc.__class__.__name__})") from exc
    if not isinstance(obj, dict):
        raise SeedError(f"{what}: expected a JSON object")
    return obj


def _str(obj: Mapping[str, Any], key: str, what: str, *, required: bool = True) -> str:
    v = obj.get(key)
    if v is None and not required:
        return ""
    if not isinstance(v, str):
        raise SeedError(f"{what}: {key!r} must be a string")
    return v


@dataclass(frozen=True, slots=True)
class Descriptor:
    media_type: str
    digest: str
    size: int
    platform: Platform | None = None
    annotations: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def parse(cls, obj: Any, what: str) -> Descriptor:
        if not isinstance(obj, dict):
            raise SeedError(f"{what}: a descriptor must be an object")
        digest = _str(obj, "digest", what)
        check_digest(digest, what)
        size = obj.get("size")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise SeedError(f"{what}: 'size' must be a non-negative integer")
        plat = None
        p = obj.get("platform")
        if p is not None:
            if not isinstance(p, dict):
                raise SeedError(f"{what}: 'platform' must be an object")
            variant = _str(p, "variant", what, required=False)
            plat = Platform(_str(p, "os", what), _str(p, "architecture", what), variant)
        ann = obj.get("annotations") or {}
        if not isinstance(ann, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in ann.items()):
            raise SeedError(f"{what}: 'annotations' must map strings to strings")
        return cls(_str(obj, "mediaType", what, required=False), digest, size, plat, ann)


def manifest_kind(obj: Mapping[str, Any], declared: str, what: str) -> str:
    """"index" or "manifest", from the document's mediaType, else the declared type, else its shape."""
    if obj.get("schemaVersion") == 1 or declared in _SCHEMA1:
        raise SeedError(f"{what}: Docker schema 1 manifests are not supported (push the image with a recent tool)")
    if obj.get("schemaVersion") != 2:
        raise SeedError(f"{what}: schemaVersion must be 2")
    mt = obj.get("mediaType") or declared
    if mt in INDEX_TYPES:
        return "index"
    if mt in MANIFEST_TYPES:
        return "manifest"
    if not mt or mt == "application/json":
        if "manifests" in obj:
            return "index"
        if "layers" in obj:
            return "manifest"
    raise SeedError(f"{what}: unsupported manifest media type {show(str(mt))}")


def index_manifests(obj: Mapping[str, Any], what: str) -> list[Descriptor]:
    items = obj.get("manifests")
    if not isinstance(items, list):
        raise SeedError(f"{what}: 'manifests' must be a list")
    return [Descriptor.parse(d, f"{what}: manifests[{i}]") for i, d in enumerate(items)]


def _arch_variant(p: Platform) -> tuple[str, str, str]:
    variant = p.variant
    if p.architecture == "arm64" and variant == "v8":
        variant = ""  # arm64 is v8 unless it says otherwise
    return p.os, p.architecture, variant


def select_platform(descs: Sequence[Descriptor], want: Platform | None, what: str) -> Descriptor:
    """The entry of an index for ``want`` (default: linux and the host's architecture).

    An entry without a platform is taken only when it is the only candidate; attestation
    manifests (``vnd.docker.reference.type``) are never images.
    """
    want = want or host_platform()
    images = [d for d in descs if "vnd.docker.reference.type" not in d.annotations]
    wo, wa, wv = _arch_variant(want)
    exact = [d for d in images if d.platform is not None and _arch_variant(d.platform) == (wo, wa, wv)]
    if exact:
        return exact[0]
    if not want.variant:
        loose = [d for d in images if d.platform is not None and _arch_variant(d.platform)[:2] == (wo, wa)]
        if loose:
            return loose[0]
    if len(images) == 1 and images[0].platform is None:
        return images[0]
    have = ", ".join(sorted({str(d.platform) for d in images if d.platform is not None})) or "none"
    raise SeedError(f"{what}: no image for platform {want} (the index has: {have}); choose one with --platform")


def config_diff_ids(config: Mapping[str, Any], n_layers: int, what: str) -> list[str]:
    rootfs = config.get("rootfs")
    if not isinstance(rootfs, dict) or rootfs.get("type") != "layers":
        raise SeedError(f"{what}: rootfs.type must be 'layers'")
    ids = rootfs.get("diff_ids")
    if not isinstance(ids, list) or not all(isinstance(d, str) for d in ids):
        raise SeedError(f"{what}: rootfs.diff_ids must be a list of digests")
    for d in ids:
        check_digest(d, f"{what}: rootfs.diff_ids")
    if len(ids) != n_layers:
        raise SeedError(f"{what}: {len(ids)} diff_ids for {n_layers} layers")
    return list(ids)


def config_platform(config: Mapping[str, Any]) -> Platform:
    def s(key: str) -> str:
        v = config.get(key)
        return v if isinstance(v, str) else ""

    return Platform(s("os"), s("architecture"), s("variant"))


def canonical_config(config: Mapping[str, Any], what: str) -> str:
    """The config as canonical JSON (sorted keys, no spaces), to keep as a manifest annotation.

    The format bounds an annotation at 1 MiB; a config over that loses its ``history``
    (build notes), which nothing needs to run the image.
    """
    def dump(obj: Mapping[str, Any]) -> str:
        return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)

    text = dump(config)
    if len(text.encode()) > _MAX_ANNOTATION and "history" in config:
        text = dump({k: v for k, v in config.items() if k != "history"})
    if len(text.encode()) > _MAX_ANNOTATION:
        raise SeedError(f"{what}: the image config is over 1 MiB even without its history")
    return text


def image_from_manifest(
    manifest: bytes,
    manifest_digest: str,
    declared_type: str,
    config: bytes,
    options: ImageOptions,
    description: str,
) -> ResolvedImage:
    """A :class:`ResolvedImage` from an image manifest and its (already verified) config."""
    what = f"{description}: manifest"
    obj = parse_json_object(manifest, what)
    if manifest_kind(obj, declared_type, what) != "manifest":
        raise SeedError(f"{what}: expected an image manifest, found an index")
    layers_json = obj.get("layers")
    if not isinstance(layers_json, list):
        raise SeedError(f"{what}: 'layers' must be a list")
    if len(layers_json) > options.limits.max_layers:
        raise SeedError(f"{what}: {len(layers_json)} layers, over the limit of {options.limits.max_layers}")
    layers = [Descriptor.parse(d, f"{what}: layers[{i}]") for i, d in enumerate(layers_json)]
    cfg = parse_json_object(config, f"{description}: config")
    diff_ids = config_diff_ids(cfg, len(layers), f"{description}: config")
    n = len(layers)
    refs = tuple(
        LayerRef(i, n, d.digest, d.digest, d.size, d.media_type or "", diff_ids[i]) for i, d in enumerate(layers)
    )
    ann = obj.get("annotations") or {}
    return ResolvedImage(
        description=description,
        manifest_digest=manifest_digest,
        config=config,
        config_json=cfg,
        layers=refs,
        platform=config_platform(cfg),
        annotations={k: v for k, v in ann.items() if isinstance(k, str) and isinstance(v, str)},
    )


def config_descriptor(manifest: bytes, what: str) -> Descriptor:
    obj = parse_json_object(manifest, what)
    return Descriptor.parse(obj.get("config"), f"{what}: config")


# --- blob stores: a directory or a tar --------------------------------------------------------


class BlobStore(Protocol):
    """Where an OCI layout's files are: ``read_file`` for small metadata, ``open_blob`` to stream."""

    where: str

    def read_file(self, name: str, limit: int) -> bytes | None: ...

    def open_blob(self, digest: str) -> BinaryIO: ...


def _read_limited(f: BinaryIO, limit: int, what: str) -> bytes:
    data = f.read(limit + 1)
    if len(data) > limit:
        raise SeedError(f"{what}: over the {limit} byte limit")
    return data


class DirStore:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.where = str(root)

    def read_file(self, name: str, limit: int) -> bytes | None:
        try:
            with open(self.root / name, "rb") as f:
                return _read_limited(f, limit, f"{self.where}/{name}")
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise SeedError(f"cannot read {self.where}/{name}: {exc.strerror}") from exc

    def open_blob(self, digest: str) -> BinaryIO:
        algo, hexd = check_digest(digest, self.where)
        path = self.root / "blobs" / algo / hexd
        try:
            return open(path, "rb")
        except FileNotFoundError:
            raise SeedError(f"{self.where}: blob {digest[:19]}... is missing") from None
        except OSError as exc:
            raise SeedError(f"cannot read {path}: {exc.strerror}") from exc


class TarStore:
    """Members of a (seekable) tar by name; links inside the archive are followed a few hops."""

    def __init__(self, path: str) -> None:
        self.where = path
        try:
            self.tf = tarfile.open(path, "r:*")  # noqa: SIM115 - kept open for the source's life
            members = self.tf.getmembers()
        except (tarfile.TarError, EOFError) as exc:
            raise SeedError(f"{path}: not a (gzip/bzip2/xz) tar archive: {exc}") from exc
        except OSError as exc:
            raise SeedError(f"cannot read {path}: {exc.strerror or exc}") from exc
        self.members: dict[str, tarfile.TarInfo] = {}
        for m in members:
            self.members[self._norm(m.name)] = m

    @staticmethod
    def _norm(name: str) -> str:
        return os.path.normpath("/" + name).lstrip("/")

    def close(self) -> None:
        self.tf.close()

    def has(self, name: str) -> bool:
        return self._norm(name) in self.members

    def member(self, name: str) -> tarfile.TarInfo | None:
        m = self.members.get(self._norm(name))
        for _ in range(8):
            if m is None or not (m.issym() or m.islnk()):
                return m
            base = os.path.dirname(m.name) if m.issym() else ""
            m = self.members.get(self._norm(os.path.join(base, m.linkname)))
        raise SeedError(f"{self.where}: {show(name)}: too many links inside the archive")

    def open_member(self, name: str) -> BinaryIO:
        m = self.member(name)
        if m is None or not m.isreg():
            raise SeedError(f"{self.where}: {show(name)} is missing from the archive")
        f = self.tf.extractfile(m)
        assert f is not None
        return f  # type: ignore[return-value]  # an ExFileObject (io.BufferedReader)

    def member_size(self, name: str) -> int:
        m = self.member(name)
        return m.size if m is not None else 0

    def read_file(self, name: str, limit: int) -> bytes | None:
        m = self.member(name)
        if m is None:
            return None
        with self.open_member(name) as f:
            return _read_limited(f, limit, f"{self.where}: {name}")

    def open_blob(self, digest: str) -> BinaryIO:
        algo, hexd = check_digest(digest, self.where)
        return self.open_member(f"blobs/{algo}/{hexd}")


def read_blob(store: BlobStore, desc: Descriptor, limit: int, what: str) -> bytes:
    """A small blob (manifest, config), size-limited and verified against its descriptor."""
    if desc.size > limit:
        raise SeedError(f"{what}: {desc.size} bytes, over the {limit} byte limit")
    with store.open_blob(desc.digest) as f:
        data = _read_limited(f, limit, what)
    if len(data) != desc.size:
        raise IntegrityError(f"{what}: {len(data)} bytes, its descriptor says {desc.size}")
    verify_blob(data, desc.digest, what)
    return data


# --- the layout source -----------------------------------------------------------------------


class LayoutSource:
    """``oci:DIR[:TAG]`` (or an OCI layout inside a tar, through a :class:`TarStore`)."""

    def __init__(self, store: BlobStore, tag: str | None, description: str, options: ImageOptions) -> None:
        self.store = store
        self.tag = tag
        self.description = description
        self.options = options

    async def resolve(self) -> ResolvedImage:
        return await asyncio.to_thread(self.resolve_sync)

    def resolve_sync(self) -> ResolvedImage:
        limits = self.options.limits
        what = self.description
        layout = self.store.read_file("oci-layout", 4096)
        if layout is None:
            raise SeedError(f"{what}: not an OCI image layout (no oci-layout file)")
        version = parse_json_object(layout, f"{what}: oci-layout").get("imageLayoutVersion")
        if not isinstance(version, str) or not version.startswith("1."):
            raise SeedError(f"{what}: unsupported imageLayoutVersion {version!r}")
        index = self.store.read_file("index.json", limits.max_manifest_bytes)
        if index is None:
            raise SeedError(f"{what}: not an OCI image layout (no index.json)")
        descs = index_manifests(parse_json_object(index, f"{what}: index.json"), f"{what}: index.json")
        desc = self._pick(descs)
        for _ in range(_MAX_INDEX_DEPTH):
            data = read_blob(self.store, desc, limits.max_manifest_bytes, f"{what}: manifest {desc.digest[:19]}")
            obj = parse_json_object(data, f"{what}: manifest {desc.digest[:19]}")
            if manifest_kind(obj, desc.media_type, f"{what}: manifest {desc.digest[:19]}") == "manifest":
                cdesc = config_descriptor(data, f"{what}: manifest")
                config = read_blob(self.store, cdesc, limits.max_config_bytes, f"{what}: config")
                return image_from_manifest(data, desc.digest, desc.media_type, config, self.options, what)
            desc = select_platform(index_manifests(obj, f"{what}: index"), self.options.platform, what)
        raise SeedError(f"{what}: indexes nested more than {_MAX_INDEX_DEPTH} deep")

    def _pick(self, descs: list[Descriptor]) -> Descriptor:
        what = self.description
        tags = [d.annotations.get(REF_NAME) for d in descs]
        if self.tag is not None:
            found = [d for d, t in zip(descs, tags, strict=True) if t == self.tag]
            if not found:
                have = ", ".join(sorted({t for t in tags if t})) or "none"
                raise SeedError(f"{what}: no image tagged {self.tag!r} (tags: {have})")
            return found[0]
        if len(descs) == 1:
            return descs[0]
        latest = [d for d, t in zip(descs, tags, strict=True) if t == "latest"]
        if latest:
            return latest[0]
        if not descs:
            raise SeedError(f"{what}: the layout holds no image")
        have = ", ".join(sorted({t for t in tags if t})) or "untagged"
        raise SeedError(f"{what}: the layout holds {len(descs)} images; name one as oci:DIR:TAG (tags: {have})")

    @asynccontextmanager
    async def open_layer(self, layer: LayerRef) -> AsyncIterator[Readable]:
        f = await asyncio.to_thread(self.store.open_blob, layer.locator)
        try:
            yield f
        finally:
            f.close()

    async def aclose(self) -> None:
        pass
