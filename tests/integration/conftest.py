"""In-process fixtures: a small Foo server and a Proxy, both on gevent, port 0.

Clients in these tests are gevent sockets: a blocking stdlib recv in the test
greenlet would freeze the hub the proxy runs on.
"""

from __future__ import annotations

import gc
import socket as _stdsocket

import gevent
import greenlet
import pytest
from gevent import socket
from gevent.event import Event
from gevent.server import StreamServer

from fooproxy.config import Address, Config
from fooproxy.databus import FLOW_TYPES, DataBus
from fooproxy.dispatcher import Dispatcher
from fooproxy.stats import Stats
from fooproxy.upstream import HubConnect


class MiniServer:
    """Answers each line ``T SEQ ...`` with ``ACK SEQ`` (``NAK 0 ERR`` otherwise).

    Like the reference server it never closes after the client's EOF unless
    ``close_on_eof``; ``split`` sends each answer in two segments; clearing
    the ``release`` event makes it read but not answer until it is set again.
    """

    def __init__(self, close_on_eof: bool = False, split: bool = False) -> None:
        self.close_on_eof = close_on_eof
        self.split = split
        self.connections = 0
        self.received = bytearray()
        self.sockets: list = []
        self.release = Event()
        self.release.set()
        self.stopped = Event()
        self.server = StreamServer(("127.0.0.1", 0), self.handle)

    def start(self) -> MiniServer:
        self.server.start()
        return self

    @property
    def address(self) -> Address:
        return Address("127.0.0.1", self.server.server_port)

    def handle(self, sock, _addr) -> None:
        self.connections += 1
        self.sockets.append(sock)
        buf = b""
        while True:
            try:
                data = sock.recv(65536)
            except OSError:
                return
            if not data:
                break
            self.received += data
            buf += data
            *lines, buf = buf.split(b"\n")
            self.release.wait()
            out = []
            for line in lines:
                parts = line.split(b" ")
                if len(parts) >= 2 and parts[0] in (b"REQ", b"ACK", b"NAK") and parts[1].lstrip(b"+-").isdigit():
                    out.append(b"ACK " + parts[1] + b" ok\n")
                else:
                    out.append(b"NAK 0 ERR\n")
            reply = b"".join(out)
            try:
                if self.split and len(reply) > 1:
                    sock.sendall(reply[:3])
                    gevent.sleep(0.001)
                    sock.sendall(reply[3:])
                elif reply:
                    sock.sendall(reply)
            except OSError:
                return
        if self.close_on_eof:
            sock.close()
        else:
            # Like the reference server, never close our side: returning would
            # let StreamServer close the socket, so park until stop().
            self.stopped.wait()

    def stop(self) -> None:
        self.stopped.set()
        self.server.stop(timeout=0.5)
        for i, s in enumerate(self.sockets):
            s.close()
            if i % 100 == 99:
                # The chaos test parks thousands of sockets here: closing them all
                # in one go held the hub past gevent's monitor threshold (0.1 s).
                gevent.sleep(0)


@pytest.fixture
def mini_server():
    servers = []

    def make(**kw) -> MiniServer:
        srv = MiniServer(**kw).start()
        servers.append(srv)
        return srv

    yield make
    for srv in servers:
        srv.stop()


@pytest.fixture
def proxy_for():
    """``proxy_for(address, **config)`` starts an in-process Dispatcher on port 0."""
    made: list[Dispatcher] = []

    def make(forward: Address, **kw) -> Dispatcher:
        kw.setdefault("http", None)
        kw.setdefault("recovery_path", None)
        kw.setdefault("grace", 0.5)  # tests leave clients open: do not wait long for them
        cfg = Config(listen=Address("127.0.0.1", 0), forward=forward, **kw)
        d = Dispatcher(cfg, Stats())
        d.start()
        made.append(d)
        return d

    yield make
    for d in made:
        d.shutdown()
    # Nothing may outlive a test: no handler greenlet, no session, no open client.
    for d in made:
        assert len(d.proxy.handlers) == 0, "handler greenlets left: %d" % len(d.proxy.handlers)
        assert not d.proxy.sessions, "sessions left: %r" % d.proxy.sessions
        assert not d.proxy.connecting, "upstream dials left: %r" % d.proxy.connecting
        assert d.proxy.open_count == 0, "clients still open: %d" % d.proxy.open_count
    # ...no session or dial object kept alive by a watcher left behind...
    gc.collect()
    alive = [o for o in gc.get_objects() if isinstance(o, (DataBus, *FLOW_TYPES, HubConnect))]
    assert not alive, "session objects still referenced: %r" % alive[:5]
    # ...and no greenlet still running fooproxy code (a handler, a timer loop).
    running = [g for g in gc.get_objects() if isinstance(g, greenlet.greenlet) and _in_fooproxy(g)]
    assert not running, "greenlets left running fooproxy code: %r" % running


def _in_fooproxy(g: greenlet.greenlet) -> bool:
    frame = None if g.dead else g.gr_frame
    while frame is not None:
        if "/fooproxy/" in frame.f_code.co_filename:
            return True
        frame = frame.f_back
    return False


def closed_by_proxy(c, timeout: float = 5.0) -> bool:
    """The proxy closed this client: EOF (or a reset) within ``timeout``."""
    c.settimeout(timeout)
    try:
        return c.recv(100) == b""
    except ConnectionResetError:
        return True


@pytest.fixture
def blackhole():
    """A loopback listener whose accept queue is full: new SYNs are dropped, connects hang.

    Linux drops a SYN when the listener's accept queue is full (the proxy never
    sends anything off 127.0.0.0/8). Fillers are added until one times out.
    """
    lsock = _stdsocket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(0)
    address = lsock.getsockname()
    fillers = []
    try:
        for _ in range(16):
            s = socket.socket()
            s.settimeout(0.2)
            try:
                s.connect(address)
            except TimeoutError:
                s.close()
                break
            fillers.append(s)
        else:
            pytest.skip("could not fill the listen backlog on this kernel")
        yield Address("127.0.0.1", address[1])
    finally:
        for s in fillers:
            s.close()
        lsock.close()
