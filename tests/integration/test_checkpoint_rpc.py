"""CheckpointContainer and the checkpoint capability in Status, through a real daemon.

Where `criu check` fails on the host (this VM: its vDSO layout), the RPC fails
with FAILED_PRECONDITION and criu's reason, Status says so, and the success
path is skipped with that reason."""

from __future__ import annotations

import json
import subprocess
import tarfile
from pathlib import Path

import grpc
import pytest

from api import api_pb2
from runtimeservice.checkpoint import CRIU_PATH, summarize_criu_output
from runtimeservice.service import RuntimeService
from tests.integration.conftest import SeededRegistry
from tests.integration.cridaemon import (
    CtrCrib,
    code_of,
    container_config,
    create,
    ctr_crib,
    exec_sync,
    pull,
    remove,
    sandbox,
    start,
    status,
)
from tests.integration.daemon import Daemon

pytestmark = pytest.mark.integration
__all__ = ["ctr_crib"]

if not hasattr(RuntimeService, "CheckpointContainer"):
    pytest.skip("CheckpointContainer is not mixed into RuntimeService yet",
                allow_module_level=True)

CODE = grpc.StatusCode
RUNNING = api_pb2.ContainerState.CONTAINER_RUNNING


def host_criu() -> tuple[bool, str]:
    try:
        out = subprocess.run([CRIU_PATH, "check"], capture_output=True, text=True, timeout=60)
    except FileNotFoundError:
        return False, f"criu is not installed at {CRIU_PATH}"
    return out.returncode == 0, (out.stderr + out.stdout).strip()


def checkpoint_info(d: Daemon) -> dict[str, object]:
    resp = d.runtime.Status(api_pb2.StatusRequest(verbose=True))
    return dict(json.loads(resp.info["checkpoint"]))


def checkpoint(d: Daemon, cid: str, location: Path | str, timeout: int = 0) -> None:
    d.runtime.CheckpointContainer(api_pb2.CheckpointContainerRequest(
        container_id=cid, location=str(location), timeout=timeout), timeout=120)


def test_status_advertises_checkpointing_only_where_criu_check_passes(
        ctr_crib: CtrCrib) -> None:
    d = ctr_crib()
    ok, output = host_criu()
    found = checkpoint_info(d)
    assert found["available"] is ok
    reason = str(found["reason"])
    assert reason
    if not ok:  # criu's own words, without its "Error (file.c:123):" prefixes
        assert "check failed" in reason and "Error (" not in reason
        assert any(line.split("):", 1)[-1].strip() in reason
                   for line in output.splitlines() if line.startswith("Error"))


def test_checkpoint_checks_and_fails_clearly(ctr_crib: CtrCrib, test_registry: SeededRegistry,
                                            tmp_path: Path) -> None:
    d = ctr_crib()
    image = pull(d, test_registry.ref("busybox"))
    sid, pod = sandbox(d, "ckpt")
    created = create(d, sid, pod, container_config("idle", image, ["sleep", "1000"]))
    cid = create(d, sid, pod, container_config("busy", image, ["sleep", "1000"]))
    start(d, cid)
    archive = tmp_path / "busy.tar"

    code, msg = code_of(lambda: checkpoint(d, "0" * 64, archive))
    assert code == CODE.NOT_FOUND and "0" * 12 in msg
    code, msg = code_of(lambda: checkpoint(d, created, archive))
    assert code == CODE.FAILED_PRECONDITION and "created" in msg and "running" in msg
    code, msg = code_of(lambda: checkpoint(d, cid, "relative/busy.tar"))
    assert code == CODE.INVALID_ARGUMENT and "relative/busy.tar" in msg
    code, msg = code_of(lambda: checkpoint(d, cid, tmp_path / "absent" / "x.tar"))
    assert code == CODE.INVALID_ARGUMENT and "does not exist" in msg
    code, msg = code_of(lambda: checkpoint(d, cid, ""))
    assert code == CODE.INVALID_ARGUMENT and "location" in msg

    ok, _ = host_criu()
    if not ok:
        code, msg = code_of(lambda: checkpoint(d, cid, archive))
        assert code == CODE.FAILED_PRECONDITION, msg
        assert "CRIU is not usable on this host" in msg and cid in msg
        assert str(checkpoint_info(d)["reason"]) in msg
        assert not archive.exists()
    assert status(d, cid).state == RUNNING  # untouched either way
    assert not (d.root / "checkpoints").exists()  # no staging left
    remove(d, cid)
    remove(d, created)


def test_checkpoint_of_a_running_container(ctr_crib: CtrCrib, test_registry: SeededRegistry,
                                           tmp_path: Path) -> None:
    ok, output = host_criu()
    if not ok:
        pytest.skip("criu check fails on this host, checkpointing is unavailable: "
                    + (summarize_criu_output(output) or "no output"))
    d = ctr_crib()
    image = pull(d, test_registry.ref("busybox"))
    sid, pod = sandbox(d, "ckpt-ok")
    cid = create(d, sid, pod, container_config("busy", image, ["sleep", "1000"]))
    start(d, cid)
    assert exec_sync(d, cid, ["sh", "-c", "echo hi > /made-here"]).exit_code == 0
    archive = tmp_path / "busy.tar"
    checkpoint(d, cid, archive)
    with tarfile.open(archive) as tar:
        names = set(tar.getnames())
    assert {"config.dump", "spec.dump", "rootfs-diff.tar"} <= names
    assert any(n.startswith("checkpoint/") for n in names)
    assert status(d, cid).state == RUNNING
    assert exec_sync(d, cid, ["cat", "/made-here"]).stdout == b"hi\n"
    assert not (d.root / "checkpoints").exists()
    remove(d, cid)
