"""Misbehaving clients, all at once: the proxy neither crashes, nor leaks, nor mixes up answers.

Many clients run a random mix of behaviours for a few seconds through one
proxy: lockstep exchanges, pipelined bursts with a half-close, garbage,
resets mid-line, oversized lines, connect-and-leave, and leaving with answers
owed. Afterwards every session must be gone (the fixture also checks that no
session object survives), nothing may have reached gevent's error stream or
the error log, and every well-behaved client must have got exactly its answers.
"""

from __future__ import annotations

import io
import logging
import random
import socket as _stdsocket
import struct
import time

import gevent
from gevent import socket

from tests.helpers import hub_errors_of_ours, read_lines, wait_until

DURATION = 3.0
#: Well-behaved client runs the crowd must have checked, and the longest it may take to get there.
MIN_GOOD = 100
HARD_LIMIT = 30.0
CLIENTS = 60


def _connect(address) -> socket.socket:
    return socket.create_connection((address[0], address[1]), timeout=5)


def lockstep(address, rng: random.Random) -> int:
    c = _connect(address)
    try:
        for seq in range(rng.randint(1, 5)):
            c.sendall(b"REQ %d data\n" % seq)
            assert read_lines(c, 1) == [b"ACK %d ok" % seq]
        return 1
    finally:
        c.close()


def pipelined_half_close(address, rng: random.Random) -> int:
    c = _connect(address)
    try:
        n = rng.randint(1, 50)
        payload = b"".join(b"REQ %d x\n" % i for i in range(n))
        cut = rng.randint(0, len(payload))
        c.sendall(payload[:cut])
        c.sendall(payload[cut:])
        c.shutdown(_stdsocket.SHUT_WR)
        lines = read_lines(c, n + 1)  # n answers, then EOF (the proxy closes once all are delivered)
        assert lines[:n] == [b"ACK %d ok" % i for i in range(n)] and lines[n:] == [b""]
        return 1
    finally:
        c.close()


def garbage(address, rng: random.Random) -> int:
    c = _connect(address)
    c.sendall(bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 3000))) + b"\n")
    c.close()
    return 0


def reset_mid_line(address, rng: random.Random) -> int:
    c = _connect(address)
    c.sendall(b"REQ 1 half-a-li")
    c.setsockopt(_stdsocket.SOL_SOCKET, _stdsocket.SO_LINGER, struct.pack("ii", 1, 0))
    c.close()  # RST
    return 0


def oversized(address, rng: random.Random) -> int:
    c = _connect(address)
    try:
        c.sendall(b"REQ 1 " + b"y" * rng.randint(70_000, 200_000))
    except OSError:
        pass  # the server may drop us first
    c.close()
    return 0


def leave_at_once(address, rng: random.Random) -> int:
    _connect(address).close()
    return 0


def leave_owing(address, rng: random.Random) -> int:
    c = _connect(address)
    c.sendall(b"".join(b"REQ %d z\n" % i for i in range(rng.randint(1, 200))))
    c.close()  # answers still on their way: the proxy's writes to us fail
    return 0


BEHAVIOURS = [lockstep, pipelined_half_close, garbage, reset_mid_line, oversized, leave_at_once, leave_owing]


def test_a_crowd_of_misbehaving_clients(mini_server, proxy_for, caplog):
    srv = mini_server()
    # linger: the default 5 s, not less. One hub runs the 60 clients, the proxy and
    # the server here; on a loaded CI machine it stalled past a 0.5 s linger, and a
    # well-behaved half-closing client then got EOF before its 17 answers (correct
    # for the proxy, -linger is a bound from the client's EOF; wrong for this test).
    d = proxy_for(srv.address, linger=5.0, idle_timeout=2)
    hub = gevent.get_hub()
    errors = io.StringIO()
    saved, hub.exception_stream = hub.exception_stream, errors
    good = [0]

    def client(i: int) -> None:
        rng = random.Random(i)
        start = time.monotonic()
        # At least DURATION, and on until MIN_GOOD well-behaved runs have been checked (a
        # loaded machine is slower, not exempt), but never past HARD_LIMIT.
        while (now := time.monotonic()) - start < DURATION or (good[0] <= MIN_GOOD and now - start < HARD_LIMIT):
            ok = rng.choice(BEHAVIOURS)(d.address, rng)  # switches: add after, not around it
            good[0] += ok

    try:
        with caplog.at_level(logging.WARNING, logger="fooproxy"):
            crowd = [gevent.spawn(client, i) for i in range(CLIENTS)]
            gevent.joinall(crowd, timeout=HARD_LIMIT + 20, raise_error=True)
            assert all(g.dead for g in crowd)
            assert wait_until(lambda: d.snapshot().totals["connections_active"] == 0, timeout=10)
    finally:
        hub.exception_stream = saved
    assert hub_errors_of_ours(errors.getvalue()) == []
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []
    totals = d.snapshot().totals
    assert good[0] > MIN_GOOD and totals["connections_total"] > good[0]
    assert not d.proxy.sessions and d.proxy.open_count == 0
