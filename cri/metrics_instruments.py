"""crib's metrics as prometheus_client objects on a private registry.

Loaded by `cri.metrics.enable()` only, so that a daemon with metrics off never
imports prometheus_client; everything else goes through `cri.metrics`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    ProcessCollector,
    disable_created_metrics,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector

from cri.metrics import PULL_BUCKETS, RPC_BUCKETS, STATE_KINDS, StateSource

log = logging.getLogger("cri.metrics")


class _StateCollector(Collector):
    """crib_containers / crib_sandboxes, computed by the runtime's callbacks at scrape time."""

    def __init__(self, sources: Mapping[str, StateSource]) -> None:
        self._sources = sources  # cri.metrics' live dict: later registrations show up

    def _family(self, kind: str) -> GaugeMetricFamily:
        return GaugeMetricFamily(f"crib_{kind}", f"Number of {kind} known to crib, by state.",
                                 labels=["state"])

    def describe(self) -> Iterable[Metric]:
        return [self._family(kind) for kind in STATE_KINDS]

    def collect(self) -> Iterable[Metric]:
        for kind in STATE_KINDS:
            source = self._sources.get(kind)
            if source is None:
                continue
            try:
                counts = source()
            except Exception:
                # One broken callback must not take the whole scrape down.
                log.exception("the %s state source failed during a metrics scrape", kind)
                continue
            family = self._family(kind)
            for state, count in sorted(counts.items()):
                family.add_metric([state], count)
            yield family


class Instruments:
    """Every metric crib records, on its own registry (never prometheus_client's global one)."""

    def __init__(self, state_sources: Mapping[str, StateSource]) -> None:
        # Go runtimes (CRI-O, containerd) export no *_created series; neither do we.
        disable_created_metrics()
        r = self.registry = CollectorRegistry()
        self.rpc_requests = Counter(
            "crib_grpc_requests", "CRI gRPC calls handled, by method and status code.",
            ["method", "code"], registry=r)
        self.rpc_duration = Histogram(
            "crib_grpc_request_duration_seconds", "Time to answer a CRI gRPC call.",
            ["method"], buckets=RPC_BUCKETS, registry=r)
        self.pull_bytes = Counter(
            "crib_image_pull_bytes", "Bytes downloaded from registries by image pulls.",
            registry=r)
        self.pull_duration = Histogram(
            "crib_image_pull_duration_seconds", "Duration of successful image pulls.",
            buckets=PULL_BUCKETS, registry=r)
        self.pulls = Counter(
            "crib_image_pulls", "Image pulls finished, by result (success or failure).",
            ["result"], registry=r)
        self.failures = Counter(
            "crib_operation_failures", "Failed operations, by operation and failing step.",
            ["operation", "step"], registry=r)
        r.register(_StateCollector(state_sources))
        ProcessCollector(registry=r)

    def render(self, accept: str) -> tuple[bytes, str]:
        """The exposition in the format `accept` asks for, and its content type."""
        encoder, content_type = choose_encoder(accept)
        return encoder(self.registry), content_type
