"""GetContainerEvents through a real daemon: the four lifecycle events in order with
the statuses the kubelet's evented PLEG reads, several subscribers, a subscriber
that never reads (dropped, without slowing CreateContainer), and exits that
happened while the daemon was down."""

from __future__ import annotations

import queue
import statistics
import subprocess
import threading
import time
from collections.abc import Callable

import grpc
import pytest

from api import api_pb2, api_pb2_grpc
from cri.config import RuntimeConfig
from runtimeservice.service import RuntimeService
from tests.integration.conftest import SeededRegistry
from tests.integration.cridaemon import (
    CtrCrib,
    container_config,
    create,
    ctr_crib,
    info,
    pull,
    remove,
    sandbox,
    start,
    stop,
    wait_state,
)
from tests.integration.daemon import Daemon

pytestmark = pytest.mark.integration
__all__ = ["ctr_crib"]

if not hasattr(RuntimeService, "GetContainerEvents"):
    pytest.skip("GetContainerEvents is not mixed into RuntimeService yet",
                allow_module_level=True)

EV = api_pb2.ContainerEventType
CREATED, STARTED = EV.CONTAINER_CREATED_EVENT, EV.CONTAINER_STARTED_EVENT
STOPPED, DELETED = EV.CONTAINER_STOPPED_EVENT, EV.CONTAINER_DELETED_EVENT
ST = api_pb2.ContainerState
WAIT = 30.0  # generous limits for events to arrive, not timing checks


class Subscriber:
    """One GetContainerEvents stream, read by a thread into a queue (or not read at all)."""

    def __init__(self, d: Daemon, read: bool = True, fixed_window: bool = False) -> None:
        # With `fixed_window`, the stream has its own connection whose HTTP/2
        # flow-control window stays at the default 64 KiB (no BDP probing, which
        # would grow it to megabytes): a client that does not read is then
        # noticed by the daemon after a few events instead of hundreds.
        self.channel: grpc.Channel | None = None
        stub = d.runtime
        if fixed_window:
            self.channel = grpc.insecure_channel(f"unix://{d.socket}",
                                                 options=[("grpc.http2.bdp_probe", 0)])
            stub = api_pb2_grpc.RuntimeServiceStub(self.channel)
        self.call = stub.GetContainerEvents(api_pb2.GetEventsRequest())
        self.call.initial_metadata()  # sent once the daemon has subscribed this stream
        self.events: queue.Queue[api_pb2.ContainerEventResponse] = queue.Queue()
        self.error: grpc.RpcError | None = None
        self.done = threading.Event()
        self.thread: threading.Thread | None = None
        if read:
            self.start_reading()

    def start_reading(self) -> None:
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        try:
            for event in self.call:
                self.events.put(event)
        except grpc.RpcError as err:
            self.error = err
        finally:
            self.done.set()

    def next(self, timeout: float = WAIT) -> api_pb2.ContainerEventResponse:
        return self.events.get(timeout=timeout)

    def until(self, pred: Callable[[api_pb2.ContainerEventResponse], bool]
              ) -> list[api_pb2.ContainerEventResponse]:
        """Events up to and including the first one matching `pred`."""
        seen = []
        while True:
            event = self.next()
            seen.append(event)
            if pred(event):
                return seen

    def of(self, cid: str, count: int) -> list[api_pb2.ContainerEventResponse]:
        """The next `count` events about container `cid` (others are skipped)."""
        found: list[api_pb2.ContainerEventResponse] = []
        while len(found) < count:
            event = self.next()
            if event.container_id == cid:
                found.append(event)
        return found

    def close(self) -> None:
        self.call.cancel()
        if self.thread is not None:
            self.thread.join(10)
        if self.channel is not None:
            self.channel.close()


def own_status(event: api_pb2.ContainerEventResponse) -> api_pb2.ContainerStatus | None:
    return next((s for s in event.containers_statuses if s.id == event.container_id), None)


def test_lifecycle_events_in_order_with_statuses_for_two_subscribers(
        ctr_crib: CtrCrib, test_registry: SeededRegistry) -> None:
    d = ctr_crib()
    image = pull(d, test_registry.ref("busybox"))
    sid, pod = sandbox(d, "events", labels={"app": "ev"})
    subs = [Subscriber(d), Subscriber(d)]
    try:
        sidecar = create(d, sid, pod, container_config("sidecar", image, ["sleep", "1000"]))
        cid = create(d, sid, pod, container_config("main", image, ["sh", "-c", "exit 3"]))
        start(d, cid)
        assert wait_state(d, cid, ST.CONTAINER_EXITED).exit_code == 3
        remove(d, cid)
        remove(d, sidecar)
        for sub in subs:
            stream = sub.until(lambda e: e.container_id == sidecar
                               and e.container_event_type == DELETED)
            # A container removed before it ran is stopped first, as a running one is.
            assert [e.container_event_type for e in stream if e.container_id == sidecar] == [
                CREATED, STOPPED, DELETED]
            events = [e for e in stream if e.container_id == cid]
            assert [e.container_event_type for e in events] == [CREATED, STARTED, STOPPED,
                                                                DELETED]
            created_at = [e.created_at for e in stream]
            assert created_at == sorted(created_at) and created_at[0] > 0
            for e in events:
                # The pod's status with its metadata (the kubelet drops events without it).
                assert e.pod_sandbox_status.id == sid
                assert e.pod_sandbox_status.metadata.name == "events"
                assert e.pod_sandbox_status.metadata.uid == pod.metadata.uid
                assert e.pod_sandbox_status.state == api_pb2.PodSandboxState.SANDBOX_READY
                assert e.pod_sandbox_status.labels["app"] == "ev"
                # Every container of the pod, oldest first; a deleted one is gone.
                ids = [s.id for s in e.containers_statuses]
                assert ids == ([sidecar] if e.container_event_type == DELETED
                               else [sidecar, cid])
            states = [own_status(e) for e in events[:3]]
            assert [s.state for s in states if s] == [ST.CONTAINER_CREATED,
                                                      ST.CONTAINER_RUNNING, ST.CONTAINER_EXITED]
            exited = states[2]
            assert exited is not None and (exited.exit_code, exited.reason) == (3, "Error")
            assert exited.finished_at >= exited.started_at > 0
            assert exited.metadata.name == "main"
            assert stream[-1].containers_statuses == []  # the pod is empty now
    finally:
        for sub in subs:
            sub.close()


