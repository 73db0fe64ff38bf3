"""``docker-archive:FILE[:REPO:TAG|@N]``: what ``docker save`` and ``skopeo copy ... docker-archive:`` write.

The archive is a tar (optionally gzip/bzip2/xz compressed) holding ``manifest.json`` —
a list of images, each ``{"Config": member, "RepoTags": [...], "Layers": [member, ...]}``
— the config and the layer tars.  Legacy archives name members ``<id>/layer.tar`` (and
dedup identical layers with symlinks inside the archive), Docker 25+ writes an OCI layout
(``blobs/sha256/<hex>``, ``index.json``) next to ``manifest.json``; an archive with only the
OCI layout is read as one.

Docker-archive layers have no blob digest; each is verified against its ``diff_id`` (the
sha256 of the uncompressed tar, from the config) while it streams, and the config against
its member name when that is a digest (``<hex>.json``, ``blobs/sha256/<hex>``).
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from lazyfs.errors import SeedError
from lazyfs.image.layers import show
from lazyfs.image.oci import (
    LayoutSource,
    TarStore,
    config_diff_ids,
    config_platform,
    parse_json_object,
    verify_blob,
)
from lazyfs.image.source import ImageOptions, LayerRef, Readable, ResolvedImage

__all__ = ["DockerArchiveSource"]

_HEX_MEMBER = re.compile(r"(?:.*/)?(?:blobs/sha256/)?([0-9a-f]{64})(?:\.json)?")


class DockerArchiveSource:
    def __init__(self, path: str, selector: str | None, options: ImageOptions) -> None:
        self.path = path
        self.selector = selector
        self.options = options
        self.description = f"docker-archive:{path}" + (f":{selector}" if selector else "")
        self._store: TarStore | None = None
        self._oci: LayoutSource | None = None

    async def resolve(self) -> ResolvedImage:
        return await asyncio.to_thread(self._resolve)

    def _resolve(self) -> ResolvedImage:
        limits = self.options.limits
        what = self.description
        store = self._store = TarStore(self.path)
        raw = store.read_file("manifest.json", limits.max_manifest_bytes)
        if raw is None:
            if store.has("index.json") and store.has("oci-layout"):
                tag = self.selector if self.selector and not self.selector.startswith("@") else None
                self._oci = LayoutSource(store, tag, what, self.options)
                return self._oci.resolve_sync()
            raise SeedError(f"{what}: not a docker-archive (no manifest.json)")
        try:
            images = json.loads(raw)
        except ValueError as exc:
            raise SeedError(f"{what}: manifest.json is not valid JSON") from exc
        if not isinstance(images, list) or not images or not all(isinstance(i, dict) for i in images):
            raise SeedError(f"{what}: manifest.json must be a non-empty list of images")
        image = self._pick(images)
        config_name = image.get("Config")
        layer_names = image.get("Layers")
        if not isinstance(config_name, str) or not isinstance(layer_names, list):
            raise SeedError(f"{what}: manifest.json: an image needs 'Config' and 'Layers'")
        if not all(isinstance(n, str) for n in layer_names):
            raise SeedError(f"{what}: manifest.json: 'Layers' must list member names")
        if len(layer_names) > limits.max_layers:
            raise SeedError(f"{what}: {len(layer_names)} layers, over the limit of {limits.max_layers}")
        config = store.read_file(config_name, limits.max_config_bytes)
        if config is None:
            raise SeedError(f"{what}: the config {show(config_name)} is missing from the archive")
        m = _HEX_MEMBER.fullmatch(config_name)
        if m:
            verify_blob(config, f"sha256:{m.group(1)}", f"{what}: config")
        cfg = parse_json_object(config, f"{what}: config")
        diff_ids = config_diff_ids(cfg, len(layer_names), f"{what}: config")
        n = len(layer_names)
        layers = []
        for i, name in enumerate(layer_names):
            if store.member(name) is None:
                raise SeedError(f"{what}: layer {show(name)} is missing from the archive")
            lm = _HEX_MEMBER.fullmatch(name)
            digest = f"sha256:{lm.group(1)}" if lm and "blobs/" in name else ""
            layers.append(LayerRef(i, n, name, digest, store.member_size(name), "", diff_ids[i]))
        return ResolvedImage(
            description=what,
            manifest_digest="",
            config=config,
            config_json=cfg,
            layers=tuple(layers),
            platform=config_platform(cfg),
        )

    def _pick(self, images: list[dict[str, Any]]) -> dict[str, Any]:
        what = self.description
        sel = self.selector
        if sel is None:
            if len(images) == 1:
                return images[0]
            names = ", ".join(t for i in images for t in (i.get("RepoTags") or []) if isinstance(t, str))
            raise SeedError(
                f"{what}: the archive holds {len(images)} images; name one as FILE:REPO:TAG or FILE:@N "
                f"(tags: {names or 'none'})"
            )
        if sel.startswith("@"):
            if not sel[1:].isdigit() or int(sel[1:]) >= len(images):
                raise SeedError(f"{what}: no image {sel} (the archive holds {len(images)})")
            return images[int(sel[1:])]
        for i in images:
            tags = i.get("RepoTags") or []
            if isinstance(tags, list) and (sel in tags or (":" not in sel and f"{sel}:latest" in tags)):
                return i
        raise SeedError(f"{what}: no image tagged {sel!r} in the archive")

    @asynccontextmanager
    async def open_layer(self, layer: LayerRef) -> AsyncIterator[Readable]:
        if self._oci is not None:
            async with self._oci.open_layer(layer) as blob:
                yield blob
            return
        assert self._store is not None
        f = await asyncio.to_thread(self._store.open_member, layer.locator)
        try:
            yield f
        finally:
            f.close()

    async def aclose(self) -> None:
        if self._store is not None:
            await asyncio.to_thread(self._store.close)
