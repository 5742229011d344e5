"""DataBus: one client session, two pumps between the client and its upstream.

Each pump reads a chunk, writes it on whole, then counts the lines it
finished (so counts describe delivered bytes). Nothing waits for a whole line.

Endings (the reference server never closes its side, so none of them waits
for the server's EOF):

* client EOF: the upstream's write side is shut (or, for a pooled connection,
  left open), then the session ends as soon as every line the client sent has
  had its answer delivered, or after ``linger`` seconds at most;
* upstream EOF: the client gets every byte already read, then EOF, and the
  session ends;
* an error or an idle timeout on either side: both sockets are shut down,
  which wakes the other pump, and the session ends.

Only ``run()`` closes nothing: the caller owns both sockets and closes them
after ``run()`` returns (closing a socket another greenlet waits on gives
EBADF, gevent #800).
"""

from __future__ import annotations

import errno
import logging
import socket as _stdsocket
import time

import gevent
from gevent.event import Event
from gevent.socket import socket

from fooproxy.protocol import MessageCounter
from fooproxy.stats import Stats

log = logging.getLogger("fooproxy.databus")

BUFSIZE = 65536
#: Errors that mean "the peer went away": logged at debug, not as failures.
PEER_GONE = frozenset({errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN, errno.ECONNABORTED, errno.ESHUTDOWN})
_SHUT_RD, _SHUT_WR, _SHUT_RDWR = _stdsocket.SHUT_RD, _stdsocket.SHUT_WR, _stdsocket.SHUT_RDWR

# How a session ended, as logged and as returned by run().
CLIENT_CLOSED = "client closed"
UPSTREAM_CLOSED = "upstream closed"
IDLE = "idle timeout"
LINGER = "client closed, answers still owed after linger"


def _shutdown(sock: socket, how: int) -> None:
    try:
        sock.shutdown(how)
    except OSError:
        pass  # already closed or never connected: nothing left to wake


