"""Start a real crib daemon on a temporary socket, root and runroot, for tests."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from api import api_pb2, api_pb2_grpc

ROOT = Path(__file__).resolve().parents[2]


@dataclass
class Daemon:
    base: Path
    socket: Path
    root: Path
    runroot: Path
    config: Path
    log: Path
    proc: subprocess.Popen[bytes] | None = None
    channel: grpc.Channel | None = None
    extra_args: list[str] = field(default_factory=list)

    @property
    def runtime(self) -> api_pb2_grpc.RuntimeServiceStub:
        assert self.channel is not None
        return api_pb2_grpc.RuntimeServiceStub(self.channel)

    @property
    def images(self) -> api_pb2_grpc.ImageServiceStub:
        assert self.channel is not None
        return api_pb2_grpc.ImageServiceStub(self.channel)

    def argv(self) -> list[str]:
        return [sys.executable, "-m", "cri", "--config", str(self.config),
                "--config-dir", str(self.base / "crib.d"), "--socket", str(self.socket),
                "--root", str(self.root), "--runroot", str(self.runroot),
                "--log-level", "debug", *self.extra_args]

    def start(self, timeout: float = 30.0) -> None:
        logfile = self.log.open("ab")
        self.proc = subprocess.Popen(self.argv(), cwd=ROOT, stdout=logfile, stderr=logfile,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        logfile.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"crib exited with {self.proc.returncode}:\n"
                                   + self.log.read_text())
            if self.socket.exists():
                break
            time.sleep(0.02)
        else:
            raise RuntimeError("crib did not create its socket:\n" + self.log.read_text())
        self.channel = grpc.insecure_channel(f"unix://{self.socket}")
        grpc.channel_ready_future(self.channel).result(timeout=timeout)
        self.wait_ready(deadline)

    def wait_ready(self, deadline: float) -> None:
        """Wait until the daemon has recovered its state (it answers UNAVAILABLE until then)."""
        while True:
            try:
                self.runtime.RuntimeConfig(api_pb2.RuntimeConfigRequest(), timeout=5)
                return
            except grpc.RpcError as err:
                if err.code() != grpc.StatusCode.UNAVAILABLE or time.monotonic() > deadline:
                    raise
            time.sleep(0.02)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        if self.channel is not None:
            self.channel.close()
            self.channel = None
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        code = self.proc.wait(timeout)
        return code

    def session_leftovers(self) -> list[str]:
        """Processes still in the daemon's session (other than deliberate monitors)."""
        assert self.proc is not None
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            fields = stat.rsplit(")", 1)[1].split()
            if int(fields[3]) == self.proc.pid:  # session id
                found.append(f"{entry.name} {stat[:80]}")
        return found


def new_daemon(base: Path) -> Daemon:
    base.mkdir(parents=True, exist_ok=True)
    config = base / "crib.toml"
    if not config.exists():
        config.write_text("")
    # Streaming on an ephemeral port: tests run several daemons at once.
    dropins = base / "crib.d"
    dropins.mkdir(exist_ok=True)
    (dropins / "00-test-streaming.toml").write_text("[streaming]\nport = 0\n")
    return Daemon(base=base, socket=base / "run" / "crib.sock", root=base / "root",
                  runroot=base / "run", config=config, log=base / "crib.log")


def assert_clean_exit(d: Daemon, code: int) -> None:
    log = d.log.read_text()
    assert code == 0, f"crib exited with {code}:\n{log}"
    assert not d.socket.exists(), "socket left behind"
    assert not (d.runroot / "crib.lock").exists(), "lock left behind"
    assert not d.session_leftovers(), d.session_leftovers()
    assert "Traceback" not in log, log


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


# ---------------------------------------------------------------- pod networking


def _run_index() -> int:
    """A number that keeps this test process's network apart from any other test run's.

    Test runs may overlap on one machine (several checkouts, a benchmark); each
    uses bridge crt<N> and subnet 10.199.<N>.0/24, with N free when picked.
    """
    start = os.getpid() % 180
    for i in range(180):
        n = 20 + (start + i) % 180
        if not Path(f"/sys/class/net/crt{n}").exists():
            return n
    raise RuntimeError("no free test network index")


