"""UpstreamPool: reuse clean upstream connections, at most ``size`` open at once.

Reuse is decided twice:

* by the session: the Proxy's session-end callback releases a connection as
  reusable only when ``DataBus.clean`` holds (the client closed, every line it
  sent has had its answer delivered, no half line either way, the upstream
  never sent EOF).
  Anything else (linger ran out, idle timeout, error, drain) closes it.
* here, before it is handed out again: a non-blocking ``recv(1, MSG_PEEK)`` on
  the idle socket must find nothing to read. EOF (the server closed it), a
  reset, or bytes nobody asked for mean the connection is discarded and the
  next idle one (or a fresh dial) is tried; such a connection never reaches a
  client. A server closing between the check and the first request cannot be
  detected beforehand; the session then ends as "upstream closed".

Slots: ``open_count`` counts idle plus in-use connections (and dials in
progress). A client that finds no idle connection and no free slot waits, in
FIFO order, for up to ``wait`` seconds; a released connection or a freed slot
is handed straight to the first waiter, so late arrivals never overtake it.
When the wait runs out, ``acquire`` raises ``PoolExhausted`` (an
``UpstreamError``): the proxy closes that client and counts it in
``upstream_errors``, like an unreachable upstream, since for the client it is
the same thing (no upstream connection to be had); the log line says which.

Idle connections expire after ``idle`` seconds: checked lazily at every
``acquire`` and by a ``ref=False`` hub timer every ``idle/2`` seconds that also
drops connections the server closed (so they do not sit in CLOSE_WAIT). The
timer runs only while something is idle and never keeps the hub alive.
"""

from __future__ import annotations

import logging
import socket as _stdsocket
import time
from collections import deque
from collections.abc import Callable
from typing import NoReturn

import gevent
from gevent.event import AsyncResult
from gevent.socket import socket

from fooproxy.config import Address
from fooproxy.upstream import Connector, UpstreamError

log = logging.getLogger("fooproxy.pool")

#: Handed to a waiter instead of a socket: "a slot is yours, dial".
_SLOT = object()
_MIN_REAP_INTERVAL = 0.05  # a tiny -pool-idle must not turn the reaper into a busy loop


class PoolExhausted(UpstreamError):
    """No pooled connection became free within the wait."""

    reason = "no pooled upstream connection free"


def healthy(sock: socket) -> bool:
    """True when an idle connection has nothing to read: no EOF, no reset, no stray bytes."""
    timeout = sock.gettimeout()
    # Timeout 0 makes gevent's recv raise EWOULDBLOCK at once; with any other
    # timeout it would wait for data (even with MSG_DONTWAIT).
    sock.settimeout(0.0)
    try:
        sock.recv(1, _stdsocket.MSG_PEEK)
    except BlockingIOError:
        return True  # nothing pending: the connection is quiet and open
    except OSError:
        return False  # reset, or already closed
    finally:
        sock.settimeout(timeout)
    return False  # b"" (EOF) or unsolicited bytes: out of step, never reuse


def _close(sock: socket) -> None:
    try:
        sock.close()
    except OSError:
        pass


