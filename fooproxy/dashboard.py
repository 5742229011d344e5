"""The live page: a ring of one-second samples, ``/stats/stream`` (Server-Sent Events) and the page's files.

``LiveSamples`` lives in the process that serves HTTP (the single process, or
the master of ``-workers N``, which samples the summed slots). One greenlet
takes one sample a second, whatever the number of open pages: the sample is
encoded once, kept in a ring of ``HISTORY_S`` samples and handed, as the same
bytes, to every open stream. So a page costs the proxy one small write a
second and nothing on the traffic path; two pages do not take two snapshots.

A stream (``stream()``, a WSGI body iterator) sends the whole ring first (a
page opened now shows the last 5 minutes at once), then each new sample. It
runs in its HTTP connection's greenlet: the request head was read under the
head deadline, the body is not under it. It ends when the client goes (the
next write fails: within two samples), when the client stops reading for the
HTTP socket timeout, or when the samples stop (shutdown). At most
``max_streams`` run at once, well under the HTTP connection limit, so open
pages can never hold every slot and lock ``/health`` out.
"""

from __future__ import annotations

import functools
import json
import logging
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from importlib import resources
from typing import Any

import gevent
from gevent.event import Event

#: Seconds of history kept (and sent to a page when it connects).
HISTORY_S = 300
#: Seconds between samples.
INTERVAL_S = 1.0
#: Longest a stream stays without writing (a comment line when no sample came).
KEEPALIVE_S = 5.0
#: Live pages at once (each holds one HTTP connection of the 256).
MAX_STREAMS = 32
#: The page's files, served under /static/ (and the page itself at / and /dashboard).
_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".LICENSE": "text/plain; charset=utf-8",
    ".txt": "text/plain; charset=utf-8",
}
STATIC_FILES = (
    "dashboard.html",
    "dashboard.js",
    "dashboard.css",
    "uPlot.iife.min.js",
    "uPlot.min.css",
    "uPlot.LICENSE",
)
PAGE = "dashboard.html"

_log = logging.getLogger("fooproxy.dashboard")

GetStats = Callable[[], Mapping[str, Any]]


@functools.cache
def load_static() -> dict[str, tuple[str, bytes]]:
    """``{name: (content type, bytes)}`` of the page's files, read from the package once per process (at start)."""
    out = {}
    root = resources.files("fooproxy") / "static"
    for name in STATIC_FILES:
        suffix = name[name.rfind(".") :]
        out[name] = (_TYPES[suffix], (root / name).read_bytes())
    return out


def sse(event: str, data: bytes) -> bytes:
    """One Server-Sent Event; ``data`` is one line of JSON (no newline in it)."""
    return b"event: " + event.encode() + b"\ndata: " + data + b"\n\n"


class LiveSamples:
    """The ring of one-second samples, the greenlet that takes them, and the streams that read them.

    ``get_stats()`` returns the sample's fields (the ``/stats`` object);
    ``get_health()`` the extra gauges (``upstream_up``, ``draining``,
    ``persistence_ok``); ``info`` is sent once per stream (version, workers).
    """

    def __init__(
        self,
        get_stats: GetStats,
        get_health: Callable[[], Mapping[str, float]] | None = None,
        info: Mapping[str, Any] | None = None,
        interval: float = INTERVAL_S,
        history: int = HISTORY_S,
        max_streams: int = MAX_STREAMS,
        keepalive: float = KEEPALIVE_S,
        clock: Callable[[], float] = time.time,
        logger: logging.Logger | None = None,
    ) -> None:
        self._get_stats = get_stats
        self._get_health = get_health
        self.info = dict(info or {})
        self.interval = interval
        self.max_streams = max_streams
        self.keepalive = keepalive
        self._clock = clock
        self.log = logger or _log
        #: Encoded samples, oldest first.
        self.ring: deque[bytes] = deque(maxlen=history)
        #: Samples taken since start (a stream compares it with what it sent).
        self.taken = 0
        #: Streams open now.
        self.streams = 0
        self._tick = Event()
        self._greenlet: gevent.Greenlet | None = None
        self._stopped = False
        self._failing = False

    # -- sampling ------------------------------------------------------------
    def start(self) -> None:
        """Take the first sample now, then one every ``interval`` seconds (one greenlet)."""
        if self._greenlet is None and not self._stopped:
            self._greenlet = gevent.spawn(self._run)

    def stop(self) -> None:
        """No more samples; every open stream ends after what it has. Idempotent."""
        self._stopped = True
        if self._greenlet is not None:
            self._greenlet.kill(block=False)
            self._greenlet = None
        self._wake()

    def _run(self) -> None:
        start = time.monotonic()
        n = 0
        while not self._stopped:
            self.take()
            n += 1
            # Scheduled on the monotonic clock: the samples stay a second apart, without drift.
            delay = start + n * self.interval - time.monotonic()
            if delay < 0:  # the hub was held (or the clock jumped): skip the missed ticks
                n += int(-delay // self.interval) + 1
                delay = start + n * self.interval - time.monotonic()
            gevent.sleep(max(delay, 0.0))

    def take(self) -> bytes | None:
        """One sample: the stats and the health gauges, encoded once, appended to the ring, sent to every stream."""
        try:
            sample: dict[str, Any] = {"t": round(self._clock(), 3), "stats": dict(self._get_stats())}
            if self._get_health is not None:
                sample["health"] = dict(self._get_health())
            data = json.dumps(sample, separators=(",", ":")).encode()
        except Exception:
            # A bug of ours must not end the sampling (nor flood the log): once, with the traceback.
            if not self._failing:
                self._failing = True
                self.log.exception("live page: taking a sample failed")
            return None
        self._failing = False
        self.ring.append(data)
        self.taken += 1
        self._wake()
        return data

    def _wake(self) -> None:
        tick, self._tick = self._tick, Event()
        tick.set()

    # -- streams -------------------------------------------------------------
    def full(self) -> bool:
        """Whether a new stream would be over ``max_streams``."""
        return self.streams >= self.max_streams

    def stream(self) -> Iterator[bytes]:
        """The body of ``/stats/stream``: retry hint, info, the history, then each new sample."""
        self.streams += 1
        try:
            info = json.dumps(self.info, separators=(",", ":")).encode()
            history = b"[" + b",".join(self.ring) + b"]"
            sent = self.taken  # the history holds every sample up to here
            # retry: how soon (ms) the browser reconnects after losing us (a restart).
            yield b"retry: 1000\n\n" + sse("info", info) + sse("history", history)
            while not self._stopped:
                if self.taken == sent:
                    self._tick.wait(timeout=self.keepalive)
                    if self._stopped:
                        break
                    if self.taken == sent:  # no sample for a while (a bug of ours): a comment still finds a gone client
                        yield b": no sample\n\n"
                        continue
                # Every sample since the last one sent (more than one if a write was slow), oldest first.
                missed = min(self.taken - sent, len(self.ring))
                sent = self.taken
                yield b"".join(sse("sample", self.ring[-i]) for i in range(missed, 0, -1))
        finally:
            self.streams -= 1


def page_routes(static: Mapping[str, tuple[str, bytes]] | None = None) -> dict[str, tuple[str, bytes]]:
    """``{path: (content type, body)}``: the page at ``/`` and ``/dashboard``, its files under ``/static/``."""
    files = load_static() if static is None else static
    routes = {"/static/" + name: files[name] for name in files}
    routes["/"] = routes["/dashboard"] = files[PAGE]
    return routes
