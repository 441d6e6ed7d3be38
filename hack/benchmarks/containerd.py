"""containerd (Debian's 1.6 package) with its CRI plugin, all in a private directory.

Everything containerd would put elsewhere is pointed into the base directory:
root and state, the gRPC/ttrpc sockets, runc's state root (``options.Root``),
network namespaces (``netns_mounts_under_state_dir``), CNI config and IPAM data,
and the registry hosts directory. Two things cannot be moved in 1.6: shim
sockets go to ``/run/containerd/s/`` (removed by each shim on exit) and
libcni's cache to ``/var/lib/cni/results`` (removed on CNI DEL); HostGuard
checks both. cgroupfs driver, runc from Debian (``/usr/sbin/runc``) through
the runc v2 shim, plugins that would reach elsewhere (aufs, btrfs, zfs,
devmapper, the opt plugin, OTLP tracing) disabled.

The pod sandbox image is built here from Debian's static catatonit (``-P`` =
pause mode) and pushed to the local registry, because containerd runs a pause
container per pod.
"""

from __future__ import annotations

import subprocess
import tempfile
from pathlib import Path

from hack.benchmarks.host import Owned
from hack.benchmarks.runtime import BenchRuntime
from hack.testimages import RegistryClient, model
from hack.testimages.compose import BlobStore, Builder
from hack.testimages.tarlayer import file

CONTAINERD = "/usr/bin/containerd"
SHIM = "/usr/bin/containerd-shim-runc-v2"
RUNC = "/usr/sbin/runc"
CATATONIT = Path("/usr/bin/catatonit")
PAUSE_REPO = "crib-test/pause"
PAUSE_TAG = "3.9"
CRI = 'plugins."io.containerd.grpc.v1.cri"'
DISABLED_PLUGINS = [
    "io.containerd.internal.v1.opt",
    "io.containerd.snapshotter.v1.aufs",
    "io.containerd.snapshotter.v1.btrfs",
    "io.containerd.snapshotter.v1.devmapper",
    "io.containerd.snapshotter.v1.zfs",
    "io.containerd.tracing.processor.v1.otlp",
    "io.containerd.internal.v1.tracing",
]  # io.containerd.runtime.v1.linux stays: 1.6's tasks service (and so CRI) needs it


def _q(value: str) -> str:
    """A TOML basic string."""
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def render_config(base: Path, sock: Path, cni_dir: Path, pause_image: str,
                  log_level: str = "warn") -> str:
    """containerd's config.toml (version 2) for a private instance under `base`."""
    disabled = ", ".join(_q(p) for p in DISABLED_PLUGINS)
    runc = f"{CRI}.containerd.runtimes.runc"
    return "\n".join([
        "version = 2",
        f"root = {_q(str(base / 'root'))}",
        f"state = {_q(str(base / 'state'))}",
        f"disabled_plugins = [{disabled}]",
        "",
        "[grpc]",
        f"  address = {_q(str(sock))}",
        "",
        "[ttrpc]",
        f"  address = {_q(str(sock) + '.ttrpc')}",
        "",
        "[debug]",
        f"  level = {_q(log_level)}",
        "",
        f"[{CRI}]",
        f"  sandbox_image = {_q(pause_image)}",
        '  stream_server_address = "127.0.0.1"',
        '  stream_server_port = "0"',
        "  enable_selinux = false",
        "  disable_apparmor = true",
        "  restrict_oom_score_adj = true",
        "  netns_mounts_under_state_dir = true",
        "  enable_cdi = false",
        "",
        f"[{CRI}.containerd]",
        '  snapshotter = "overlayfs"',
        '  default_runtime_name = "runc"',
        "",
        f"[{runc}]",
        '  runtime_type = "io.containerd.runc.v2"',
        "",
        f"[{runc}.options]",
        f"  BinaryName = {_q(RUNC)}",
        f"  Root = {_q(str(base / 'runc'))}",
        "  SystemdCgroup = false",
        "",
        f"[{CRI}.cni]",
        '  bin_dir = "/usr/lib/cni"',
        f"  conf_dir = {_q(str(cni_dir))}",
        "  max_conf_num = 1",
        "",
        f"[{CRI}.registry]",
        f"  config_path = {_q(str(base / 'certs.d'))}",
        "",
    ])


def render_hosts_toml(registry: str) -> str:
    """hosts.toml for a plain-HTTP registry at `registry` (host:port)."""
    url = f"http://{registry}"
    return (f"server = {_q(url)}\n\n[host.{_q(url)}]\n"
            '  capabilities = ["pull", "resolve"]\n')


def push_pause_image(registry: str) -> str:
    """Build the pause image (catatonit -P) and push it; returns its reference."""
    if not CATATONIT.is_file():
        raise FileNotFoundError(f"{CATATONIT} not found (apt-get install catatonit)")
    with tempfile.TemporaryDirectory(prefix="crib-bench-pause-") as tmp:
        store = BlobStore(Path(tmp))
        builder = Builder(store)
        layer = builder.layer([file("pause", CATATONIT.read_bytes(), mode=0o755)], "pause")
        manifest = builder.image([layer], {"Entrypoint": ["/pause", "-P"],
                                           "Labels": {"org.crib.test.image": "pause"}})
        client = RegistryClient(registry)
        try:
            for digest in manifest.blobs:
                client.push_blob(PAUSE_REPO, digest, store.path(digest))
            client.push_manifest(PAUSE_REPO, PAUSE_TAG,
                                 store.read(manifest.descriptor.digest), model.OCI_MANIFEST)
        finally:
            client.close()
    return f"{registry}/{PAUSE_REPO}:{PAUSE_TAG}"


class Containerd(BenchRuntime):
    name = "containerd"

    @property
    def socket(self) -> Path:
        return self.base / "containerd.sock"

    @property
    def config_path(self) -> Path:
        return self.base / "config.toml"

    def prepare(self, registry: str, pause_image: str) -> None:
        for binary in (CONTAINERD, SHIM, RUNC):
            if not Path(binary).is_file():
                raise FileNotFoundError(f"{binary} not found (apt-get install containerd runc)")
        self.base.mkdir(parents=True, exist_ok=True)
        self.write_cni()
        hosts = self.base / "certs.d" / registry
        hosts.mkdir(parents=True, exist_ok=True)
        (hosts / "hosts.toml").write_text(render_hosts_toml(registry))
        self.config_path.write_text(render_config(self.base, self.socket, self.cni_dir,
                                                  pause_image))

    def owned(self) -> Owned:
        owned = super().owned()
        owned.outside_files = self.shim_sockets
        return owned

    def shim_sockets(self) -> list[Path]:
        """Sockets of this instance's shims in /run/containerd/s (from each task's address)."""
        found = []
        for addr in (self.base / "state" / "io.containerd.runtime.v2.task").glob("*/*/address"):
            text = addr.read_text(errors="replace").strip()
            if text.startswith("unix://"):
                found.append(Path(text.removeprefix("unix://")))
        return found

    def argv(self) -> list[str]:
        return [CONTAINERD, "--config", str(self.config_path)]

    def version_info(self) -> str:
        out = subprocess.run([CONTAINERD, "--version"], capture_output=True, text=True,
                             check=False)
        return out.stdout.strip()
