"""Upstream connections: resolve the server's address once, dial it per client.

``Connector`` is the interface the proxy uses (``acquire``/``release``); the
pooled variant in ``pool.py`` reuses clean connections instead of closing them.
``Dial`` is the same connect without a greenlet: a non-blocking ``connect`` and
a write watcher, for the proxy's accept callback (see ``Proxy.do_handle``).
"""

from __future__ import annotations

import errno
import os
import socket as _stdsocket
from collections.abc import Callable

import gevent
from gevent import socket

from fooproxy.config import Address


class UpstreamError(OSError):
    """The upstream could not be reached; the message says where and why."""


def resolve(address: Address) -> list[tuple]:
    """``getaddrinfo`` once at start, so no client pays a DNS lookup."""
    infos = _stdsocket.getaddrinfo(address.connect_host, address.port, type=_stdsocket.SOCK_STREAM)
    return [(family, sockaddr) for family, _type, _proto, _name, sockaddr in infos]


def dial(targets: list[tuple], timeout: float) -> socket.socket:
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
    """One fresh upstream connection per client."""

    def __init__(self, address: Address, connect_timeout: float) -> None:
        self.address = address
        self.connect_timeout = connect_timeout
        self._targets: list[tuple] | None = None

    @property
    def reuses(self) -> bool:
        """Whether released connections may be kept (sessions then keep the upstream open)."""
        return False

    def targets(self) -> list[tuple]:
        if self._targets is None:
            self._targets = resolve(self.address)
        return self._targets

    def prepare(self) -> None:
        """Resolve the address now if it can be (at start), so clients never wait for DNS."""
        try:
            self.targets()
        except OSError:
            pass  # not resolvable yet: the first client tries again, in a greenlet

    @property
    def resolved(self) -> bool:
        """The address is resolved: ``dial`` can run without a greenlet (no DNS lookup)."""
        return self._targets is not None

    def acquire(self) -> socket.socket:
        """A connected upstream socket, or ``UpstreamError`` saying why not."""
        try:
            return dial(self.targets(), self.connect_timeout)
        except OSError as exc:
            raise self.failure(exc) from None

    def dial(self, done: Callable[[socket.socket | None, UpstreamError | None], None]) -> Dial:
        """Start a connect from the hub (``resolved`` must hold); ``done(sock, None)`` or ``done(None, error)``."""
        assert self._targets is not None
        return Dial(self._targets, self.connect_timeout, lambda sock, exc: done(sock, exc and self.failure(exc)))

    def failure(self, exc: OSError) -> UpstreamError:
        """The ``UpstreamError`` a failed connect is reported as."""
        if isinstance(exc, TimeoutError):
            return UpstreamError("connect to %s timed out after %gs" % (self.address, self.connect_timeout))
        self._targets = None  # re-resolve next time: the name may have moved
        return UpstreamError("cannot connect to %s: %s" % (self.address, exc.strerror or exc))

    def release(self, sock: socket.socket, reusable: bool) -> None:
        """Give a connection back after its session; here it is always closed."""
        sock.close()

    def close(self) -> None:
        """Close whatever the connector keeps (nothing here)."""


_IN_PROGRESS = frozenset({errno.EINPROGRESS, errno.EAGAIN, errno.EINTR})


class Dial:
    """One upstream connect driven by libev watchers, for callers in the hub.

    Tries each target in turn with ``timeout`` each, like ``dial``, then calls
    ``done(sock, None)`` or ``done(None, last_error)`` exactly once (possibly
    before the constructor returns). ``cancel()`` stops it and calls
    ``done(None, None)``.
    """

    __slots__ = ("targets", "timeout", "done", "sock", "watcher", "timer", "last")

    def __init__(self, targets: list[tuple], timeout: float, done: Callable) -> None:
        self.targets = list(targets)
        self.timeout = timeout
        self.done: Callable | None = done
        self.sock: socket.socket | None = None
        self.watcher = self.timer = None
        self.last: OSError | None = None
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
                sock = socket.socket(family, _stdsocket.SOCK_STREAM)
            except OSError as exc:  # EMFILE: out of descriptors
                self.last = exc
                continue
            err = sock._sock.connect_ex(sockaddr)  # the OS socket is non-blocking: returns at once
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

    def _connected(self, sock: socket.socket) -> None:
        try:
            sock.setsockopt(_stdsocket.IPPROTO_TCP, _stdsocket.TCP_NODELAY, 1)
        except OSError as exc:  # reset already: report it like any failed connect
            sock.close()
            self.last = exc
            self._next()
            return
        self._report(sock, None)

    def _report(self, sock: socket.socket | None, exc: OSError | None) -> None:
        done, self.done = self.done, None
        if done is not None:
            done(sock, exc)

    def _stop(self) -> None:
        if self.watcher is not None:
            self.watcher.close()
            self.timer.close()
            self.watcher = self.timer = None

    def _drop(self) -> None:
        self._stop()
        if self.sock is not None:
            self.sock.close()
            self.sock = None
