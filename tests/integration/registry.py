"""A real registry (Debian's docker-registry) on 127.0.0.1 for integration tests.

    reg = start_registry(tmp_path / "registry")
    images = seed(reg)            # push all non-big test images (warm cache: well under 1 s)
    ...
    reg.stop()                    # terminates and reaps only that pid

The registry is our child process (not a daemon), so stop() can wait for it.
Storage lives in ``store_dir/data``; ``blob_path()`` gives a blob's file there
(for tests that corrupt a registry on purpose).
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import requests

from hack.testimages import ImageInfo, build_all, push_all, registry_blob_path

REGISTRY_BIN = os.environ.get("CRIB_REGISTRY_BIN", "/usr/bin/docker-registry")
START_TIMEOUT = 15.0
STOP_TIMEOUT = 10.0


@dataclass
class Registry:
    host: str
    port: int
    store_dir: Path
    pid: int
    auth: tuple[str, str] | None = None  # credentials when started with htpasswd
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    _log: IO[bytes] | None = field(default=None, repr=False)

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def storage_root(self) -> Path:
        return self.store_dir / "data"

    @property
    def log_path(self) -> Path:
        return self.store_dir / "registry.log"

    def blob_path(self, digest: str) -> Path:
        return registry_blob_path(self.storage_root, digest)

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self) -> None:
        """SIGTERM this registry (only its pid), SIGKILL after a grace period, reap it."""
        proc = self.process
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(STOP_TIMEOUT)
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> Registry:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def write_htpasswd(path: Path, users: dict[str, str]) -> Path:
    """An htpasswd file with bcrypt entries (the only scheme docker-registry accepts)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        import crypt  # stdlib until 3.13; bcrypt comes from libxcrypt

        lines = [f"{user}:{crypt.crypt(pw, crypt.mksalt(crypt.METHOD_BLOWFISH, rounds=16))}"
                 for user, pw in users.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def _config(store_dir: Path, host: str, port: int, htpasswd: Path | None) -> str:
    lines = [
        "version: 0.1",
        "log:",
        "  level: warn",
        "  accesslog:",
        "    disabled: true",
        "storage:",
        "  filesystem:",
        f"    rootdirectory: {store_dir / 'data'}",
        "  delete:",
        "    enabled: true",
        "  maintenance:",
        "    uploadpurging:",
        "      enabled: false",
        "http:",
        f"  addr: {host}:{port}",
        "  secret: crib-test-registry",
    ]
    if htpasswd is not None:
        lines += ["auth:", "  htpasswd:", "    realm: crib-test", f"    path: {htpasswd}"]
    return "\n".join(lines) + "\n"


def _wait_ready(reg: Registry) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if not reg.alive():
            raise RuntimeError(f"docker-registry exited during start-up:\n"
                               f"{reg.log_path.read_text(errors='replace')[-2000:]}")
        with contextlib.suppress(requests.RequestException):
            if requests.get(f"{reg.url}/v2/", timeout=1).status_code in (200, 401):
                return
        time.sleep(0.05)
    reg.stop()
    raise RuntimeError(f"docker-registry on {reg.address} did not answer /v2/ "
                       f"within {START_TIMEOUT}s")


def start_registry(store_dir: Path, port: int | None = None,
                   htpasswd: Path | None = None,
                   auth: tuple[str, str] | None = None) -> Registry:
    """Start docker-registry on 127.0.0.1 (a free port when ``port`` is None).

    With ``htpasswd`` every request needs Basic auth; pass the matching
    ``auth`` so that seed() can push.
    """
    host = "127.0.0.1"
    store_dir.mkdir(parents=True, exist_ok=True)
    (store_dir / "data").mkdir(exist_ok=True)
    attempts = 1 if port is not None else 3
    for attempt in range(attempts):
        chosen = port if port is not None else free_port(host)
        config = store_dir / "config.yml"
        config.write_text(_config(store_dir, host, chosen, htpasswd))
        log = (store_dir / "registry.log").open("ab")
        proc = subprocess.Popen([REGISTRY_BIN, "serve", str(config)], stdin=subprocess.DEVNULL,
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        reg = Registry(host, chosen, store_dir, proc.pid, auth, proc, log)
        try:
            _wait_ready(reg)
            return reg
        except RuntimeError:
            reg.stop()
            if attempt == attempts - 1:
                raise
    raise AssertionError("unreachable")


def seed(registry: Registry, cache_dir: Path | None = None) -> dict[str, ImageInfo]:
    """Build (cached) and push every non-big test image; returns their records."""
    images = build_all(cache_dir)
    push_all(registry.address, images, auth=registry.auth)
    return images
