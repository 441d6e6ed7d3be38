from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from api import api_pb2
from cri.errors import FailedPrecondition, InvalidArgument, Unimplemented
from runtimeservice import capabilities as capmod
from runtimeservice.ocispec import (
    BuiltSpec,
    ContainerContext,
    HostFacts,
    Ns,
    SandboxContext,
    build_spec,
    build_spec_async,
)
from runtimeservice.ocispec_security import DEFAULT_MASKED_PATHS, DEFAULT_READONLY_PATHS

BOUNDING = frozenset(capmod.CAPABILITIES) - {"CAP_SYS_RESOURCE"}
HOST = HostFacts(cap_bounding=BOUNDING, machine="x86_64", rro_supported=True,
                 oom_score_adj_min=0)  # fmt: skip
SANDBOX = SandboxContext(
    sandbox_id="sb1", hostname="pod-host",
    net_ns="/run/crib/ns/net/sb1", ipc_ns="/run/crib/ns/ipc/sb1", uts_ns="/run/crib/ns/uts/sb1",
    hosts_path="/pod/hosts", resolv_conf_path="/pod/resolv.conf", hostname_path="/pod/hostname",
    shm_path="/pod/shm",
)  # fmt: skip
IMAGE = {"config": {"Entrypoint": ["/bin/app"], "Cmd": ["serve"], "Env": ["A=1"],
                    "User": "app", "StopSignal": "SIGINT"}}  # fmt: skip


@pytest.fixture
def rootfs(tmp_path: Path) -> Path:
    root = tmp_path / "rootfs"
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "passwd").write_text("root:x:0:0::/root:/bin/sh\napp:x:1000:1000::/:/bin/sh\n")
    (root / "etc" / "group").write_text("root:x:0:\napp:x:1000:\nwheel:x:10:app\n")
    return root


def _build(
    rootfs: Path,
    config: api_pb2.ContainerConfig | None = None,
    *,
    pod: api_pb2.PodSandboxConfig | None = None,
    sandbox: SandboxContext = SANDBOX,
    host: HostFacts = HOST,
    image: dict[str, Any] | None = None,
    **container: Any,
) -> BuiltSpec:
    config = config or api_pb2.ContainerConfig()
    ctx = ContainerContext(container_id="c1", rootfs=str(rootfs), cgroups_path="/pod/c1",
                           **container)  # fmt: skip
    return build_spec(config, pod or api_pb2.PodSandboxConfig(), IMAGE if image is None else image,
                      sandbox, ctx, host)  # fmt: skip


def test_default_spec(rootfs: Path) -> None:
    built = _build(rootfs)
    spec = built.spec
    json.dumps(spec)  # serialisable
    proc = spec["process"]
    assert proc["args"] == ["/bin/app", "serve"]
    assert "HOSTNAME=pod-host" in proc["env"] and "A=1" in proc["env"]
    assert proc["user"] == {"uid": 1000, "gid": 1000, "additionalGids": [1000, 10]}
    assert proc["cwd"] == "/"
    assert proc["terminal"] is False and proc["noNewPrivileges"] is False
    assert proc["capabilities"]["bounding"] == capmod.sort_caps(capmod.DEFAULT_CAPABILITIES)
    assert proc["capabilities"]["inheritable"] == [] and proc["capabilities"]["ambient"] == []
    assert "oomScoreAdj" not in proc and "apparmorProfile" not in proc
    assert spec["root"] == {"path": str(rootfs), "readonly": False}
    linux = spec["linux"]
    assert linux["cgroupsPath"] == "/pod/c1"
    assert linux["maskedPaths"] == list(DEFAULT_MASKED_PATHS)
    assert linux["readonlyPaths"] == list(DEFAULT_READONLY_PATHS)
    assert "seccomp" not in linux  # nothing asked = unconfined
    assert linux["resources"]["devices"] == [{"allow": False, "access": "rwm"}]
    assert "hostname" not in spec  # the joined UTS namespace already has it
    assert built.stop_signal == 2 and built.stop_signal_name == "SIGINT"
    assert built.seccomp_profile == "unconfined"
    assert built.user.username == "app"
    dests = [m["destination"] for m in spec["mounts"]]
    for d in ("/proc", "/dev", "/dev/pts", "/dev/mqueue", "/sys", "/sys/fs/cgroup", "/dev/shm",
              "/etc/hosts", "/etc/resolv.conf", "/etc/hostname"):  # fmt: skip
        assert d in dests


def test_namespaces_join_sandbox(rootfs: Path) -> None:
    ns = _build(rootfs).spec["linux"]["namespaces"]
    # Default CRI pid mode is POD; a pod that shares nothing gives a new one.
    assert ns == [
        {"type": "pid"},
        {"type": "network", "path": "/run/crib/ns/net/sb1"},
        {"type": "ipc", "path": "/run/crib/ns/ipc/sb1"},
        {"type": "uts", "path": "/run/crib/ns/uts/sb1"},
        {"type": "mount"},
    ]


