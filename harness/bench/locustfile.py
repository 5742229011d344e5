"""Locust scenarios for the Foo protocol (run by ``foo-harness swarm`` / ``make load``).

Run locust only as a subprocess: importing it patches the process (gevent)::

    locust -f harness/bench/locustfile.py --headless -u 50 -r 10 -t 20s --host 127.0.0.1:8002 \\
        --only-summary --json LockstepUser PipelinedUser

User classes (scenarios), each firing one ``FOO`` request event per REQ:

* ``LockstepUser`` -- one connection, one request at a time;
* ``PipelinedUser`` -- one connection, ``--foo-window`` requests in flight;
* ``ChurnUser`` -- connect, ``--foo-churn`` requests one at a time, close;
* ``MixedUser`` -- one connection mixing single requests, bursts of
  ``--foo-window`` and reconnects.

Event names come from a fixed set: ``"<scenario> REQ"`` for requests and
``"<scenario> CONNECT"`` for connects. A REQ event's response time is the time
from its send to its answer. It fails on a wrong seq, a wrong type or hash (the
answer rule of ``harness.peers.answer``; a NAK is a valid answer), a timeout or EOF;
requests lost that way each fire one failure. ``on_stop`` waits for the
answers still owed before closing, so every REQ sent fires exactly one event:
the REQ events equal the proxy's ``msg_req``, and with no failures they also
equal its ``msg_ack + msg_nak``.

Parameters: ``--foo-window`` (``$FOO_WINDOW``, default 16), ``--foo-churn``
(``$FOO_CHURN``, 10), ``--foo-size`` (``$FOO_SIZE``, data bytes, 16),
``--foo-timeout`` (``$FOO_TIMEOUT``, seconds, 5). ``--host`` is ``host:port``
or ``tcp://host:port``.
"""

from __future__ import annotations

import os
import random
import socket
import time
from collections import deque

from locust import User, constant, events, task

from harness.peers.answer import check_answer

ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789"
RECV_SIZE = 65536


@events.init_command_line_parser.add_listener
def _add_arguments(parser) -> None:
    env = os.environ.get
    parser.add_argument("--foo-window", type=int, default=int(env("FOO_WINDOW", "16")), help="requests in flight")
    parser.add_argument("--foo-churn", type=int, default=int(env("FOO_CHURN", "10")), help="requests per connection")
    parser.add_argument("--foo-size", type=int, default=int(env("FOO_SIZE", "16")), help="data bytes per request")
    parser.add_argument("--foo-timeout", type=float, default=float(env("FOO_TIMEOUT", "5")), help="answer timeout, s")


class FooError(Exception):
    """A failed request: wrong answer, timeout, EOF or a failed connect."""


def parse_host(host: str | None) -> tuple[str, int]:
    """``host:port``, ``tcp://host:port`` or ``[v6]:port`` -> ``(host, port)``."""
    if not host:
        raise FooError("no --host given (host:port)")
    if "://" in host:
        host = host.split("://", 1)[1]
    name, _, port = host.rstrip("/").rpartition(":")
    return name.strip("[]") or "127.0.0.1", int(port)


