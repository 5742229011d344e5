"""HTTP endpoint: /health (/status, /heartbeat), /stats, /metrics and the live page on gevent.pywsgi.

``make_app`` is a plain WSGI callable that dispatches on ``PATH_INFO``;
``HttpServer`` runs it on a ``WSGIServer`` with its own connection limit, so
HTTP clients can never take slots from proxy sessions, and handles the
shutdown details: ``Connection: close`` while draining, and idle keep-alive
connections dropped at once instead of holding ``stop()`` until its timeout.

Hostile clients. ``/health`` is a liveness probe: if slow clients could hold
every slot, the probe would fail and an orchestrator would restart a healthy
proxy. So:

- each request head (request line and headers) must arrive within
  ``header_timeout`` seconds *in total*, counted from when the connection
  starts waiting for it; a socket timeout alone restarts with every byte, so a
  slowloris sending a byte every few seconds would hold its slot for ever;
- a head is at most ``MAX_HEAD_BYTES`` (431 beyond, 414 for a request line
  over gevent's ``MAX_REQUEST_LINE``);
- at ``max_connections``, a new connection evicts the one that has waited
  longest for its request head. A real probe sends its head in one segment
  and is answered within milliseconds, so it is never the oldest waiter;
  however many slow clients there are, a new request always gets a slot.
  (A larger pool alone would only move the number an attacker needs.) Only
  when no connection is waiting for a head (all are being answered) is the
  new one closed at once;
- bad requests are logged as one short line with the peer, rate-limited
  (``RepeatFilter``), never with the raw bytes;
- ``allow`` (``-http-allow``) lists the source networks that get answers;
  anyone else gets 403.
"""

from __future__ import annotations

import io
import ipaddress
import json
import logging
import socket
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import gevent
from gevent.pool import Group
from gevent.pywsgi import MAX_REQUEST_LINE, LoggingLogAdapter, WSGIHandler, WSGIServer
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import CollectorRegistry

from fooproxy.config import Address
from fooproxy.dashboard import LiveSamples, page_routes
from fooproxy.listeners import StartupError, bind
from fooproxy.metrics import GetExtra, GetSnapshot, make_registry
from fooproxy.ratelimit import RepeatFilter

GetHealth = Callable[[], "tuple[bool, dict[str, Any]]"]
StartResponse = Callable[..., Any]
WSGIApp = Callable[[dict, StartResponse], Iterable[bytes]]

HEALTH_PATHS = frozenset({"/health", "/status", "/heartbeat"})
_ALLOWED = "GET, HEAD"
#: Request line plus headers. Probes and Prometheus send a few hundred bytes.
MAX_HEAD_BYTES = 16384
#: Seconds for a whole request head (and for an idle keep-alive connection's
#: next one). A probe sends its head in one segment; 5 s covers retransmits
#: on a lossy link.
HEADER_TIMEOUT = 5.0
#: Connections at once; beyond, the oldest still waiting for its head is evicted.
MAX_CONNECTIONS = 256
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
_FORBIDDEN = b"forbidden\n"
_log = logging.getLogger("fooproxy.http")

__all__ = ["HEALTH_PATHS", "HttpServer", "StartupError", "make_app"]