def _with_pid(mode: int, target: str = "") -> api_pb2.ContainerConfig:
    config = api_pb2.ContainerConfig()
    config.linux.security_context.namespace_options.pid = mode
    config.linux.security_context.namespace_options.target_id = target
    return config


def test_pid_modes(rootfs: Path) -> None:
    def pid(built: BuiltSpec) -> dict[str, str] | None:
        return next((n for n in built.spec["linux"]["namespaces"] if n["type"] == "pid"), None)

    shared = SandboxContext(sandbox_id="sb", pid_ns="/proc/42/ns/pid")
    assert pid(_build(rootfs, _with_pid(api_pb2.POD), sandbox=shared)) == {
        "type": "pid", "path": "/proc/42/ns/pid"}  # fmt: skip
    assert pid(_build(rootfs, _with_pid(api_pb2.CONTAINER), sandbox=shared)) == {"type": "pid"}
    assert pid(_build(rootfs, _with_pid(api_pb2.NODE))) is None
    target = _build(rootfs, _with_pid(api_pb2.TARGET, "abc"), target_pid_ns="/proc/7/ns/pid")
    assert pid(target) == {"type": "pid", "path": "/proc/7/ns/pid"}
    with pytest.raises(InvalidArgument, match="'abc'"):
        _build(rootfs, _with_pid(api_pb2.TARGET, "abc"))


def test_host_namespaces_and_cgroup_v2(rootfs: Path) -> None:
    host_pod = SandboxContext(sandbox_id="sb", net_ns=None, ipc_ns=Ns.HOST, uts_ns=None)
    v2 = HostFacts(cap_bounding=BOUNDING, cgroup_v2=True)
    ns = _build(rootfs, _with_pid(api_pb2.NODE), sandbox=host_pod, host=v2).spec["linux"][
        "namespaces"]  # fmt: skip
    assert ns == [{"type": "mount"}, {"type": "cgroup"}]
    fresh = SandboxContext(sandbox_id="sb", hostname="h", uts_ns=Ns.NEW)
    assert _build(rootfs, sandbox=fresh).spec["hostname"] == "h"


def test_user_namespaces_refused(rootfs: Path) -> None:
    config = api_pb2.ContainerConfig()
    config.linux.security_context.namespace_options.userns_options.mode = api_pb2.POD
    with pytest.raises(Unimplemented, match="user namespaces"):
        _build(rootfs, config)
    node = api_pb2.ContainerConfig()
    node.linux.security_context.namespace_options.userns_options.mode = api_pb2.NODE
    _build(rootfs, node)


def test_resources(rootfs: Path) -> None:
    config = api_pb2.ContainerConfig()
    res = config.linux.resources
    res.cpu_shares, res.cpu_quota, res.cpu_period = 512, 50000, 100000
    res.cpuset_cpus, res.cpuset_mems = "0-1", "0"
    res.memory_limit_in_bytes, res.memory_swap_limit_in_bytes = 1 << 30, 2 << 30
    res.oom_score_adj = -997
    res.hugepage_limits.add(page_size="2MB", limit=1 << 21)
    built = _build(rootfs, config, pids_limit=100)
    r = built.spec["linux"]["resources"]
    assert r["cpu"] == {"shares": 512, "quota": 50000, "period": 100000, "cpus": "0-1",
                        "mems": "0"}  # fmt: skip
    assert r["memory"] == {"limit": 1 << 30, "swap": 2 << 30}
    assert r["hugepageLimits"] == [{"pageSize": "2MB", "limit": 1 << 21}]
    assert r["pids"] == {"limit": 100}
    assert built.spec["process"]["oomScoreAdj"] == 0  # clamped to the daemon's own


def test_resource_errors(rootfs: Path) -> None:
    config = api_pb2.ContainerConfig()
    config.linux.resources.memory_limit_in_bytes = 2 << 30
    config.linux.resources.memory_swap_limit_in_bytes = 1 << 30
    with pytest.raises(InvalidArgument, match="memory_swap_limit_in_bytes"):
        _build(rootfs, config)
    unified = api_pb2.ContainerConfig()
    unified.linux.resources.unified["memory.high"] = "1G"
    with pytest.raises(InvalidArgument, match="cgroup v2"):
        _build(rootfs, unified)
    v2 = HostFacts(cap_bounding=BOUNDING, cgroup_v2=True)
    assert _build(rootfs, unified, host=v2).spec["linux"]["resources"]["unified"] == {
        "memory.high": "1G"}  # fmt: skip


