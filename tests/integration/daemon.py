"""Start a real crib daemon on a temporary socket, root and runroot, for tests."""

from __future__ import annotations

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