def _timed_creates(d: Daemon, sid: str, pod: api_pb2.PodSandboxConfig, image: str,
                   prefix: str, n: int) -> tuple[list[float], list[str]]:
    times, ids = [], []
    for i in range(n):
        config = container_config(f"{prefix}{i}", image, ["sleep", "1000"])
        t0 = time.perf_counter()
        ids.append(create(d, sid, pod, config))
        times.append(time.perf_counter() - t0)
    return times, ids


BUFFER = 4  # events a subscriber may fall behind (the test daemon's runtime.event_buffer)
CREATES = 30


@pytest.mark.skipif(not hasattr(RuntimeConfig, "event_buffer"),
                    reason="needs the [runtime] event_buffer option in cri/config.py")
def test_subscriber_that_never_reads_is_dropped_without_slowing_create(
        ctr_crib: CtrCrib, test_registry: SeededRegistry) -> None:
    d = ctr_crib(extra_config=f"\n[runtime]\nevent_buffer = {BUFFER}\n")
    image = pull(d, test_registry.ref("busybox"))
    warm_sid, warm_pod = sandbox(d, "warm")
    _, ids = _timed_creates(d, warm_sid, warm_pod, image, "warm", 3)  # first calls fill caches
    # The same work twice, each in a fresh pod: without subscribers, then with one
    # that never reads (and one that does).
    base_sid, base_pod = sandbox(d, "baseline")
    baseline, more = _timed_creates(d, base_sid, base_pod, image, "c", CREATES)
    ids += more
    stuck = Subscriber(d, read=False, fixed_window=True)
    reader = Subscriber(d)
    try:
        sid, pod = sandbox(d, "loaded")
        loaded, more = _timed_creates(d, sid, pod, image, "c", CREATES)
        ids += more
        # Each event carries the statuses of all the pod's containers, so the stuck
        # stream's flow-control window fills after a dozen or so events, then its
        # buffer, well within these calls: from then on it costs nothing.
        ratio = statistics.median(loaded) / statistics.median(baseline)
        assert ratio < 2.0, (f"CreateContainer median {statistics.median(loaded) * 1000:.1f} "
                             f"ms with a stuck subscriber vs "
                             f"{statistics.median(baseline) * 1000:.1f} ms without")
        # The reader saw every one of them, in order.
        seen = [e.container_id for e in reader.until(lambda e: e.container_id == more[-1])]
        assert [c for c in seen if c in more] == more
        # The stuck one, once it reads, gets what was in flight, then RESOURCE_EXHAUSTED.
        stuck.start_reading()
        assert stuck.done.wait(WAIT)
        assert stuck.error is not None
        assert stuck.error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "too slow" in (stuck.error.details() or "")
        assert stuck.events.qsize() < len(more)
        assert not reader.done.is_set()  # the reader is still subscribed
    finally:
        stuck.close()
        reader.close()
    for cid in ids:
        remove(d, cid)


def test_exits_while_the_daemon_was_down_are_emitted_after_start(
        ctr_crib: CtrCrib, test_registry: SeededRegistry) -> None:
    d = ctr_crib()
    image = pull(d, test_registry.ref("busybox"))
    sid, pod = sandbox(d, "restart")
    dies = create(d, sid, pod, container_config("dies", image, ["sleep", "1000"]))
    keeps = create(d, sid, pod, container_config("keeps", image, ["sleep", "1000"]))
    for cid in (dies, keeps):
        start(d, cid)
    container_pid = int(info(d, dies)["pid"])
    assert d.stop() == 0
    # While crib is down, one container is killed; conmon records the exit.
    runc_root = d.runroot / "runtimes" / "runc"
    subprocess.run(["runc", "--root", str(runc_root), "kill", dies, "KILL"], check=True)
    exit_file = d.runroot / "exits" / dies
    deadline = time.monotonic() + WAIT
    while not exit_file.exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert exit_file.exists(), f"conmon wrote no exit file for {dies} (pid {container_pid})"

    d.start()
    # Subscribers that connect after the restart (a kubelet reconnecting, and a second
    # client) each get the exit found at start, then live events.
    subs = [Subscriber(d), Subscriber(d)]
    try:
        for sub in subs:
            event = sub.next()
            assert (event.container_id, event.container_event_type) == (dies, STOPPED)
            st = own_status(event)
            assert st is not None and (st.state, st.exit_code) == (ST.CONTAINER_EXITED, 137)
            assert event.pod_sandbox_status.id == sid
            assert {s.id for s in event.containers_statuses} == {dies, keeps}
        stop(d, keeps)
        for sub in subs:
            event = sub.next()
            assert (event.container_id, event.container_event_type) == (keeps, STOPPED)
    finally:
        for sub in subs:
            sub.close()
    remove(d, dies)
    remove(d, keeps)
