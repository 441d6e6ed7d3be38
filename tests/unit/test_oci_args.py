"""Argument construction and error parsing for the OCI runtime, conmon and
exec (pure logic; nothing is run)."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from cri.errors import AlreadyExists, FailedPrecondition, Internal, InvalidArgument, NotFound
from runtimeservice.cgroups import CgroupDriver
from runtimeservice.exec import _Capture, exec_process
from runtimeservice.monitor import Monitor, MonitorConfig, MonitorSpec
from runtimeservice.oci import OciRuntime, RuntimeFlavor, signal_name
from runtimeservice.ocierrors import (
    RuntimeFeatures,
    classify_runtime_error,
    crun_unsupported_reason,
    parse_version,
    runtime_error_message,
)

RUNC = OciRuntime("runc", "/usr/sbin/runc", "/run/crib/runc")
CRUN = OciRuntime("crun", "/usr/bin/crun", "/run/crib/crun", CgroupDriver.SYSTEMD)


def test_global_args_and_flavor() -> None:
    assert RUNC.flavor is RuntimeFlavor.RUNC and CRUN.flavor is RuntimeFlavor.CRUN
    assert RUNC.global_args() == ["--root", "/run/crib/runc", "--log-format", "json"]
    assert CRUN.global_args()[-1] == "--systemd-cgroup"
    # conmon adds --systemd-cgroup itself (from -s); the runtime args never carry it
    assert CRUN.monitor_runtime_args() == ["--root=/run/crib/crun", "--log-format=json"]
    assert RUNC.argv(["state", "x"])[:1] == ["/usr/sbin/runc"]


def test_subcommand_args() -> None:
    assert RUNC.create_args("c", "/b", "/p") == [
        "create", "--bundle", "/b", "--pid-file", "/p", "c"]
    assert RUNC.create_args("c", "/b", "/p", "/s")[-3:] == ["--console-socket", "/s", "c"]
    assert RUNC.exec_args("c", "/proc.json") == ["exec", "--process", "/proc.json", "c"]
    assert RUNC.exec_args("c", "/j", pid_file="/p", detach=True, console_socket="/s") == [
        "exec", "--process", "/j", "--pid-file", "/p", "--detach", "--console-socket", "/s", "c"]
    assert RUNC.kill_args("c", 15, False) == ["kill", "c", "TERM"]
    assert RUNC.kill_args("c", "SIGKILL", True) == ["kill", "--all", "c", "KILL"]
    assert CRUN.update_args("c", "/r.json") == ["update", "--resources", "/r.json", "c"]


@pytest.mark.parametrize("sig, name", [(9, "KILL"), ("sigterm", "TERM"), ("HUP", "HUP"),
                                       ("15", "TERM"), ("SIGRTMIN", "RTMIN")])
def test_signal_names(sig: int | str, name: str) -> None:
    assert signal_name(sig) == name


@pytest.mark.parametrize("sig", [0, 999, "SIGNOPE", ""])
def test_bad_signals(sig: int | str) -> None:
    with pytest.raises(InvalidArgument):
        signal_name(sig)


def test_error_message_from_json_logrus_and_plain() -> None:
    js = '{"level":"warning","msg":"meh","time":"t"}\n{"level":"error","msg":"boom","time":"t"}\n'
    assert runtime_error_message(js) == "boom"
    text = 'time="2024" level=error msg="exec: \\"x\\": executable file not found in $PATH"\n'
    assert runtime_error_message(text) == 'exec: "x": executable file not found in $PATH'
    assert runtime_error_message("", "just words\n") == "just words"
    assert runtime_error_message("boom\n", js) == "boom"  # same message once
    assert runtime_error_message("", "  \n") == ""


@pytest.mark.parametrize("message, cls", [
    ("container does not exist", NotFound),
    ("error opening file `/run/crib/crun/x/status`: No such file or directory", NotFound),
    ("open /b/config.json: no such file or directory", Internal),
    ('exec: "x": executable file not found in $PATH', InvalidArgument),
    ('exec: "/x": stat /x: no such file or directory', InvalidArgument),
    ("runc create failed: container with given ID already exists", AlreadyExists),
    ("cannot delete container c that is not stopped: running", FailedPrecondition),
    ("container not running", FailedPrecondition),
    ("cannot exec in a stopped container", FailedPrecondition),
    ("cgroups in hybrid mode not supported, drop all controllers from cgroupv2",
     FailedPrecondition),
    ("json: cannot unmarshal string into Go struct field", InvalidArgument),
    ("something odd", Internal),
])
def test_classify(message: str, cls: type) -> None:
    assert classify_runtime_error(message, "/run/crib/crun") is cls


def test_runtime_error_names_handler_and_explains_hybrid() -> None:
    err = CRUN.error("create c1", '{"msg":"cgroups in hybrid mode not supported","level":"error"}')
    assert isinstance(err, FailedPrecondition)
    assert err.message.startswith("crun create c1 failed: cgroups in hybrid mode")
    assert "use runc" in err.message
    assert "no error message" in RUNC.error("start c", "").message


def test_parse_version() -> None:
    runc = parse_version("runc version 1.1.5+ds1\ncommit: abc\nspec: 1.0.2-dev\ngo: go1.19\n",
                         "runc")
    assert (runc.name, runc.version, runc.commit, runc.spec) == (
        "runc", "1.1.5+ds1", "abc", "1.0.2-dev")
    crun = parse_version("crun version 1.8.1\ncommit: f8a\nrundir: /run/crun\nspec: 1.0.0\n",
                         "crun")
    assert (crun.name, crun.version, crun.spec) == ("crun", "1.8.1", "1.0.0")
    assert parse_version("", "x").version == "unknown"


def test_features_parse() -> None:
    feats = RuntimeFeatures.parse({
        "mountOptions": ["rbind", "rro"],
        "linux": {"namespaces": ["user", "pid"], "cgroup": {"v1": True},
                  "seccomp": {"enabled": True},
                  "mountExtensions": {"idmap": {"enabled": True}}},
    })
    assert feats.recursive_read_only and feats.user_namespaces and feats.seccomp
    assert feats.cgroup_v1 and not feats.cgroup_v2
    bare = RuntimeFeatures.parse({"mountOptions": ["bind"]})
    assert not bare.recursive_read_only and not bare.user_namespaces


def test_crun_unsupported_reason(tmp_path: Path) -> None:
    assert crun_unsupported_reason(str(tmp_path)) is None
    (tmp_path / "unified").mkdir()
    (tmp_path / "unified" / "cgroup.controllers").write_text("\n")
    assert crun_unsupported_reason(str(tmp_path)) is None
    (tmp_path / "unified" / "cgroup.controllers").write_text("hugetlb\n")
    reason = crun_unsupported_reason(str(tmp_path))
    assert reason is not None and "hybrid" in reason and "hugetlb" in reason


def test_conmon_argv() -> None:
    mon = Monitor(MonitorConfig(exit_dir="/e", socket_dir="/s", log_size_max=1024))
    spec = MonitorSpec("cid", "/b", "/p", "/l/c.log", name="web", stdin=True)
    argv = mon.conmon_argv(CRUN, spec)
    pairs = dict(itertools.pairwise(argv))
    assert argv[:2] == ["/usr/bin/conmon", "--api-version"]
    assert pairs["-c"] == pairs["-u"] == "cid" and pairs["-n"] == "web"
    assert pairs["-r"] == "/usr/bin/crun" and pairs["-b"] == "/b"
    assert pairs["-p"] == "/p/pid" and pairs["-P"] == "/p/conmon.pid"
    assert pairs["-l"] == "k8s-file:/l/c.log" and pairs["--exit-dir"] == "/e"
    assert pairs["-0"] == "/p" and pairs["--socket-dir-path"] == "/s"
    assert pairs["--log-size-max"] == "1024"
    runtime_args = [argv[i + 1] for i, a in enumerate(argv) if a == "--runtime-arg"]
    assert runtime_args == ["--root=/run/crib/crun", "--log-format=json"]
    assert {"--systemd-cgroup", "--stdin", "--leave-stdin-open"} <= set(argv)
    assert "--terminal" not in argv
    once = mon.conmon_argv(RUNC, MonitorSpec("c", "/b", "/p", "/l", stdin=True, stdin_once=True,
                                             terminal=True))
    assert "--leave-stdin-open" not in once and "--systemd-cgroup" not in once
    assert "--terminal" in once
    plain = Monitor(MonitorConfig()).conmon_argv(RUNC, MonitorSpec("c", "/b", "/p", "/l"))
    assert "--log-size-max" not in plain and "--stdin" not in plain
    with pytest.raises(InvalidArgument, match="':'"):
        mon.conmon_argv(RUNC, MonitorSpec("c", "/b", "/p", "/l/a:b"))
    assert mon.attach_socket_path("cid") == "/s/cid/attach"
    assert mon.ctl_path("cid") == "/s/cid/ctl"


def test_exec_process_inherits_container_process() -> None:
    base = {"user": {"uid": 5, "gid": 6}, "env": ["PATH=/bin", "A=1"], "cwd": "/srv",
            "capabilities": {"bounding": ["CAP_KILL"]}, "noNewPrivileges": True,
            "args": ["server"], "terminal": True, "oomScoreAdj": 100}
    proc = exec_process(base, ["ls", "-l"], env=["A=2", "B=3"])
    assert proc["args"] == ["ls", "-l"] and proc["terminal"] is False
    assert proc["user"] == {"uid": 5, "gid": 6} and proc["cwd"] == "/srv"
    assert proc["env"] == ["PATH=/bin", "A=2", "B=3"]
    assert proc["capabilities"] == base["capabilities"]
    assert proc["capabilities"] is not base["capabilities"]
    assert "oomScoreAdj" not in proc
    tty = exec_process({}, ["sh"], tty=True, cwd="/tmp", console_size=(24, 80))
    assert tty["terminal"] and tty["consoleSize"] == {"height": 24, "width": 80}
    assert tty["cwd"] == "/tmp" and tty["user"] == {"uid": 0, "gid": 0}
    with pytest.raises(InvalidArgument):
        exec_process(base, [])


def test_output_capture_is_bounded() -> None:
    cap = _Capture(5)
    for chunk in (b"abc", b"defg", b"hij"):
        cap.feed(chunk)
    assert cap.kept == 5 and cap.dropped == 5
    assert cap.value() == b"abcde\n[crib: output truncated, 5 more bytes dropped]\n"
    small = _Capture(10)
    small.feed(b"ok")
    assert small.value() == b"ok" and small.dropped == 0
