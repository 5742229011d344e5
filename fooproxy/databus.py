"""DataBus: one client session, driven by libev watchers, with no greenlet of its own.

Each direction is a ``Flow``: when its source is readable, one ``recv`` of up to
64 KiB (and, when the chunk ends inside a line, one more non-blocking ``recv``
for whatever of the rest has already arrived: ``Flow._read_more``), one
``send`` of the chunk, then the lines the chunk finished are counted (so counts
describe bytes handed to the destination). If the destination takes only part
of it, reading stops and a write watcher sends the rest first: backpressure
without buffering more than one chunk. Nothing waits for a whole line.

Why callbacks and not a greenlet per direction: a parked greenlet keeps its
saved C stack (~8 KiB each), and every wake-up is two switches through gevent's
socket layer. A session here is a few small objects and two io watchers, and a
message costs one callback in the hub (see the README's benchmark section).

Endings (the reference server never closes its side, so none of them waits
for the server's EOF):

* client EOF: the upstream's write side is shut (or, for a pooled connection,
  left open), then the session ends as soon as every line the client sent has
  had its answer delivered, or after ``linger`` seconds at most;
* upstream EOF: the client gets every byte already read, then EOF, and the
  session ends;
* an error, an idle timeout, or ``abort()`` (the drain): both sockets are shut
  down and the session ends.

At the end every watcher is closed and ``on_end(bus)`` runs, in the hub: it
must not block. The DataBus closes no socket: the caller owns both, and closes
them (or pools the upstream, when ``clean``) in ``on_end``.
"""

from __future__ import annotations

import errno
import logging
import socket as _stdsocket
import time
from collections.abc import Callable
from typing import Any

import gevent
from gevent.socket import socket

from fooproxy import speedups
from fooproxy.latency import Timer
from fooproxy.protocol import MessageCounter
from fooproxy.stats import Stats

log = logging.getLogger("fooproxy.databus")

BUFSIZE = 65536
#: Errors that mean "the peer went away": logged at debug, not as failures.
PEER_GONE = frozenset({errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN, errno.ECONNABORTED, errno.ESHUTDOWN})
_SHUT_WR, _SHUT_RDWR = _stdsocket.SHUT_WR, _stdsocket.SHUT_RDWR
_READ, _WRITE = 1, 2
_RETRY = (BlockingIOError, InterruptedError)

# How a session ended, as logged.
CLIENT_CLOSED = "client closed"
UPSTREAM_CLOSED = "upstream closed"
IDLE = "idle timeout"
LINGER = "client closed, answers still owed after linger"
INTERNAL = "error: internal"  # a bug of ours ended the session (counted in errors_internal)
SHUT_DOWN = "shut down"


def _shutdown(sock: socket, how: int) -> None:
    try:
        sock.shutdown(how)
    except OSError:
        pass  # already closed or never connected: nothing left to tell the peer


def _raw(sock: socket) -> _stdsocket.socket:
    """The OS-level socket under a gevent one: always non-blocking, never waits in the hub."""
    return getattr(sock, "_sock", sock)


