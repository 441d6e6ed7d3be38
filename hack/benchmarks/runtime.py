"""What the two benchmarked runtimes have in common: a private base directory,
a CNI network of their own, a top-level cgroup for their pods, a daemon process
the benchmark started (and alone stops), and the processes that count as theirs.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from abc import ABC, abstractmethod
from pathlib import Path
from typing import IO, Any

import grpc

from api import api_pb2, api_pb2_grpc
from hack.benchmarks import procstat
from hack.benchmarks.cri_client import POD_NAMESPACE
from hack.benchmarks.host import Owned

START_TIMEOUT = 60.0
STOP_TIMEOUT = 30.0


def cni_conflist(network: str, bridge: str, subnet: str, data_dir: Path) -> dict[str, Any]:
    """A bridge + host-local network; no masquerade or port mapping, so no iptables rules."""
    return {
        "cniVersion": "1.0.0",
        "name": network,
        "plugins": [{
            "type": "bridge",
            "bridge": bridge,
            "isGateway": True,
            "ipMasq": False,
            "hairpinMode": False,
            "ipam": {"type": "host-local", "ranges": [[{"subnet": subnet}]],
                     "routes": [{"dst": "0.0.0.0/0"}], "dataDir": str(data_dir)},
        }],
    }


class BenchRuntime(ABC):
    """One runtime under test, started on its own socket, root and state."""

    name: str = ""

    def __init__(self, base: Path, bridge: str, subnet: str) -> None:
        self.base = base
        self.bridge = bridge
        self.subnet = subnet
        self.network = f"{bridge}-net"
        self.cgroup_root = f"crib-bench-{self.name}"
        self.log_path = base / f"{self.name}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    # ------------------------------------------------------------ layout

    @property
    @abstractmethod
    def socket(self) -> Path: ...

    @property
    def cni_dir(self) -> Path:
        return self.base / "cni"

    @property
    def pod_logs(self) -> Path:
        return self.base / "pod-logs"

    def owned(self) -> Owned:
        return Owned(self.name, self.base, self.cgroup_root, self.bridge, self.subnet,
                     self.network, POD_NAMESPACE, process_markers=[str(self.base)])

    def write_cni(self) -> None:
        self.cni_dir.mkdir(parents=True, exist_ok=True)
        doc = cni_conflist(self.network, self.bridge, self.subnet, self.base / "ipam")
        (self.cni_dir / "10-bench.conflist").write_text(json.dumps(doc, indent=1) + "\n")

    # ------------------------------------------------------------ process

    @abstractmethod
    def argv(self) -> list[str]: ...

    @abstractmethod
    def prepare(self, registry: str, pause_image: str) -> None:
        """Write the runtime's configuration (called before start)."""

    def env(self) -> dict[str, str]:
        return dict(os.environ)

    def cwd(self) -> Path | None:
        return None

    def start(self) -> None:
        """Start the daemon and wait until it answers Status with runtime and network ready."""
        self.pod_logs.mkdir(parents=True, exist_ok=True)
        self._log = self.log_path.open("ab")
        self.proc = subprocess.Popen(self.argv(), stdin=subprocess.DEVNULL, stdout=self._log,
                                     stderr=subprocess.STDOUT, start_new_session=True,
                                     env=self.env(), cwd=self.cwd())
        deadline = time.monotonic() + START_TIMEOUT
        last = "no socket yet"
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode} during "
                                   f"start-up:\n{self.log_tail()}")
            if self.socket.exists():
                last = self._probe()
                if not last:
                    return
            time.sleep(0.05)
        raise RuntimeError(f"{self.name} not ready after {START_TIMEOUT}s ({last}):\n"
                           f"{self.log_tail()}")

    def _probe(self) -> str:
        """'' when ready, else why not."""
        with grpc.insecure_channel(f"unix://{self.socket}") as ch:
            stub = api_pb2_grpc.RuntimeServiceStub(ch)
            try:
                stub.Version(api_pb2.VersionRequest(), timeout=5)
            except grpc.RpcError as exc:  # UNIMPLEMENTED here: the CRI service is not up
                return f"Version: {exc.code().name}: {exc.details()}"
            try:
                status = stub.Status(api_pb2.StatusRequest(), timeout=5).status
            except grpc.RpcError as exc:
                if exc.code() == grpc.StatusCode.UNIMPLEMENTED:
                    return ""  # answers Version; Status is not there yet
                return f"Status: {exc.code().name}: {exc.details()}"
        conds = {c.type: (c.status, c.message) for c in status.conditions}
        missing = [f"{t}: {m}" for t, (ok, m) in conds.items() if not ok]
        return "; ".join(missing)

    def stop(self) -> int | None:
        """SIGTERM the daemon this benchmark started (only that pid) and reap it."""
        code = None
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
                try:
                    code = self.proc.wait(STOP_TIMEOUT)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    code = self.proc.wait(STOP_TIMEOUT)
            else:
                code = self.proc.returncode
        if self._log is not None:
            self._log.close()
            self._log = None
        return code

    @property
    def daemon_pid(self) -> int:
        assert self.proc is not None, f"{self.name} was not started"
        return self.proc.pid

    def processes(self, procs: list[procstat.ProcInfo] | None = None) -> procstat.Classified:
        """The runtime's own processes and its pods' infra processes, right now."""
        return procstat.classify(procs if procs is not None else procstat.scan(),
                                 self.daemon_pid, str(self.base))

    def daemon_rss_mib(self) -> float:
        info = procstat.read_proc(self.daemon_pid)
        return info.rss_kib / 1024 if info else 0.0

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    @abstractmethod
    def version_info(self) -> str:
        """The daemon's version, for the report's metadata."""
