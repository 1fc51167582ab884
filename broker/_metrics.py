"""The broker's Prometheus metrics (names agreed in docs/broker.md's metrics table).

Two kinds of numbers live here:

- *Events* (a lease was handed out, a restore finished, a task crashed) are
  counted or timed the moment they happen, by the broker code that sees them,
  into ordinary ``prometheus_client`` counters and histograms.
- *Levels* (clones per state, queue length, sessions open) are never pushed:
  a custom collector calls one ``readings()`` function at scrape time, which
  builds a frozen :class:`Readings` from the pool's and the gateway's
  ``statistics()``. A scrape therefore always sees one consistent moment and
  there is no gauge that can drift out of date.

Everything is registered in a dedicated :class:`CollectorRegistry`, so several
brokers in one test process never share numbers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import attrs
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

CLONE_STATES = ("provisioning", "warm", "leased", "destroying", "broken")
"""Every value of the ``state`` label of ``aldaas_clones`` (all are exported, zeros included)."""

SNAPSHOT_STATUSES = ("restoring", "verifying", "ready", "failed")
"""Every value of the ``status`` label of ``aldaas_snapshots``."""

DIRECTIONS = ("up", "down")
"""``up`` is client → database, ``down`` is database → client."""

_FAST_BUCKETS: tuple[float, ...] = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.15, 0.25)
_FAST_BUCKETS += (0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
"""Hand-out and queue waits: the target is 50 ms p50 / 150 ms p99, a queue may last minutes."""

_SLOW_BUCKETS: tuple[float, ...] = (
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
    300.0,
    600.0,
)
_SLOW_BUCKETS += (1800.0, 3600.0, 7200.0, 14400.0)
"""Provisioning takes seconds; a restore of a large backup takes hours."""


@attrs.frozen(kw_only=True)
class Readings:
    """One consistent moment of every level the broker exports, read at scrape time."""

    clones: Mapping[str, int] = attrs.field(factory=dict)
    """Clones per state; states missing here are exported as 0."""
    queue_length: int = 0
    restore_done_bytes: int = 0
    restore_total_bytes: int = 0
    snapshots: Mapping[str, int] = attrs.field(factory=dict)
    """Snapshots per status; statuses missing here are exported as 0."""
    snapshot_age_seconds: float | None = None
    """Age of the newest ready snapshot; ``None`` (exported as 0) when there is none."""
    source_last_success: float | None = None
    """Wall-clock epoch seconds of the source's last successful listing; ``None`` (exported as
    0) before the first."""
    leases_active: int = 0
    leases_max_active: int | None = None
    """``lease.max_active``; ``None`` (exported as 0) when leases are unlimited."""
    gateway_sessions: int = 0
    gateway_streams: int = 0
    gateway_bytes_up: int = 0
    """Cumulative bytes client → database since the gateway started (a counter)."""
    gateway_bytes_down: int = 0
    """Cumulative bytes database → client since the gateway started (a counter)."""
    gateway_auth_failures: int = 0
    """Cumulative rejected tokens and secrets since the gateway started (a counter)."""
    gateway_refused: int = 0
    """Cumulative connections refused before authentication (caps, lockouts, a full gateway)."""
    gateway_handshakes: int = 0
    """Connections accepted whose credentials are not verified yet."""
    gateway_memory_held_bytes: int = 0
    """Bytes of the gateway's memory budget that sessions hold."""
    trio_tasks: int = 0
    """Trio tasks alive in the broker process; a count that climbs and never comes back is a leak."""


ReadingsFunction = Callable[[], Readings]


class _LevelsCollector(Collector):
    """Turns one :class:`Readings` into gauge (and sampled counter) families per scrape."""

    def __init__(self, readings: ReadingsFunction) -> None:
        self._readings = readings

    def describe(self) -> Iterable[Metric]:
        # Describing without calling readings() keeps registration free of side effects.
        return _families(Readings())

    def collect(self) -> Iterable[Metric]:
        return _families(self._readings())