class Flow:
    """One direction of a session: ``src`` to ``dst``, counted.

    ``lines`` and ``nbytes`` count what was handed to ``dst`` (a chunk counts
    once all of it is out). ``unsent`` holds the tail of a chunk ``dst`` did not
    take yet; while it is set, ``src`` is not read.
    """

    __slots__ = ("bus", "to_server", "recv", "send", "reader", "writer", "dst_fd", "counter",
                 "lines", "nbytes", "chunk", "unsent", "watch_answers", "timer", "err_later")  # fmt: skip

    def __init__(self, bus: DataBus, src: socket, dst: socket, to_server: bool) -> None:
        raw_src, raw_dst = _raw(src), _raw(dst)
        self.bus: DataBus | None = bus
        self.to_server = to_server
        self.recv = raw_src.recv
        self.send = raw_dst.send
        self.reader = gevent.get_hub().loop.io(raw_src.fileno(), _READ)
        self.writer = None  # made on the first short write: most sessions never need one
        self.dst_fd = raw_dst.fileno()
        self.counter = MessageCounter()
        self.lines = self.nbytes = 0
        self.chunk: bytes | None = None
        self.unsent: memoryview | None = None
        self.watch_answers = False  # set at client EOF on the server->client flow
        self.timer: Timer | None = None  # the session's latency Timer, for Stats.record
        self.err_later: OSError | None = None  # the extra read's error (_read_more), for the next wake-up

    @property
    def direction(self) -> str:
        return "client->server" if self.to_server else "server->client"

    def start(self) -> None:
        self.reader.start(self.on_readable)

    def on_readable(self) -> None:
        """libev callback, in the hub: move one chunk."""
        bus = self.bus
        try:
            if self.err_later is not None:
                exc, self.err_later = self.err_later, None
                raise exc
            data = self.recv(BUFSIZE)
            if not data:
                bus.eof(self)
                return
            if data[-1] != 10 and len(data) < BUFSIZE:
                data = self._read_more(data)
            try:
                sent = self.send(data)
            except _RETRY:
                sent = 0
            if sent == len(data):
                self.delivered(data)
            else:
                self._hold(data, sent)
        except _RETRY:
            pass  # woken, but another reader was faster (or a signal): wait again
        except OSError as exc:
            bus.fail(self, exc)
        except Exception:  # a bug: end this session, never leave a watcher firing on it
            bus.crashed()

    def _read_more(self, data: bytes) -> bytes:
        """``data`` ends inside a line: add what of the rest has already arrived, without waiting.

        One more non-blocking read, so that a line the peer wrote in pieces
        goes out in one send when its pieces are all here: the reference
        server writes each answer in three (``ACK 11``, `` c0b3…``, ``\\n``),
        and every send saved is a segment and a wake-up of the peer, most of a
        message's kernel time. EAGAIN sends what there is; EOF is read again
        at the next wake-up; an error waits in ``err_later`` until the next
        wake-up, after this chunk is delivered (the socket stays readable).
        """
        try:
            return data + self.recv(BUFSIZE - len(data))
        except _RETRY:
            return data
        except OSError as exc:
            self.err_later = exc
            return data

    def delivered(self, data: bytes) -> None:
        """Count a chunk ``dst`` has taken in full."""
        n = len(data)
        bus = self.bus
        counts = self.counter.feed(data)
        bus.record(self.to_server, n, counts, self.timer, data, bus.messages_cell)
        req, ack, nak, invalid = counts  # the session's own count: record() returns nothing
        self.lines += req + ack + nak + invalid
        self.nbytes += n
        if self.watch_answers:
            bus.answers_delivered()

    def _hold(self, data: bytes, sent: int) -> None:
        """``dst`` is full: stop reading, send the rest when it is writable."""
        self.chunk = data
        self.unsent = memoryview(data)[sent:]
        self.reader.stop()
        if self.writer is None:
            self.writer = gevent.get_hub().loop.io(self.dst_fd, _WRITE)
        self.writer.start(self.on_writable)

    def on_writable(self) -> None:
        """libev callback, in the hub: send more of the held chunk."""
        try:
            self.unsent = unsent = self.unsent[self.send(self.unsent) :]
            if len(unsent):
                return
            data, self.chunk, self.unsent = self.chunk, None, None
            self.writer.stop()
            self.reader.start(self.on_readable)  # before counting: counting may end the session
            self.delivered(data)
        except _RETRY:
            pass
        except OSError as exc:
            self.bus.fail(self, exc)
        except Exception:
            self.bus.crashed()

    def close(self) -> None:
        self.reader.close()
        if self.writer is not None:
            self.writer.close()
        self.bus = None  # breaks the bus <-> flow cycle at once, without the cyclic GC


