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
    "requests_sent",
    "requests_refused",
    "connections_refused",
    "bytes_received",
    "bad_chunks",
    "per_peer_errors",
    "per_peer_bad",
    "per_peer_bytes",
    "lookups",
    "lookups_missing",
    "readdirs",
    "dirs_listed_ahead",
    "list_ahead_dropped",
    "list_ahead_errors",
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
                # A mapping of numbers is one family with one more label (``peer`` for
                # ``per_peer_errors``: the key is what the field name says it is per).
                if isinstance(v, dict):
                    key = f.name.removeprefix("per_").split("_", 1)[0]
                    fam = self._family(f"lazyfs_{group}_{f.name}", group, f.name, [*names, key])
                    for k, item in sorted(v.items()):
                        if _numeric(item):
                            fam.add_metric([*values, str(k)], float(item))
                    yield fam
                elif _numeric(v):
                    fam = self._family(f"lazyfs_{group}_{f.name}", group, f.name, names)
                    fam.add_metric(values, float(v))
                    yield fam

    @staticmethod
    def _family(name: str, group: str, field: str, labels: list[str]) -> CounterMetricFamily | GaugeMetricFamily:
        if field in COUNTERS:
            return CounterMetricFamily(name, f"lazyfs {group} {field}", labels=labels)
        return GaugeMetricFamily(name, f"lazyfs {group} {field}", labels=labels)


def _numeric(v: object) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def serve_metrics(addr: str, collector: StatisticsCollector) -> CollectorRegistry:
    """Start the exporter on ``HOST:PORT`` in a background thread."""
    host, _, port = addr.rpartition(":")
    registry = CollectorRegistry()
    registry.register(collector)
    start_http_server(int(port), addr=host or "0.0.0.0", registry=registry)
    return registry