# -- the WSGI application --------------------------------------------------------
def make_app(
    get_snapshot: GetSnapshot,
    get_health: GetHealth,
    get_extra: GetExtra | None = None,
    registry: CollectorRegistry | None = None,
    logger: logging.Logger | None = None,
    live: LiveSamples | None = None,
) -> WSGIApp:
    """The WSGI app for /health, /stats and /metrics (and, given ``live``, the live page).

    ``get_health() -> (ok, detail)``: 200 with ``{"status": "ok", **detail}``
    or 503 with ``{"status": "unavailable", "reason": ..., **detail}``
    (``detail`` may override ``status``, e.g. ``"degraded"``).
    ``/stats`` is exactly ``json.dumps(get_snapshot().as_dict())``.
    ``/metrics`` is served from ``registry`` (default: ``make_registry(get_snapshot, get_extra)``).
    With ``live``: the page at ``/`` and ``/dashboard``, its files under
    ``/static/`` (read from the package now, once) and ``/stats/stream``
    (Server-Sent Events from ``live``; 503 beyond ``live.max_streams``).
    """
    log = logger or _log
    if registry is None:
        registry = make_registry(get_snapshot, get_extra)
    pages = page_routes() if live is not None else {}
    stream_path = "/stats/stream" if live is not None else None

    def health() -> tuple[str, list[tuple[str, str]], bytes]:
        ok, detail = get_health()
        body: dict[str, Any] = {"status": "ok" if ok else "unavailable"}
        body.update(detail)
        if not ok:
            body.setdefault("reason", "unhealthy")
        status = "200 OK" if ok else "503 Service Unavailable"
        return status, [("Content-Type", "application/json")], json.dumps(body).encode()

    def stats() -> tuple[str, list[tuple[str, str]], bytes]:
        # The same object SIGUSR2 prints, so scripts can use either.
        body = json.dumps(get_snapshot().as_dict()).encode()
        return "200 OK", [("Content-Type", "application/json")], body

    def metrics(environ: dict) -> tuple[str, list[tuple[str, str]], bytes]:
        # choose_encoder honours Accept (Prometheus text or OpenMetrics).
        encoder, content_type = choose_encoder(environ.get("HTTP_ACCEPT", ""))
        return "200 OK", [("Content-Type", content_type)], encoder(registry)

    def app(environ: dict, start_response: StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        method = environ.get("REQUEST_METHOD", "GET")
        known = path in HEALTH_PATHS or path in ("/stats", "/metrics") or path in pages or path == stream_path
        if known and path == stream_path and method in ("GET", "HEAD") and live is not None:
            return stream(method, start_response)
        try:
            if not known:
                status, headers, body = "404 Not Found", [("Content-Type", "text/plain")], b"not found\n"
            elif method not in ("GET", "HEAD"):
                status, headers, body = (
                    "405 Method Not Allowed",
                    [("Content-Type", "text/plain"), ("Allow", _ALLOWED)],
                    b"method not allowed\n",
                )
            elif path in HEALTH_PATHS:
                status, headers, body = health()
            elif path == "/stats":
                status, headers, body = stats()
            elif path in pages:
                content_type, body = pages[path]
                status, headers = "200 OK", [("Content-Type", content_type)]
            else:
                status, headers, body = metrics(environ)
        except Exception:
            log.exception("HTTP %s %s failed", method, path)
            status, headers, body = "500 Internal Server Error", [("Content-Type", "text/plain")], b"internal error\n"
        headers.append(("Content-Length", str(len(body))))
        headers.append(("Cache-Control", "no-store"))
        start_response(status, headers)
        # HEAD: same headers (Content-Length of the GET body), no body.
        return [] if method == "HEAD" else [body]

    def stream(method: str, start_response: StartResponse) -> Iterable[bytes]:
        assert live is not None
        if live.full():
            body = b"too many live pages open (%d)\n" % live.max_streams
            start_response(
                "503 Service Unavailable",
                [("Content-Type", "text/plain"), ("Content-Length", str(len(body))), ("Retry-After", "5")],
            )
            return [] if method == "HEAD" else [body]
        # No Content-Length: pywsgi sends the body chunked, one chunk per event, as it comes.
        start_response(
            "200 OK",
            [("Content-Type", "text/event-stream"), ("Cache-Control", "no-store"), ("X-Accel-Buffering", "no")],
        )
        return [] if method == "HEAD" else live.stream()

    return app


# -- the server ------------------------------------------------------------------
class _HeadTooLarge(ValueError):
    """The request head is over MAX_HEAD_BYTES (answered 431)."""


_TOO_LARGE_RESPONSE = (
    b"HTTP/1.1 431 Request Header Fields Too Large\r\nConnection: close\r\n"
    b"Content-Type: text/plain\r\nContent-Length: 25\r\n\r\nrequest head is too large\n"
)
_BAD_RESPONSE = (
    b"HTTP/1.1 400 Bad Request\r\nConnection: close\r\n"
    b"Content-Type: text/plain\r\nContent-Length: 12\r\n\r\nbad request\n"
)


class _Handler(WSGIHandler):
    """One HTTP connection: request heads read against a total deadline and a size cap.

    Also tracks connections waiting for a request line, so stop/drain can
    drop them and a new connection can evict the longest waiter.
    """

    _requests = 0
    _head = b""
    _too_large = False
    _head_started = False

    def __init__(self, sock: Any, address: Any, server: _Server) -> None:
        # A per-operation timeout still bounds a client that stops reading
        # our response; the head itself has a total deadline (read_requestline).
        sock.settimeout(server.idle_timeout)
        # pywsgi writes the headers and the body in two sends; with Nagle on,
        # the body of every keep-alive response after the first waits ~40 ms
        # for the client's delayed ACK.
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass
        super().__init__(sock, address, server)

    def read_requestline(self) -> str:
        server: _Server = self.server
        waiting = server.keepalive_waiting if self._requests else server.fresh_waiting
        if self._requests and server.draining:
            return ""  # end a keep-alive connection between requests
        self._requests += 1
        waiting.add(self)
        server.waiting_since[self] = None  # insertion order: the first key waited longest
        self._head_started = False
        try:
            with gevent.Timeout(server.header_timeout, False):
                return self._read_head()
            if not self._head_started:
                return ""  # an idle keep-alive connection, or one that never spoke: close quietly
            server.note(
                "slow",
                "HTTP: request head from %s not complete within %gs; closed"
                % (_peer(self.client_address), server.header_timeout),
            )
            return ""
        finally:
            waiting.discard(self)
            server.waiting_since.pop(self, None)

    def _read_head(self) -> str:
        """Read the request line and, for HTTP/1.x, the header lines up to the blank line."""
        self._head, self._too_large = b"", False
        if not self.rfile.peek(1):  # waits for the first byte (or EOF)
            return ""
        self._head_started = True
        line = self.rfile.readline(MAX_REQUEST_LINE)
        if len(line) >= MAX_REQUEST_LINE or len(line.split()) != 3:
            return line.decode("latin-1")  # pywsgi answers 414, 400, or serves HTTP/0.9 (no headers)
        parts = []
        left = MAX_HEAD_BYTES - len(line)
        while True:
            header = self.rfile.readline(left + 1)
            parts.append(header)
            left -= len(header)
            if left < 0:
                self._too_large = True
                break
            if header in (b"\r\n", b"\n", b""):
                break
        self._head = b"".join(parts)
        return line.decode("latin-1")

    def read_request(self, raw_requestline: str) -> bool:
        if self._too_large:
            raise _HeadTooLarge("request head over %d bytes" % MAX_HEAD_BYTES)
        # pywsgi parses the headers from self.rfile; hand it the head already
        # read under the deadline (the body, if any, is still on the socket).
        real, self.rfile = self.rfile, io.BufferedReader(io.BytesIO(self._head))
        try:
            return super().read_request(raw_requestline)
        finally:
            self.rfile = real

    def _handle_client_error(self, ex: BaseException) -> tuple[str, bytes]:
        # Replaces pywsgi's: it logs the raw request at ERROR (and prints a
        # traceback for http.client's own errors, e.g. over 100 headers).
        server: _Server = self.server
        if isinstance(ex, _HeadTooLarge):
            server.note(
                "large",
                "HTTP: request head over %d bytes from %s; answered 431" % (MAX_HEAD_BYTES, _peer(self.client_address)),
            )
            return "431", _TOO_LARGE_RESPONSE
        server.note(
            "bad", "HTTP: bad request from %s (%s); answered 400" % (_peer(self.client_address), ex.__class__.__name__)
        )
        return "400", _BAD_RESPONSE

    def handle_error(self, t: Any, v: Any, tb: Any) -> None:
        # A client that stops reading a response (a stalled live page) times out our send:
        # that is the client's doing, not an internal error; one short line, no traceback.
        if isinstance(v, TimeoutError):
            self.close_connection = True
            self.server.note(
                "stalled",
                "HTTP: client %s stopped reading for %gs; closed"
                % (_peer(self.client_address), self.server.idle_timeout),
            )
            return
        super().handle_error(t, v, tb)

    def log_error(self, msg: str, *args: Any) -> None:
        # Everything pywsgi reports about a client: one short line, rate-limited.
        self.server.note("error", "HTTP: client %s: %s" % (_peer(self.client_address), str(msg)[:60]))


def _wake(handlers: Iterable[_Handler]) -> None:
    # shutdown, not close: the handler's greenlet is blocked reading this
    # socket; shutdown wakes it with EOF and it closes the socket itself
    # (closing it here would give that greenlet EBADF, gevent #800).
    for handler in list(handlers):
        sock = getattr(handler, "socket", None)
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def _peer(address: Any) -> str:
    try:
        host, port = address[:2]
    except (TypeError, ValueError):
        return "?"
    return ("[%s]:%s" if ":" in str(host) else "%s:%s") % (host, port)


class _Server(WSGIServer):
    handler_class = _Handler

    def __init__(
        self,
        *args: Any,
        idle_timeout: float,
        header_timeout: float,
        max_connections: int,
        repeats: RepeatFilter,
        **kwargs: Any,
    ) -> None:
        self.idle_timeout = idle_timeout
        self.header_timeout = header_timeout
        self.max_connections = max_connections
        self.repeats = repeats
        self.draining = False
        self.fresh_waiting: set[_Handler] = set()
        self.keepalive_waiting: set[_Handler] = set()
        #: Handlers waiting for a request head, oldest first (eviction order).
        self.waiting_since: dict[_Handler, None] = {}
        self.connections = Group()
        self.evicted = 0
        # A bare spawn function, not a Pool: a full Pool makes the server stop
        # accepting, which is what let 32 slow clients lock /health out.
        super().__init__(*args, spawn=self._admit, **kwargs)

    def _admit(self, func: Callable[..., Any], *args: Any) -> None:
        """Start a connection's greenlet; at the limit, evict the oldest head-waiter first."""
        if len(self.connections) >= self.max_connections:
            victim = next(iter(self.waiting_since), None)
            if victim is None:  # every connection is being answered: turn this one away
                sock = args[-1][0]
                sock.close()
                self.note("full", "HTTP: %d connections busy; turned one away" % self.max_connections)
                return
            del self.waiting_since[victim]
            self.evicted += 1
            _wake({victim})
            self.note(
                "evict",
                "HTTP: at %d connections; closed the oldest one still sending its request" % self.max_connections,
            )
        self.connections.spawn(func, *args)

    def note(self, key: str, message: str) -> None:
        """A client misbehaved: one short line, at most every period per kind (``RepeatFilter``)."""
        self.repeats.warn(key, message)


class HttpServer:
    """The HTTP endpoint on ``address`` (port 0 picks a free port; see ``address`` after start)."""

    def __init__(
        self,
        address: Address,
        app: WSGIApp,
        logger: logging.Logger | None = None,
        access_log: bool = False,
        max_connections: int = MAX_CONNECTIONS,
        idle_timeout: float = 10.0,
        header_timeout: float = HEADER_TIMEOUT,
        allow: Sequence[IPNetwork] | None = None,
    ) -> None:
        self.requested = address
        #: The bound address once started (the real port when ``address.port`` is 0).
        self.address = address
        self.log = logger or _log
        self._app = app
        self._access_log = access_log
        self._max_connections = max_connections
        self._idle_timeout = idle_timeout
        self._header_timeout = header_timeout
        #: Source networks answered; None: everyone.
        self.allow = None if allow is None else tuple(allow)
        self.repeats = RepeatFilter(self.log)
        self._draining = False
        self._server: _Server | None = None

    @property
    def draining(self) -> bool:
        return self._draining

    @draining.setter
    def draining(self, value: bool) -> None:
        self._draining = bool(value)
        if self._server is not None:
            self._server.draining = self._draining
            if self._draining:
                _wake(self._server.keepalive_waiting)

    def drain(self) -> None:
        """From now on answer with ``Connection: close`` and end idle keep-alive connections.

        New requests are still served (health checks see the drain), but no
        client keeps a connection that would hold up ``stop()``.
        """
        self.draining = True

    def allowed(self, host: str) -> bool:
        """Whether a client at ``host`` (an IP string) may use the endpoint."""
        if self.allow is None:
            return True
        try:
            ip = ipaddress.ip_address(host.split("%", 1)[0])
        except ValueError:
            return False
        if ip.version == 6 and ip.ipv4_mapped is not None:  # a v4 client on a dual-stack socket
            ip = ip.ipv4_mapped
        return any(ip in net for net in self.allow)

    def _wrapped(self, environ: dict, start_response: StartResponse) -> Iterable[bytes]:
        peer = environ.get("REMOTE_ADDR", "")
        if not self.allowed(peer):
            self.repeats.warn("forbidden", "HTTP: %s is not in -http-allow; answered 403" % peer)
            start_response(
                "403 Forbidden",
                [("Content-Type", "text/plain"), ("Content-Length", str(len(_FORBIDDEN))), ("Connection", "close")],
            )
            return [] if environ.get("REQUEST_METHOD") == "HEAD" else [_FORBIDDEN]
        if not self._draining:
            return self._app(environ, start_response)

        def closing(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
            # pywsgi honours an app-provided "Connection: close" and closes after the response.
            headers = [(k, v) for k, v in headers if k.lower() != "connection"]
            headers.append(("Connection", "close"))
            return start_response(status, headers, exc_info)

        return self._app(environ, closing)

    def start(self) -> None:
        """Bind and start serving.

        Raises ``fooproxy.listeners.StartupError`` with a one-line message
        naming the address, e.g. "cannot serve HTTP on 127.0.0.1:8088: address
        already in use".
        """
        if self._server is not None:
            return
        # Bound by the same helper as the proxy port, so the errors read alike, and with its backlog
        # (1024): past max_connections the clients wait there while the oldest head-waiters are
        # evicted. With 128, 500 slowloris connections overflowed it, and a health probe's dropped
        # SYN came back only after the kernel's 1 s retransmit.
        listener = bind(self.requested, what="serve HTTP")
        server = _Server(
            listener,
            self._wrapped,
            log=LoggingLogAdapter(self.log, logging.DEBUG) if self._access_log else None,
            error_log=LoggingLogAdapter(self.log, logging.ERROR),
            # Setting SERVER_NAME skips the socket.getfqdn() pywsgi runs at
            # start: a DNS lookup that hangs on a machine without DNS.
            environ={"SERVER_NAME": "fooproxy"},
            idle_timeout=self._idle_timeout,
            header_timeout=self._header_timeout,
            max_connections=self._max_connections,
            repeats=self.repeats,
        )
        server.draining = self._draining
        try:
            server.start()
        except OSError as exc:
            listener.close()
            raise StartupError("cannot serve HTTP on %s: %s" % (self.requested, exc)) from None
        self._server = server
        host, port = listener.getsockname()[:2]
        self.address = Address("" if host in ("::", "0.0.0.0") else host, port)
        self.log.info("HTTP endpoint on http://%s/ (/health /stats /metrics)", _url_host(self.address))

    def stop(self, timeout: float = 1.0) -> None:
        """Stop accepting, drop connections waiting for a request, let the rest finish.

        Requests in progress get up to ``timeout`` seconds, then are killed. Idempotent.
        """
        self._draining = True
        server = self._server
        if server is None or server.closed:
            return
        server.draining = True
        server.close()
        _wake(server.keepalive_waiting)
        _wake(server.fresh_waiting)
        server.connections.join(timeout=timeout)
        server.connections.kill(block=True, timeout=1)


def _url_host(address: Address) -> str:
    return str(Address(address.connect_host, address.port))