#: The C Flow (``fooproxy/_flow.c``: the same class, its hot path compiled), or None.
_CFlow = speedups.FLOW.Flow if speedups.FLOW is not None else None
#: Every class a session's flow may be (what a leak check looks for).
FLOW_TYPES: tuple[type, ...] = (Flow,) if _CFlow is None else (Flow, _CFlow)


def new_flows(bus: DataBus, client: socket, upstream: socket, stats: Stats, messages_cell: int) -> tuple[Flow, Flow]:
    """Both directions of ``bus``, client->server first: C Flows when built (speedups.py), else the Python one above."""
    if _CFlow is None:
        return Flow(bus, client, upstream, True), Flow(bus, upstream, client, False)
    record = None if speedups.records_in_c(stats) else stats.record
    loop = gevent.get_hub().loop
    cfd, ufd = _raw(client).fileno(), _raw(upstream).fileno()
    return (_CFlow(bus, cfd, ufd, True, loop, stats, record, messages_cell),
            _CFlow(bus, ufd, cfd, False, loop, stats, record, messages_cell))  # fmt: skip


class DataBus:
    """Moves bytes both ways between ``client`` and ``upstream`` and counts them.

    The Go tool's DataBus: here one client's session, two ``Flow``s on libev
    watchers. ``keep_upstream``: on client EOF leave the upstream open so that a
    pool can reuse it; ``clean`` then says whether it may be reused. What the
    caller wants to know about the client (its address, when it came) stays with
    the caller.
    """

    __slots__ = ("client", "upstream", "record", "linger", "idle_timeout", "keep_upstream", "c2s_flow", "s2c_flow",
                 "client_eof", "upstream_eof", "ending", "last_active", "_moved", "_timers", "_sweep",
                 "_on_end", "_idle_due", "timer", "messages_cell")  # fmt: skip

    def __init__(
        self,
        client: socket,
        upstream: socket,
        stats: Stats,
        *,
        linger: float = 5.0,
        idle_timeout: float = 0.0,
        keep_upstream: bool = False,
        messages_cell: int = 0,
        latency: bool = True,
    ) -> None:
        self.client = client
        self.upstream = upstream
        self.record = stats.record
        self.messages_cell = messages_cell  # the upstream's messages cell (Stats.messages_cell), or 0
        self.linger = linger
        self.idle_timeout = idle_timeout
        self.keep_upstream = keep_upstream
        self.c2s_flow, self.s2c_flow = new_flows(self, client, upstream, stats, messages_cell)
        self.client_eof = False
        self.upstream_eof = False
        self.ending: str | None = None
        self.last_active = time.monotonic()
        self._moved = 0
        self._timers: list = []
        self._sweep: IdleSweep | None = None
        self._on_end: Callable[[DataBus], None] | None = None
        self._idle_due: Any = None  # the one-shot timer of an idle end due before the next tick
        #: Times each REQ until its answer (``latency.py``); None with ``-latency off``.
        self.timer: Timer | None = None
        if latency:
            self.timer = self.c2s_flow.timer = self.s2c_flow.timer = Timer(stats)

    # -- state ----------------------------------------------------------------
    c2s = property(lambda self: self.c2s_flow.counter, doc="The client->server line counter.")
    s2c = property(lambda self: self.s2c_flow.counter, doc="The server->client line counter.")
    bytes_c2s = property(lambda self: self.c2s_flow.nbytes)
    bytes_s2c = property(lambda self: self.s2c_flow.nbytes)
    lines_c2s = property(lambda self: self.c2s_flow.lines)
    lines_s2c = property(lambda self: self.s2c_flow.lines)

    @property
    def owed(self) -> int:
        """Answers the server still owes: lines sent minus lines delivered back."""
        return self.c2s_flow.lines - self.s2c_flow.lines

    @property
    def answered(self) -> bool:
        """Every line the client sent has had its answer delivered, and nothing is half sent."""
        back = self.s2c_flow
        return self.owed <= 0 and not back.counter.pending and back.unsent is None

    @property
    def clean(self) -> bool:
        """True when the upstream carries no unfinished exchange and may be reused."""
        return (
            self.ending == CLIENT_CLOSED
            and not self.upstream_eof
            and self.owed == 0  # more answers than questions: the server is off script
            and not self.c2s.pending
            and not self.s2c.pending
        )

    # -- control --------------------------------------------------------------
    def start(self, on_end: Callable[[DataBus], None]) -> None:
        """Start moving bytes; ``on_end(self)`` is called once, in the hub, when the session ends."""
        self._on_end = on_end
        if self.idle_timeout:
            # A repeating check of the byte counters, rather than a timeout
            # armed per wait (no cost per chunk), shared by every session with
            # the same period (IdleSweep: no timer per session). The last byte
            # is noticed at most one period (idle_timeout / 4) late, and the end
            # is checked exactly when due (see _check_idle), so the session
            # ends between 1 and 1.25 x idle_timeout after its last byte.
            self._sweep = IdleSweep.of(max(self.idle_timeout / 4, 0.01))
            self._sweep.add(self)
        self.c2s_flow.start()
        self.s2c_flow.start()

    def abort(self, how: str = SHUT_DOWN) -> None:
        """End the session now (the drain after the grace period): shut both sockets down."""
        if self.ending is None:
            self.ending = how
        self._abort()

    # -- events from the flows --------------------------------------------------
    def eof(self, flow: Flow) -> None:
        if flow.to_server:
            self._client_eof()
        else:
            # The server really closed: the client has every byte already
            # read (nothing is held at EOF); it gets EOF, the session ends.
            self.upstream_eof = True
            _shutdown(self.client, _SHUT_RDWR)
            self.finish(UPSTREAM_CLOSED)

    def answers_delivered(self) -> None:
        """The server->client flow delivered a chunk after the client's EOF: end once every answer is out."""
        if self.answered:
            self.finish(CLIENT_CLOSED)

    def _client_eof(self) -> None:
        self.client_eof = True
        back = self.s2c_flow  # self.answered, inlined: the path every session ends by
        if self.c2s_flow.lines <= back.lines and back.unsent is None and not back.counter.pending:
            self.finish(CLIENT_CLOSED)  # the common case; closing the upstream says the rest
            return
        self.c2s_flow.reader.stop()
        if not self.keep_upstream:
            _shutdown(self.upstream, _SHUT_WR)  # pass the half-close on
        if self.linger > 0:
            self.s2c_flow.watch_answers = True
            self._timer(self.linger, self._linger_over)
        else:
            self._linger_over()

    def _linger_over(self) -> None:
        self.finish(CLIENT_CLOSED if self.answered else LINGER)

    def fail(self, flow: Flow, exc: OSError) -> None:
        if self.ending is None:
            if exc.errno in PEER_GONE:
                self.ending = "%s: %s" % (flow.direction, errno.errorcode.get(exc.errno, exc.errno))
                log.debug("%s: %s", flow.direction, exc)
            else:
                self.ending = "error %s: %s" % (flow.direction, exc)
        self._abort()

    def crashed(self) -> None:
        log.exception("session failed")  # the owner's close line names the client (error: internal)
        self.abort(INTERNAL)

    def _check_idle(self) -> None:
        """Timer callback: end the session once no byte moved either way for ``idle_timeout`` s.

        When the end falls before the next periodic tick, a one-shot timer
        checks again exactly then. Without it, a tick that fires a hair early
        (libev measures from its cached loop time) finds the session just
        short of idle, and the end slips a whole period: 1.5 x idle_timeout.
        """
        moved = self.c2s_flow.nbytes + self.s2c_flow.nbytes
        now = time.monotonic()
        if moved != self._moved:
            self._moved, self.last_active = moved, now
            return
        left = self.idle_timeout - (now - self.last_active)
        if left <= 0:
            self.abort(IDLE)
        elif left < self.idle_timeout / 4 and self._idle_due is None:
            timer = self._idle_due = gevent.get_hub().loop.timer(left)
            timer.start(self._guarded, self._idle_check_due)

    def _idle_check_due(self) -> None:
        self._idle_due.close()
        self._idle_due = None
        self._check_idle()  # re-arms itself if the loop's clock ran a little ahead of ours

    # -- the end ----------------------------------------------------------------
    def _abort(self) -> None:
        _shutdown(self.client, _SHUT_RDWR)
        _shutdown(self.upstream, _SHUT_RDWR)
        self.finish(SHUT_DOWN)

    def finish(self, how: str) -> None:
        """Close every watcher, then tell the owner (once). ``how`` unless already decided."""
        on_end = self._on_end
        if on_end is None:
            return
        self._on_end = None
        if self.ending is None:
            self.ending = how
        self.c2s_flow.close()
        self.s2c_flow.close()
        if self._sweep is not None:
            self._sweep.discard(self)
            self._sweep = None
        for timer in self._timers:
            timer.close()
        self._timers = []
        if self._idle_due is not None:
            self._idle_due.close()
            self._idle_due = None
        if self.timer is not None:
            self.timer.close()  # REQs still owed count as unanswered
        try:
            on_end(self)
        except Exception:  # a bug in the owner must not leave the hub's callback loop broken
            log.exception("session end handler failed")

    def _timer(self, after: float, callback: Callable[[], None], repeat: float = 0.0) -> None:
        timer = gevent.get_hub().loop.timer(after, repeat)
        timer.start(self._guarded, callback)
        self._timers.append(timer)

    def _guarded(self, callback: Callable[[], None]) -> None:
        try:
            callback()
        except Exception:
            self.crashed()


