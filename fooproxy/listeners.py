"""Listening sockets, bound before the server starts so errors are clear."""

from __future__ import annotations

import errno
import logging
import resource
import socket as _stdsocket
import time

import gevent
from gevent import socket

from fooproxy.config import Address
from fooproxy.ratelimit import RepeatFilter


class StartupError(RuntimeError):
    """The proxy cannot start; the message is one line for the user."""


def bind(
    address: Address, reuse_port: bool = False, backlog: int = 1024, what: str = "listen", probe: bool = True
) -> socket.socket:
    """A listening gevent socket on ``address``.

    An empty host listens on all interfaces, IPv4 and IPv6 alike (as Go does),
    so a client dialling ``localhost`` finds it whichever address that gives.
    With ``reuse_port``, a port already held by a process that did not set
    SO_REUSEPORT is still reported as in use, and one that did is probed
    first, so two fooproxies never split a port by accident. A worker passes
    ``probe=False``: its siblings hold the port, and its master probed it once.
    """
    if reuse_port and probe:
        probe_free(address, what)
    family, host = _family_host(address)
    sock = socket.socket(family, _stdsocket.SOCK_STREAM)
    try:
        sock.setsockopt(_stdsocket.SOL_SOCKET, _stdsocket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(_stdsocket.SOL_SOCKET, _stdsocket.SO_REUSEPORT, 1)
        if family == _stdsocket.AF_INET6 and not address.host:
            sock.setsockopt(_stdsocket.IPPROTO_IPV6, _stdsocket.IPV6_V6ONLY, 0)
        sock.bind((host, address.port))
        sock.listen(backlog)
    except OSError as exc:
        sock.close()
        raise StartupError(_describe(exc, address, what)) from None
    return sock


def probe_free(address: Address, what: str = "listen") -> None:
    """Raise ``StartupError`` if something already listens on ``address``."""
    family, host = _family_host(address)
    if address.port == 0:
        return
    probe = _stdsocket.socket(family, _stdsocket.SOCK_STREAM)
    try:
        probe.setsockopt(_stdsocket.SOL_SOCKET, _stdsocket.SO_REUSEADDR, 1)
        if family == _stdsocket.AF_INET6 and not address.host:
            probe.setsockopt(_stdsocket.IPPROTO_IPV6, _stdsocket.IPV6_V6ONLY, 0)
        probe.bind((host, address.port))
    except OSError as exc:
        raise StartupError(_describe(exc, address, what)) from None
    finally:
        probe.close()


def _family_host(address: Address) -> tuple[int, str]:
    if not address.host:
        if _stdsocket.has_ipv6 and _ipv6_works():
            return _stdsocket.AF_INET6, "::"
        return _stdsocket.AF_INET, "0.0.0.0"
    if ":" in address.host:
        return _stdsocket.AF_INET6, address.host
    if address.host.replace(".", "").isdigit():
        return _stdsocket.AF_INET, address.host
    try:
        info = _stdsocket.getaddrinfo(address.host, address.port, type=_stdsocket.SOCK_STREAM)[0]
    except OSError as exc:
        raise StartupError("cannot resolve %s: %s" % (address, exc)) from None
    return info[0], info[4][0]


def _ipv6_works() -> bool:
    try:
        s = _stdsocket.socket(_stdsocket.AF_INET6, _stdsocket.SOCK_STREAM)
    except OSError:
        return False
    s.close()
    return True


def _describe(exc: OSError, address: Address, what: str) -> str:
    if exc.errno == errno.EADDRINUSE:
        return "cannot %s on %s: address already in use" % (what, address)
    if exc.errno == errno.EADDRNOTAVAIL:
        return "cannot %s on %s: address not available on this machine" % (what, address)
    if exc.errno == errno.EACCES:
        return "cannot %s on %s: permission denied" % (what, address)
    return "cannot %s on %s: %s" % (what, address, exc.strerror or exc)


#: accept() errors that mean "out of descriptors or kernel memory for now", not a broken listener.
RESOURCE_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


class AcceptPause:
    """What a gevent server does when accept() fails for lack of descriptors (EMFILE) or memory.

    gevent's own handling prints a full traceback for each failed accept, one
    per waiting client, and retries with a backoff of up to 1 s. Here the
    server (whose accept callback calls ``handles``) stops watching its listener,
    says so once per period with a count (``RepeatFilter``), and looks again
    after ``MIN_DELAY``, doubling up to ``MAX_DELAY`` while it keeps failing
    (10 tries a second at most, back to ``MIN_DELAY`` after a second without
    a failure), so it accepts again within 0.1 s of a descriptor freeing up. Meanwhile
    the clients wait in the kernel's accept backlog; none is refused by us.
    The server's ``stop_accepting`` calls ``cancel`` (a drain ends the pause).
    """

    MIN_DELAY = 0.01
    MAX_DELAY = 0.1

    def __init__(self, server, logger: logging.Logger) -> None:
        self.server = server
        self.warnings = RepeatFilter(logger)
        self.delay = self.MIN_DELAY
        #: Failed accepts since start (each one a client left waiting in the backlog a little longer).
        self.failures = 0
        self._timer = None
        self._last_failure = 0.0

    def handles(self, exc: OSError) -> bool:
        """True if ``exc`` is a resource error, now handled (paused); False: not ours, re-raise it."""
        if exc.errno not in RESOURCE_ERRNOS:
            return False
        now = time.monotonic()
        if now - self._last_failure > 1.0:  # a new episode, not a retry that failed again
            self.delay = self.MIN_DELAY
        self._last_failure = now
        self.failures += 1
        soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        self.warnings.warn(
            "accept",
            "cannot accept a client: %s (descriptor limit %d, ulimit -n); clients wait in the backlog"
            % (exc.strerror or exc, soft),
        )
        self.server.stop_accepting()  # cancels a pending retry too
        self._timer = gevent.get_hub().loop.timer(self.delay)
        self._timer.start(self._retry)
        self.delay = min(self.MAX_DELAY, self.delay * 2)
        return True

    def _retry(self) -> None:
        self._timer.close()
        self._timer = None
        server = self.server
        if server.started and not server.full():
            server.start_accepting()

    def cancel(self) -> None:
        if self._timer is not None:
            self._timer.close()
            self._timer = None
