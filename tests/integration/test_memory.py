"""Memory per session stays bounded however long a line is."""

from __future__ import annotations

import gevent
from gevent.server import StreamServer

from fooproxy.config import Address
from tests.helpers import connect, wait_until


def rss_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def test_8mib_line_without_newline_does_not_grow_the_process(proxy_for):
    received = [0]

    def sink(sock, _addr):
        while True:
            data = sock.recv(65536)
            if not data:
                return
            received[0] += len(data)

    server = StreamServer(("127.0.0.1", 0), sink)
    server.start()
    try:
        d = proxy_for(Address("127.0.0.1", server.server_port))
        piece = b"REQ 1 " + b"x" * (65536 - 6)
        total = 128 * len(piece)  # 8 MiB, no newline anywhere
        c = connect(d.address)
        c.sendall(piece)  # warm up buffers and code paths before measuring
        assert wait_until(lambda: received[0] == len(piece))
        before = rss_kib()
        for _ in range(127):
            c.sendall(piece)
            gevent.sleep(0)
        assert wait_until(lambda: received[0] == total, timeout=20)
        grown = rss_kib() - before
        assert grown < 3 * 1024, "RSS grew by %d KiB for one 8 MiB line" % grown
        assert d.snapshot().as_dict()["bytes_client_to_server"] == total
        c.close()
    finally:
        server.stop(timeout=0)
