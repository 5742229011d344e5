"""Upstream connections: resolve the server's address once, connect to it per client.

``Connector`` is the interface the proxy uses. It says once, in
``connects_from_hub``, how it hands out connections: from the hub
(``connect_from_hub(done)``, a ``HubConnect`` on watchers, called from the
accept callback) or in a greenlet (``acquire()``, which may wait: the pooled
variant in ``pool.py``, which also reuses clean connections instead of
closing them). ``connect_first`` is the blocking connect a greenlet uses.
Either way a failure is an ``UpstreamError`` whose ``reason`` is what the
client's close line says.
"""

from __future__ import annotations

import _socket
import errno
import os
import socket as _stdsocket
import time
from collections.abc import Callable

import gevent
from gevent import socket

from fooproxy import sockops
from fooproxy.config import Address

UNREACHABLE = "upstream unreachable"
#: After a failed connect, re-resolve the name at most this often (off the hub).
REFRESH_INTERVAL = 1.0


class UpstreamError(OSError):
    """A client gets no upstream connection: ``str()`` says where and why (logged),
    ``reason`` is the short ending of the client's close line (and the key the
    proxy rate-limits its warnings by)."""

    reason = UNREACHABLE


def resolve(address: Address) -> list[tuple]:
    """``getaddrinfo`` once at start, so no client pays a DNS lookup."""
    infos = _stdsocket.getaddrinfo(address.connect_host, address.port, type=_stdsocket.SOCK_STREAM)
    return [(family, sockaddr) for family, _type, _proto, _name, sockaddr in infos]


def connect_first(targets: list[tuple], timeout: float) -> socket.socket:
    """Connect to the first target that accepts, with ``timeout`` per attempt."""
    last: OSError | None = None
    for family, sockaddr in targets:
        sock = socket.socket(family, _stdsocket.SOCK_STREAM)
        try:
            sock.settimeout(timeout)
            sock.connect(sockaddr)
            sock.setsockopt(_stdsocket.IPPROTO_TCP, _stdsocket.TCP_NODELAY, 1)
            return sock
        except OSError as exc:
            sock.close()
            last = exc
        except BaseException:
            sock.close()  # killed mid-connect (drain): do not leave the socket to the GC
            raise
    raise last or OSError("no address to connect to")


