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

from lazyfs.image.config import CONFIG_ANNOTATION, ImageConfig
from lazyfs.image.reference import ImageRef, parse_image_ref
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
