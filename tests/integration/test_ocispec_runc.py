"""Specs from runtimeservice.ocispec run under the real runc and do what they say.

Each test builds a busybox rootfs, generates a spec for one representative CRI
config (fresh namespaces, no sandbox), runs it with ``runc run`` in the
foreground with a state root and a cgroup of its own, and checks what the
container printed. Afterwards no runc state, cgroup or mount may be left.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from api import api_pb2
from cri.errors import FailedPrecondition
from runtimeservice import capabilities as capmod
from runtimeservice.ocispec import (
    BuiltSpec,
    ContainerContext,
    HostFacts,
    Ns,
    SandboxContext,
    build_spec,
)
from runtimeservice.ocispec_devices import host_devices

pytestmark = pytest.mark.integration

RUNC = shutil.which("runc")
BUSYBOX = "/usr/bin/busybox"
APPLETS = ("sh", "id", "cat", "grep", "touch", "wc", "ls", "mount", "umount", "unshare", "true",
           "echo", "stat")  # fmt: skip

if os.geteuid() != 0 or RUNC is None or not os.path.exists(BUSYBOX):
    pytest.skip("needs root, runc and busybox-static", allow_module_level=True)


@dataclass
class Env:
    bundle: Path
    rootfs: Path
    state: Path
    cgroup: str  # test-only cgroup parent, relative to each hierarchy
    host: HostFacts
    counter: int = 0


def _cgroup_dirs(name: str) -> list[Path]:
    return [p for p in Path("/sys/fs/cgroup").glob(f"*/{name}") if p.is_dir()] + (
        [Path("/sys/fs/cgroup", name)] if Path("/sys/fs/cgroup", name).is_dir() else []
    )


def _remove_cgroup_tree(path: Path) -> None:
    for child in sorted((p for p in path.rglob("*") if p.is_dir()), reverse=True):
        child.rmdir()
    path.rmdir()


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    bundle = tmp_path / "bundle"
    rootfs = bundle / "rootfs"
    (rootfs / "bin").mkdir(parents=True)
    (rootfs / "etc").mkdir()
    shutil.copy(BUSYBOX, rootfs / "bin" / "busybox")
    for applet in APPLETS:
        (rootfs / "bin" / applet).symlink_to("busybox")
    (rootfs / "etc" / "passwd").write_text(
        "root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000::/home/app:/bin/sh\n"
    )
    (rootfs / "etc" / "group").write_text(
        "root:x:0:\napp:x:1000:\naudio:x:29:app\nvideo:x:44:other,app\n"
    )
    state = tmp_path / "state"
    state.mkdir()
    cgroup = f"crib-test-ocispec-{uuid.uuid4().hex[:12]}"
    e = Env(bundle, rootfs, state, cgroup, HostFacts.probe())
    try:
        yield e
    finally:
        for path in _cgroup_dirs(cgroup):
            _remove_cgroup_tree(path)
    assert _cgroup_dirs(cgroup) == []
    assert os.listdir(state) == [], "runc state left behind"


def _config(script: str) -> api_pb2.ContainerConfig:
    config = api_pb2.ContainerConfig()
    config.metadata.name = "probe"
    config.command.extend(["sh", "-c", script])
    config.linux.security_context.namespace_options.pid = api_pb2.CONTAINER
    return config


def _build(
    env: Env,
    config: api_pb2.ContainerConfig,
    privileged: bool = False,
    pids_limit: int | None = None,
) -> BuiltSpec:
    env.counter += 1
    pod = api_pb2.PodSandboxConfig()
    pod.linux.security_context.privileged = privileged
    sandbox = SandboxContext("sb-test", hostname="probe", net_ns=Ns.NEW, ipc_ns=Ns.NEW,
                             uts_ns=Ns.NEW)  # fmt: skip
    container = ContainerContext(
        container_id=f"ocispec-{uuid.uuid4().hex[:12]}",
        rootfs=str(env.rootfs),
        cgroups_path=f"/{env.cgroup}/c{env.counter}",
        pids_limit=pids_limit,
    )
    return build_spec(config, pod, {}, sandbox, container, env.host)


def _run(env: Env, built: BuiltSpec) -> tuple[int, str]:
    """Run the spec in the foreground; return (exit code, stdout+stderr)."""
    (env.bundle / "config.json").write_text(json.dumps(built.spec))
    cid = f"ocispec-{uuid.uuid4().hex[:12]}"
    base = [RUNC or "runc", "--root", str(env.state)]
    try:
        proc = subprocess.run(
            [*base, "run", "--bundle", str(env.bundle), cid],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=120,
        )
    finally:
        listed = subprocess.run([*base, "list", "-q"], capture_output=True, text=True)
        if cid in listed.stdout.split():
            subprocess.run([*base, "delete", "--force", cid], capture_output=True)
    return proc.returncode, proc.stdout + proc.stderr


def _status(output: str, key: str) -> str:
    for line in output.splitlines():
        if line.startswith(key + ":"):
            return line.split(":", 1)[1].strip()
    raise AssertionError(f"no {key} in output:\n{output}")


STATUS = "grep -E '^(CapEff|CapBnd|NoNewPrivs|Seccomp):' /proc/self/status"
KEYS = "grep -c ' /proc/keys ' /proc/self/mountinfo"


def test_default_config(env: Env) -> None:
    kcore = (
        "if [ -e /proc/kcore ]; then echo kcore=$(wc -c < /proc/kcore);"
        " else echo kcore=absent; fi"
    )
    built = _build(env, _config(f"id; {STATUS}; echo keys=$({KEYS}); {kcore}"))
    rc, out = _run(env, built)
    assert rc == 0, out
    assert "uid=0(root) gid=0(root)" in out
    expected = capmod.to_mask(set(capmod.DEFAULT_CAPABILITIES) & env.host.cap_bounding)
    assert int(_status(out, "CapEff"), 16) == expected
    assert _status(out, "NoNewPrivs") == "0"
    assert _status(out, "Seccomp") == "0"  # nothing asked = unconfined, as the CRI says
    assert "keys=1" in out  # /proc/keys is masked by a mount
    assert "kcore=absent" in out or "kcore=0" in out


def test_user_by_name_with_supplementary_groups(env: Env) -> None:
    config = _config("id")
    config.linux.security_context.run_as_username = "app"
    config.linux.security_context.supplemental_groups.append(1234)
    rc, out = _run(env, _build(env, config))
    assert rc == 0, out
    assert "uid=1000(app) gid=1000(app)" in out
    groups = out.split("groups=", 1)[1].split()[0]
    assert sorted(int(g.split("(")[0]) for g in groups.split(",")) == [29, 44, 1000, 1234]


def test_strict_supplemental_groups(env: Env) -> None:
    config = _config("id")
    config.linux.security_context.run_as_user.value = 1000
    config.linux.security_context.run_as_group.value = 2000
    config.linux.security_context.supplemental_groups.append(1234)
    config.linux.security_context.supplemental_groups_policy = api_pb2.Strict
    rc, out = _run(env, _build(env, config))
    assert rc == 0, out
    assert "uid=1000(app) gid=2000" in out
    groups = out.split("groups=", 1)[1].split()[0]
    assert sorted(int(g.split("(")[0]) for g in groups.split(",")) == [1234, 2000]


def test_readonly_rootfs(env: Env) -> None:
    config = _config("touch /newfile; echo root=$?; touch /dev/shm/x; echo shm=$?")
    config.linux.security_context.readonly_rootfs = True
    rc, out = _run(env, _build(env, config))
    assert rc == 0, out
    assert "root=1" in out and "shm=0" in out
    assert not (env.rootfs / "newfile").exists()


def test_drop_all_add_net_bind_service(env: Env) -> None:
    config = _config(STATUS)
    caps = config.linux.security_context.capabilities
    caps.drop_capabilities.append("ALL")
    caps.add_capabilities.append("net_bind_service")
    rc, out = _run(env, _build(env, config))
    assert rc == 0, out
    assert int(_status(out, "CapEff"), 16) == 1 << capmod.CAPABILITIES["CAP_NET_BIND_SERVICE"]
    assert int(_status(out, "CapBnd"), 16) == 1 << capmod.CAPABILITIES["CAP_NET_BIND_SERVICE"]


def test_privileged(env: Env) -> None:
    extra = next(
        (d for d in host_devices() if d.path not in ("/dev/null", "/dev/zero", "/dev/full",
                                                     "/dev/tty", "/dev/random", "/dev/urandom")),
        None,
    )  # fmt: skip
    script = (
        f"{STATUS}; echo keys=$({KEYS});"
        " echo sysrw=$(grep ' /sys ' /proc/self/mountinfo | grep -c ' rw,');"
        + (f" [ -{extra.kind} {extra.path} ] && echo dev=ok" if extra else "")
    )
    config = _config(script)
    config.linux.security_context.privileged = True
    config.linux.security_context.seccomp.profile_type = api_pb2.SecurityProfile.RuntimeDefault
    rc, out = _run(env, _build(env, config, privileged=True))
    assert rc == 0, out
    assert int(_status(out, "CapEff"), 16) == capmod.to_mask(env.host.cap_bounding)
    assert _status(out, "Seccomp") == "0"  # privileged: no filter
    assert "sysrw=1" in out  # /sys is read-write
    assert "keys=0" in out  # /proc/keys not masked
    if extra:
        assert "dev=ok" in out


def test_seccomp_runtime_default(env: Env) -> None:
    # Creating a user namespace needs no capability, only the default profile
    # forbids it: the same command succeeds unconfined and fails confined.
    config = _config(f"{STATUS}; unshare -U true; echo unshare=$?")
    config.linux.security_context.seccomp.profile_type = api_pb2.SecurityProfile.RuntimeDefault
    config.linux.security_context.no_new_privs = True
    rc, out = _run(env, _build(env, config))
    assert rc == 0, out
    assert _status(out, "Seccomp") == "2"
    assert _status(out, "NoNewPrivs") == "1"
    assert "unshare=1" in out

    config.linux.security_context.seccomp.profile_type = api_pb2.SecurityProfile.Unconfined
    rc, out = _run(env, _build(env, config))
    assert rc == 0, out
    assert _status(out, "Seccomp") == "0"
    assert "unshare=0" in out


def test_explicit_masked_and_readonly_paths(env: Env) -> None:
    config = _config(
        f"echo version=$(wc -c < /proc/version); echo keys=$({KEYS});"
        " echo 1 > /proc/sys/vm/drop_caches; echo sys=$?"
    )
    sc = config.linux.security_context
    sc.masked_paths.append("/proc/version")
    sc.readonly_paths.append("/proc/sys")
    rc, out = _run(env, _build(env, config))
    assert rc == 0, out
    assert "version=0" in out
    assert "keys=0" in out  # only the given paths: /proc/keys is not masked
    assert "sys=1" in out  # /proc/sys is read-only


def test_cri_mounts_rro_and_devices(env: Env, tmp_path: Path) -> None:
    data = tmp_path / "data"
    (data / "sub").mkdir(parents=True)
    link = tmp_path / "link"
    link.symlink_to(data)
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(data / "sub")], check=True)
    try:
        config = _config(
            "touch /ro/sub/x; echo ro_sub=$?; touch /rro/sub/x; echo rro_sub=$?;"
            " touch /rro/x; echo rro_top=$?; echo hi > /dev/mynull; echo dev=$?"
        )
        plain = config.mounts.add(container_path="/ro", host_path=str(link), readonly=True)
        rro = config.mounts.add(container_path="/rro", host_path=str(data), readonly=True)
        rro.recursive_read_only = env.host.rro_supported
        config.devices.add(container_path="/dev/mynull", host_path="/dev/null", permissions="rw")
        built = _build(env, config)
        assert built.mounts[0].host_path == str(data)  # the symlink was resolved
        assert plain.host_path == str(link)
        rc, out = _run(env, built)
    finally:
        subprocess.run(["umount", str(data / "sub")], check=True)
    assert rc == 0, out
    assert "ro_sub=0" in out  # a plain read-only bind leaves submounts writable
    assert "rro_top=1" in out
    if env.host.rro_supported:
        assert "rro_sub=1" in out
    assert "dev=0" in out
    assert os.listdir(data / "sub") == []


def test_bidirectional_propagation(env: Env, tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    config = _config("mount -t tmpfs tmpfs /shared/inner && echo mounted")
    config.linux.security_context.privileged = True
    config.mounts.add(container_path="/shared", host_path=str(shared),
                      propagation=api_pb2.PROPAGATION_BIDIRECTIONAL)  # fmt: skip
    with pytest.raises(FailedPrecondition, match="not a shared mount"):
        _build(env, config, privileged=True)

    (shared / "inner").mkdir()
    subprocess.run(["mount", "--bind", str(shared), str(shared)], check=True)
    try:
        subprocess.run(["mount", "--make-shared", str(shared)], check=True)
        built = _build(env, config, privileged=True)
        assert built.spec["linux"]["rootfsPropagation"] == "rshared"
        rc, out = _run(env, built)
        assert rc == 0, out
        assert "mounted" in out
        # The container's mount reached the host through the shared mount.
        assert os.path.ismount(shared / "inner")
    finally:
        if os.path.ismount(shared / "inner"):
            subprocess.run(["umount", str(shared / "inner")], check=True)
        subprocess.run(["umount", str(shared)], check=True)
    assert not os.path.ismount(shared)


def test_oom_score_adj_is_clamped(env: Env) -> None:
    config = _config("cat /proc/self/oom_score_adj")
    config.linux.resources.oom_score_adj = -997
    rc, out = _run(env, _build(env, config))
    assert rc == 0, out
    floor = env.host.oom_score_adj_min
    assert out.strip() == str(-997 if floor is None else max(-997, floor))


def test_resources_reach_the_cgroup(env: Env) -> None:
    if env.host.cgroup_v2:
        files = ["memory.max", "cpu.max", "pids.max"]
        expected = [str(64 << 20), "50000", "100000", "50"]
    else:
        files = ["memory/memory.limit_in_bytes", "cpu/cpu.cfs_quota_us", "cpu/cpu.shares",
                 "pids/pids.max"]  # fmt: skip
        expected = [str(64 << 20), "50000", "256", "50"]
    config = _config("; ".join(f"cat /sys/fs/cgroup/{f}" for f in files))
    res = config.linux.resources
    res.memory_limit_in_bytes = 64 << 20
    res.memory_swap_limit_in_bytes = 64 << 20
    res.cpu_quota, res.cpu_period, res.cpu_shares = 50000, 100000, 256
    res.hugepage_limits.add(page_size="2MB", limit=0)  # dropped where hugetlb is absent
    rc, out = _run(env, _build(env, config, pids_limit=50))
    assert rc == 0, out
    assert out.split() == expected