class DataBus:
    """Moves bytes both ways between ``client`` and ``upstream`` and counts them.

    ``keep_upstream``: on client EOF leave the upstream open so that a pool can
    reuse it; ``clean`` then says whether it may be reused.
    """

    def __init__(
        self,
        client: socket,
        upstream: socket,
        stats: Stats,
        *,
        linger: float = 5.0,
        idle_timeout: float = 0.0,
        keep_upstream: bool = False,
    ) -> None:
        self.client = client
        self.upstream = upstream
        self.stats = stats
        self.linger = linger
        self.idle_timeout = idle_timeout
        self.keep_upstream = keep_upstream
        self.c2s = MessageCounter()
        self.s2c = MessageCounter()
        self.bytes_c2s = self.bytes_s2c = 0
        self.lines_c2s = self.lines_s2c = 0
        self.client_eof = False
        self.upstream_eof = False
        self.ending: str | None = None
        self.last_active = time.monotonic()
        self._moved = 0
        self._answered = Event()

    # -- public -------------------------------------------------------------
    @property
    def owed(self) -> int:
        """Answers the server still owes: lines sent minus lines delivered back."""
        return self.lines_c2s - self.lines_s2c

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

    def run(self) -> str:
        """Pump until the session ends; return how it ended."""
        # No socket timeouts: gevent arms a Timeout for every blocking wait of
        # a socket that has one (~9 us per message). One repeating libev timer
        # per session watches the byte counters instead.
        self.client.settimeout(None)
        self.upstream.settimeout(None)
        timer = None
        if self.idle_timeout:
            period = max(self.idle_timeout / 4, 0.01)  # ends the session within 1.25 x idle_timeout
            timer = gevent.get_hub().loop.timer(period, period)
            timer.start(self._check_idle)
        back = gevent.spawn(self._pump_s2c)
        try:
            self._pump_c2s()
            if self.keep_upstream and not back.dead:
                # The answers owed have arrived (or the linger ran out): the
                # pump would otherwise sit in recv on a connection we keep.
                back.kill()
            else:
                back.join()
        finally:
            if timer is not None:
                timer.close()
            if not back.dead:
                back.kill()  # we were killed ourselves (drain): take the child along
        return self.ending or CLIENT_CLOSED

    # -- pumps --------------------------------------------------------------
    def _forward(self, src: socket, dst: socket, counter: MessageCounter, to_server: bool) -> bool:
        """Copy ``src`` to ``dst`` chunk by chunk, counting; True at EOF, False after an error."""
        recv, send, sendall = src.recv, dst.send, dst.sendall
        feed, record = counter.feed, self.stats.record
        hub = gevent.get_hub()
        wait, readable = hub.wait, hub.loop.io(src.fileno(), 1)
        answered = self._answered
        drained = False  # the last read emptied the socket: wait for data before reading again
        try:
            while True:
                if drained:
                    wait(readable)  # no EAGAIN exception per read
                data = recv(BUFSIZE)
                if not data:
                    return True
                n = len(data)
                drained = n < BUFSIZE
                sent = send(data)  # one send() syscall; gevent's sendall adds a getsockopt per call
                if sent != n:
                    sendall(memoryview(data)[sent:])
                lines = record(to_server, n, feed(data))
                if to_server:
                    self.lines_c2s += lines
                    self.bytes_c2s += n
                else:
                    self.lines_s2c += lines
                    self.bytes_s2c += n
                    if self.client_eof and self.lines_s2c >= self.lines_c2s and not counter.pending:
                        answered.set()
        except OSError as exc:
            self._fail("client->server" if to_server else "server->client", exc)
            return False
        finally:
            readable.close()

    def _pump_c2s(self) -> None:
        if not self._forward(self.client, self.upstream, self.c2s, True):
            return
        upstream = self.upstream
        if self.ending is not None:
            return  # woken by the other side's ending
        self.client_eof = True
        if self.upstream_eof:
            self._end(UPSTREAM_CLOSED)
            return
        if not self.keep_upstream:
            _shutdown(upstream, _SHUT_WR)  # pass the half-close on
        if self.owed > 0 or self.s2c.pending:
            self._answered.wait(self.linger)
        if self.ending is None:
            answered = self.owed <= 0 and not self.s2c.pending
            self._end(CLIENT_CLOSED if answered else LINGER)
        if not self.keep_upstream or self.ending != CLIENT_CLOSED:
            # Wake the other pump: the reference server never sends EOF.
            _shutdown(upstream, _SHUT_RDWR)

    def _pump_s2c(self) -> None:
        if not self._forward(self.upstream, self.client, self.s2c, False):
            return  # _fail() aborted the session
        client, answered = self.client, self._answered
        if self.ending is None:
            # The server really closed: deliver EOF, then end the whole session.
            self.upstream_eof = True
            self._end(UPSTREAM_CLOSED)
            _shutdown(client, _SHUT_RDWR)
        elif not (self.keep_upstream and self.ending == CLIENT_CLOSED):
            _shutdown(client, _SHUT_WR)
        answered.set()

    # -- endings ------------------------------------------------------------
    def _end(self, how: str) -> None:
        if self.ending is None:
            self.ending = how

    def _fail(self, direction: str, exc: OSError) -> None:
        if self.ending is None:
            if exc.errno in PEER_GONE:
                self.ending = "%s: %s" % (direction, errno.errorcode.get(exc.errno, exc.errno))
                log.debug("%s: %s", direction, exc)
            else:
                self.ending = "error %s: %s" % (direction, exc)
        self._abort()

    def _check_idle(self) -> None:
        """Timer callback, in the hub (must not block): end the session once no byte
        moved either way for ``idle_timeout`` seconds."""
        moved = self.bytes_c2s + self.bytes_s2c
        now = time.monotonic()
        if moved != self._moved:
            self._moved, self.last_active = moved, now
        elif self.ending is None and now - self.last_active >= self.idle_timeout:
            self._end(IDLE)
            self._abort()

    def _abort(self) -> None:
        _shutdown(self.client, _SHUT_RDWR)
        _shutdown(self.upstream, _SHUT_RDWR)
        self._answered.set()