def _families(r: Readings) -> list[Metric]:
    clones = GaugeMetricFamily(
        "aldaas_clones", "Database clones by life-cycle state.", labels=["state"]
    )
    for state in CLONE_STATES:
        clones.add_metric([state], r.clones.get(state, 0))
    snapshots = GaugeMetricFamily("aldaas_snapshots", "Snapshots by status.", labels=["status"])
    for status in SNAPSHOT_STATUSES:
        snapshots.add_metric([status], r.snapshots.get(status, 0))
    gateway_bytes = CounterMetricFamily(
        "aldaas_gateway_bytes",
        "Payload bytes relayed by the gateway (up: client to database, down: back).",
        labels=["direction"],
    )
    gateway_bytes.add_metric(["up"], r.gateway_bytes_up)
    gateway_bytes.add_metric(["down"], r.gateway_bytes_down)
    return [
        clones,
        GaugeMetricFamily(
            "aldaas_queue_length", "Acquirers waiting for a clone.", value=r.queue_length
        ),
        GaugeMetricFamily(
            "aldaas_restore_done_bytes",
            "Bytes done of the restore in progress (0 when none).",
            value=r.restore_done_bytes,
        ),
        GaugeMetricFamily(
            "aldaas_restore_total_bytes",
            "Size of the backup being restored (0 when none).",
            value=r.restore_total_bytes,
        ),
        snapshots,
        GaugeMetricFamily(
            "aldaas_snapshot_age_seconds",
            "Age of the newest ready snapshot (0 when there is none).",
            value=r.snapshot_age_seconds or 0.0,
        ),
        GaugeMetricFamily(
            "aldaas_source_last_success_timestamp_seconds",
            "Unix time of the backup source's last successful listing (0 before the first).",
            value=r.source_last_success or 0.0,
        ),
        GaugeMetricFamily("aldaas_leases_active", "Leases not yet ended.", value=r.leases_active),
        GaugeMetricFamily(
            "aldaas_leases_max_active",
            "lease.max_active: hand-outs are refused at this many active leases (0: no limit).",
            value=r.leases_max_active or 0,
        ),
        GaugeMetricFamily(
            "aldaas_gateway_sessions", "Gateway sessions open.", value=r.gateway_sessions
        ),
        GaugeMetricFamily(
            "aldaas_gateway_streams",
            "TCP streams open through the gateway.",
            value=r.gateway_streams,
        ),
        gateway_bytes,
        GaugeMetricFamily(
            "aldaas_trio_tasks", "Trio tasks alive in the broker process.", value=r.trio_tasks
        ),
        CounterMetricFamily(
            "aldaas_gateway_auth_failures",
            "Gateway requests refused for a wrong instance token or lease secret.",
            value=r.gateway_auth_failures,
        ),
        CounterMetricFamily(
            "aldaas_gateway_refused",
            "Gateway connections refused before authentication (caps, lockouts, full gateway).",
            value=r.gateway_refused,
        ),
        GaugeMetricFamily(
            "aldaas_gateway_handshakes",
            "Gateway connections whose credentials are not verified yet.",
            value=r.gateway_handshakes,
        ),
        GaugeMetricFamily(
            "aldaas_gateway_memory_held_bytes",
            "Bytes of the gateway's memory budget held by sessions (replay and stream windows).",
            value=r.gateway_memory_held_bytes,
        ),
    ]


