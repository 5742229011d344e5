"""Upstream connections: resolve the server's address once, dial it per client.

``Connector`` is the interface the proxy uses (``acquire``/``release``); the
pooled variant in ``pool.py`` reuses clean connections instead of closing them.
"""

from __future__ import annotations

import socket as _stdsocket

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

    def acquire(self) -> socket.socket:
        """A connected upstream socket, or ``UpstreamError`` saying why not."""
        try:
            return dial(self.targets(), self.connect_timeout)
        except TimeoutError:
            raise UpstreamError("connect to %s timed out after %gs" % (self.address, self.connect_timeout)) from None
        except OSError as exc:
            self._targets = None  # re-resolve next time: the name may have moved
            raise UpstreamError("cannot connect to %s: %s" % (self.address, exc.strerror or exc)) from None

    def release(self, sock: socket.socket, reusable: bool) -> None:
        """Give a connection back after its session; here it is always closed."""
        sock.close()

    def close(self) -> None:
        """Close whatever the connector keeps (nothing here)."""
