"""Prometheus metrics: names in one place, values read from ``statistics()`` at scrape time.

Nothing in the hot path touches prometheus-client: the fetcher and store keep
plain counters, and :class:`StatisticsCollector` turns their frozen
statistics dataclasses into metric families when Prometheus scrapes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

__all__ = ["COUNTERS", "StatisticsCollector", "serve_metrics"]

# Fields that only grow are counters; everything else is exported as a gauge.
COUNTERS = {
    "requests",
    "memory_hits",
    "cache_hits",
    "cache_misses",
    "bytes_from_memory",
    "bytes_from_cache",
    "bytes_from_peers",
    "bytes_from_origin",
    "origin_requests",
    "origin_errors",
    "peer_errors",
    "verify_failures",
    "deadline_failures",
    "cache_write_errors",
    "hits",
    "misses",
    "inserts",
    "evictions",
    "torn",
    "bytes_served",
    "requests_served",
}


class StatisticsCollector(Collector):
    """Exports ``lazyfs_<group>_<field>`` for every numeric field of each statistics object."""

    def __init__(self, sources: dict[str, Callable[[], Any]], labels: dict[str, str]) -> None:
        self.sources = sources
        self.labels = labels

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        names = list(self.labels)
        values = [self.labels[n] for n in names]
        for group, fn in self.sources.items():
            stats = fn()
            if stats is None:
                continue
            for f in dataclasses.fields(stats):
                v = getattr(stats, f.name)
                if not isinstance(v, int | float) or isinstance(v, bool):
                    continue
                name = f"lazyfs_{group}_{f.name}"
                fam: CounterMetricFamily | GaugeMetricFamily
                if f.name in COUNTERS:
                    fam = CounterMetricFamily(name, f"lazyfs {group} {f.name}", labels=names)
                else:
                    fam = GaugeMetricFamily(name, f"lazyfs {group} {f.name}", labels=names)
                fam.add_metric(values, float(v))
                yield fam


def serve_metrics(addr: str, collector: StatisticsCollector) -> CollectorRegistry:
    """Start the exporter on ``HOST:PORT`` in a background thread."""
    host, _, port = addr.rpartition(":")
    registry = CollectorRegistry()
    registry.register(collector)
    start_http_server(int(port), addr=host or "0.0.0.0", registry=registry)
    return registry
