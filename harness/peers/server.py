"""foo-server: a Foo server that answers like the reference ``server-linux``.

In-process use (tests, benchmarks)::

    server = FooServer(make_listener(Address("127.0.0.1", 0)), quiet=True)
    server.start()
    ... connect to server.server_port ...
    server.stop()

Only explicit gevent APIs are used, so the module works with or without
monkey patching.

After a client's EOF the server answers everything it had read, logs
``disconnected`` and, like the reference, never closes its own side. The
handler greenlet then parks on an Event (no CPU use) and holds the socket
until the server stops or the peer is gone for good: every ``reap_interval``
seconds it checks the socket for a reset (SO_ERROR / TCP state CLOSE).
A peer that closes with unread answers resets at once; one that closes
cleanly is found by TCP keepalive once its kernel has forgotten the
connection (about ``tcp_fin_timeout`` + ``KEEPALIVE_IDLE`` seconds). So parked
sockets never pile up without bound. A line longer than 65,536 bytes ends the
handling the same way (logged ``disconnected``, nothing more read or
answered, the socket held, as the reference holds it). ``close_on_eof=True``
closes right after answering (or after the long line) instead.

Every log line carries Go's ``log`` timestamp prefix, durations are Go's, and
startup errors read like the reference's (``harness.peers.gofmt``).
"""

from __future__ import annotations

import errno
import functools
import os
import random
import signal
import sys
import time
from typing import Any, TextIO

import gevent
import gevent.event
import gevent.pool
import gevent.socket as gsocket
from gevent.server import StreamServer

from fooproxy.config import Address
from fooproxy.protocol import MAX_LINE
from harness.peers.answer import answer_for, lie_about
from harness.peers.flags import parse_cli
from harness.peers.gofmt import (
    AddrError,
    duration,
    errno_text,
    join_host_port,
    log_line,
    lookup_error,
    split_host_port,
)

USAGE = """\
foo-server: a Foo protocol server that answers like the reference server-linux.

Usage:
  foo-server [options]
  foo-server -h | --help

Options:
  -h --help       Show this help and exit.
  --listen ADDR   Listen on ADDR (:port, host:port, [v6]:port); an empty host means
                  all interfaces, IPv4 and IPv6 [default: :8001].
  --split         Split each write at random points, as the reference does.
  --close-on-eof  Close a connection once its client sent EOF and all is answered,
                  or sent a line over 64 KiB (the reference never closes its side).
  --quiet         Do not log per-connection lines.
  --lie           Corrupt every hashed answer (to test that clients validate).
"""

RECV_SIZE = 65536
YIELD_AFTER = 16384  # bytes in one read after which the handler yields to the hub
#: TCP keepalive for parked connections, so that vanished peers are found.
KEEPALIVE_IDLE, KEEPALIVE_INTERVAL, KEEPALIVE_COUNT = 30, 10, 3
_TCP_CLOSE = 7  # Linux tcp_info.tcpi_state


class Answerer:
    """The answers to a byte stream of any segmentation, as the reference gives them.

    ``feed(chunk)`` returns the answers (joined) for the lines ``chunk``
    completes. A line longer than ``MAX_LINE`` bytes (newline included) sets
    ``oversized``: the answers to the lines before it are still returned, and
    nothing is answered after it.
    """

    __slots__ = ("_pending", "_answer", "oversized")

    def __init__(self, lie: bool = False) -> None:
        self._pending = bytearray()
        self._answer = (lambda line: lie_about(answer_for(line))) if lie else answer_for
        self.oversized = False

    def feed(self, chunk: bytes) -> bytes:
        """Account for ``chunk``; return the answers to the lines it completes."""
        if self.oversized:
            return b""
        last = chunk.rfind(b"\n")
        pending = self._pending
        if last < 0:
            pending += chunk
            if len(pending) >= MAX_LINE:
                self._overflow()
            return b""
        ans = self._answer
        out = []
        start = 0
        if pending:
            nl = chunk.find(b"\n")
            if len(pending) + nl >= MAX_LINE:
                self._overflow()
                return b""
            out.append(ans(bytes(pending) + chunk[:nl]))
            pending.clear()
            start = nl + 1
        if start <= last:
            lines = chunk[start:last].split(b"\n")
            if last - start >= MAX_LINE:
                for i, line in enumerate(lines):
                    if len(line) >= MAX_LINE:
                        del lines[i:]
                        self.oversized = True
                        break
            out.extend([ans(line) for line in lines])
        if not self.oversized and last + 1 < len(chunk):
            pending += chunk[last + 1 :]
            if len(pending) >= MAX_LINE:
                self._overflow()
        return b"".join(out)

    def _overflow(self) -> None:
        self.oversized = True
        self._pending = bytearray()


