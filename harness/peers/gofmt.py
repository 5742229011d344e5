"""How Go's standard library prints things, so that foo-server and foo-client print what the reference binaries do.

The reference ``server-linux`` and ``client-linux`` are Go programs: their log
lines carry ``log``'s timestamp prefix, their durations are
``time.Duration.String``, addresses are ``net.JoinHostPort``, socket errors are
``net.OpError`` texts (``read tcp 127.0.0.1:5->127.0.0.1:8001: read: connection
reset by peer``) and a bad ``host:port`` is ``net.SplitHostPort``'s
``AddrError``. Each function here writes one of those exactly (checked against
the binaries by tests/e2e/test_reference_parity.py and against Go's own test
tables by tests/unit/test_peers.py).
"""

from __future__ import annotations

import errno
import os
import time
from typing import Any

#: Go's ``log`` standard flags (``log.LstdFlags``): local date and time to the second.
LOG_TIME_FORMAT = "%Y/%m/%d %H:%M:%S"


def log_line(text: str, now: float | None = None) -> str:
    """``text`` with Go's standard log prefix: ``2026/12/02 00:34:36 text``."""
    return "%s %s" % (time.strftime(LOG_TIME_FORMAT, time.localtime(now)), text)


def duration(ns: int) -> str:
    """A duration in nanoseconds as Go's ``time.Duration.String`` writes it (``1.5µs``, ``1h2m3.4s``).

    Below a second the largest unit that keeps the integer part non-zero is
    used (ns, µs with U+00B5, ms) with every significant fraction digit; from a
    second on it is ``[Nh][Nm]S[.fff]s``; zero is ``0s``.
    """
    if ns == 0:
        return "0s"
    sign = "-" if ns < 0 else ""
    ns = abs(ns)

    def frac(value: int, unit: int, suffix: str) -> str:
        whole, rest = divmod(value, unit)
        digits = ("%0*d" % (len(str(unit)) - 1, rest)).rstrip("0")
        return "%d%s%s" % (whole, "." + digits if digits else "", suffix)

    if ns < 1000:
        return "%s%dns" % (sign, ns)
    if ns < 1_000_000:
        return sign + frac(ns, 1000, "µs")
    if ns < 1_000_000_000:
        return sign + frac(ns, 1_000_000, "ms")
    minutes, sec_ns = divmod(ns, 60_000_000_000)
    hours, minutes = divmod(minutes, 60)
    out = sign
    if hours:
        out += "%dh" % hours
    if hours or minutes:
        out += "%dm" % minutes
    return out + frac(sec_ns, 1_000_000_000, "s")


def join_host_port(address: Any) -> str:
    """A socket address as Go prints it: ``host:port``, ``[v6]:port``; IPv4-mapped IPv6 shown as IPv4."""
    if not isinstance(address, tuple):
        return str(address)
    host, port = address[0], address[1]
    if host.startswith("::ffff:") and "." in host:
        host = host[7:]
    return "[%s]:%d" % (host, port) if ":" in host else "%s:%d" % (host, port)


class AddrError(ValueError):
    """A ``host:port`` Go's ``net`` refuses; ``str()`` is Go's text, e.g. ``address abc: missing port in address``."""


def split_host_port(text: str) -> tuple[str, int]:
    """``host:port`` / ``[v6]:port`` / ``:port`` -> ``(host, port)`` by Go's ``net.SplitHostPort`` rules.

    Unlike fooproxy's flags, a bare port is refused (``missing port in
    address``), as the reference peers refuse it. An empty port means 0.
    """
    i = text.rfind(":")
    if i < 0:
        raise AddrError("address %s: missing port in address" % text)
    j = k = 0
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise AddrError("address %s: missing ']' in address" % text)
        if end + 1 == len(text):
            raise AddrError("address %s: missing port in address" % text)
        if end + 1 != i:
            why = "too many colons" if text[end + 1] == ":" else "missing port"
            raise AddrError("address %s: %s in address" % (text, why))
        host, j, k = text[1:end], 1, end + 1
    else:
        host = text[:i]
        if ":" in host:
            raise AddrError("address %s: too many colons in address" % text)
    if "[" in text[j:]:
        raise AddrError("address %s: unexpected '[' in address" % text)
    if "]" in text[k:]:
        raise AddrError("address %s: unexpected ']' in address" % text)
    port_s = text[i + 1 :]
    if port_s == "":
        return host, 0
    if not port_s.isdigit() or not port_s.isascii() or int(port_s) > 65535:
        raise AddrError("address %s: invalid port" % port_s)
    return host, int(port_s)


def lookup_error(host: str, resolv_conf: str = "/etc/resolv.conf") -> str:
    """Go's resolver error for a name that does not resolve: ``lookup NAME on NS:53: no such host``."""
    try:
        with open(resolv_conf) as f:
            servers = [line.split()[1] for line in f if line.startswith("nameserver") and len(line.split()) > 1]
    except OSError:
        servers = []
    where = " on %s" % join_host_port((servers[0], 53)) if servers else ""
    return "lookup %s%s: no such host" % (host, where)


def errno_text(exc: OSError) -> str:
    """The text Go's ``syscall.Errno`` gives ``exc``'s errno: the C library's, first letter lower-case."""
    if exc.errno is None:
        return str(exc) or type(exc).__name__
    text = os.strerror(exc.errno)
    return text[:1].lower() + text[1:]


def dial_error(exc: OSError, remote: str) -> str:
    """``net.Dial``'s error for a failed TCP connect to ``remote``: ``dial tcp R: getsockopt: connection refused``.

    A non-blocking connect learns a refusal, timeout or unreachable host from
    ``getsockopt(SO_ERROR)``, which Go names; errors of the connect call itself
    are named ``connect``. ``TimeoutError`` without an errno is Go's deadline.
    """
    if isinstance(exc, TimeoutError) and exc.errno is None:
        return "dial tcp %s: i/o timeout" % remote
    late = (errno.ECONNREFUSED, errno.ETIMEDOUT, errno.EHOSTUNREACH, errno.ECONNRESET)
    return "dial tcp %s: %s: %s" % (remote, "getsockopt" if exc.errno in late else "connect", errno_text(exc))


def io_error(op: str, exc: OSError, local: str, remote: str) -> str:
    """``net.OpError`` of a ``read`` or ``write`` on a TCP connection: ``read tcp L->R: read: <errno text>``."""
    if isinstance(exc, TimeoutError) and exc.errno is None:
        return "%s tcp %s->%s: i/o timeout" % (op, local, remote)
    return "%s tcp %s->%s: %s: %s" % (op, local, remote, op, errno_text(exc))


def quote(data: bytes) -> str:
    """``strconv.Quote`` of ``data``: double quotes, Go escapes for quotes, backslashes and non-printables."""
    out = ['"']
    for text in data.decode("utf-8", "surrogateescape"):
        code = ord(text)
        if text in '"\\':
            out.append("\\" + text)
        elif 0xDC80 <= code <= 0xDCFF:  # a byte that is not UTF-8
            out.append("\\x%02x" % (code - 0xDC00))
        elif text in "\a\b\f\n\r\t\v":
            out.append("\\" + "abfnrtv"["\a\b\f\n\r\t\v".index(text)])
        elif code < 0x20 or code == 0x7F:
            out.append("\\x%02x" % code)
        elif not text.isprintable():
            out.append("\\u%04x" % code if code <= 0xFFFF else "\\U%08x" % code)
        else:
            out.append(text)
    out.append('"')
    return "".join(out)
