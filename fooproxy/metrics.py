"""Prometheus exposition of the proxy's stats: a custom collector over ``Snapshot``.

``StatsCollector.collect()`` reads one snapshot per scrape and turns it into
metric families; prometheus_client does all the formatting. It runs on the
hub (inside an HTTP request), so it does no I/O and its cost does not depend
on traffic: one snapshot, a fixed number of families.
"""

from __future__ import annotations

import platform
from collections.abc import Callable, Iterator, Mapping

import gevent
from prometheus_client import ProcessCollector
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector, CollectorRegistry
from prometheus_client.utils import floatToGoString

from fooproxy import __version__, speedups
from fooproxy.latency import BOUNDS
from fooproxy.stats import Snapshot
from fooproxy.timetable import WINDOWS

GetSnapshot = Callable[[], Snapshot]
#: Extra gauges, ``{"upstream_up": 1.0, ...}``: each becomes ``fooproxy_<name>``.
GetExtra = Callable[[], Mapping[str, float]]

_MESSAGE_TYPES = (("req", "msg_req"), ("ack", "msg_ack"), ("nak", "msg_nak"), ("invalid", "msg_invalid"))
_DIRECTIONS = (("client_to_server", "bytes_client_to_server"), ("server_to_client", "bytes_server_to_client"))
_WINDOW_LABELS = tuple("%gs" % w for w in WINDOWS)  # ("1s", "10s")
_LE = (*(floatToGoString(b) for b in BOUNDS), "+Inf")
#: HELP of the gauges ``get_extra`` gives (``Health.gauges``).
EXTRA_HELP = {
    "draining": "1 while the proxy drains (SIGTERM/SIGINT: no new clients), else 0.",
    "upstream_up": "1 if the last periodic check could connect to the upstream server, else 0.",
    "persistence_ok": "1 if the last save of the recovery file succeeded, else 0.",
}
#: ``hot_path``: "c" when fooproxy/_flow.c moves the bytes, "python" on the fallback (speedups.py).
_BUILD = {"version": __version__, "python": platform.python_version(), "gevent": gevent.__version__,
          "hot_path": speedups.HOT_PATH}  # fmt: skip


def _histogram(family: HistogramMetricFamily, labels: list[str], counts: list[int], sum_ns: int) -> None:
    cum, buckets = 0, []
    for le, n in zip(_LE, counts, strict=True):
        cum += n
        buckets.append((le, cum))
    family.add_metric(labels, buckets, sum_ns / 1e9)