class Connector:
    """One fresh upstream connection per client, connected from the hub."""

    #: True: ``connect_from_hub(done)`` from the accept callback, no greenlet. False:
    #: ``acquire()`` in a greenlet, which may wait (a pool). Fixed per class.
    connects_from_hub = True
    #: Whether released connections may be kept (sessions then keep the upstream open).
    reuses = False
    #: Told the seconds of each successful connect (the connect histogram); it only records.
    connect_timer: Callable[[float], None] | None = None

    def __init__(self, address: Address, connect_timeout: float) -> None:
        self.address = address
        self.connect_timeout = connect_timeout
        self._targets: list[tuple] | None = None
        self._now_of: list[tuple] | None = None  # the targets ``_now`` was decided for
        self._now: tuple | None = None  # their first, when on loopback: what connect_now tries
        self._refresh: gevent.Greenlet | None = None
        self._refreshed_at = float("-inf")

    def targets(self) -> list[tuple]:
        """The resolved addresses (resolving now, in this greenlet, if never done)."""
        if self._targets is None:
            self._targets = resolve(self.address)
        return self._targets

    def prepare(self) -> None:
        """Resolve the address now if it can be (at start), so clients never wait for DNS."""
        try:
            self.targets()
        except OSError:
            pass  # not resolvable yet: the first connect resolves it (a HubConnect does so in a greenlet)

    def acquire(self) -> socket.socket:
        """A connected upstream socket, or ``UpstreamError`` saying why not (blocks this greenlet)."""
        started = time.monotonic()
        try:
            sock = connect_first(self.targets(), self.connect_timeout)
        except OSError as exc:
            raise self.failure(exc) from None
        if self.connect_timer is not None:
            self.connect_timer(time.monotonic() - started)
        return sock

    def connect_from_hub(self, done: Callable[[socket.socket | None, UpstreamError | None], None]) -> HubConnect:
        """Start a connect from the hub: ``done(sock, None)``, ``done(None, error)``, or ``done(None, None)``
        if cancelled."""
        # The HubConnect times the connect and makes the error itself (``on_time``,
        # ``failure``): no closure per client, and one Python frame less per report.
        if self._targets is None:  # never resolved: the HubConnect resolves first, in a greenlet
            return HubConnect(None, self.connect_timeout, done, resolve=self.targets, on_time=self.connect_timer,
                              failure=self.failure)  # fmt: skip
        return HubConnect(self._targets, self.connect_timeout, done, on_time=self.connect_timer, failure=self.failure)

    def connect_now(self) -> _socket.socket | None:
        """``connect_from_hub``'s fast path: a connected socket when the connect finishes at once, else None.

        Tried only for a loopback first target, where the handshake has
        finished by the time a second ``connect`` asks (see ``HubConnect._next``):
        then the session starts without a HubConnect, its report and the
        callbacks between (a few microseconds of Python per client, W4's cost).
        None (a refusal, a full backlog, anything else) leaves nothing open and
        records nothing: the caller goes the full way, which tries again and
        reports. A remote target is never tried here, so no SYN is wasted.
        """
        targets = self._targets
        if targets is not self._now_of:  # resolved (again) since the last client: is its first target local?
            self._now_of = targets
            self._now = targets[0] if targets and _loopback(*targets[0]) else None
        if self._now is None:
            return None
        started = time.monotonic()
        sock = sockops.connect_now(*self._now)
        if sock is not None and self.connect_timer is not None:
            self.connect_timer(time.monotonic() - started)
        return sock

    def failure(self, exc: OSError) -> UpstreamError:
        """The ``UpstreamError`` a failed connect is reported as."""
        if isinstance(exc, UpstreamError):
            return exc
        if isinstance(exc, TimeoutError):
            return UpstreamError("connect to %s timed out after %gs" % (self.address, self.connect_timeout))
        # The name may have moved: resolve it again in the background. Clients keep
        # connecting to the current targets meanwhile, from the hub as before.
        self._refresh_targets()
        return UpstreamError("cannot connect to %s: %s" % (self.address, exc.strerror or exc))

    def _refresh_targets(self) -> None:
        now = time.monotonic()
        if self._refresh is not None or now - self._refreshed_at < REFRESH_INTERVAL:
            return
        self._refreshed_at = now
        self._refresh = gevent.spawn(self._resolve_again)

    def _resolve_again(self) -> None:
        try:
            self._targets = resolve(self.address)
        except OSError:
            pass  # keep the old targets: a failing lookup is no better
        finally:
            self._refresh = None

    def messages_cell(self, sock: socket.socket) -> int:
        """Where the session on ``sock`` counts its upstream's messages (0: nowhere; a Balancer counts per upstream)."""
        return 0

    def release(self, sock: socket.socket, reusable: bool) -> None:
        """Give a connection back after its session; here it is always closed."""
        sockops.close(sock)

    def retire(self) -> None:
        """A reload replaced this connector: close it once no session uses it (here: nothing is kept)."""
        self.close()

    def close(self) -> None:
        """Stop a re-resolve in progress; nothing else is kept here."""
        refresh, self._refresh = self._refresh, None
        if refresh is not None:
            refresh.kill(timeout=1)


def _loopback(family: int, sockaddr: tuple) -> bool:
    """Whether a resolved target is on this machine's loopback (127.0.0.0/8 or ::1)."""
    host = sockaddr[0]
    if family == _stdsocket.AF_INET:
        return host.startswith("127.")
    return family == _stdsocket.AF_INET6 and host in ("::1", "::ffff:127.0.0.1")


_IN_PROGRESS = frozenset({errno.EINPROGRESS, errno.EAGAIN, errno.EINTR})


