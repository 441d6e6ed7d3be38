"""The daemon as a process: serving, robustness, config errors, locking, shutdown."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import grpc
import pytest

from api import api_pb2
from tests.integration.daemon import Daemon, assert_clean_exit, new_daemon

pytestmark = pytest.mark.integration


def test_version_every_field_set(crib: Daemon) -> None:
    v = crib.runtime.Version(api_pb2.VersionRequest(version="v1"))
    assert v.version and v.runtime_name == "crib" and v.runtime_version
    assert v.runtime_api_version == "v1"


def test_status_conditions_and_handlers(crib: Daemon) -> None:
    st = crib.runtime.Status(api_pb2.StatusRequest(verbose=True))
    conds = {c.type: c for c in st.status.conditions}
    assert conds["RuntimeReady"].status is True
    # the fixture's config has no CNI config dir with a network in it
    names = [h.name for h in st.runtime_handlers]
    assert "" in names and "runc" in names
    cfg = json.loads(st.info["config"])
    assert cfg["root"] == str(crib.root)
    assert cfg["api"]["listen"] == str(crib.socket)


def test_status_network_ready_follows_cni_config(tmp_path: Path,
                                                 crib_factory: list[Daemon]) -> None:
    netd = tmp_path / "net.d"
    netd.mkdir()
    d = new_daemon(tmp_path / "d")
    d.config.write_text(f"[network]\ncni_conf_dir = '{netd}'\n")
    d.start()
    crib_factory.append(d)
    cond = {c.type: c for c in d.runtime.Status(api_pb2.StatusRequest()).status.conditions}
    assert cond["NetworkReady"].status is False
    assert cond["NetworkReady"].reason and str(netd) in cond["NetworkReady"].message
    (netd / "10-test.conflist").write_text(json.dumps(
        {"cniVersion": "1.0.0", "name": "t", "plugins": [{"type": "loopback"}]}))
    cond = {c.type: c for c in d.runtime.Status(api_pb2.StatusRequest()).status.conditions}
    assert cond["NetworkReady"].status is True


def test_status_runtime_not_ready_when_binary_missing(tmp_path: Path,
                                                      crib_factory: list[Daemon]) -> None:
    d = new_daemon(tmp_path / "d")
    d.config.write_text("[runtime.handlers.runc]\npath = '/nonexistent/runc'\n")
    d.start()
    crib_factory.append(d)
    cond = {c.type: c for c in d.runtime.Status(api_pb2.StatusRequest()).status.conditions}
    assert cond["RuntimeReady"].status is False
    assert "/nonexistent/runc" in cond["RuntimeReady"].message


def test_runtime_config_and_update(crib: Daemon) -> None:
    rc = crib.runtime.RuntimeConfig(api_pb2.RuntimeConfigRequest())
    assert rc.linux.cgroup_driver == api_pb2.CgroupDriver.CGROUPFS
    crib.runtime.UpdateRuntimeConfig(api_pb2.UpdateRuntimeConfigRequest(
        runtime_config=api_pb2.RuntimeConfig(
            network_config=api_pb2.NetworkConfig(pod_cidr="10.244.0.0/24"))))
    saved = json.loads((crib.root / "runtime-config.json").read_text())
    assert saved["pod_cidr"] == "10.244.0.0/24"


def test_every_rpc_answers(crib: Daemon) -> None:
    """All 41 RPCs answer with a status (never UNKNOWN/INTERNAL) and the daemon keeps serving."""
    answered = 0
    assert crib.channel is not None
    for svc_name in ("RuntimeService", "ImageService"):
        svc = api_pb2.DESCRIPTOR.services_by_name[svc_name]
        for m in svc.methods:
            req_cls = getattr(api_pb2, m.input_type.name)
            resp_cls = getattr(api_pb2, m.output_type.name)
            path = f"/{svc.full_name}/{m.name}"
            try:
                if m.server_streaming:
                    call = crib.channel.unary_stream(
                        path, request_serializer=req_cls.SerializeToString,
                        response_deserializer=resp_cls.FromString)
                    for _ in call(req_cls(), timeout=5):
                        break
                else:
                    call = crib.channel.unary_unary(
                        path, request_serializer=req_cls.SerializeToString,
                        response_deserializer=resp_cls.FromString)
                    call(req_cls(), timeout=5)
            except grpc.RpcError as err:
                assert err.code() not in (grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL,
                                          grpc.StatusCode.UNAVAILABLE), (m.name, err)
                if err.code() == grpc.StatusCode.UNIMPLEMENTED:
                    assert m.name in (err.details() or ""), err.details()
            answered += 1
    assert answered == 41
    assert crib.runtime.Version(api_pb2.VersionRequest()).runtime_name == "crib"


def test_garbage_on_the_socket(crib: Daemon) -> None:
    payloads = [os.urandom(4096), b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
                b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + os.urandom(1024), b""]
    for payload in payloads:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.connect(str(crib.socket))
            s.sendall(payload)
            s.settimeout(2)
            with contextlib.suppress(TimeoutError, ConnectionResetError):
                s.recv(1024)
    assert crib.runtime.Version(api_pb2.VersionRequest()).runtime_name == "crib"


def test_wrong_message_type(crib: Daemon) -> None:
    assert crib.channel is not None
    # ExecSyncResponse.stdout is field 1, bytes: as VersionRequest.version (a string) it
    # is invalid UTF-8 and must fail to decode.
    call = crib.channel.unary_unary("/runtime.v1.RuntimeService/Version",
                                    request_serializer=lambda m: m.SerializeToString(),
                                    response_deserializer=api_pb2.VersionResponse.FromString)
    with pytest.raises(grpc.RpcError) as err:
        call(api_pb2.ExecSyncResponse(stdout=b"\xff\xfe\xfd"), timeout=5)
    assert err.value.code() != grpc.StatusCode.OK
    raw = crib.channel.unary_unary("/runtime.v1.RuntimeService/Status",
                                   request_serializer=lambda b: b,
                                   response_deserializer=api_pb2.StatusResponse.FromString)
    with pytest.raises(grpc.RpcError):
        raw(b"\xff\xff\xff\xff\xff", timeout=5)
    assert crib.runtime.Version(api_pb2.VersionRequest()).runtime_name == "crib"


def test_oversized_message(crib: Daemon) -> None:
    big = api_pb2.ImageStatusRequest(image=api_pb2.ImageSpec(image="a" * (64 << 20)))
    with pytest.raises(grpc.RpcError) as err:
        crib.images.ImageStatus(big, timeout=30)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert crib.runtime.Version(api_pb2.VersionRequest()).runtime_name == "crib"


def test_second_daemon_refused(crib: Daemon, tmp_path: Path) -> None:
    other = subprocess.run(
        [*crib.argv()[:-2], "--socket", str(tmp_path / "other.sock")],
        capture_output=True, text=True, timeout=30)
    assert other.returncode != 0
    assert "another crib daemon" in other.stderr
    assert str(crib.proc.pid if crib.proc else "") in other.stderr
    assert crib.socket.exists()
    assert crib.runtime.Version(api_pb2.VersionRequest()).runtime_name == "crib"


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_stops_cleanly(tmp_path: Path, sig: int) -> None:
    d = new_daemon(tmp_path / "d")
    d.start()
    assert d.runtime.Version(api_pb2.VersionRequest()).runtime_name == "crib"
    assert_clean_exit(d, d.stop(sig))


def test_config_errors_stop_the_start(tmp_path: Path) -> None:
    d = new_daemon(tmp_path / "d")
    d.config.write_text("[runtime]\nconmon = 42\n")
    done = subprocess.run(d.argv(), capture_output=True, text=True, timeout=30)
    assert done.returncode == 2
    assert str(d.config) in done.stderr and "runtime.conmon" in done.stderr
    assert "42" in done.stderr
    assert not d.socket.exists()


def test_stale_socket_is_replaced(tmp_path: Path, crib_factory: list[Daemon]) -> None:
    d = new_daemon(tmp_path / "d")
    d.socket.parent.mkdir(parents=True)
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(d.socket))  # a socket nobody listens on, as after a crash
    d.start()
    crib_factory.append(d)
    assert d.runtime.Version(api_pb2.VersionRequest()).runtime_name == "crib"
    assert (d.socket.stat().st_mode & 0o777) == 0o660


def test_restart_after_sigkill(tmp_path: Path, crib_factory: list[Daemon]) -> None:
    d = new_daemon(tmp_path / "d")
    d.start()
    assert d.stop(signal.SIGKILL) == -signal.SIGKILL
    time.sleep(0.1)
    d.start()
    crib_factory.append(d)
    assert d.runtime.Version(api_pb2.VersionRequest()).runtime_name == "crib"