class StatsCollector(Collector):
    """Yields the fooproxy metric families from one ``Snapshot`` per scrape."""

    def __init__(self, get_snapshot: GetSnapshot, get_extra: GetExtra | None = None) -> None:
        self._get_snapshot = get_snapshot
        self._get_extra = get_extra

    def describe(self) -> list[Metric]:
        # Defining describe() lets the registry check name clashes at register()
        # time without taking a snapshot.
        return list(self._families(Snapshot(totals={}), {}))

    def collect(self) -> Iterator[Metric]:
        snap = self._get_snapshot()
        extra = self._get_extra() if self._get_extra is not None else {}
        yield from self._families(snap, extra)

    @staticmethod
    def _families(snap: Snapshot, extra: Mapping[str, float]) -> Iterator[Metric]:
        t = snap.totals
        messages = CounterMetricFamily(
            "fooproxy_messages",
            "Whole Foo lines seen in either direction, by type (invalid = not a Foo message).",
            labels=["type"],
        )
        for label, key in _MESSAGE_TYPES:
            messages.add_metric([label], t.get(key, 0))
        yield messages

        r1, r10, s1, s10 = snap.windows
        for name, what, counts in (
            ("fooproxy_request_rate", "REQ", (r1, r10)),
            ("fooproxy_response_rate", "ACK+NAK", (s1, s10)),
        ):
            rate = GaugeMetricFamily(name, "%s messages per second over a moving window." % what, labels=["window"])
            for label, count, seconds in zip(_WINDOW_LABELS, counts, WINDOWS, strict=True):
                rate.add_metric([label], count / seconds)
            yield rate

        yield GaugeMetricFamily(
            "fooproxy_connections_active", "Client sessions open now.", value=t.get("connections_active", 0)
        )
        yield CounterMetricFamily(
            "fooproxy_connections", "Client sessions accepted.", value=t.get("connections_total", 0)
        )
        nbytes = CounterMetricFamily("fooproxy_bytes", "Bytes forwarded, by direction.", labels=["direction"])
        for label, key in _DIRECTIONS:
            nbytes.add_metric([label], t.get(key, 0))
        yield nbytes
        yield CounterMetricFamily(
            "fooproxy_upstream_errors",
            "Clients that could not be given an upstream connection (unreachable, or pool exhausted).",
            value=t.get("upstream_errors", 0),
        )
        yield CounterMetricFamily(
            "fooproxy_errors_internal",
            "Client sessions ended by an internal error of the proxy (a bug: the log has its traceback).",
            value=t.get("errors_internal", 0),
        )
        yield GaugeMetricFamily(
            "fooproxy_pool_idle_connections", "Pooled upstream connections idle now.", value=t.get("pool_idle", 0)
        )
        yield GaugeMetricFamily(
            "fooproxy_pool_open_connections", "Pooled upstream connections open now.", value=t.get("pool_open", 0)
        )
        lat = snap.latency
        requests = HistogramMetricFamily(
            "fooproxy_request_duration_seconds",
            "Time from a REQ's passing to the server until its answer passed to the client, by answer.",
            labels=["result"],
        )
        _histogram(requests, ["ack"], lat.ack, lat.ack_sum_ns)
        _histogram(requests, ["nak"], lat.nak, lat.nak_sum_ns)
        yield requests
        yield CounterMetricFamily(
            "fooproxy_requests_unanswered",
            "REQs still owed an answer when their session ended (not in the duration histogram).",
            value=lat.unanswered,
        )
        connects = HistogramMetricFamily(
            "fooproxy_upstream_connect_duration_seconds", "Time taken by successful upstream connects."
        )
        _histogram(connects, [], lat.connect, lat.connect_sum_ns)
        yield connects
        yield InfoMetricFamily("fooproxy_build", "The running fooproxy's version and runtime.", value=_BUILD)
        rows = snap.shown_upstreams()
        if rows:
            yield from _upstream_families(rows)
        for name in sorted(extra):
            yield GaugeMetricFamily("fooproxy_" + name, EXTRA_HELP[name], value=extra[name])


def _upstream_families(rows: Mapping[str, Mapping[str, int | bool]]) -> Iterator[Metric]:
    """The per-upstream series, labelled ``upstream="host:port"`` (one per configured upstream)."""
    up = GaugeMetricFamily("fooproxy_upstream_up", "1 while the upstream is in rotation.", labels=["upstream"])
    active = GaugeMetricFamily(
        "fooproxy_upstream_sessions_active", "Client sessions on this upstream now.", labels=["upstream"]
    )
    total = CounterMetricFamily(
        "fooproxy_upstream_sessions", "Client sessions given this upstream.", labels=["upstream"]
    )
    messages = CounterMetricFamily(
        "fooproxy_upstream_messages", "REQ+ACK+NAK lines of the sessions on this upstream.", labels=["upstream"]
    )
    for address, row in rows.items():
        up.add_metric([address], float(bool(row["up"])))
        active.add_metric([address], row["sessions_active"])
        total.add_metric([address], row["sessions_total"])
        messages.add_metric([address], row["messages"])
    yield from (up, active, total, messages)


def make_registry(get_snapshot: GetSnapshot, get_extra: GetExtra | None = None) -> CollectorRegistry:
    """A private registry: a ``StatsCollector`` and the process collector of this process
    (the master with ``-workers``: ``process_start_time_seconds`` is when the proxy started)."""
    registry = CollectorRegistry()
    registry.register(StatsCollector(get_snapshot, get_extra))
    ProcessCollector(registry=registry)
    return registry