class HubConnect:
    """One upstream connect driven by libev watchers, for callers in the hub.

    Tries each target in turn with ``timeout`` each, like ``connect_first``, then calls
    ``done(sock, None)`` (``sock`` a bare, non-blocking ``_socket.socket``, not a
    gevent one: wrap it to do blocking I/O) or ``done(None, last_error)`` exactly once (possibly
    before the constructor returns). ``cancel()`` stops it and calls
    ``done(None, None)``. Given no targets but ``resolve``, it first resolves
    in a greenlet (a lookup may block; the hub must not). ``on_time(seconds)``
    is told how long a successful connect took (from the constructor on), and a
    failure is reported as ``failure(error)`` when given (a ``Connector``'s
    ``UpstreamError``).
    """

    __slots__ = ("targets", "timeout", "done", "sock", "watcher", "timer", "last", "resolver", "on_time", "started",
                 "failure")  # fmt: skip

    def __init__(
        self,
        targets: list[tuple] | None,
        timeout: float,
        done: Callable,
        resolve: Callable[[], list[tuple]] | None = None,
        on_time: Callable[[float], None] | None = None,
        failure: Callable[[OSError], OSError] | None = None,
    ) -> None:
        self.on_time = on_time
        self.started = time.monotonic() if on_time is not None else 0.0
        self.failure = failure
        self.targets = list(targets or ())
        self.timeout = timeout
        self.done: Callable | None = done
        self.sock: _socket.socket | None = None
        self.watcher = self.timer = None
        self.last: OSError | None = None
        self.resolver: gevent.Greenlet | None = None
        if targets is None and resolve is not None:
            self.resolver = gevent.spawn(self._resolve, resolve)
        else:
            self._next()

    def _resolve(self, resolve: Callable[[], list[tuple]]) -> None:
        try:
            targets = resolve()
        except OSError as exc:
            self.resolver = None
            self._report(None, exc)
            return
        self.resolver = None
        if self.done is not None:  # not cancelled meanwhile
            self.targets = list(targets)
            self._next()

    @property
    def finished(self) -> bool:
        return self.done is None

    def cancel(self) -> None:
        self._drop()
        self._report(None, None)

    def _next(self) -> None:
        while self.targets:
            family, sockaddr = self.targets.pop(0)
            try:
                # The bare C socket, not a gevent one: the session only needs the fd
                # (libev watchers, non-blocking recv/send), and gevent's wrapper costs
                # Python frames to make and again to close, per connection. Whoever gets
                # it closes it (a Connector's ``release``).
                sock, err = sockops.start_connect(family, sockaddr)
            except OSError as exc:  # EMFILE: out of descriptors
                self.last = exc
                continue
            if err == 0:
                self._connected(sock)
                return
            if err in _IN_PROGRESS:
                loop = gevent.get_hub().loop
                self.sock = sock
                self.watcher = loop.io(sock.fileno(), 2)
                self.watcher.start(self._writable)
                self.timer = loop.timer(self.timeout)
                self.timer.start(self._timed_out)
                return
            sock.close()
            self.last = OSError(err, os.strerror(err))
        self._report(None, self.last or OSError("no address to connect to"))

    def _writable(self) -> None:
        sock = self.sock
        try:
            err = sock.getsockopt(_stdsocket.SOL_SOCKET, _stdsocket.SO_ERROR)
        except OSError as exc:
            err = exc.errno or errno.EBADF
        self._stop()
        self.sock = None
        if err:
            sock.close()
            self.last = OSError(err, os.strerror(err))
            self._next()
        else:
            self._connected(sock)

    def _timed_out(self) -> None:
        self._drop()
        self.last = TimeoutError(errno.ETIMEDOUT, "timed out")
        self._next()

    def _connected(self, sock: _socket.socket) -> None:
        try:
            sock.setsockopt(_stdsocket.IPPROTO_TCP, _stdsocket.TCP_NODELAY, 1)
        except OSError as exc:  # reset already: report it like any failed connect
            sock.close()
            self.last = exc
            self._next()
            return
        self._report(sock, None)

    def _report(self, sock: _socket.socket | None, exc: OSError | None) -> None:
        done, self.done = self.done, None
        if done is not None:
            if sock is not None:
                if self.on_time is not None:
                    self.on_time(time.monotonic() - self.started)
            elif exc is not None and self.failure is not None:
                exc = self.failure(exc)
            done(sock, exc)

    def _stop(self) -> None:
        if self.watcher is not None:
            self.watcher.close()
            self.timer.close()
            self.watcher = self.timer = None

    def _drop(self) -> None:
        resolver, self.resolver = self.resolver, None
        if resolver is not None:
            resolver.kill(block=False)
        self._stop()
        if self.sock is not None:
            self.sock.close()
            self.sock = None
