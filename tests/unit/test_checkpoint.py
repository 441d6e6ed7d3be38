"""Checkpoint archives (assembly, validation, the writable layer's changes), the
`criu check` probe and the checkpoint flow's ordering, with fake criu/runtime
programs. No root: whiteouts and opaque dirs are covered by the integration test."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import stat
import sys
import tarfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from cri.errors import CribError, FailedPrecondition, Internal, InvalidArgument, NotFound
from runtimeservice import checkpoint_archive as ca
from runtimeservice.checkpoint import (
    CheckpointResult,
    checkpoint,
    checkpoint_args,
    criu_available,
    dump_log_errors,
    summarize_criu_output,
)
from runtimeservice.checkpoint_archive import ContainerInfo
from runtimeservice.oci import OciRuntime, OciState, OciStatus, RuntimeFlavor

CRIU_VDSO_FAILURE = """\
Error (criu/vdso.c:381): vdso: Unexpected rt vDSO area bounds
Error (criu/vdso.c:613): vdso: Failed to fill self vdso symtable
Error (criu/kerndat.c:1615): kerndat_vdso_fill_symtable failed when initializing kerndat.
Error (criu/crtools.c:260): Could not initialize kernel features detection.
Error (criu/vdso.c:381): vdso: Unexpected rt vDSO area bounds
"""


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def script(path: Path, body: str) -> str:
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)
    return str(path)


# ---------------------------------------------------------------- pure pieces


def test_go_time_matches_rfc3339nano() -> None:
    assert ca.go_time(0) == "0001-01-01T00:00:00Z"
    assert ca.go_time(1_700_000_000_000_000_000) == "2023-11-14T22:13:20Z"
    assert ca.go_time(1_700_000_000_123_000_000) == "2023-11-14T22:13:20.123Z"
    assert ca.go_time(1_700_000_000_000_000_001) == "2023-11-14T22:13:20.000000001Z"


def test_config_dump_has_cri_o_fields() -> None:
    info = ContainerInfo("c" * 64, "k8s_app_pod_ns_uid_0", "busybox",
                         "sha256:" + "a" * 64, "docker.io/library/busybox:latest", "runc",
                         1_700_000_000_000_000_000)
    dump = ca.config_dump(info, 1_700_000_100_000_000_000)
    assert dump == {
        "id": "c" * 64,
        "name": "k8s_app_pod_ns_uid_0",
        "rootfsImage": "busybox",
        "rootfsImageRef": "sha256:" + "a" * 64,
        "rootfsImageName": "docker.io/library/busybox:latest",
        "runtime": "runc",
        "createdTime": "2023-11-14T22:13:20Z",
        "checkpointedTime": "2023-11-14T22:15:00Z",
        "restoredTime": "0001-01-01T00:00:00Z",
        "restored": False,
    }


def test_archive_location_validation(tmp_path: Path) -> None:
    assert ca.validate_archive_path(str(tmp_path / "a.tar")) == tmp_path / "a.tar"
    for bad, words in [
        ("", "empty"),
        ("relative/a.tar", "not an absolute path"),
        (str(tmp_path / "missing" / "a.tar"), "does not exist"),
        (str(tmp_path), "is a directory"),
        (str(tmp_path / "x") + "/", "is a directory"),
    ]:
        with pytest.raises(InvalidArgument, match=words) as info:
            ca.validate_archive_path(bad)
        assert repr(bad) in info.value.message or bad == ""


def test_summarize_criu_output_strips_prefixes_and_repeats() -> None:
    summary = summarize_criu_output(CRIU_VDSO_FAILURE)
    assert summary.startswith("vdso: Unexpected rt vDSO area bounds; vdso: Failed")
    assert summary.count("Unexpected rt vDSO") == 1 and "criu/vdso.c" not in summary
    assert len(summarize_criu_output("x" * 1000, limit=50)) == 50


def test_dump_log_errors(tmp_path: Path) -> None:
    assert dump_log_errors(tmp_path) == ""
    (tmp_path / "dump.log").write_text(
        "(00.001) Version: 3.17.1\n"
        "(00.023) Error (criu/vdso.c:613): vdso: Failed to fill self vdso symtable\n"
        "(00.024) Found mmap_min_addr 0x10000\n"
        "(00.025) Error (criu/cr-dump.c:2093): Dumping FAILED.\n")
    assert dump_log_errors(tmp_path) == (
        "vdso: Failed to fill self vdso symtable; Dumping FAILED.")


def test_checkpoint_args_for_runc_and_crun() -> None:
    runc = OciRuntime("runc", "/usr/sbin/runc", "/run/crib/runc")
    args = checkpoint_args(runc, "cid", Path("/w/s/checkpoint"), Path("/w/s"),
                           leave_running=True)
    assert args == ["--criu", "/usr/sbin/criu", "checkpoint", "--image-path", "/w/s/checkpoint",
                    "--work-path", "/w/s", "--leave-running", "cid"]
    assert runc.argv(args)[:6] == ["/usr/sbin/runc", "--root", "/run/crib/runc",
                                   "--log-format", "json", "--criu"]
    crun = OciRuntime("crun", "/usr/bin/crun", "/run/crib/crun")
    assert crun.flavor is RuntimeFlavor.CRUN
    args = checkpoint_args(crun, "cid", Path("/i"), Path("/w"), leave_running=False,
                           tcp_established=True, file_locks=True, criu_path="/opt/criu")
    assert args == ["checkpoint", "--image-path", "/i", "--work-path", "/w",
                    "--tcp-established", "--file-locks", "cid"]


def test_mount_destinations_and_bind_mounts(tmp_path: Path) -> None:
    (tmp_path / "hosts").write_text("127.0.0.1 localhost\n")
    (tmp_path / "hosts").chmod(0o644)
    (tmp_path / "data").mkdir(mode=0o750)
    (tmp_path / "data").chmod(0o750)
    spec = {"mounts": [
        {"destination": "/proc", "type": "proc", "source": "proc"},
        {"destination": "/etc/hosts", "type": "bind", "source": str(tmp_path / "hosts"),
         "options": ["rbind", "ro"]},
        {"destination": "/data/", "source": str(tmp_path / "data"), "options": ["rbind"]},
        {"destination": "/dev/shm", "type": "bind", "source": str(tmp_path / "data")},
        {"destination": "/gone", "type": "bind", "source": str(tmp_path / "missing")},
        {"destination": "/t", "type": "tmpfs", "source": "tmpfs"},
    ]}
    dests = ca.mount_destinations(spec)
    assert {"/proc", "/etc/hosts", "/data", "/t", "/sys", "/run"} <= dests
    assert ca.bind_mounts(spec) == [
        {"source": str(tmp_path / "hosts"), "destination": "/etc/hosts",
         "file_type": "file", "permissions": 0o644},
        {"source": str(tmp_path / "data"), "destination": "/data/",
         "file_type": "directory", "permissions": 0o750},
    ]
    assert ca.bind_mounts({}) == []


def make_upper(root: Path) -> Path:
    upper = root / "upper"
    (upper / "etc").mkdir(parents=True)
    (upper / "etc" / "motd").write_text("hello\n")
    (upper / "tmp" / "deep").mkdir(parents=True)
    (upper / "tmp" / "deep" / "file").write_bytes(b"\0" * 5000)
    os.link(upper / "tmp" / "deep" / "file", upper / "tmp" / "hardlink")
    (upper / "tmp" / "link").symlink_to("deep/file")
    (upper / "proc").mkdir()  # a mount point the runtime made
    (upper / "proc" / "inside").write_text("kept")
    return upper


def test_scan_upper_lists_changes_and_skips_mount_points(tmp_path: Path) -> None:
    upper = make_upper(tmp_path)
    sock = socket.socket(socket.AF_UNIX)
    try:
        sock.bind(str(upper / "tmp" / "sock"))
        changes = ca.scan_upper(upper, skip={"/proc", "/etc/hosts"})
    finally:
        sock.close()
    assert changes.include == ("etc", "etc/motd", "proc/inside", "tmp", "tmp/deep",
                               "tmp/deep/file", "tmp/hardlink", "tmp/link")
    assert changes.deleted == ()


def test_hidden_lower_entries(tmp_path: Path) -> None:
    lower1, lower2 = tmp_path / "l1", tmp_path / "l2"
    (lower1 / "d" / "a").mkdir(parents=True)
    (lower1 / "d" / "b").write_text("b")
    (lower2 / "d").mkdir(parents=True)
    (lower2 / "d" / "c").write_text("c")
    (lower2 / "d" / "keep").write_text("k")
    (lower2 / "f").write_text("not a dir")
    hidden = ca._hidden_lower_entries("d", {"keep"}, [lower1, lower2, tmp_path / "none"])
    assert hidden == {"a", "b", "c"}
    assert ca._hidden_lower_entries("f", set(), [lower2]) == set()


def test_rootfs_diff_tar_content(tmp_path: Path) -> None:
    upper = make_upper(tmp_path)
    changes = ca.scan_upper(upper, skip={"/proc"})
    ca.write_rootfs_diff(upper, changes.include, tmp_path / "diff.tar")
    with tarfile.open(tmp_path / "diff.tar") as tf:
        members = {m.name: m for m in tf.getmembers()}
        assert list(members) == list(changes.include)
        assert members["tmp/hardlink"].islnk() or members["tmp/deep/file"].islnk()
        assert members["tmp/link"].issym() and members["tmp/link"].linkname == "deep/file"
        assert members["etc"].isdir() and members["etc/motd"].uname == ""
        f = tf.extractfile("etc/motd")
        assert f is not None and f.read() == b"hello\n"


def fake_stage(stage: Path) -> None:
    (stage / "checkpoint").mkdir(parents=True)
    (stage / "checkpoint" / "core-1.img").write_bytes(b"core")
    (stage / "checkpoint" / "pages-1.img").write_bytes(b"\1" * 8192)
    (stage / "dump.log").write_text("(00.1) Dumping finished successfully\n")


def test_archive_round_trip(tmp_path: Path) -> None:
    stage, upper = tmp_path / "stage", make_upper(tmp_path)
    fake_stage(stage)
    spec = {"ociVersion": "1.0.2", "mounts": [{"destination": "/proc", "type": "proc"}]}
    info = ContainerInfo("c1", "name", runtime="runc", created_at=1)
    ca.stage_metadata(stage, spec, info, 2_000_000_000)
    changes = ca.RootfsChanges(("etc", "etc/motd"), ("/bin/yes", "/var/cache/x"))
    ca.stage_rootfs(stage, upper, changes)
    target = tmp_path / "out" / "checkpoint.tar"
    target.parent.mkdir()
    members = ca.write_archive(stage, target)
    assert members == ("checkpoint", "dump.log", "config.dump", "spec.dump",
                       "rootfs-diff.tar", "deleted.files")
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    assert os.listdir(target.parent) == ["checkpoint.tar"]  # no temp file left
    got = ca.inspect_archive(target)
    assert got.members == frozenset(members)
    assert got.config["id"] == "c1" and got.config["checkpointedTime"] == "1970-01-01T00:00:02Z"
    assert got.spec == spec
    assert got.rootfs_diff == ("etc", "etc/motd")
    assert got.deleted_files == ("/bin/yes", "/var/cache/x")
    assert sorted(got.image_files) == ["core-1.img", "pages-1.img"]
    with tarfile.open(target) as tf:
        names = tf.getnames()
    assert "bind.mounts" not in names and all(not n.startswith(("/", "./")) for n in names)


def test_write_archive_is_atomic_and_leaves_nothing_on_failure(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    stage = tmp_path / "stage"
    fake_stage(stage)
    target = tmp_path / "out" / "a.tar"
    target.parent.mkdir()
    with pytest.raises(Internal, match=r"lacks config\.dump, spec\.dump"):
        ca.write_archive(stage, target)
    assert os.listdir(target.parent) == []
    ca.stage_metadata(stage, {}, ContainerInfo("c1"), 1)
    target.write_bytes(b"previous archive")

    def broken(raw: Any, stage: Path, members: Sequence[str]) -> None:
        raw.write(b"half an archive")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ca, "_tar_members", broken)
    with pytest.raises(OSError, match="No space"):
        ca.write_archive(stage, target)
    assert os.listdir(target.parent) == ["a.tar"]
    assert target.read_bytes() == b"previous archive"


def test_inspect_archive_rejects_other_files(tmp_path: Path) -> None:
    junk = tmp_path / "junk.tar"
    junk.write_bytes(b"not a tar at all" * 100)
    with pytest.raises(InvalidArgument, match="not a readable checkpoint archive"):
        ca.inspect_archive(junk)
    other = tmp_path / "other.tar"
    (tmp_path / "config.dump").write_text("{}")
    with tarfile.open(other, "w") as tf:
        tf.add(tmp_path / "config.dump", arcname="config.dump")
    with pytest.raises(InvalidArgument, match=r"no checkpoint, spec\.dump"):
        ca.inspect_archive(other)


# ---------------------------------------------------------------- criu check


def test_criu_available_reports_failure_reason_and_caches(tmp_path: Path) -> None:
    calls = tmp_path / "calls"
    body = f'echo x >> {calls}\ncat >&2 <<"EOF"\n{CRIU_VDSO_FAILURE}EOF\nexit 1\n'
    criu = script(tmp_path / "criu-bad", body)
    ok, reason = run(criu_available(criu))
    assert not ok
    assert reason.startswith(f"{criu} check failed (exit 1): vdso: Unexpected rt vDSO")
    assert run(criu_available(criu)) == (ok, reason)
    assert calls.read_text().count("x") == 1  # cached
    run(criu_available(criu, refresh=True))
    assert calls.read_text().count("x") == 2


def test_criu_available_success_and_missing(tmp_path: Path) -> None:
    good = script(tmp_path / "criu-good", 'echo "Looks good."\n')
    assert run(criu_available(good)) == (True, "Looks good.")
    missing = str(tmp_path / "no-criu")
    assert run(criu_available(missing)) == (False, f"criu is not installed at {missing}")


# ---------------------------------------------------------------- the flow, with fakes

# Stands in for `runc checkpoint`: writes images and a dump.log where asked, or fails.
FAKE_RUNTIME = r"""
import json, os, sys
args = sys.argv[1:]
image, work = args[args.index("--image-path") + 1], args[args.index("--work-path") + 1]
os.makedirs(image)
if os.environ.get("FAKE_FAIL"):
    with open(os.path.join(work, "dump.log"), "w") as f:
        f.write("(00.02) Error (criu/vdso.c:613): vdso: Failed to fill self vdso symtable\n")
    print(json.dumps({"level": "error", "msg": "criu failed: type DUMP errno 0\nlog file: "
                      + os.path.join(work, "dump.log")}), file=sys.stderr)
    sys.exit(1)
