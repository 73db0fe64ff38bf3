"""Publishing a container image: resolve, flatten its layers into one tree, then :func:`lazyfs.seed.publish`.

::

    source.resolve()  ─► config (verified) + layers
    for each layer, in order:  source.open_layer() ─► LayerTree.apply() in a worker thread
                               (blob digest, diff_id, OCI whiteouts; file bytes spooled)
    LayerTree.emit() ─► ManifestBuilder + SourceFiles pointing into the spool
    publish(..., annotations={CONFIG_ANNOTATION: canonical config}) ─► packs, manifest, ref

Nothing is published until every layer has been applied and verified: a hostile entry,
a digest mismatch or a cancelled seed leaves no manifest and no ref (packs uploaded by a
failed *publish* are content-addressed and harmless).  The spool directory is removed
whatever happens.  Chunks already at the origin are not uploaded again, so a second image
on the same base uploads only its new files' bytes.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from lazyfs.config import SeedConfig
from lazyfs.errors import SeedError, UsageError
from lazyfs.image.archive import DockerArchiveSource
from lazyfs.image.layers import LayerTree
from lazyfs.image.oci import CONFIG_ANNOTATION, DirStore, LayoutSource, canonical_config
from lazyfs.image.reference import DockerArchiveRef, ImageRef, OciLayoutRef, RegistryRef, parse_image_ref
from lazyfs.image.registry import RegistrySource
from lazyfs.image.source import ImageOptions, ImageSource, ResolvedImage
from lazyfs.manifest import ManifestBuilder, Ref
from lazyfs.origin.base import Origin
from lazyfs.progress import LineProgress, NullProgress, ProgressReporter
from lazyfs.seed import SeedResult, publish

__all__ = ["ImageSeedResult", "open_image_source", "seed_image"]


@dataclass(frozen=True)
class ImageSeedResult:
    result: SeedResult
    image: ResolvedImage
    layer_bytes: int  # blob bytes read (compressed, as stored)
    flatten_seconds: float


def open_image_source(ref: ImageRef | str, options: ImageOptions | None = None) -> ImageSource:
    """The :class:`ImageSource` for ``oci:DIR[:TAG]``, ``docker-archive:FILE`` or ``docker://...``."""
    options = options or ImageOptions()
    if isinstance(ref, str):
        parsed = parse_image_ref(ref)
        if parsed is None:
            raise UsageError(f"{ref!r} is not an image reference (oci:DIR, docker-archive:FILE, docker://...)")
        ref = parsed
    if isinstance(ref, OciLayoutRef):
        if not os.path.isdir(ref.path):
            raise UsageError(f"{ref}: {ref.path} is not a directory")
        return LayoutSource(DirStore(Path(ref.path)), ref.tag, str(ref), options)
    if isinstance(ref, DockerArchiveRef):
        if not os.path.isfile(ref.path):
            raise UsageError(f"{ref}: no such file {ref.path}")
        return DockerArchiveSource(ref.path, ref.selector, options)
    assert isinstance(ref, RegistryRef)
    return RegistrySource(ref, options)


class _Counter:
    def __init__(self, progress: ProgressReporter) -> None:
        self.progress = progress
        self.n = 0

    def __call__(self, n: int) -> None:
        self.n += n
        self.progress.advance(n)


async def _apply(tree: LayerTree, source: ImageSource, image: ResolvedImage, counter: _Counter) -> None:
    loop = asyncio.get_running_loop()
    for layer in image.layers:
        async with source.open_layer(layer) as blob:
            fut = loop.run_in_executor(None, tree.apply, blob, layer, counter)
            try:
                await asyncio.shield(fut)
            except asyncio.CancelledError:
                # Stop the worker at its next read and wait for it: the spool goes next.
                tree.abort.set()
                with contextlib.suppress(BaseException):  # it was told to stop; its error is no news
                    await fut
                raise


async def seed_image(
    ref: ImageRef | str,
    origin: Origin,
    name: Ref,
    config: SeedConfig = SeedConfig(),
    options: ImageOptions | None = None,
    progress: ProgressReporter | None = None,
    pull_progress: ProgressReporter | None = None,
) -> ImageSeedResult:
    """Flatten the image ``ref`` and publish it to ``origin`` as ``name`` (``NAME:TAG``).

    ``pull_progress`` counts layer bytes read (as stored), ``progress`` the chunking of
    the flattened tree (as in :func:`lazyfs.seed.seed`).
    """
    if name.tag is None:
        raise UsageError(f"cannot publish to {name}: give NAME[:TAG]")
    options = options or ImageOptions()
    source = open_image_source(ref, options)
    pull = pull_progress or NullProgress()
    try:
        t0 = time.monotonic()
        image = await source.resolve()
        annotations = {CONFIG_ANNOTATION: canonical_config(image.config_json, f"{image.description}: config")}
        spool_parent = options.spool_dir
        if spool_parent is not None:
            os.makedirs(spool_parent, exist_ok=True)
        try:
            spool = tempfile.mkdtemp(prefix="lazyfs-image-", dir=spool_parent)
        except OSError as exc:
            raise SeedError(f"cannot create a spool directory in {spool_parent or tempfile.gettempdir()}: "
                            f"{exc.strerror}") from exc
        tree = LayerTree(spool, options.limits)
        try:
            counter = _Counter(pull)
            pull.start(image.compressed_size)
            try:
                await _apply(tree, source, image, counter)
            except BaseException:
                # A bar must be stopped; a final progress line would only precede the error.
                if not isinstance(pull, LineProgress):
                    pull.finish()
                raise
            pull.finish()
            builder = ManifestBuilder(config.chunk_size)
            files = tree.emit(builder)
            flatten_seconds = time.monotonic() - t0
            result = await publish(origin, builder, files, name, config, progress, annotations)
        finally:
            tree.close()
            await asyncio.to_thread(shutil.rmtree, spool, True)
    finally:
        await source.aclose()
    return ImageSeedResult(result, image, counter.n, flatten_seconds)