class Metrics:
    """The broker's metrics in their own registry; call the methods as events happen."""

    def __init__(
        self,
        readings: ReadingsFunction = Readings,
        *,
        tasks: Iterable[str] = (),
        components: Iterable[str] = (),
    ) -> None:
        """``tasks`` and ``components`` pre-create their label values so they export as 0."""
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self._handout = Histogram(
            "aldaas_handout_seconds",
            "From an acquire call to the lease being returned.",
            buckets=_FAST_BUCKETS,
            registry=r,
        )
        self._queue_wait = Histogram(
            "aldaas_queue_wait_seconds",
            "Time acquirers spent queued for a clone.",
            buckets=_FAST_BUCKETS,
            registry=r,
        )
        self._provision = Histogram(
            "aldaas_provision_seconds",
            "From cloning a snapshot to the clone accepting connections.",
            buckets=_SLOW_BUCKETS,
            registry=r,
        )
        self._restore = Histogram(
            "aldaas_restore_seconds",
            "The whole restore step of a snapshot pipeline run.",
            buckets=_SLOW_BUCKETS,
            registry=r,
        )
        self._restore_bytes = Counter(
            "aldaas_restore_bytes_total", "Backup bytes streamed into restores.", registry=r
        )
        self._expirations = Counter(
            "aldaas_lease_expirations_total",
            "Leases ended by their idle TTL or maximum lifetime.",
            registry=r,
        )
        self._resets = Counter(
            "aldaas_lease_resets_total", "Leases reset to a pristine clone.", registry=r
        )
        self._refusals = Counter(
            "aldaas_lease_refusals_total",
            "Hand-outs refused because lease.max_active leases were active.",
            registry=r,
        )
        self._task_restarts = Counter(
            "aldaas_task_restarts_total",
            "Supervised background tasks restarted after a crash.",
            ["task"],
            registry=r,
        )
        self._errors = Counter(
            "aldaas_errors_total",
            "Errors by the component that saw them.",
            ["component"],
            registry=r,
        )
        for task in tasks:
            self._task_restarts.labels(task=task)
        for component in components:
            self._errors.labels(component=component)
        r.register(_LevelsCollector(readings))

    def observe_handout(self, seconds: float) -> None:
        self._handout.observe(seconds)

    def observe_queue_wait(self, seconds: float) -> None:
        self._queue_wait.observe(seconds)

    def observe_provision(self, seconds: float) -> None:
        self._provision.observe(seconds)

    def observe_restore(self, seconds: float) -> None:
        self._restore.observe(seconds)

    def add_restore_bytes(self, n: int) -> None:
        if n > 0:
            self._restore_bytes.inc(n)

    def lease_expired(self) -> None:
        self._expirations.inc()

    def lease_reset(self) -> None:
        self._resets.inc()

    def lease_refused(self) -> None:
        self._refusals.inc()

    def task_restarted(self, task: str) -> None:
        self._task_restarts.labels(task=task).inc()

    def error(self, component: str) -> None:
        self._errors.labels(component=component).inc()

    def exposition(self) -> bytes:
        """The text exposition format (``text/plain; version=0.0.4``) for ``GET /metrics``."""
        return generate_latest(self.registry)


EXPOSITION_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_NAMES = frozenset(
    {
        "aldaas_clones",
        "aldaas_handout_seconds",
        "aldaas_queue_length",
        "aldaas_queue_wait_seconds",
        "aldaas_provision_seconds",
        "aldaas_restore_seconds",
        "aldaas_restore_bytes_total",
        "aldaas_restore_done_bytes",
        "aldaas_restore_total_bytes",
        "aldaas_snapshots",
        "aldaas_snapshot_age_seconds",
        "aldaas_source_last_success_timestamp_seconds",
        "aldaas_leases_active",
        "aldaas_leases_max_active",
        "aldaas_lease_expirations_total",
        "aldaas_lease_refusals_total",
        "aldaas_lease_resets_total",
        "aldaas_gateway_sessions",
        "aldaas_gateway_streams",
        "aldaas_gateway_bytes_total",
        "aldaas_gateway_auth_failures_total",
        "aldaas_gateway_refused_total",
        "aldaas_gateway_handshakes",
        "aldaas_gateway_memory_held_bytes",
        "aldaas_trio_tasks",
        "aldaas_task_restarts_total",
        "aldaas_errors_total",
    }
)


def exported_metric_names() -> frozenset[str]:
    """Every metric the broker exports, by base name.

    Base names carry no ``_bucket``/``_sum``/``_count``/``_created`` suffix.
    Counters keep their ``_total`` suffix, as they appear in queries. The
    chart's dashboard test checks that every panel queries one of these.
    """
    return _NAMES