def make_listener(address: Address, backlog: int = 1024) -> gsocket.socket:
    """Bind and listen on ``address`` (a gevent socket).

    An empty host binds all interfaces dual-stack (``::`` with IPV6_V6ONLY off)
    when IPv6 is available, else ``0.0.0.0``. Raises OSError on failure.
    """
    if address.host:
        infos = gsocket.getaddrinfo(
            address.host, address.port, gsocket.AF_UNSPEC, gsocket.SOCK_STREAM, 0, gsocket.AI_PASSIVE
        )
        candidates = [(family, sockaddr) for family, _, _, _, sockaddr in infos]
    else:
        candidates = []
        if gsocket.has_ipv6:
            candidates.append((gsocket.AF_INET6, ("::", address.port)))
        candidates.append((gsocket.AF_INET, ("0.0.0.0", address.port)))
    error: OSError | None = None
    for family, sockaddr in candidates:
        if error is not None and not address.host and not _no_ipv6(error):
            break  # e.g. port in use on [::]: do not silently serve IPv4 only
        try:
            sock = gsocket.socket(family, gsocket.SOCK_STREAM)
        except OSError as exc:
            error = exc
            continue
        try:
            sock.setsockopt(gsocket.SOL_SOCKET, gsocket.SO_REUSEADDR, 1)
            if family == gsocket.AF_INET6 and not address.host:
                sock.setsockopt(gsocket.IPPROTO_IPV6, gsocket.IPV6_V6ONLY, 0)
            sock.bind(sockaddr)
            sock.listen(backlog)
            return sock
        except OSError as exc:
            sock.close()
            error = exc
    assert error is not None
    raise error


def _no_ipv6(exc: OSError) -> bool:
    """True for the errors that mean "no IPv6 here" (fall back to IPv4), not "port in use"."""
    return exc.errno in (errno.EAFNOSUPPORT, errno.EADDRNOTAVAIL, errno.EPROTONOSUPPORT)


def _peer_gone(sock: gsocket.socket) -> bool:
    """True when the connection was reset (or the socket is unusable)."""
    try:
        if sock.getsockopt(gsocket.SOL_SOCKET, gsocket.SO_ERROR):
            return True
        if hasattr(gsocket, "TCP_INFO"):
            return sock.getsockopt(gsocket.IPPROTO_TCP, gsocket.TCP_INFO, 8)[0] == _TCP_CLOSE
    except OSError:
        return True
    return False


def _keepalive(sock: gsocket.socket) -> None:
    try:
        sock.setsockopt(gsocket.SOL_SOCKET, gsocket.SO_KEEPALIVE, 1)
        for name, value in (
            ("TCP_KEEPIDLE", KEEPALIVE_IDLE),
            ("TCP_KEEPINTVL", KEEPALIVE_INTERVAL),
            ("TCP_KEEPCNT", KEEPALIVE_COUNT),
        ):
            if hasattr(gsocket, name):
                sock.setsockopt(gsocket.IPPROTO_TCP, getattr(gsocket, name), value)
    except OSError:
        pass


