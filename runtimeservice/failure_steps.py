"""Which step of a multi-step operation failed, for `crib_operation_failures_total`.

An operation (RunPodSandbox, CreateContainer) names each step as it reaches
it; when an exception leaves the operation, the failure is counted once,
under the step that was running::

    async with FailureSteps("CreateContainer") as failing:
        failing.at("mount")
        await rootfs.mount(...)
        failing.at("oci_runtime")
        await monitor.create(...)

Steps that run concurrently wrap their awaitable with `run(step, aw)`, so the
one that actually failed is counted, not whichever was named last.

Cancellation (the client went away, the daemon stops) is not a failure and is
not counted. Step names become Prometheus label values: use the constants
below, never ids or messages. With metrics off, nothing is recorded.
"""

from __future__ import annotations

from collections.abc import Awaitable
from types import TracebackType
from typing import Final, TypeVar

from cri import metrics

T = TypeVar("T")

# The steps crib reports (the label values of `step`).
RECORD: Final = "record"  # writing the state record
IMAGE: Final = "image"  # resolving the container's image
CGROUP: Final = "cgroup"
NAMESPACES: Final = "namespaces"
MOUNT: Final = "mount"  # overlay rootfs, /dev/shm, pod files
SPEC: Final = "spec"  # building the OCI config
CNI: Final = "cni"
OCI_RUNTIME: Final = "oci_runtime"  # runc/crun, conmon, the infra process
SANDBOX: Final = "sandbox"  # the pod sandbox went away meanwhile


class FailureSteps:
    """Tracks the current step of one operation and counts its failure once."""

    def __init__(self, operation: str, step: str = RECORD) -> None:
        self.operation = operation
        self.step = step
        self.failed_step: str | None = None

    def at(self, step: str) -> None:
        """The operation is now running `step`."""
        self.step = step

    def fail(self, step: str | None = None) -> None:
        """Count the failure at `step` (default: the current one), unless already counted."""
        if self.failed_step is not None:
            return
        self.failed_step = step or self.step
        if metrics.ENABLED:
            metrics.record_failure(self.operation, self.failed_step)

    async def run(self, step: str, aw: Awaitable[T]) -> T:
        """Await `aw`, counting a failure at `step` (for steps run concurrently)."""
        try:
            return await aw
        except Exception:
            self.fail(step)
            raise

    def _exit(self, exc: BaseException | None) -> None:
        if isinstance(exc, Exception):
            self.fail()

    def __enter__(self) -> FailureSteps:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._exit(exc)

    async def __aenter__(self) -> FailureSteps:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        self._exit(exc)