def _caps_config(add: list[str], drop: list[str], ambient: list[str] = []) -> Any:  # noqa: B006
    config = api_pb2.ContainerConfig()
    c = config.linux.security_context.capabilities
    c.add_capabilities.extend(add)
    c.drop_capabilities.extend(drop)
    c.add_ambient_capabilities.extend(ambient)
    return config


def test_capabilities(rootfs: Path) -> None:
    caps = _build(rootfs, _caps_config(["NET_BIND_SERVICE"], ["ALL"])).spec["process"][
        "capabilities"]  # fmt: skip
    assert caps["bounding"] == caps["effective"] == caps["permitted"] == ["CAP_NET_BIND_SERVICE"]
    everything = _build(rootfs, _caps_config(["ALL", "SYS_RESOURCE"], [])).spec["process"][
        "capabilities"]  # fmt: skip
    assert set(everything["bounding"]) == BOUNDING  # SYS_RESOURCE is not the host's to give
    ambient = _build(rootfs, _caps_config([], ["ALL"], ["cap_net_raw"])).spec["process"][
        "capabilities"]  # fmt: skip
    assert ambient["ambient"] == ambient["inheritable"] == ["CAP_NET_RAW"]
    assert ambient["bounding"] == ["CAP_NET_RAW"]
    with pytest.raises(InvalidArgument, match="unknown capability"):
        _build(rootfs, _caps_config(["CAP_FLY"], []))


def _privileged(pod_privileged: bool = True) -> tuple[Any, Any]:
    config = api_pb2.ContainerConfig()
    config.linux.security_context.privileged = True
    config.linux.security_context.seccomp.profile_type = api_pb2.SecurityProfile.RuntimeDefault
    pod = api_pb2.PodSandboxConfig()
    pod.linux.security_context.privileged = pod_privileged
    return config, pod


def test_privileged(rootfs: Path) -> None:
    config, pod = _privileged()
    built = _build(rootfs, config, pod=pod)
    spec = built.spec
    assert set(spec["process"]["capabilities"]["bounding"]) == BOUNDING
    assert "seccomp" not in spec["linux"] and built.seccomp_profile == "unconfined"
    assert "maskedPaths" not in spec["linux"] and "readonlyPaths" not in spec["linux"]
    assert spec["linux"]["resources"]["devices"] == [{"allow": True, "access": "rwm"}]
    assert any(d["path"] == "/dev/null" for d in spec["linux"]["devices"])
    sysfs = next(m for m in spec["mounts"] if m["destination"] == "/sys")
    assert "ro" not in sysfs["options"]
    assert built.privileged


def test_privileged_needs_privileged_pod(rootfs: Path) -> None:
    config, pod = _privileged(pod_privileged=False)
    with pytest.raises(InvalidArgument, match="non-privileged sandbox"):
        _build(rootfs, config, pod=pod)
    allowed = SandboxContext(sandbox_id="sb", privileged_allowed=True)
    _build(rootfs, config, pod=pod, sandbox=allowed)


def test_seccomp_choices(rootfs: Path, tmp_path: Path) -> None:
    config = api_pb2.ContainerConfig()
    sc = config.linux.security_context
    sc.seccomp.profile_type = api_pb2.SecurityProfile.RuntimeDefault
    built = _build(rootfs, config)
    assert built.spec["linux"]["seccomp"]["defaultAction"] == "SCMP_ACT_ERRNO"
    assert built.seccomp_profile == "runtime/default"

    sc.seccomp.profile_type = api_pb2.SecurityProfile.Unconfined
    assert "seccomp" not in _build(rootfs, config).spec["linux"]

    profile = tmp_path / "p.json"
    profile.write_text('{"defaultAction": "SCMP_ACT_LOG"}')
    sc.seccomp.profile_type = api_pb2.SecurityProfile.Localhost
    sc.seccomp.localhost_ref = str(profile)
    built = _build(rootfs, config)
    assert built.spec["linux"]["seccomp"] == {"defaultAction": "SCMP_ACT_LOG", "syscalls": []}
    assert built.seccomp_profile == f"localhost/{profile}"
    sc.seccomp.localhost_ref = "p.json"
    with pytest.raises(InvalidArgument, match="not absolute"):
        _build(rootfs, config)
    sc.seccomp.localhost_ref = str(tmp_path / "missing.json")
    with pytest.raises(InvalidArgument, match=r"missing\.json"):
        _build(rootfs, config)


@pytest.mark.parametrize(
    "legacy, expected",
    [("", "unconfined"), ("unconfined", "unconfined"), ("runtime/default", "runtime/default"),
     ("docker/default", "runtime/default")],
)  # fmt: skip
def test_legacy_seccomp_strings(rootfs: Path, legacy: str, expected: str) -> None:
    config = api_pb2.ContainerConfig()
    config.linux.security_context.seccomp_profile_path = legacy
    assert _build(rootfs, config).seccomp_profile == expected


