"""HTTP endpoint: /health (/status, /heartbeat), /stats and /metrics on gevent.pywsgi.

``make_app`` is a plain WSGI callable that dispatches on ``PATH_INFO``;
``HttpServer`` runs it on a ``WSGIServer`` with its own small pool, so HTTP
clients can never take slots from proxy sessions, and handles the shutdown
details: ``Connection: close`` while draining, and idle keep-alive connections
dropped at once instead of holding ``stop()`` until its timeout.
"""

from __future__ import annotations

import json
import logging
import socket
from collections.abc import Callable, Iterable
from typing import Any

from gevent.pool import Pool
from gevent.pywsgi import LoggingLogAdapter, WSGIHandler, WSGIServer
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import CollectorRegistry

from fooproxy.config import Address
from fooproxy.listeners import StartupError, bind
from fooproxy.metrics import GetExtra, GetSnapshot, make_registry

GetHealth = Callable[[], "tuple[bool, dict[str, Any]]"]
StartResponse = Callable[..., Any]
WSGIApp = Callable[[dict, StartResponse], Iterable[bytes]]

HEALTH_PATHS = frozenset({"/health", "/status", "/heartbeat"})
_ALLOWED = "GET, HEAD"
_log = logging.getLogger("fooproxy.http")

__all__ = ["HEALTH_PATHS", "HttpServer", "StartupError", "make_app"]


# -- the WSGI application --------------------------------------------------------
def make_app(
    get_snapshot: GetSnapshot,
    get_health: GetHealth,
    get_extra: GetExtra | None = None,
    registry: CollectorRegistry | None = None,
    logger: logging.Logger | None = None,
) -> WSGIApp:
    """The WSGI app for /health, /stats and /metrics.

    ``get_health() -> (ok, detail)``: 200 with ``{"status": "ok", **detail}``
    or 503 with ``{"status": "unavailable", "reason": ..., **detail}``
    (``detail`` may override ``status``, e.g. ``"degraded"``).
    ``/stats`` is exactly ``json.dumps(get_snapshot().as_dict())``.
    ``/metrics`` is served from ``registry`` (default: ``make_registry(get_snapshot, get_extra)``).
    """
    log = logger or _log
    if registry is None:
        registry = make_registry(get_snapshot, get_extra)

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
        known = path in HEALTH_PATHS or path in ("/stats", "/metrics")
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

    return app


# -- the server ------------------------------------------------------------------
class _Handler(WSGIHandler):
    """Tracks connections waiting for a request line, so stop/drain can drop them."""

    _requests = 0

    def __init__(self, sock: Any, address: Any, server: _Server) -> None:
        # An idle timeout frees the pool slot of a client that connects and
        # says nothing or keeps an idle keep-alive connection: 32 such clients
        # would otherwise stop all accepting.
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
        try:
            return super().read_requestline()
        finally:
            waiting.discard(self)


class _Server(WSGIServer):
    handler_class = _Handler

    def __init__(self, *args: Any, idle_timeout: float, **kwargs: Any) -> None:
        self.idle_timeout = idle_timeout
        self.draining = False
        self.fresh_waiting: set[_Handler] = set()
        self.keepalive_waiting: set[_Handler] = set()
        super().__init__(*args, **kwargs)


def _wake(handlers: set[_Handler]) -> None:
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


class HttpServer:
    """The HTTP endpoint on ``address`` (port 0 picks a free port; see ``address`` after start)."""

    def __init__(
        self,
        address: Address,
        app: WSGIApp,
        logger: logging.Logger | None = None,
        access_log: bool = False,
        pool_size: int = 32,
        idle_timeout: float = 10.0,
    ) -> None:
        self.requested = address
        #: The bound address once started (the real port when ``address.port`` is 0).
        self.address = address
        self.log = logger or _log
        self._app = app
        self._access_log = access_log
        self._pool_size = pool_size
        self._idle_timeout = idle_timeout
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

    def _wrapped(self, environ: dict, start_response: StartResponse) -> Iterable[bytes]:
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
        # Bound by the same helper as the proxy port, so the errors read alike.
        listener = bind(self.requested, backlog=128, what="serve HTTP")
        server = _Server(
            listener,
            self._wrapped,
            spawn=Pool(self._pool_size),
            log=LoggingLogAdapter(self.log, logging.DEBUG) if self._access_log else None,
            error_log=LoggingLogAdapter(self.log, logging.ERROR),
            # Setting SERVER_NAME skips the socket.getfqdn() pywsgi runs at
            # start: a DNS lookup that hangs on a machine without DNS.
            environ={"SERVER_NAME": "fooproxy"},
            idle_timeout=self._idle_timeout,
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
        pool = server.pool
        if pool is not None:
            pool.join(timeout=timeout)
            pool.kill(block=True, timeout=1)


def _url_host(address: Address) -> str:
    return str(Address(address.connect_host, address.port))
