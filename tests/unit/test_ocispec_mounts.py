from __future__ import annotations

import os
from pathlib import Path

import pytest

from api import api_pb2
from cri.errors import FailedPrecondition, InvalidArgument, NotFound, Unimplemented
from runtimeservice import ocispec_devices as devs
from runtimeservice import ocispec_mounts as mounts

MOUNTINFO = r"""22 27 0:21 / /proc rw,relatime - proc proc rw
27 1 254:0 / / rw,relatime - ext4 /dev/vda rw
40 27 0:40 / /var/lib/kubelet rw,relatime shared:5 - ext4 /dev/vdb rw
41 40 0:41 / /var/lib/kubelet/pods/a rw,relatime master:5 - tmpfs tmpfs rw
42 27 0:42 / /mnt/with\040space rw,relatime shared:9 - tmpfs tmpfs rw
43 27 0:43 / /data rw,relatime - tmpfs tmpfs rw
44 27 0:44 / /data rw,relatime shared:12 - tmpfs tmpfs rw
"""


@pytest.fixture
def mountinfo(tmp_path: Path) -> str:
    path = tmp_path / "mountinfo"
    path.write_text(MOUNTINFO)
    return str(path)


def test_parse_and_lookup() -> None:
    infos = mounts.parse_mountinfo(MOUNTINFO)
    assert infos[4].mount_point == "/mnt/with space"
    assert mounts.mount_of("/var/lib/kubelet/pods/a/vol", infos).slave  # type: ignore[union-attr]
    holder = mounts.mount_of("/var/lib/kubelet/x", infos)
    assert holder is not None and holder.shared and holder.mount_point == "/var/lib/kubelet"
    assert mounts.mount_of("/var/lib/kubeletx", infos).mount_point == "/"  # type: ignore[union-attr]
    # Two mounts on /data: the later (top) one counts.
    assert mounts.mount_of("/data/f", infos).shared  # type: ignore[union-attr]


def test_propagation_checks(mountinfo: str) -> None:
    mounts.check_propagation("/anything", mounts.PRIVATE, "/nonexistent")  # nothing read
    mounts.check_propagation("/var/lib/kubelet/v", mounts.BIDIRECTIONAL, mountinfo)
    mounts.check_propagation("/var/lib/kubelet/pods/a/v", mounts.HOST_TO_CONTAINER, mountinfo)
    mounts.check_propagation("/mnt/with space/v", mounts.BIDIRECTIONAL, mountinfo)
    with pytest.raises(FailedPrecondition, match="not a shared mount"):
        mounts.check_propagation("/var/lib/kubelet/pods/a/v", mounts.BIDIRECTIONAL, mountinfo)
    with pytest.raises(FailedPrecondition, match="not a shared or slave"):
        mounts.check_propagation("/srv", mounts.HOST_TO_CONTAINER, mountinfo)


def _resolve(m: api_pb2.Mount, mountinfo: str, rro: bool = True) -> mounts.ResolvedMount:
    return mounts.resolve_cri_mount(
        m, rro_supported=rro, idmap_supported=False, mountinfo_path=mountinfo
    )


def test_cri_mount_resolves_symlinks(tmp_path: Path, mountinfo: str) -> None:
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "link").symlink_to(real)
    got = _resolve(api_pb2.Mount(container_path="/data/", host_path=str(tmp_path / "link"),
                                 readonly=True), mountinfo)  # fmt: skip
    assert got.host_path == str(real)
    assert got.to_oci() == {"destination": "/data", "type": "bind", "source": str(real),
                            "options": ["rbind", "rprivate", "ro"]}  # fmt: skip


def test_cri_mount_errors(tmp_path: Path, mountinfo: str) -> None:
    with pytest.raises(NotFound, match="missing"):
        _resolve(api_pb2.Mount(container_path="/d", host_path=str(tmp_path / "missing")),
                 mountinfo)  # fmt: skip
    with pytest.raises(InvalidArgument, match="not an absolute"):
        _resolve(api_pb2.Mount(container_path="d", host_path=str(tmp_path)), mountinfo)
    with pytest.raises(InvalidArgument, match="not absolute"):
        _resolve(api_pb2.Mount(container_path="/d", host_path="rel"), mountinfo)
    image = api_pb2.Mount(container_path="/d", image=api_pb2.ImageSpec(image="busybox"))
    with pytest.raises(Unimplemented, match="image"):
        _resolve(image, mountinfo)
    mapped = api_pb2.Mount(container_path="/d", host_path=str(tmp_path),
                           uidMappings=[api_pb2.IDMapping(host_id=1000, length=1)])  # fmt: skip
    with pytest.raises(Unimplemented, match="id-mapped"):
        _resolve(mapped, mountinfo)


def test_recursive_read_only_rules(tmp_path: Path, mountinfo: str) -> None:
    ok = api_pb2.Mount(container_path="/d", host_path=str(tmp_path), readonly=True,
                       recursive_read_only=True)  # fmt: skip
    assert _resolve(ok, mountinfo).to_oci()["options"] == ["rbind", "rprivate", "ro", "rro"]
    with pytest.raises(InvalidArgument, match="mount_setattr"):
        _resolve(ok, mountinfo, rro=False)
    writable = api_pb2.Mount(container_path="/d", host_path=str(tmp_path),
                             recursive_read_only=True)  # fmt: skip
    with pytest.raises(InvalidArgument, match="must also be readonly"):
        _resolve(writable, mountinfo)
    slave = api_pb2.Mount(container_path="/d", host_path=str(tmp_path), readonly=True,
                          recursive_read_only=True,
                          propagation=api_pb2.PROPAGATION_HOST_TO_CONTAINER)  # fmt: skip
    with pytest.raises(InvalidArgument, match="private propagation"):
        _resolve(slave, mountinfo)