class FooClient:
    """One Foo connection over a (gevent-patched) socket, with the requests in flight.

    ``send(n)`` writes ``n`` requests at once; ``receive()`` reads one chunk and
    returns the answers it completed, each with its request and an error text
    (``None`` when correct). A lost connection raises ``FooError`` after
    ``lost()`` has returned the requests it took with it.
    """

    def __init__(self, address: tuple[str, int], timeout: float, size: int) -> None:
        self.address = address
        self.timeout = timeout
        self.size = size
        self.sock: socket.socket | None = None
        self.seq = 0
        self.inflight: deque[tuple[int, bytes, float]] = deque()
        self.partial = b""
        self.sent = self.answered = 0
        self._rng = random.Random()

    def connect(self) -> None:
        sock = socket.create_connection(self.address, timeout=self.timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock = sock
        self.seq = 0
        self.partial = b""

    @property
    def connected(self) -> bool:
        return self.sock is not None

    def send(self, count: int = 1) -> None:
        """Write ``count`` requests in one write; they are in flight from now."""
        assert self.sock is not None
        lines = []
        now = time.perf_counter()
        for _ in range(count):
            self.seq += 1
            data = "".join(self._rng.choices(ALPHABET, k=self.size)).encode() if self.size else b""
            lines.append(b"REQ %d %s\n" % (self.seq, data) if data else b"REQ %d\n" % self.seq)
            self.inflight.append((self.seq, data, now))
        self.sent += count
        self.sock.sendall(b"".join(lines))

    def receive(self) -> list[tuple[bytes, int, float, str | None]]:
        """Read once; return ``(answer_line, seq, send_time, error)`` for each answer completed."""
        assert self.sock is not None
        try:
            chunk = self.sock.recv(RECV_SIZE)
        except TimeoutError:
            raise FooError("timeout: no answer within %gs" % self.timeout) from None
        except OSError as exc:
            raise FooError("connection error: %s" % exc) from None
        if not chunk:
            raise FooError("EOF with %d answers owed" % len(self.inflight))
        data = self.partial + chunk
        last = data.rfind(b"\n")
        if last < 0:
            self.partial = data
            return []
        self.partial = data[last + 1 :]
        out = []
        for line in data[:last].split(b"\n"):
            if not self.inflight:
                out.append((line, -1, time.perf_counter(), "unexpected answer %r" % line[:80]))
                continue
            seq, req_data, t0 = self.inflight.popleft()
            out.append((line, seq, t0, check_answer(line, seq, req_data)))
        self.answered += len(out)
        return out

    def lost(self) -> list[tuple[int, float]]:
        """Forget the requests in flight (the connection is gone); return ``(seq, send_time)`` of each."""
        gone = [(seq, t0) for seq, _, t0 in self.inflight]
        self.inflight.clear()
        self.close(drain=False)
        return gone

    def close(self, drain: bool = True) -> None:
        if self.sock is not None:
            sock, self.sock = self.sock, None
            sock.close()


class FooUser(User):
    """Base of the Foo scenarios: a ``FooClient``, events fired per answer, a drain on stop."""

    abstract = True
    wait_time = constant(0)
    scenario = "foo"

    def __init__(self, environment) -> None:
        super().__init__(environment)
        opts = environment.parsed_options
        self.window = max(1, getattr(opts, "foo_window", 16))
        self.churn = max(1, getattr(opts, "foo_churn", 10))
        timeout = getattr(opts, "foo_timeout", 5.0)
        self.client = FooClient(parse_host(self.host), timeout, getattr(opts, "foo_size", 16))
        self.req_name = "%s REQ" % self.scenario
        self._fire = environment.events.request.fire
        self._stopped = False

    # -- events --
    def fire(self, name: str, t0: float, length: int, error: str | None) -> None:
        self._fire(
            request_type="FOO",
            name=name,
            response_time=(time.perf_counter() - t0) * 1000.0,
            response_length=length,
            exception=FooError(error) if error else None,
            context={},
        )

    def connect(self) -> bool:
        """Connect, firing a CONNECT event; False (and a pause) when it failed."""
        t0 = time.perf_counter()
        try:
            self.client.connect()
        except OSError as exc:
            self.fire("%s CONNECT" % self.scenario, t0, 0, "connect %s:%d: %s" % (*self.client.address, exc))
            time.sleep(0.1)
            return False
        self.fire("%s CONNECT" % self.scenario, t0, 0, None)
        return True

    def receive(self) -> int:
        """Read once and fire an event per answer; on a lost connection fire a failure per request lost."""
        try:
            answers = self.client.receive()
        except FooError as exc:
            for _seq, t0 in self.client.lost():
                self.fire(self.req_name, t0, 0, str(exc))
            return 0
        for line, _seq, t0, error in answers:
            self.fire(self.req_name, t0, len(line) + 1, error)
        return len(answers)

    def exchange(self, count: int) -> None:
        """Send ``count`` requests at once and wait for all their answers."""
        if not self.client.connected and not self.connect():
            return
        self.client.send(count)
        while self.client.inflight and self.client.connected:
            self.receive()

    def drain(self) -> None:
        """Wait for every answer still owed (each read bounded by the timeout)."""
        while self.client.inflight and self.client.connected:
            self.receive()

    # -- lifecycle --
    def on_start(self) -> None:
        self.connect()

    def on_stop(self) -> None:
        # May run twice (TaskSet and User both call it on a kill): idempotent.
        if self._stopped:
            return
        self._stopped = True
        self.drain()
        self.client.close()


class LockstepUser(FooUser):
    """One request at a time on one connection."""

    scenario = "lockstep"
    weight = 3

    @task
    def one(self) -> None:
        self.exchange(1)


class PipelinedUser(FooUser):
    """Keeps ``--foo-window`` requests in flight on one connection."""

    scenario = "pipelined"

    @task
    def keep_window_full(self) -> None:
        client = self.client
        if not client.connected and not self.connect():
            return
        missing = self.window - len(client.inflight)
        if missing > 0:
            client.send(missing)
        self.receive()


class ChurnUser(FooUser):
    """Connect, ``--foo-churn`` requests one at a time, close; again."""

    scenario = "churn"

    def on_start(self) -> None:
        pass  # each task opens its own connection

    @task
    def session(self) -> None:
        if not self.connect():
            return
        for _ in range(self.churn):
            self.exchange(1)
            if not self.client.connected:
                return
        self.client.close()


class MixedUser(FooUser):
    """Single requests, bursts of ``--foo-window`` and reconnects, on one connection at a time."""

    scenario = "mixed"

    @task(6)
    def single(self) -> None:
        self.exchange(1)

    @task(2)
    def burst(self) -> None:
        self.exchange(self.window)

    @task(1)
    def reconnect(self) -> None:
        self.drain()
        self.client.close()
        self.connect()
