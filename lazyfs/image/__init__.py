"""Container images as lazyfs trees: OCI layouts, docker-archives and registries, flattened and published.

``lazyfs seed oci:DIR[:TAG] | docker-archive:FILE | docker://HOST/REPO:TAG ORIGIN --name NAME:TAG``
applies the image's layers in order (OCI whiteouts and opaque directories, hardlinks across
layers, devices, xattrs) into one tree and publishes it like a directory; the image config
goes with the manifest (:class:`ImageConfig`).

* :mod:`lazyfs.image.reference` — parsing the SRC forms
* :mod:`lazyfs.image.source` — the common model (:class:`ImageSource`, layers, options, limits)
* :mod:`lazyfs.image.oci` — manifests/indexes/configs and the OCI layout source
* :mod:`lazyfs.image.archive` — docker-archive
* :mod:`lazyfs.image.registry` — the registry v2 client (auth, redirects, verification)
* :mod:`lazyfs.image.layers` — decompression, verification, applying layers (:class:`LayerTree`)
* :mod:`lazyfs.image.config` — the published config (:class:`ImageConfig`)
* :mod:`lazyfs.image.seed` — the glue (:func:`seed_image`)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from lazyfs._lazy import lazy_attributes
from lazyfs.image.reference import ImageRef, parse_image_ref

if TYPE_CHECKING:
    from lazyfs.image.config import CONFIG_ANNOTATION, ImageConfig
    from lazyfs.image.seed import ImageSeedResult, open_image_source, seed_image
    from lazyfs.image.source import ImageLimits, ImageOptions, Platform, host_platform

__all__ = [
    "CONFIG_ANNOTATION",
    "ImageConfig",
    "ImageLimits",
    "ImageOptions",
    "ImageRef",
    "ImageSeedResult",
    "Platform",
    "host_platform",
    "open_image_source",
    "parse_image_ref",
    "seed_image",
]

# The registry client pulls in aiohttp (~0.3 s): ``lazyfs seed DIR`` asks only whether SRC is an
# image reference, so everything past the parser loads on first use.
_LAZY = {
    "CONFIG_ANNOTATION": "lazyfs.image.config",
    "ImageConfig": "lazyfs.image.config",
    "ImageSeedResult": "lazyfs.image.seed",
    "open_image_source": "lazyfs.image.seed",
    "seed_image": "lazyfs.image.seed",
    "ImageLimits": "lazyfs.image.source",
    "ImageOptions": "lazyfs.image.source",
    "Platform": "lazyfs.image.source",
    "host_platform": "lazyfs.image.source",
}

__getattr__ = lazy_attributes(__name__, _LAZY)
