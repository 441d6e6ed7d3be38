"""crib's own test images, built deterministically from Debian packages.

    from hack.testimages import build_all, push_all
    images = build_all()                # cached in $CRIB_TESTIMAGES_CACHE or
                                        # /var/cache/crib/testimages
    push_all("127.0.0.1:5000", images)  # own minimal push client (push.py)

CLI: ``python3 -m hack.testimages build [--big]`` and
``python3 -m hack.testimages push HOST:PORT [--big]``.
"""

from hack.testimages.build import build_all, build_image, build_images
from hack.testimages.corrupt import BadDigest, corrupt_blob, make_bad_digest, registry_blob_path
from hack.testimages.model import (
    ImageInfo,
    PlatformManifest,
    default_cache_dir,
    host_platform,
)
from hack.testimages.push import PushError, RegistryClient, push_all
from hack.testimages.tree import load_tree

__all__ = [
    "BadDigest",
    "ImageInfo",
    "PlatformManifest",
    "PushError",
    "RegistryClient",
    "build_all",
    "build_image",
    "build_images",
    "corrupt_blob",
    "default_cache_dir",
    "host_platform",
    "load_tree",
    "make_bad_digest",
    "push_all",
    "registry_blob_path",
]