def test_defaults_and_merge() -> None:
    facts = mounts.DefaultMountFacts(
        hosts_path="/pod/hosts", resolv_conf_path="/pod/resolv", hostname_path="/pod/hostname",
        shm_path="/pod/shm", readonly_rootfs=True,
        termination_message=("/dev/termination-log", "/pod/term"),
    )  # fmt: skip
    defaults = mounts.default_mounts(facts)
    by_dest = {m["destination"]: m for m in defaults}
    assert by_dest["/sys"]["type"] == "sysfs" and "ro" in by_dest["/sys"]["options"]
    assert "ro" in by_dest["/sys/fs/cgroup"]["options"]
    assert by_dest["/dev/shm"]["source"] == "/pod/shm"
    assert by_dest["/etc/hosts"]["options"][-1] == "ro"  # read-only rootfs
    assert by_dest["/dev/termination-log"]["options"][-1] == "rw"

    override = mounts.ResolvedMount(container_path="/etc/hosts", host_path="/kubelet/hosts")
    child = mounts.ResolvedMount(container_path="/data/sub", host_path="/x")
    parent = mounts.ResolvedMount(container_path="/data", host_path="/y")
    merged = mounts.merge_mounts(defaults, [child, override, parent])
    dests = [m["destination"] for m in merged]
    assert dests.count("/etc/hosts") == 1
    assert next(m for m in merged if m["destination"] == "/etc/hosts")["source"] == "/kubelet/hosts"
    assert dests.index("/data") < dests.index("/data/sub")
    assert dests.index("/dev") < dests.index("/dev/pts") < dests.index("/sys/fs/cgroup")
    with pytest.raises(InvalidArgument, match="share the container path"):
        mounts.merge_mounts(defaults, [parent, parent])


def test_privileged_host_network_host_ipc_defaults() -> None:
    defaults = mounts.default_mounts(
        mounts.DefaultMountFacts(privileged=True, host_network=True, host_ipc=True)
    )
    by_dest = {m["destination"]: m for m in defaults}
    assert by_dest["/sys"]["type"] == "bind" and "rw" in by_dest["/sys"]["options"]
    assert "ro" not in by_dest["/sys/fs/cgroup"]["options"]
    assert by_dest["/dev/shm"]["source"] == "/dev/shm"
    assert "/etc/hosts" not in by_dest
    private = mounts.default_mounts(mounts.DefaultMountFacts())
    assert next(m for m in private if m["destination"] == "/dev/shm")["type"] == "tmpfs"


def test_rootfs_propagation() -> None:
    def rm(p: int) -> mounts.ResolvedMount:
        return mounts.ResolvedMount(container_path="/a", host_path="/a", propagation=p)

    assert mounts.rootfs_propagation([rm(mounts.PRIVATE)]) is None
    assert mounts.rootfs_propagation([rm(mounts.HOST_TO_CONTAINER)]) == "rslave"
    assert mounts.rootfs_propagation(
        [rm(mounts.HOST_TO_CONTAINER), rm(mounts.BIDIRECTIONAL)]) == "rshared"  # fmt: skip


def test_cri_device_from_dev_null() -> None:
    device_list, rules = devs.build_devices(
        [api_pb2.Device(container_path="/dev/mynull", host_path="/dev/null", permissions="rw")],
        privileged=False,
    )
    st = os.stat("/dev/null")
    assert device_list == [{"path": "/dev/mynull", "type": "c", "major": os.major(st.st_rdev),
                            "minor": os.minor(st.st_rdev), "fileMode": 0o666, "uid": 0,
                            "gid": 0}]  # fmt: skip
    assert rules[0] == {"allow": False, "access": "rwm"}
    assert rules[1]["access"] == "rw" and rules[1]["major"] == os.major(st.st_rdev)


def test_device_errors(tmp_path: Path) -> None:
    with pytest.raises(NotFound, match="does not exist"):
        devs.cri_devices([api_pb2.Device(container_path="/dev/x", host_path="/dev/nonexistent")])
    regular = tmp_path / "f"
    regular.write_text("")
    with pytest.raises(InvalidArgument, match="not a device"):
        devs.cri_devices([api_pb2.Device(container_path="/dev/x", host_path=str(regular))])
    with pytest.raises(InvalidArgument, match="permissions"):
        devs.cri_devices([api_pb2.Device(container_path="/dev/x", host_path="/dev/null",
                                         permissions="rwx")])  # fmt: skip


def test_device_directory_is_walked(tmp_path: Path) -> None:
    (tmp_path / "nested").mkdir()
    (tmp_path / "nested" / "null").symlink_to("/dev/null")  # symlinks are not devices
    got = devs.cri_devices([api_pb2.Device(container_path="/dev/mine", host_path=str(tmp_path))])
    assert got == []


def test_privileged_gets_host_devices() -> None:
    device_list, rules = devs.build_devices([], privileged=True)
    assert rules == [{"allow": True, "access": "rwm"}]
    paths = {d["path"] for d in device_list}
    assert "/dev/null" in paths
    assert not any(p.startswith(("/dev/pts/", "/dev/shm/")) for p in paths)
    assert "/dev/console" not in paths
