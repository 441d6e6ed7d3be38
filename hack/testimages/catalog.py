"""The recipes of crib's own test images (repositories under ``crib-test/``).

Each recipe builds its blobs with a Builder and returns a BuiltImage. Layer
contents are plain Entry lists, so the expected final tree can be computed
from the same data (see tree.py).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

from hack.testimages.compose import Builder, BuiltImage, Layer
from hack.testimages.rootfs import APP_GID, APP_UID, DEFAULT_PATH, busybox_config, busybox_entries
from hack.testimages.tarlayer import (
    Compression,
    Entry,
    chardev,
    directory,
    file,
    hardlink,
    opaque,
    symlink,
    whiteout,
)

BIG_LAYERS = 8
BIG_LAYER_BYTES = 25 << 20  # 8 x 25 MiB = 200 MiB of incompressible data

# Where a broken unpacker would write the evil images' files.
EVIL_DOTDOT_NAME = "crib-evil-dotdot-escape"  # beside the rootfs directory
EVIL_ABS_HOST_PATH = "/tmp/crib-evil-abs-escape"
EVIL_SYMLINK_HOST_PATH = "/tmp/crib-evil-symlink-escape"
EVIL_SYMLINK_REL_HOST_PATH = "/tmp/crib-evil-symlink-rel-escape"

BAD_DIGEST_FILE = "bad-digest.txt"
BAD_DIGEST_CONTENT = "original content of the bad-digest layer\n"


@dataclass(frozen=True)
class Recipe:
    build: Callable[[Builder], BuiltImage]
    default: bool = True  # built by build_all(); False: only on request


def _base(b: Builder, compression: Compression = Compression.GZIP,
          docker: bool = False) -> Layer:
    return b.layer(busybox_entries(), "busybox base", compression, docker)


def _single(b: Builder, name: str, layers: list[Layer], tags: list[str] | None = None,
            **config: object) -> BuiltImage:
    manifest = b.image(layers, busybox_config(name, **config))
    return BuiltImage(tags or ["latest"], manifest.descriptor, [manifest])


def busybox(b: Builder) -> BuiltImage:
    return _single(b, "busybox", [_base(b)], tags=["latest", "1", "stable"])


def layered(b: Builder) -> BuiltImage:
    first = [
        directory("data"),
        file("data/keep.txt", "kept from layer 1\n"),
        file("data/remove-me.txt", "deleted by a whiteout in layer 2\n"),
        file("data/replace-me.txt", "version 1\n"),
        directory("data/dir-to-remove"),
        file("data/dir-to-remove/a.txt", "a\n"),
        directory("data/dir-to-remove/sub"),
        file("data/dir-to-remove/sub/b.txt", "b\n"),
        directory("data/opaque"),
        file("data/opaque/old.txt", "hidden by the opaque marker\n"),
        directory("data/opaque/oldsub"),
        file("data/opaque/oldsub/old2.txt", "hidden too\n"),
        file("data/owned.txt", "owned by app, mode 0640\n", mode=0o640, uid=APP_UID,
             gid=APP_GID),
        file("data/xattr.txt", "carries a user xattr\n",
             xattrs={"user.crib.test": "hello-xattr"}),
        file("data/hardlink-src.txt", "one inode, two names\n"),
        hardlink("data/hardlink-dst.txt", "data/hardlink-src.txt"),
        symlink("data/symlink", "keep.txt"),
        symlink("data/abs-symlink", "/data/keep.txt"),
        file("data/script.sh", "#!/bin/sh\necho layered\n", mode=0o755),
        directory("data/private", mode=0o700, uid=APP_UID, gid=APP_GID),
        file("data/private/secret.txt", "secret\n", mode=0o600, uid=APP_UID, gid=APP_GID),
        directory("opt"),
        directory("opt/devices"),
        chardev("opt/devices/null", 1, 3),
    ]
    second = [
        directory("data"),
        whiteout("data/remove-me.txt"),
        whiteout("data/dir-to-remove"),
        whiteout("bin/vi"),
        directory("data/opaque"),
        opaque("data/opaque"),
        file("data/opaque/new.txt", "added with the opaque marker\n"),
        file("data/replace-me.txt", "version 2\n"),
        file("data/setuid", "#!/bin/sh\n", mode=0o4755),
    ]
    third = [
        directory("data"),
        file("data/remove-me.txt", "back again in layer 3\n", mode=0o600),
        directory("data/dir-to-remove"),
        file("data/dir-to-remove/fresh.txt", "recreated directory\n"),
    ]
    layers = [_base(b), b.layer(first, "layered 1: content"),
              b.layer(second, "layered 2: whiteouts and opaque"),
              b.layer(third, "layered 3: re-added paths")]
    return _single(b, "layered", layers)


def _marker(b: Builder, arch: str, compression: Compression = Compression.GZIP) -> Layer:
    return b.layer([file("arch", f"{arch}\n")], f"marker {arch}", compression)


def multiarch(b: Builder) -> BuiltImage:
    amd64 = b.image([_base(b), _marker(b, "amd64")], busybox_config("multiarch"),
                    platform="linux/amd64")
    arm64 = b.image([_marker(b, "arm64")], busybox_config("multiarch"), platform="linux/arm64")
    return BuiltImage(["latest"], b.index([amd64, arm64]), [amd64, arm64])


def _s390x(b: Builder, name: str) -> BuiltImage:
    manifest = b.image([_marker(b, "s390x")], busybox_config(name), platform="linux/s390x")
    return BuiltImage(["latest"], manifest.descriptor, [manifest])


def foreign(b: Builder) -> BuiltImage:
    single = _s390x(b, "foreign")
    return BuiltImage(["latest"], b.index(single.manifests), single.manifests)


def foreign_manifest(b: Builder) -> BuiltImage:
    return _s390x(b, "foreign-manifest")


def _users(user: str, name: str) -> Recipe:
    return Recipe(lambda b: _single(b, name, [_base(b)], User=user))


def config(b: Builder) -> BuiltImage:
    work = b.layer([directory("work"), file("work/README", "the config image's workdir\n")],
                   "config workdir")
    manifest = b.image([_base(b), work], {
        "Entrypoint": ["/bin/sh", "-c"],
        "Cmd": ["echo hello"],
        "Env": ["FOO=bar", DEFAULT_PATH],
        "WorkingDir": "/work",
        "StopSignal": "SIGUSR1",
        "ExposedPorts": {"8080/tcp": {}},
        "Labels": {"org.crib.test.image": "config", "org.crib.test.purpose": "image-config"},
    })
    return BuiltImage(["latest"], manifest.descriptor, [manifest])


def zstd(b: Builder) -> BuiltImage:
    layers = [_base(b, Compression.ZSTD),
              b.layer([file("zstd.txt", "zstd\n")], "zstd marker", Compression.ZSTD)]
    return _single(b, "zstd", layers)


def docker_schema2(b: Builder) -> BuiltImage:
    manifest = b.image([_base(b, docker=True)], busybox_config("docker-schema2"), docker=True)
    return BuiltImage(["latest"], manifest.descriptor, [manifest])


def docker_list(b: Builder) -> BuiltImage:
    manifest = b.image([_base(b, docker=True)], busybox_config("docker-list"), docker=True)
    return BuiltImage(["latest"], b.index([manifest], docker=True), [manifest])


def big(b: Builder) -> BuiltImage:
    layers = [_base(b)]
    for i in range(BIG_LAYERS):
        data = random.Random(f"crib-big-{i}").randbytes(BIG_LAYER_BYTES)
        layers.append(b.layer([directory("big"), file(f"big/data-{i}.bin", data)],
                              f"big {i}", level=1))
    return _single(b, "big", layers)


def bad_digest_layer_entries(content: str = BAD_DIGEST_CONTENT) -> list[Entry]:
    return [file(BAD_DIGEST_FILE, content)]


def bad_digest(b: Builder) -> BuiltImage:
    layer = b.layer(bad_digest_layer_entries(), "bad-digest payload", Compression.NONE)
    manifest = b.image([layer], {"Cmd": ["/bin/sh"]})
    return BuiltImage(["latest"], manifest.descriptor, [manifest],
                      notes={"corrupt_layer": layer.descriptor.digest})


def _evil(b: Builder, name: str, entries: list[Entry], notes: dict[str, str]) -> BuiltImage:
    layer = b.layer(entries, name)
    manifest = b.image([layer], {"Cmd": ["/bin/sh"], "Labels": {"org.crib.test.image": name}})
    return BuiltImage(["latest"], manifest.descriptor, [manifest], with_tree=False, notes=notes)


def evil_dotdot(b: Builder) -> BuiltImage:
    entries = [directory("ok"), file("ok/file.txt", "fine\n"),
               file(f"../{EVIL_DOTDOT_NAME}", "escaped via ..\n")]
    return _evil(b, "evil-dotdot", entries, {"escape_relative_to_rootfs": f"../{EVIL_DOTDOT_NAME}"})


def evil_abs(b: Builder) -> BuiltImage:
    entries = [directory("ok"), file("ok/file.txt", "fine\n"),
               file(EVIL_ABS_HOST_PATH, "escaped via an absolute name\n")]
    return _evil(b, "evil-abs", entries, {"host_path": EVIL_ABS_HOST_PATH})


def evil_symlink(b: Builder) -> BuiltImage:
    entries = [
        symlink("escape-link", "/tmp"),
        file("escape-link/" + EVIL_SYMLINK_HOST_PATH.rsplit("/", 1)[1], "through /tmp\n"),
        symlink("escape-rel", "../../../../../../../../../../tmp"),
        file("escape-rel/" + EVIL_SYMLINK_REL_HOST_PATH.rsplit("/", 1)[1], "through ../\n"),
    ]
    notes = {"host_path": EVIL_SYMLINK_HOST_PATH,
             "host_path_relative_link": EVIL_SYMLINK_REL_HOST_PATH}
    return _evil(b, "evil-symlink", entries, notes)


RECIPES: dict[str, Recipe] = {
    "busybox": Recipe(busybox),
    "layered": Recipe(layered),
    "multiarch": Recipe(multiarch),
    "foreign": Recipe(foreign),
    "foreign-manifest": Recipe(foreign_manifest),
    "users-numeric": _users("1000", "users-numeric"),
    "users-name": _users("app", "users-name"),
    "users-namegroup": _users("app:extra", "users-namegroup"),
    "config": Recipe(config),
    "zstd": Recipe(zstd),
    "docker-schema2": Recipe(docker_schema2),
    "docker-list": Recipe(docker_list),
    "evil-dotdot": Recipe(evil_dotdot),
    "evil-abs": Recipe(evil_abs),
    "evil-symlink": Recipe(evil_symlink),
    "big": Recipe(big, default=False),
    "bad-digest": Recipe(bad_digest, default=False),
}