def test_legacy_seccomp_bad_strings(rootfs: Path) -> None:
    config = api_pb2.ContainerConfig()
    config.linux.security_context.seccomp_profile_path = "my-profile"
    with pytest.raises(InvalidArgument, match="my-profile"):
        _build(rootfs, config)
    config.linux.security_context.seccomp_profile_path = "localhost/relative.json"
    with pytest.raises(InvalidArgument, match="not absolute"):
        _build(rootfs, config)


def test_apparmor(rootfs: Path) -> None:
    config = api_pb2.ContainerConfig()
    sc = config.linux.security_context
    sc.apparmor.profile_type = api_pb2.SecurityProfile.Unconfined
    assert "apparmorProfile" not in _build(rootfs, config).spec["process"]
    sc.apparmor.profile_type = api_pb2.SecurityProfile.RuntimeDefault
    with pytest.raises(FailedPrecondition, match="AppArmor"):
        _build(rootfs, config)
    sc.ClearField("apparmor")
    sc.apparmor_profile = "localhost/my-prof"
    with pytest.raises(FailedPrecondition, match="my-prof"):
        _build(rootfs, config)
    armored = HostFacts(cap_bounding=BOUNDING, apparmor_supported=True)
    assert _build(rootfs, config, host=armored).spec["process"]["apparmorProfile"] == "my-prof"
    sc.apparmor_profile = ""
    assert _build(rootfs, config, host=armored).apparmor_profile == "crib-default"


def test_explicit_masked_paths(rootfs: Path) -> None:
    config = api_pb2.ContainerConfig()
    config.linux.security_context.masked_paths.append("/proc/version")
    linux = _build(rootfs, config).spec["linux"]
    assert linux["maskedPaths"] == ["/proc/version"]
    assert linux["readonlyPaths"] == list(DEFAULT_READONLY_PATHS)


def test_readonly_rootfs_makes_pod_files_read_only(rootfs: Path) -> None:
    config = api_pb2.ContainerConfig()
    config.linux.security_context.readonly_rootfs = True
    spec = _build(rootfs, config).spec
    assert spec["root"]["readonly"] is True
    hosts = next(m for m in spec["mounts"] if m["destination"] == "/etc/hosts")
    assert "ro" in hosts["options"]


def test_sysctls(rootfs: Path) -> None:
    spec = _build(rootfs, sysctls={"net.ipv4.ip_forward": "1", "kernel.shmmax": "1"}).spec
    assert spec["linux"]["sysctl"] == {"kernel.shmmax": "1", "net.ipv4.ip_forward": "1"}
    host_net = SandboxContext(sandbox_id="sb", ipc_ns=Ns.NEW)
    with pytest.raises(InvalidArgument, match="host's network"):
        _build(rootfs, sandbox=host_net, sysctls={"net.ipv4.ip_forward": "1"})
    with pytest.raises(InvalidArgument, match="not namespaced"):
        _build(rootfs, sysctls={"vm.swappiness": "1"})


def test_user_and_group_errors(rootfs: Path) -> None:
    config = api_pb2.ContainerConfig()
    config.linux.security_context.run_as_username = "ghost"
    with pytest.raises(InvalidArgument, match="ghost"):
        _build(rootfs, config)
    with pytest.raises(InvalidArgument, match="no command"):
        _build(rootfs, image={})


def test_termination_message_mount(rootfs: Path) -> None:
    spec = _build(rootfs, termination_message=("/dev/termination-log", "/pod/c1/term")).spec
    term = next(m for m in spec["mounts"] if m["destination"] == "/dev/termination-log")
    assert term["source"] == "/pod/c1/term"


def test_async_wrapper(rootfs: Path) -> None:
    ctx = ContainerContext(container_id="c1", rootfs=str(rootfs), cgroups_path="/p/c1")
    built = asyncio.run(build_spec_async(api_pb2.ContainerConfig(), api_pb2.PodSandboxConfig(),
                                         IMAGE, SANDBOX, ctx, HOST))  # fmt: skip
    assert built.spec["process"]["args"] == ["/bin/app", "serve"]


def test_hugepages_and_swap_need_host_support(rootfs: Path) -> None:
    config = api_pb2.ContainerConfig()
    config.linux.resources.memory_limit_in_bytes = 1 << 30
    config.linux.resources.memory_swap_limit_in_bytes = 1 << 30
    config.linux.resources.hugepage_limits.add(page_size="2MB", limit=0)
    bare = HostFacts(cap_bounding=BOUNDING, hugetlb_supported=False, swap_supported=False)
    res = _build(rootfs, config, host=bare).spec["linux"]["resources"]
    assert "hugepageLimits" not in res
    assert res["memory"] == {"limit": 1 << 30}
