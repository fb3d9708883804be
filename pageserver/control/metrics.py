"""Prometheus metrics of the control plane (served at /metrics): how many
databases, branches and running computes there are, how long creates,
wakes and suspends take, how often each limit refused something (the
front end adds how late its event loop runs, and what its proxy refused)."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

LAG_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 1.0)
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 1.0, 2.5, 5.0, 10.0)


class Metrics:
    def __init__(self, databases: Callable[[], float], branches: Callable[[], float],
                 running: Callable[[], float], hits: Callable[[], dict[str, int]] | None = None) -> None:
        self.registry = CollectorRegistry()
        if hits is not None:
            self.registry.register(_Hits(hits))
        for name, doc, fn in (("strata_databases", "Databases in the catalog", databases),
                              ("strata_branches", "Branches in the catalog", branches),
                              ("strata_running_computes", "Branches with a running compute", running)):
            Gauge(name, doc, registry=self.registry).set_function(fn)
        self.create = Histogram("strata_create_database_seconds", "Create a database (API call to URI)",
                                buckets=BUCKETS, registry=self.registry)
        self.branch = Histogram("strata_create_branch_seconds", "Create a branch",
                                buckets=BUCKETS, registry=self.registry)
        self.wake = Histogram("strata_wake_seconds", "Start a suspended branch's compute",
                              buckets=BUCKETS, registry=self.registry)
        self.suspend = Histogram("strata_suspend_seconds", "Stop a branch's compute",
                                 buckets=BUCKETS, registry=self.registry)

    def text(self) -> bytes:
        return generate_latest(self.registry)


class _Hits(Collector):
    """strata_limit_hits_total{limit}: counted where each limit is enforced."""

    def __init__(self, hits: Callable[[], dict[str, int]]) -> None:
        self._hits = hits

    def collect(self) -> list[CounterMetricFamily]:
        family = CounterMetricFamily("strata_limit_hits", "Things a database's limits refused, by limit "
                                     "(storage: writes past max_size; rate: API creations; memory: OOM kills)",
                                     labels=["limit"])
        for limit, n in sorted(self._hits().items()):
            family.add_metric([limit], n)
        return [family]
