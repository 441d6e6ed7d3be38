"""The busybox base root filesystem, made from Debian's busybox-static."""

from __future__ import annotations

import os
import subprocess
from functools import lru_cache
from pathlib import Path

from hack.testimages.tarlayer import Entry, directory, file, symlink

BUSYBOX_ENV = "CRIB_TESTIMAGES_BUSYBOX"
DEFAULT_BUSYBOX = Path("/usr/bin/busybox")
DEFAULT_PATH = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

APP_UID = 1000
APP_GID = 1000
EXTRA_GID = 2000

PASSWD = """\
root:x:0:0:root:/root:/bin/sh
nobody:x:65534:65534:nobody:/nonexistent:/bin/false
app:x:1000:1000:app:/home/app:/bin/sh
"""

GROUP = """\
root:x:0:
nobody:x:65534:
app:x:1000:
extra:x:2000:app
"""


def busybox_path() -> Path:
    path = Path(os.environ.get(BUSYBOX_ENV) or DEFAULT_BUSYBOX)
    if not path.is_file():
        raise FileNotFoundError(
            f"busybox binary {path} not found: install Debian's busybox-static "
            f"(or point {BUSYBOX_ENV} at a static busybox)")
    return path


@lru_cache(maxsize=4)
def _applets(binary: Path) -> tuple[str, ...]:
    out = subprocess.run([str(binary), "--list"], check=True, capture_output=True, text=True)
    names = {line.strip() for line in out.stdout.splitlines()}
    names.discard("")
    names.discard("busybox")
    return tuple(sorted(names))


@lru_cache(maxsize=4)
def _busybox_entries(binary: Path) -> tuple[Entry, ...]:
    entries = [
        directory("bin"),
        file("bin/busybox", binary.read_bytes(), mode=0o755),
        *(symlink(f"bin/{name}", "busybox") for name in _applets(binary)),
        directory("dev"),
        directory("etc"),
        file("etc/passwd", PASSWD),
        file("etc/group", GROUP),
        directory("home"),
        directory("home/app", mode=0o755, uid=APP_UID, gid=APP_GID),
        directory("proc", mode=0o555),
        directory("root", mode=0o700),
        directory("sys", mode=0o555),
        directory("tmp", mode=0o1777),
        directory("usr"),
        directory("usr/bin"),
        symlink("usr/bin/env", "../../bin/busybox"),
        directory("var"),
    ]
    return tuple(entries)


def busybox_entries() -> tuple[Entry, ...]:
    """The single layer of crib-test/busybox: binary, applet symlinks in /bin, users."""
    return _busybox_entries(busybox_path())


def busybox_config(image: str, **extra: object) -> dict[str, object]:
    """The container config of a busybox-based image, labelled with its name."""
    config: dict[str, object] = {
        "Cmd": ["sh"],
        "Env": [DEFAULT_PATH],
        "Labels": {"org.crib.test.image": image},
    }
    config.update(extra)
    return config
