"""crib from this source tree, on a private socket, root and runroot.

Its configuration mirrors the containerd instance: the same runc, the same CNI
plugins on its own bridge and subnet, the local registry reached over plain
HTTP, an empty registries.conf (nothing from /etc/containers leaks in), the
streaming server on an ephemeral loopback port, metrics and tracing off, and
log level warning (no debug logging cost on the measured paths).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from hack.benchmarks.runtime import BenchRuntime

ROOT = Path(__file__).resolve().parents[2]


def render_config(registry: str, cni_dir: Path, registries_conf: Path) -> str:
    """crib.toml (see cri/config.py for the keys)."""
    return "\n".join([
        "[runtime]",
        'default_handler = "runc"',
        'cgroup_driver = "cgroupfs"',
        "",
        "[runtime.handlers.runc]",
        'path = "/usr/sbin/runc"',
        "",
        "[image]",
        f"registries_conf = {json.dumps(str(registries_conf))}",
        f"registries_conf_dir = {json.dumps(str(registries_conf.parent / 'registries.conf.d'))}",
        f"insecure_registries = [{json.dumps(registry)}]",
        "",
        "[network]",
        f"cni_conf_dir = {json.dumps(str(cni_dir))}",
        'cni_plugin_dirs = ["/usr/lib/cni"]',
        "default_network = false",
        "",
        "[streaming]",
        'address = "127.0.0.1"',
        "port = 0",
        "",
        "[metrics]",
        "enabled = false",
        "",
        "[tracing]",
        'exporter = "none"',
        "",
    ])


class Crib(BenchRuntime):
    name = "crib"

    @property
    def socket(self) -> Path:
        return self.base / "run" / "crib.sock"

    @property
    def config_path(self) -> Path:
        return self.base / "crib.toml"

    def prepare(self, registry: str, pause_image: str) -> None:
        self.base.mkdir(parents=True, exist_ok=True)
        self.write_cni()
        registries = self.base / "registries.conf"
        registries.write_text("# empty: the benchmark names its registry in crib.toml\n")
        (self.base / "registries.conf.d").mkdir(exist_ok=True)
        (self.base / "crib.d").mkdir(exist_ok=True)
        self.config_path.write_text(render_config(registry, self.cni_dir, registries))

    def argv(self) -> list[str]:
        return [sys.executable, "-m", "cri", "--config", str(self.config_path),
                "--config-dir", str(self.base / "crib.d"), "--socket", str(self.socket),
                "--root", str(self.base / "root"), "--runroot", str(self.base / "run"),
                "--log-level", "warning"]

    def cwd(self) -> Path:
        return ROOT

    def version_info(self) -> str:
        out = subprocess.run([sys.executable, "-m", "cri", "version"], capture_output=True,
                             text=True, check=False, cwd=ROOT)
        return out.stdout.strip()