class FooServer(StreamServer):
    """The Foo answer server on a pre-bound listener (see ``make_listener``).

    Options: ``split`` splits each write at random points; ``close_on_eof``
    closes after the client's EOF instead of holding the socket open;
    ``quiet`` drops per-connection log lines; ``lie`` corrupts answers;
    ``reap_interval`` is how often a parked connection checks for a reset.
    """

    def __init__(
        self,
        listener: gsocket.socket,
        *,
        split: bool = False,
        close_on_eof: bool = False,
        quiet: bool = False,
        lie: bool = False,
        log: TextIO | None = None,
        reap_interval: float = 10.0,
    ) -> None:
        super().__init__(listener, spawn=gevent.pool.Pool())
        self.split = split
        self.close_on_eof = close_on_eof
        self.quiet = quiet
        self.lie = lie
        self.reap_interval = reap_interval
        self._log_file = log
        self._closing = gevent.event.Event()
        self._rng = random.Random()
        #: Connections answered to their EOF and held open (for tests/monitoring).
        self.parked = 0

    @property
    def address_text(self) -> str:
        """The bound address as Go prints it, e.g. ``[::]:8001``."""
        return join_host_port(self.socket.getsockname())

    def log(self, text: str) -> None:
        """Write one line to the log (stderr by default), with Go's timestamp prefix as the reference."""
        out = self._log_file or sys.stderr
        out.write(log_line(text) + "\n")
        out.flush()

    def handle(self, sock: gsocket.socket, address: Any) -> None:
        """Serve one connection (StreamServer closes ``sock`` when this returns)."""
        peer = join_host_port(address)
        start = time.perf_counter_ns()
        if not self.quiet:
            self.log("%s: connected" % peer)
        try:
            sock.setsockopt(gsocket.IPPROTO_TCP, gsocket.TCP_NODELAY, 1)
        except OSError:
            pass
        answerer = Answerer(lie=self.lie)
        send = functools.partial(self._send_split, sock) if self.split else sock.sendall
        eof = False
        try:
            while True:
                chunk = sock.recv(RECV_SIZE)
                if not chunk:
                    eof = True
                    break
                out = answerer.feed(chunk)
                if out:
                    send(out)
                if answerer.oversized:
                    break
                if len(chunk) >= YIELD_AFTER:
                    # recv/sendall do not switch while data and buffer space are at
                    # hand: let the other connections run between big chunks.
                    gevent.sleep(0)
        except OSError:
            pass
        if not self.quiet:
            self.log("%s: disconnected (%s)" % (peer, duration(time.perf_counter_ns() - start)))
        if (eof or answerer.oversized) and not self.close_on_eof:
            self._park(sock)

    def _send_split(self, sock: gsocket.socket, data: bytes) -> None:
        if len(data) < 2:
            sock.sendall(data)
            return
        rng = self._rng
        cuts = sorted(set(rng.randrange(1, len(data)) for _ in range(rng.randint(1, 2))))
        prev = 0
        for cut in cuts + [len(data)]:
            sock.sendall(data[prev:cut])
            prev = cut

    def _park(self, sock: gsocket.socket) -> None:
        """Hold ``sock`` open, without its side closed, until stop or a reset."""
        _keepalive(sock)
        self.parked += 1
        try:
            while not self._closing.wait(self.reap_interval):
                if _peer_gone(sock):
                    break
        finally:
            self.parked -= 1

    def stop(self, timeout: float | None = None) -> None:
        """Stop accepting, release parked connections, kill the rest after ``timeout``."""
        self._closing.set()
        super().stop(timeout=timeout)


def fatal(text: str) -> int:
    """Log ``text`` as Go's ``log.Fatal`` does (timestamp prefix, stderr) and return its exit status, 1."""
    sys.stderr.write(log_line(text) + "\n")
    sys.stderr.flush()
    return 1


def main(argv: list[str] | None = None) -> int:
    """Run foo-server until SIGTERM/SIGINT, then die by that signal, as the reference (which does not catch it).

    A ``-listen`` Go refuses, or a failed listen, ends it like the reference:
    one log line (``listen tcp: address abc: missing port in address``), exit 1.
    """
    opts = parse_cli(USAGE, argv, "foo-server")
    try:
        host, port = split_host_port(opts["--listen"])
    except AddrError as exc:
        return fatal("listen tcp: %s" % exc)
    try:
        listener = make_listener(Address(host, port))
    except gsocket.gaierror:
        return fatal("listen tcp: %s" % lookup_error(host))
    except OSError as exc:
        return fatal(
            "listen tcp %s: bind: %s" % (join_host_port((host, port)) if host else ":%d" % port, errno_text(exc))
        )
    server = FooServer(
        listener,
        split=opts["--split"],
        close_on_eof=opts["--close-on-eof"],
        quiet=opts["--quiet"],
        lie=opts["--lie"],
    )
    stop = gevent.event.AsyncResult()
    handlers = [gevent.signal_handler(sig, stop.set, sig) for sig in (signal.SIGTERM, signal.SIGINT)]
    server.start()
    server.log("listening on %s" % server.address_text)
    got = signal.SIGINT
    try:
        got = stop.get()
    except KeyboardInterrupt:
        pass
    finally:
        for handler in handlers:
            handler.cancel()
        server.stop(timeout=0)
    # Go's default for these signals: the process dies by it (status -15 / -2), which scripts see.
    signal.signal(got, signal.SIG_DFL)
    os.kill(os.getpid(), got)
    return 128 + got  # not reached: the default action ends the process


if __name__ == "__main__":
    sys.exit(main())