class IdleSweep:
    """The idle check of every session with the same period: one repeating timer for all, not one each.

    A timer per session costs a libev watcher made, started and closed per
    client (W4's churn pays it every 10 requests). Sessions join at start and
    leave at their end; the timer runs only while one is in, and each tick
    calls every session's ``_check_idle`` (guarded: a bug ends that session
    only). A tick every ``idle_timeout / 4`` over a few thousand sessions is a
    few milliseconds per period.
    """

    _by_loop: dict[tuple[Any, float], IdleSweep] = {}
    _last: IdleSweep | None = None  # the one ``of`` returned last

    def __init__(self, loop: Any, period: float) -> None:
        self.loop, self.period = loop, period
        self.sessions: set[DataBus] = set()
        self.timer = loop.timer(period, period)

    @classmethod
    def of(cls, period: float) -> IdleSweep:
        """The sweep of this thread's hub for ``period`` (made on first use)."""
        loop = gevent.get_hub().loop
        last = cls._last
        if last is not None and last.period == period and last.loop is loop:
            return last  # the same as the previous session's: no key to build
        sweep = cls._by_loop.get((loop, period))
        if sweep is None:
            for key, old in list(cls._by_loop.items()):  # a period no session uses any more (a reload changed it)
                if not old.sessions:
                    old.timer.close()
                    del cls._by_loop[key]
                    if old is cls._last:
                        cls._last = None
            sweep = cls._by_loop[(loop, period)] = cls(loop, period)
        cls._last = sweep
        return sweep

    def add(self, bus: DataBus) -> None:
        self.sessions.add(bus)
        if not self.timer.active:
            self.timer.start(self._tick)

    def discard(self, bus: DataBus) -> None:
        self.sessions.discard(bus)
        if not self.sessions:
            self.timer.stop()  # nothing to watch: an idle proxy has no timer firing

    def _tick(self) -> None:
        for bus in list(self.sessions):  # a check may end its session (which leaves the set)
            bus._guarded(bus._check_idle)
