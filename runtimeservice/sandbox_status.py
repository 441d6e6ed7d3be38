"""Sandbox records as the CRI shows them: PodSandbox, PodSandboxStatus, list filters.

Pure functions of the record. The kubelet relists every second, so the parsed
pod config is cached per record (records are immutable; a changed status is a
new record with the same config bytes).
"""

from __future__ import annotations

import functools
import json
import time
from typing import Any

from google.protobuf import json_format

from api import api_pb2
from runtimeservice.filters import labels_match
from runtimeservice.sandbox import SandboxRecord, SandboxState
from runtimeservice.sandbox_infra import alive


@functools.lru_cache(maxsize=4096)
def _config(raw: bytes) -> api_pb2.PodSandboxConfig:
    """The parsed config; shared, so callers copy from it and never change it."""
    return api_pb2.PodSandboxConfig.FromString(raw)


def visible(rec: SandboxRecord) -> bool:
    """CREATING sandboxes do not exist for clients yet."""
    return rec.state is not SandboxState.CREATING


def matches(rec: SandboxRecord, flt: api_pb2.PodSandboxFilter | None) -> bool:
    """Whether a visible record passes the filter: id prefix, state, labels, all combined."""
    if not visible(rec):
        return False
    if flt is None:
        return True
    if flt.id and not rec.id.startswith(flt.id):
        return False
    if flt.HasField("state") and flt.state.state != rec.cri_state:
        return False
    return not flt.label_selector or labels_match(flt.label_selector,
                                                 _config(rec.config).labels)


def to_pod_sandbox(rec: SandboxRecord) -> api_pb2.PodSandbox:
    config = _config(rec.config)
    return api_pb2.PodSandbox(id=rec.id, metadata=config.metadata, state=rec.cri_state,
                              created_at=rec.created_at, labels=config.labels,
                              annotations=config.annotations,
                              runtime_handler=rec.runtime_handler)


def _network(rec: SandboxRecord) -> api_pb2.PodSandboxNetworkStatus:
    if not rec.ips:
        return api_pb2.PodSandboxNetworkStatus()
    return api_pb2.PodSandboxNetworkStatus(
        ip=rec.ips[0], additional_ips=[api_pb2.PodIP(ip=ip) for ip in rec.ips[1:]])


def verbose_info(rec: SandboxRecord) -> dict[str, Any]:
    """What `crictl inspectp` shows beyond the status, containerd-style."""
    return {
        "id": rec.id,
        "state": rec.state.value,
        "pid": rec.infra_pid,
        "processStatus": ("running" if alive(rec.infra_pid, rec.infra_start) else "exited")
        if rec.infra_pid else "none",
        "netNamespacePath": rec.netns,
        "namespacePaths": {k: v for k, v in (("network", rec.netns), ("ipc", rec.ipcns),
                                              ("uts", rec.utsns), ("pid", rec.pidns)) if v},
        "cgroup": rec.cgroup,
        "cgroupsPath": rec.cgroup_runc,
        "shm": rec.shm,
        "podFiles": rec.pod_files,
        "runtimeHandler": rec.runtime_handler,
        "networkAttached": rec.network_attached,
        "config": json_format.MessageToDict(_config(rec.config)),
        **_resources(rec),
    }


def _resources(rec: SandboxRecord) -> dict[str, Any]:
    """The pod-level resources in effect (after UpdatePodSandboxResources, if any)."""
    res, over = rec.pod_resources()
    out = {}
    if res is not None:
        out["resources"] = json_format.MessageToDict(res)
    if over is not None:
        out["overhead"] = json_format.MessageToDict(over)
    return out


def to_status(rec: SandboxRecord, verbose: bool = False) -> api_pb2.PodSandboxStatusResponse:
    config = _config(rec.config)
    status = api_pb2.PodSandboxStatus(
        id=rec.id, metadata=config.metadata, state=rec.cri_state, created_at=rec.created_at,
        network=_network(rec),
        linux=api_pb2.LinuxPodSandboxStatus(namespaces=api_pb2.Namespace(
            options=config.linux.security_context.namespace_options)),
        labels=config.labels, annotations=config.annotations,
        runtime_handler=rec.runtime_handler)
    resp = api_pb2.PodSandboxStatusResponse(status=status, timestamp=time.time_ns())
    if verbose:
        resp.info["info"] = json.dumps(verbose_info(rec), sort_keys=True)
    return resp
