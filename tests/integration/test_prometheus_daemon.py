"""The Prometheus endpoint of a real daemon: it parses with prometheus_client's own
parser, and its counters and gauges move with the calls made — RPC counts and
latencies, failures by the step that failed, containers and sandboxes by state."""

from __future__ import annotations

import re
import time
from pathlib import Path

import grpc
import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from api import api_pb2
from runtimeservice.service import RuntimeService
from tests.integration.conftest import PodNet, SeededRegistry
from tests.integration.cridaemon import (
    CtrCrib,
    code_of,
    container_config,
    create,
    ctr_crib,
    pull,
    remove,
    start,
    stop,
    wait_state,
)
from tests.integration.daemon import Daemon
from tests.integration.test_sandbox_faults import Gate
from tests.integration.test_sandbox_run import NODE, pod_config

pytestmark = pytest.mark.integration
__all__ = ["ctr_crib"]

if not hasattr(RuntimeService, "init_operator"):
    pytest.skip("the Prometheus state sources are not wired into RuntimeService yet",
                allow_module_level=True)

METRICS_CONFIG = "\n[metrics]\nenabled = true\naddress = '127.0.0.1:0'\n"
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def metrics_url(d: Daemon) -> str:
    """The endpoint the daemon bound (port 0 = any free one), from its log."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        found = re.search(r"serving Prometheus metrics on (http://\S+/metrics)",
                          d.log.read_text())
        if found:
            return found[1]
        time.sleep(0.05)
    raise AssertionError("the daemon did not log its metrics address")


def scrape(url: str) -> Samples:
    resp = requests.get(url, timeout=10)
    assert resp.status_code == 200 and resp.headers["Content-Type"].startswith("text/plain")
    out: Samples = {}
    for family in text_string_to_metric_families(resp.text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def test_endpoint_parses_and_counters_move(ctr_crib: CtrCrib, test_registry: SeededRegistry,
                                           pod_net: PodNet, tmp_path: Path) -> None:
    Gate(pod_net, tmp_path, fail=True)  # CNI ADD fails: pods on the network cannot start
    d = ctr_crib(extra_config=METRICS_CONFIG)
    url = metrics_url(d)
    first = scrape(url)
    assert value(first, "process_resident_memory_bytes") > 0
    assert value(first, "process_open_fds") > 0
    assert value(first, "crib_containers", state="running") == 0
    assert value(first, "crib_sandboxes", state="ready") == 0

    # RunPodSandbox: one failing at CNI, one on the host network.
    req = api_pb2.RunPodSandboxRequest(config=pod_config("cni-fails"))
    code, _ = code_of(lambda: d.runtime.RunPodSandbox(req, timeout=60))
    assert code == grpc.StatusCode.INTERNAL
    config = pod_config("host", network=NODE)
    config.log_directory = str(d.base / "logs" / "host")
    sid = d.runtime.RunPodSandbox(api_pb2.RunPodSandboxRequest(config=config),
                                  timeout=60).pod_sandbox_id

    # CreateContainer: failing at the image, at the OCI runtime, then one that works.
    image = pull(d, test_registry.ref("busybox"))
    code, _ = code_of(lambda: create(d, sid, config, container_config(
        "no-image", test_registry.ref("busybox", "absent"), ["true"])))
    assert code == grpc.StatusCode.NOT_FOUND
    bad_cpus = container_config("bad-cpus", image, ["sleep", "1000"])
    bad_cpus.linux.resources.cpuset_cpus = "1023"  # no such CPU: the runtime refuses
    code, msg = code_of(lambda: create(d, sid, config, bad_cpus))
    assert code != grpc.StatusCode.OK, msg
    cid = create(d, sid, config, container_config("ok", image, ["sleep", "1000"]))
    start(d, cid)

    now = scrape(url)
    failures = "crib_operation_failures_total"
    assert value(now, failures, operation="RunPodSandbox", step="cni") == 1
    assert value(now, failures, operation="CreateContainer", step="image") == 1
    assert value(now, failures, operation="CreateContainer", step="oci_runtime") == 1
    requests_total = "crib_grpc_requests_total"
    assert value(now, requests_total, method="RunPodSandbox", code="INTERNAL") == 1
    assert value(now, requests_total, method="RunPodSandbox", code="OK") == 1
    assert value(now, requests_total, method="CreateContainer", code="NOT_FOUND") == 1
    assert value(now, requests_total, method="CreateContainer", code="OK") == 1
    assert value(now, requests_total, method="StartContainer", code="OK") == 1
    assert value(now, "crib_grpc_request_duration_seconds_count", method="RunPodSandbox") == 2
    assert value(now, "crib_grpc_request_duration_seconds_sum", method="RunPodSandbox") > 0
    assert value(now, "crib_containers", state="running") == 1
    assert value(now, "crib_containers", state="created") == 0
    assert value(now, "crib_sandboxes", state="ready") == 1
    assert value(now, "process_cpu_seconds_total") >= value(first, "process_cpu_seconds_total")
    assert value(now, "crib_image_pulls_total", result="success") == 1
    assert value(now, "crib_image_pull_bytes_total") > 0
    assert value(now, "crib_image_pull_duration_seconds_count") == 1

    stop(d, cid)
    wait_state(d, cid, api_pb2.ContainerState.CONTAINER_EXITED)
    later = scrape(url)
    assert value(later, "crib_containers", state="running") == 0
    assert value(later, "crib_containers", state="exited") == 1
    remove(d, cid)
    d.runtime.StopPodSandbox(api_pb2.StopPodSandboxRequest(pod_sandbox_id=sid))
    last = scrape(url)
    assert value(last, "crib_containers", state="exited") == 0
    assert value(last, "crib_sandboxes", state="notready") == 1
    d.runtime.RemovePodSandbox(api_pb2.RemovePodSandboxRequest(pod_sandbox_id=sid))
    assert value(scrape(url), "crib_sandboxes", state="notready") == 0