RUN_INDEX = _run_index()


@dataclass
class PodNet:
    """A CNI network for sandbox tests: its own bridge, subnet, IPAM store and plugins dir."""

    conf_dir: Path
    plugin_dir: Path
    ipam: Path
    name: str = f"cribtest-{RUN_INDEX}"
    bridge: str = f"crt{RUN_INDEX}"
    subnet: str = f"10.199.{RUN_INDEX}.0/24"

    @property
    def gateway(self) -> str:
        return self.subnet.rsplit(".", 1)[0] + ".1"

    def write(self, extra_plugins: list[dict[str, object]] | None = None) -> None:
        """Write the conflist: bridge + host-local, any extra plugins, then portmap."""
        from runtimeservice import cni

        conf = cni.default_conflist(self.subnet, self.bridge, data_dir=self.ipam, name=self.name)
        plugins = conf["plugins"]
        conf["plugins"] = [plugins[0], *(extra_plugins or []), *plugins[1:]]
        self.conf_dir.mkdir(parents=True, exist_ok=True)
        self.plugin_dir.mkdir(parents=True, exist_ok=True)
        (self.conf_dir / "10-cribtest.conflist").write_text(json.dumps(conf))

    def allocated(self) -> list[str]:
        """IPs host-local has handed out and not released."""
        d = self.ipam / self.name
        return sorted(p.name for p in d.iterdir() if p.name[0].isdigit()) if d.is_dir() else []

    def veths(self) -> list[str]:
        out = subprocess.run(["ip", "-o", "link", "show", "master", self.bridge],
                             capture_output=True, text=True).stdout
        return [line.split(":")[1].strip() for line in out.splitlines() if line.strip()]

    def nat_rules(self) -> list[str]:
        prefix = self.subnet.rsplit(".", 1)[0] + "."
        out = subprocess.run(["iptables-save", "-t", "nat"], capture_output=True,
                             text=True).stdout
        return [line for line in out.splitlines() if prefix in line]


def pod_daemon(base: Path, net: PodNet, extra_config: str = "") -> Daemon:
    """A daemon (not started) whose config points at `net`."""
    d = new_daemon(base)
    d.config.write_text(
        "[network]\n"
        f"cni_conf_dir = '{net.conf_dir}'\n"
        f"cni_plugin_dirs = ['{net.plugin_dir}', '/usr/lib/cni']\n" + extra_config)
    return d


def mounts_under(root: Path) -> list[str]:
    with open("/proc/self/mountinfo") as fh:
        points = [line.split()[4] for line in fh]
    return [p for p in points if p == str(root) or p.startswith(f"{root}/")]


def private_roots(d: Daemon) -> list[Path]:
    """Directories crib bind-mounts onto themselves (private propagation), once per runroot."""
    return [d.runroot / "ns", d.runroot / "pods"]


def release_private_roots(d: Daemon) -> None:
    from runtimeservice import namespaces

    for root in private_roots(d):
        namespaces.release_root(root)


def sandbox_leftovers(d: Daemon, net: PodNet, cgroup_parent: str) -> list[str]:
    """Everything a removed sandbox could leave behind, as readable strings."""
    from runtimeservice import cgroups

    found: list[str] = []
    allowed = {str(p) for p in private_roots(d)}
    found += [f"mount {m}" for m in mounts_under(d.base) if m not in allowed]
    for parent in (d.runroot / "ns", d.runroot / "pods", d.root / "pods"):
        if parent.is_dir():
            found += [f"directory {p}" for p in parent.iterdir()]
    if (d.root / "sandboxes").is_dir():
        found += [f"record {p}" for p in (d.root / "sandboxes").glob("*.json")]
    runc_state = d.runroot / "runtimes" / "runc"
    if runc_state.is_dir():
        found += [f"runc state {p}" for p in runc_state.iterdir()]
    found += [f"veth {v}" for v in net.veths()]
    found += [f"IP {ip}" for ip in net.allocated()]
    found += [f"nat rule {r}" for r in net.nat_rules()]
    for h in cgroups.detect().hierarchies():
        top = h / cgroup_parent.strip("/")
        if top.is_dir():
            found += [f"cgroup {p}" for p in top.iterdir() if p.is_dir()]
    return found
