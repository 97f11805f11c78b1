"""Prometheus metrics of a device.

The data path only bumps plain counters (a few integer additions per request,
no locks); everything is turned into Prometheus families when scraped.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
)
from prometheus_client.registry import Collector, CollectorRegistry

from mirrorpool.mirror.changes import CHUNK
from mirrorpool.mirror.pool import MemberState

if TYPE_CHECKING:
    from mirrorpool.device.device import Device

LATENCY_BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025,
                   0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
OPS = ("read", "write", "flush", "trim", "zero", "cache", "block_status", "trigger", "other")


class OpStats:
    __slots__ = ("count", "errors", "bytes", "buckets", "total_seconds")

    def __init__(self) -> None:
        self.count = 0
        self.errors = 0
        self.bytes = 0
        self.buckets = [0] * (len(LATENCY_BUCKETS) + 1)
        self.total_seconds = 0.0

    def observe(self, seconds: float, nbytes: int, failed: bool) -> None:
        self.count += 1
        self.bytes += nbytes
        self.total_seconds += seconds
        self.buckets[bisect_left(LATENCY_BUCKETS, seconds)] += 1
        if failed:
            self.errors += 1


class IoStats:
    """Per-export-name request statistics, filled by the NBD server."""

    def __init__(self) -> None:
        self.by_lu: dict[str, dict[str, OpStats]] = {}

    def for_lu(self, lu: str) -> dict[str, OpStats]:
        stats = self.by_lu.get(lu)
        if stats is None:
            stats = self.by_lu[lu] = {op: OpStats() for op in OPS}
        return stats


class DeviceCollector(Collector):
    def __init__(self, device: Device, io: IoStats) -> None:
        self.device = device
        self.io = io

    def collect(self) -> Iterator:  # type: ignore[override]
        requests = CounterMetricFamily("mirrorpool_requests", "NBD requests served",
                                       labels=["lu", "op"])
        errors = CounterMetricFamily("mirrorpool_request_errors",
                                     "NBD requests answered with an error", labels=["lu", "op"])
        nbytes = CounterMetricFamily("mirrorpool_request_bytes", "bytes read or written",
                                     labels=["lu", "op"])
        latency = HistogramMetricFamily("mirrorpool_request_latency_seconds",
                                        "time from request received to reply sent",
                                        labels=["lu", "op"])
        for lu, ops in list(self.io.by_lu.items()):
            for op, s in ops.items():
                if not s.count:
                    continue
                requests.add_metric([lu, op], s.count)
                errors.add_metric([lu, op], s.errors)
                nbytes.add_metric([lu, op], s.bytes)
                cumulative, running = [], 0
                for bound, n in zip((*LATENCY_BUCKETS, float("inf")), s.buckets, strict=True):
                    running += n
                    cumulative.append((str(bound) if bound != float("inf") else "+Inf",
                                       running))
                latency.add_metric([lu, op], cumulative, s.total_seconds)
        yield from (requests, errors, nbytes, latency)

        queue = GaugeMetricFamily("mirrorpool_queue_depth",
                                  "operations admitted and not finished", labels=["lu"])
        seq = CounterMetricFamily("mirrorpool_sequence", "last sequence number given",
                                  labels=["lu"])
        gens = GaugeMetricFamily("mirrorpool_generations", "live generations", labels=["lu"])
        members = GaugeMetricFamily("mirrorpool_pool_members", "pool members by state",
                                    labels=["lu", "state"])
        mirrored = GaugeMetricFamily("mirrorpool_mirror_in_sync",
                                     "1 when the active backup equals the primary",
                                     labels=["lu"])
        left = GaugeMetricFamily("mirrorpool_resync_bytes_left",
                                 "bytes still to copy into backups", labels=["lu"])
        rate = GaugeMetricFamily("mirrorpool_resync_rate_bytes_per_second",
                                 "recent resync copy rate", labels=["lu"])
        failures = CounterMetricFamily("mirrorpool_member_failures",
                                       "pool members failed by I/O errors", labels=["lu"])
        splits = GaugeMetricFamily("mirrorpool_split_latency_p99_seconds",
                                   "99th percentile of trigger-to-readable time (last 1000)",
                                   labels=["lu"])
        for lu in self.device.list_lus():
            v = lu.volume
            name = lu.name
            queue.add_metric([name], v.seq.inflight())
            seq.add_metric([name], v.seq.last_seq)
            gens.add_metric([name], len(v.live_generations()))
            for state in MemberState:
                members.add_metric([name, state.value],
                                   sum(1 for m in v.members if m.state is state))
            active = v.active
            mirrored.add_metric([name], 1 if active is not None and not active.pending else 0)
            pending = sum(len(m.pending) for m in v.members)
            left.add_metric([name], pending * CHUNK)
            rate.add_metric([name], v.resync_progress(active)["rate_bytes_per_s"]
                            if active else 0)
            failures.add_metric([name], v.failures)
            lat = sorted(v.split_latencies)
            splits.add_metric([name], lat[int(len(lat) * 0.99)] if lat else 0.0)
        yield from (queue, seq, gens, members, mirrored, left, rate, failures, splits)
        yield from self._replication()

    def _replication(self) -> Iterator:
        connected = GaugeMetricFamily("mirrorpool_replication_connected",
                                      "1 while the link to the remote device is up", labels=["lu"])
        consistent = GaugeMetricFamily("mirrorpool_replication_consistent",
                                       "1 while the remote copy is consistent (journaling)",
                                       labels=["lu"])
        lag_seq = GaugeMetricFamily("mirrorpool_replication_lag_sequence",
                                    "sequence numbers not yet answered by the remote device",
                                    labels=["lu"])
        lag_s = GaugeMetricFamily("mirrorpool_replication_lag_seconds",
                                  "age of the oldest record not yet answered", labels=["lu"])
        journal = GaugeMetricFamily("mirrorpool_replication_journal_bytes",
                                    "replication journal in use", labels=["lu"])
        limit = GaugeMetricFamily("mirrorpool_replication_journal_limit_bytes",
                                  "replication journal limit", labels=["lu"])
        dirty = GaugeMetricFamily("mirrorpool_replication_refresh_bytes",
                                  "bytes to copy or compare before the copy is consistent",
                                  labels=["lu"])
        sent = CounterMetricFamily("mirrorpool_replication_sent_bytes",
                                   "bytes written to the remote device", labels=["lu"])
        records = CounterMetricFamily("mirrorpool_replication_records_sent",
                                      "journal records sent to the remote device",
                                      labels=["lu"])
        windows = CounterMetricFamily("mirrorpool_replication_windows_sent",
                                      "windows the journal records were sent in (records "
                                      "sent back to back before their replies)",
                                      labels=["lu"])
        journal_writes = CounterMetricFamily(
            "mirrorpool_replication_journal_writes",
            "system calls that wrote journal records (the records of the host writes "
            "a connection had received are written together)", labels=["lu"])
        skipped = CounterMetricFamily("mirrorpool_replication_triggers_not_replicated",
                                      "triggers answered while the copy was not consistent",
                                      labels=["lu"])
        for s in self.device.remotes.all_status():
            lu = [s["lu"]]
            connected.add_metric(lu, 1 if s["connected"] else 0)
            consistent.add_metric(lu, 1 if s["state"] == "consistent" else 0)
            lag_seq.add_metric(lu, s["lag_seq"] or 0)
            lag_s.add_metric(lu, s["lag_seconds"])
            journal.add_metric(lu, s["journal_used"])
            limit.add_metric(lu, s["journal_limit"])
            dirty.add_metric(lu, s["dirty_bytes"] + s["compare_bytes"])
            sent.add_metric(lu, s["sent_bytes"])
            records.add_metric(lu, s["records_sent"])
            windows.add_metric(lu, s["windows_sent"])
            journal_writes.add_metric(lu, s["journal_writes"])
            skipped.add_metric(lu, s["triggers_not_replicated"])
        yield from (connected, consistent, lag_seq, lag_s, journal, limit, dirty, sent, records,
                    windows, journal_writes, skipped)


def make_registry(device: Device, io: IoStats) -> CollectorRegistry:
    registry = CollectorRegistry()
    registry.register(DeviceCollector(device, io))
    return registry