class UpstreamPool(Connector):
    """A ``Connector`` that keeps up to ``size`` upstream connections and reuses clean ones.

    ``on_change(idle, open)`` is called whenever either count changes (the
    dispatcher publishes them as the ``pool_idle``/``pool_open`` gauges).
    """

    def __init__(
        self,
        address: Address,
        connect_timeout: float,
        size: int,
        wait: float = 5.0,
        idle: float = 60.0,
        *,
        on_change: Callable[[int, int], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if size < 1 or wait < 0 or idle <= 0:
            raise ValueError("pool needs size >= 1, wait >= 0, idle > 0")
        super().__init__(address, connect_timeout)
        self.size = size
        self.wait = wait
        self.idle = idle
        self.clock = clock
        self.on_change = on_change
        self._idle: deque[tuple[socket, float]] = deque()  # (sock, released at), oldest first
        self._open = 0
        self._waiters: deque[AsyncResult] = deque()
        self._closed = False
        self._retiring = False  # replaced by a reload: close once the last connection is back
        self._reaper = None  # hub timer, created when something first goes idle

    connects_from_hub = False  # a client may have to queue: acquire() in a greenlet
    reuses = True

    # -- state --------------------------------------------------------------
    @property
    def idle_count(self) -> int:
        """Connections open and waiting for a client."""
        return len(self._idle)

    @property
    def open_count(self) -> int:
        """Connections open or being dialled: idle plus in use, never above ``size``."""
        return self._open

    @property
    def waiting(self) -> int:
        """Clients queued for a connection."""
        return len(self._waiters)

    # -- Connector ------------------------------------------------------------
    def connect_from_hub(self, done: Callable) -> NoReturn:
        """Refused: a connect from the hub would skip the slot accounting (use ``acquire``)."""
        raise TypeError(
            "UpstreamPool hands out connections with acquire(), in a greenlet; it has no connect_from_hub()"
        )

    def connect_now(self) -> None:
        """Never: a pooled connection comes from ``acquire`` (``Connector.connect_now`` would skip the slots)."""
        return None

    def acquire(self) -> socket:
        """An idle healthy connection (newest first), a new one, or one freed within ``wait``."""
        if self._closed:
            raise UpstreamError("upstream pool is closed")
        self._expire(self.clock())
        while self._idle:
            sock, _ = self._idle.pop()
            if healthy(sock):
                self._changed()
                return sock
            self._discard(sock)
        if self._open < self.size:
            self._open += 1
            self._changed()
            return self._connect_in_slot()
        got = self._wait_turn()
        if got is not _SLOT:
            if healthy(got):
                return got
            _close(got)  # the slot stays ours: dial a replacement in it
        return self._connect_in_slot()

    def release(self, sock: socket, reusable: bool) -> None:
        """Keep a clean connection (or hand it to the first waiter); close any other."""
        if not reusable or self._closed or (self._retiring and not self._waiters):
            self._discard(sock)
            return
        if self._waiters:
            self._waiters.popleft().set(sock)  # still counted open: now in the waiter's hands
            return
        self._idle.append((sock, self.clock()))
        self._start_reaper()
        self._changed()

    def retire(self) -> None:
        """A reload replaced this pool: keep serving its sessions and waiters, keep nothing idle,
        close when the last connection is back. The new pool owns the gauges from now on."""
        self.on_change = None
        self._retiring = True
        while self._idle:
            self._discard(self._idle.pop()[0])
        if self._open == 0:
            self.close()

    def close(self) -> None:
        """Close idle connections, fail waiters; in-use ones are closed when released.

        (Closing a socket a session still watches would leave its watcher on a
        dead, maybe reused, descriptor: the drain ends sessions first, then
        closes the pool.)
        """
        if self._closed:
            return
        self._closed = True
        super().close()  # a re-resolve in progress
        if self._reaper is not None:
            self._reaper.stop()
            self._reaper.close()
            self._reaper = None
        while self._idle:
            _close(self._idle.popleft()[0])
            self._open -= 1
        waiters, self._waiters = self._waiters, deque()
        for ticket in waiters:
            ticket.set_exception(UpstreamError("upstream pool is closed"))
        self._changed()

    # -- internals ----------------------------------------------------------
    def _connect_in_slot(self) -> socket:
        """Connect in a slot already counted in ``_open``; free it if that fails."""
        try:
            sock = Connector.acquire(self)
        except BaseException:  # also GreenletExit (drain): the slot must not leak
            self._free_slot()
            raise
        if self._closed:
            self._discard(sock)
            raise UpstreamError("upstream pool is closed")
        return sock

    def _wait_turn(self) -> object:
        """Queue for a connection or a slot; return the socket or ``_SLOT`` handed to us."""
        ticket = AsyncResult()
        self._waiters.append(ticket)
        try:
            ticket.wait(self.wait)
        except BaseException:  # killed while waiting: give back whatever we were handed
            if not ticket.ready():
                self._waiters.remove(ticket)
            elif ticket.successful():
                self._give_back(ticket.value)
            raise
        if not ticket.ready():
            self._waiters.remove(ticket)
            raise PoolExhausted("no upstream connection free within %gs (pool of %d busy)" % (self.wait, self.size))
        return ticket.get()  # raises if the pool was closed meanwhile

    def _give_back(self, got: object) -> None:
        if got is _SLOT:
            self._free_slot()
        else:
            self.release(got, True)  # type: ignore[arg-type]  # health is checked at the next acquire

    def _discard(self, sock: socket) -> None:
        _close(sock)
        self._free_slot()

    def _free_slot(self) -> None:
        if self._waiters and not self._closed:
            self._waiters.popleft().set(_SLOT)  # the count stays: the slot changes hands
            return
        self._open -= 1
        self._changed()
        if self._retiring and self._open == 0:
            self.close()

    def _expire(self, now: float) -> None:
        idle = self._idle
        while idle and now - idle[0][1] >= self.idle:
            self._discard(idle.popleft()[0])

    def _start_reaper(self) -> None:
        if self._reaper is None:
            interval = max(self.idle / 2, _MIN_REAP_INTERVAL)
            # ref=False: an idle pool alone must not keep the hub (and the process) alive.
            self._reaper = gevent.get_hub().loop.timer(interval, interval, ref=False)
        if not self._reaper.active:
            self._reaper.start(self._reap)

    def _reap(self) -> None:
        """Hub callback: expire old idle connections, drop those the server closed.

        Runs on the hub, so everything here is non-blocking (a peek with timeout 0, close).
        """
        try:
            self._expire(self.clock())
            for entry in list(self._idle):
                if not healthy(entry[0]):
                    self._idle.remove(entry)
                    self._discard(entry[0])
            if not self._idle and self._reaper is not None:
                self._reaper.stop()
        except Exception:  # never let a reaper bug kill the hub's callback loop
            log.exception("pool reaper failed")

    def _changed(self) -> None:
        if self.on_change is not None:
            self.on_change(len(self._idle), self._open)