open(os.path.join(image, "core-1.img"), "wb").write(b"core")
open(os.path.join(work, "stats-dump"), "wb").write(b"stats")
open(os.path.join(work, "dump.log"), "w").write("Dumping finished successfully\n")
"""


class FakeRuntime(OciRuntime):
    """Records pause/resume/checkpoint; `checkpoint` runs FAKE_RUNTIME."""

    def __init__(self, status: OciStatus = OciStatus.RUNNING) -> None:
        super().__init__("runc", sys.executable, "/nonexistent-state")
        self.status = status
        self.calls: list[str] = []

    def argv(self, args: Sequence[str]) -> list[str]:
        self.calls.append("checkpoint " + " ".join(a for a in args if a.startswith("--l")))
        return [sys.executable, "-c", FAKE_RUNTIME, *args]

    async def state(self, container_id: str) -> OciState:
        return OciState(container_id, self.status, 42, "/b")

    async def pause(self, container_id: str) -> None:
        self.calls.append("pause")
        self.status = OciStatus.PAUSED

    async def resume(self, container_id: str) -> None:
        self.calls.append("resume")
        self.status = OciStatus.RUNNING


@pytest.fixture
def setup(tmp_path: Path) -> dict[str, Any]:
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "config.json").write_text(json.dumps({"ociVersion": "1.0.2", "mounts": []}))
    (tmp_path / "out").mkdir()
    return {
        "bundle": bundle,
        "upper": make_upper(tmp_path),
        "work_dir": tmp_path / "work",
        "archive": tmp_path / "out" / "c.tar",
        "criu": script(tmp_path / "criu", 'echo "Looks good."\n'),
    }


def call(rt: OciRuntime, s: dict[str, Any], **kw: Any) -> CheckpointResult:
    return run(checkpoint(rt, "c1", s["bundle"], s["upper"], s["archive"],
                          work_dir=s["work_dir"], criu_path=s["criu"], **kw))


def test_flow_freezes_dumps_thaws_and_writes_the_archive(setup: dict[str, Any]) -> None:
    rt = FakeRuntime()
    res = call(rt, setup, info=ContainerInfo("c1", "web", runtime="runc"))
    assert rt.calls == ["pause", "checkpoint --leave-running", "resume"]
    assert res.archive == setup["archive"] and res.size == setup["archive"].stat().st_size
    assert res.members == ("checkpoint", "dump.log", "stats-dump", "config.dump", "spec.dump",
                           "rootfs-diff.tar")
    assert res.changed_files == 8 and res.deleted_files == () and res.left_running
    got = ca.inspect_archive(res.archive)
    assert got.config["name"] == "web" and got.image_files == ("core-1.img",)
    # the runtime's /proc mount point is left out, not what is below it
    assert "proc" not in got.rootfs_diff and "proc/inside" in got.rootfs_diff
    assert not setup["work_dir"].exists()  # created for the call, removed after it


def test_flow_failure_thaws_and_leaves_nothing(
    setup: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_FAIL", "1")
    setup["work_dir"].mkdir()
    rt = FakeRuntime()
    with pytest.raises(CribError) as info:
        call(rt, setup)
    assert type(info.value) is Internal
    assert info.value.message == ("runc checkpoint c1 failed: criu failed: type DUMP errno 0"
                                  " (criu: vdso: Failed to fill self vdso symtable)")
    assert rt.calls == ["pause", "checkpoint --leave-running", "resume"]
    assert rt.status is OciStatus.RUNNING
    assert os.listdir(setup["work_dir"]) == [] and os.listdir(setup["archive"].parent) == []


def test_flow_preconditions(setup: dict[str, Any], tmp_path: Path) -> None:
    bad_criu = script(tmp_path / "criu-bad", 'echo "Error (x.c:1): no vdso" >&2; exit 1\n')
    with pytest.raises(FailedPrecondition) as info:
        call(FakeRuntime(), {**setup, "criu": bad_criu})
    assert info.value.message == (f"cannot checkpoint container c1: CRIU is not usable on this "
                                  f"host: {bad_criu} check failed (exit 1): no vdso")
    with pytest.raises(InvalidArgument, match="not an absolute path"):
        call(FakeRuntime(), {**setup, "archive": "c.tar"})
    rt = FakeRuntime(OciStatus.STOPPED)
    with pytest.raises(FailedPrecondition, match="it is stopped, not running"):
        call(rt, setup)
    with pytest.raises(NotFound, match="writable layer"):
        call(FakeRuntime(), {**setup, "upper": tmp_path / "nope"})
    with pytest.raises(NotFound, match=r"has no config\.json"):
        call(FakeRuntime(), {**setup, "bundle": tmp_path})
    assert rt.calls == [] and not setup["work_dir"].exists()
    assert os.listdir(setup["archive"].parent) == []


def test_flow_paused_container_stays_paused(setup: dict[str, Any]) -> None:
    rt = FakeRuntime(OciStatus.PAUSED)
    call(rt, setup, leave_running=False)
    assert rt.calls == ["checkpoint "] and rt.status is OciStatus.PAUSED
