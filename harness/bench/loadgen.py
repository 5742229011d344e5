"""An efficient Foo load generator for ``make bench`` (not a test client).

Several worker processes (``-procs``, default 2), each a plain ``epoll`` loop
over non-blocking sockets: requests come from a precomputed block and are sent
in batches (up to ``-window`` in flight per connection), answers are read in
large chunks and checked by one C-level comparison of the chunk with the
precomputed answer stream (so every byte of every answer is verified: seq,
type and hash), then counted with ``bytes.count``. Latency is measured per
send batch (every request in lockstep, one per batch when pipelined), from
``time.perf_counter`` (CLOCK_MONOTONIC on Linux) at the send to the wake-up
that read the answer.

Modes: lockstep/pipelined (``-window``), churn (``-churn K``: a new connection
every K requests), paced (``-rate R``: lockstep at R requests per second per
connection on a fixed schedule, for the latency workload) and hold (``-hold``:
open ``-conns`` connections, one exchange each, then stay idle until
released), which the memory workload uses.

Paced is an open loop: request k of a connection is due at its phase + k/R
whatever the answers did, and a connection waits for that time, not for
the previous answer alone. Far below saturation every answer is back before
the next request is due, so the latency is one request's round trip with
nothing queued ahead of it. A send more than one interval behind its schedule
(the previous answer came too late, or the generator woke too late) counts
as ``late`` and restarts that connection's schedule from now, so a slow
path is reported rather than hidden by a burst of catch-up requests.

Python use (``harness.bench``)::

    gen = LoadGen(LoadSpec("127.0.0.1:8001", conns=8, window=64, size=32, duration=10))
    gen.start()          # workers spawned, connected, waiting
    result = gen.run()   # go, wait, merge the workers' reports

Command line: ``python -m harness.bench.loadgen -connect 127.0.0.1:8002 -conns 8
-window 64 -size 32 -duration 10`` prints a JSON summary.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import random
import resource
import select
import socket
import subprocess
import sys
import time
from array import array
from collections import deque
from dataclasses import asdict, dataclass, field
from typing import Any

from harness.peers.answer import answer

ALPHABET = b"abcdefghijklmnopqrstuvwxyz0123456789"
_TO_ALPHABET = bytes(ALPHABET[b % len(ALPHABET)] for b in range(256))
BLOCK = 16384  # requests in the precomputed cycle (seq 1..BLOCK, then again)
RECV = 262144
MAX_CONNECTING = 64  # connects in progress per worker at once
MAX_SAMPLES = 100_000  # latency samples a worker reports (evenly thinned beyond)
DRAIN = 5.0  # seconds to wait for the answers still owed at the end


# -- request and answer blocks -------------------------------------------------
def make_blocks(size: int, seed: int = 1, n: int = BLOCK) -> tuple[bytes, array, bytes, array]:
    """``(requests, req_offsets, answers, answer_offsets)`` for ``REQ 1..n`` with ``size``-byte data."""
    rng = random.Random(seed)
    reqs, answers = [], []
    roff, aoff = array("q", [0]), array("q", [0])
    rpos = apos = 0
    for seq in range(1, n + 1):
        data = rng.randbytes(size).translate(_TO_ALPHABET)
        line = b"REQ %d %s\n" % (seq, data) if size else b"REQ %d\n" % seq
        ans = answer(b"REQ", seq, data)
        reqs.append(line)
        answers.append(ans)
        rpos += len(line)
        apos += len(ans)
        roff.append(rpos)
        aoff.append(apos)
    return b"".join(reqs), roff, b"".join(answers), aoff


# -- the worker: one epoll loop ----------------------------------------------------
class _Conn:
    __slots__ = (
        "sock",
        "fd",
        "sent",
        "answered",
        "exp",
        "out",
        "lat",
        "last_rx",
        "limit",
        "connecting",
        "dead",
        "due",
    )

    def __init__(self, sock: socket.socket, limit: int) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.sent = 0  # requests sent on this connection
        self.answered = 0
        self.exp = 0  # offset of the next expected answer byte in the answer block
        self.out: memoryview | None = None  # unsent rest of a partial send
        self.lat: deque = deque()  # (answers needed, send time)
        self.last_rx = time.perf_counter()
        self.limit = limit  # requests before a churn reconnect (0: none)
        self.connecting = True
        self.dead = False
        self.due = 0.0  # paced: perf_counter time the next request is due


class Worker:
    """One worker process's share of the connections."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.host, port = args.connect.rsplit(":", 1)
        self.addr = (self.host.strip("[]") or "127.0.0.1", int(port))
        self.conns, self.window, self.churn = args.conns, max(1, args.window), args.churn
        self.duration, self.io_timeout, self.hold = args.duration, args.io_timeout, args.hold
        # Paced (-rate): lockstep on a schedule, one request per interval per connection.
        self.interval = 1.0 / args.rate if args.rate > 0 else 0.0
        if self.interval:
            self.window = 1
        self.seed = args.seed
        self.late = 0  # paced sends more than one interval behind their schedule
        self.reqs, self.roff, answers, self.aoff = make_blocks(args.size, args.seed)
        self.reqmv = memoryview(self.reqs)
        self.alen = len(answers)
        self.ans2 = answers + answers  # any chunk shorter than one block is one slice of this
        self.ep = select.epoll()
        self.by_fd: dict[int, _Conn] = {}
        self.pending_connects: deque[int] = deque()  # connection slots still to open
        self.errors: list[str] = []
        self.error_count = 0
        self.samples = array("d")
        self.naks = 0
        self.done_sent = self.done_answered = 0  # from closed connections
        self.opened = 0
        self.stopping = False
        self.snap: tuple[int, int] | None = None

    # -- errors --
    def error(self, text: str) -> None:
        self.error_count += 1
        if len(self.errors) < 10:
            self.errors.append(text)

    # -- connections --
    def open(self) -> None:
        sock = socket.socket(socket.AF_INET6 if ":" in self.addr[0] else socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        rc = sock.connect_ex(self.addr)
        if rc not in (0, errno.EINPROGRESS):
            sock.close()
            self.error("connect %s:%d: %s" % (self.addr[0], self.addr[1], os.strerror(rc)))
            return
        c = _Conn(sock, self.churn)
        self.by_fd[c.fd] = c
        self.opened += 1
        self.ep.register(c.fd, select.EPOLLOUT)

    def connected(self, c: _Conn) -> bool:
        err = c.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            self.error("connect %s:%d: %s" % (self.addr[0], self.addr[1], os.strerror(err)))
            self.drop(c)
            return False
        c.connecting = False
        c.last_rx = time.perf_counter()
        self.ep.modify(c.fd, select.EPOLLIN)
        return True

    def drop(self, c: _Conn) -> None:
        """Close ``c`` and keep its counts."""
        if c.dead:
            return
        c.dead = True
        self.done_sent += c.sent
        self.done_answered += c.answered
        try:
            self.ep.unregister(c.fd)
        except OSError:
            pass
        del self.by_fd[c.fd]
        c.sock.close()

    # -- sending --
    def fill(self, c: _Conn) -> None:
        """Send requests until ``window`` are in flight (or the churn limit is reached)."""
        if c.out is not None or self.stopping:
            return
        if self.interval:
            self.fill_paced(c)
            return
        target = c.answered + self.window
        if c.limit and target > c.limit:
            target = c.limit
        count = target - c.sent
        if count <= 0:
            return
        i = c.sent % BLOCK
        j = i + count
        if j > BLOCK:
            j = BLOCK
        now = time.perf_counter()
        if c.sent == c.answered:
            c.last_rx = now  # nothing was owed: the answer timeout starts now, not at the last answer
        c.sent += j - i
        c.lat.append((c.sent - (j - i) + 1, now))
        self.send(c, self.reqmv[self.roff[i] : self.roff[j]])

    def fill_paced(self, c: _Conn) -> None:
        """Send ``c``'s next request if it is due and nothing is in flight (``-rate``)."""
        if c.sent != c.answered or (c.limit and c.sent >= c.limit):
            return
        now = time.perf_counter()
        if now < c.due:
            return
        if now - c.due > self.interval:
            self.late += 1
            c.due = now  # restart the schedule: no burst of catch-up requests
        c.due += self.interval
        i = c.sent % BLOCK
        c.last_rx = now
        c.sent += 1
        c.lat.append((c.sent, now))
        self.send(c, self.reqmv[self.roff[i] : self.roff[i + 1]])

    def pace(self) -> float:
        """Paced: send what is due; return the seconds until the next request is due (at most 0.05)."""
        wait = 0.05
        now = time.perf_counter()
        for c in list(self.by_fd.values()):
            if c.connecting or c.dead or c.out is not None or c.sent != c.answered:
                continue
            if c.due <= now:
                self.fill_paced(c)
            elif c.due - now < wait:
                wait = c.due - now
        return wait

    def start_schedule(self) -> None:
        """Paced: spread the connections' first requests evenly over one interval (random offset per worker)."""
        conns = [c for c in self.by_fd.values() if not c.connecting]
        offset = random.Random(self.seed).random()
        t0 = time.perf_counter()
        for j, c in enumerate(conns):
            c.due = t0 + self.interval * ((j + offset) / max(1, len(conns)))

    def send(self, c: _Conn, buf: memoryview) -> None:
        try:
            n = c.sock.send(buf)
        except BlockingIOError:
            n = 0
        except OSError as exc:
            self.error("send: %s" % exc)
            self.drop(c)
            return
        if n < len(buf):
            c.out = buf[n:]
            self.ep.modify(c.fd, select.EPOLLIN | select.EPOLLOUT)

    def flush(self, c: _Conn) -> None:
        buf, c.out = c.out, None
        self.ep.modify(c.fd, select.EPOLLIN)
        if buf is not None:
            self.send(c, buf)
        if c.out is None:
            self.fill(c)

    # -- receiving --
    def read(self, c: _Conn) -> None:
        try:
            data = c.sock.recv(RECV)
        except BlockingIOError:
            return
        except OSError as exc:
            self.error("recv after %d answers: %s" % (c.answered, exc))
            self.drop(c)
            return
        if not data:
            if c.answered < c.sent:
                self.error("EOF with %d answers owed" % (c.sent - c.answered))
            else:
                self.error("EOF from the server")
            self.drop(c)
            return
        n = len(data)
        off = c.exp
        if self.ans2[off : off + n] != data:
            self.mismatch(c, data)
            return
        off += n
        c.exp = off - self.alen if off >= self.alen else off
        answered = c.answered = c.answered + data.count(b"\n")
        self.naks += data.count(b"N")  # only NAK has an N: hex and digits do not
        c.last_rx = now = time.perf_counter()
        lat = c.lat
        while lat and lat[0][0] <= answered:
            self.samples.append(now - lat.popleft()[1])
        if answered > c.sent:
            self.error("more answers than requests")
            self.drop(c)
        elif c.limit and answered >= c.limit:
            self.drop(c)  # churn: all K answered, close and open a new one
            if not self.stopping:
                self.pending_connects.append(1)
        else:
            self.fill(c)

    def mismatch(self, c: _Conn, data: bytes) -> None:
        off = c.exp
        want = self.ans2[off : off + len(data)]
        i = next((k for k in range(len(data)) if data[k] != want[k]), len(data))
        start = data.rfind(b"\n", 0, i) + 1
        got_line = data[start : data.find(b"\n", i) + 1 or None]
        want_line = want[start : want.find(b"\n", i) + 1 or None]
        self.error("wrong answer after %d answers: got %r, want %r" % (c.answered, got_line[:80], want_line[:80]))
        self.drop(c)

    # -- the loop --
    def run(self, ready, wait_go) -> dict[str, Any]:
        """Connect, report ready, wait for go, load for ``duration``, drain, report."""
        for _ in range(self.conns):
            self.pending_connects.append(1)
        self.connect_all()
        if self.hold:
            for c in list(self.by_fd.values()):
                self.fill(c)  # one exchange each, so the proxy has its upstream too
            self.stopping = True  # and no more
            self.loop(time.monotonic() + self.io_timeout, until_idle=True)
        ready()
        wait_go()
        cpu0, t0 = _cpu(), time.monotonic()
        if self.interval:
            self.start_schedule()
        if not self.hold:
            for c in list(self.by_fd.values()):
                self.fill(c)
            self.loop(t0 + self.duration)
            elapsed = time.monotonic() - t0
            self.snap = self.totals()
            self.stopping = True
            self.loop(time.monotonic() + DRAIN, until_idle=True)
        else:
            elapsed = time.monotonic() - t0
        sent, answered = self.totals()
        owed = sent - answered
        if owed and not self.hold:
            self.error("%d answers still owed after the %gs drain" % (owed, DRAIN))
        held = len(self.by_fd)
        for c in list(self.by_fd.values()):
            self.drop(c)
        snap = self.snap or (sent, answered)
        samples = self.samples
        if len(samples) > MAX_SAMPLES:
            step = len(samples) / MAX_SAMPLES
            samples = array("d", (samples[int(k * step)] for k in range(MAX_SAMPLES)))
        return {
            "pid": os.getpid(),
            "elapsed_s": elapsed,
            "sent": sent,
            "answered": answered,
            "sent_in_window": snap[0],
            "answered_in_window": snap[1],
            "naks": self.naks,
            "late": self.late,
            "errors": self.error_count,
            "error_texts": self.errors,
            "conns_opened": self.opened,
            "held": held,
            "cpu_s": _cpu() - cpu0,
            "lat_us": [round(s * 1e6, 1) for s in samples],
        }

    def totals(self) -> tuple[int, int]:
        sent, answered = self.done_sent, self.done_answered
        for c in self.by_fd.values():
            sent += c.sent
            answered += c.answered
        return sent, answered

    def connect_all(self) -> None:
        """Open every pending connection (at most MAX_CONNECTING at a time)."""
        deadline = time.monotonic() + self.io_timeout + 10
        while self.pending_connects or any(c.connecting for c in self.by_fd.values()):
            self.start_connects()
            for fd, _mask in self.ep.poll(0.5):
                c = self.by_fd.get(fd)
                if c is not None and c.connecting:
                    self.connected(c)
            if time.monotonic() > deadline:
                self.error("connections not established within %gs" % (self.io_timeout + 10))
                for c in [c for c in self.by_fd.values() if c.connecting]:
                    self.drop(c)
                self.pending_connects.clear()

    def start_connects(self) -> None:
        connecting = sum(1 for c in self.by_fd.values() if c.connecting) if self.churn == 0 else 0
        while self.pending_connects and connecting < MAX_CONNECTING:
            self.pending_connects.popleft()
            self.open()
            connecting += 1

    def loop(self, deadline: float, until_idle: bool = False) -> None:
        poll, by_fd = self.ep.poll, self.by_fd
        epollin, epollout, monotonic = select.EPOLLIN, select.EPOLLOUT, time.monotonic
        next_check = monotonic() + 0.25
        paced = bool(self.interval)
        wait = 0.05
        while True:
            if self.pending_connects and not self.stopping:
                self.start_connects()
            if paced and not self.stopping:
                wait = self.pace()  # epoll rounds the wait up to a whole ms; latency is timed from the send
            for fd, mask in poll(wait):
                c = by_fd.get(fd)
                if c is None:
                    continue
                if c.connecting:
                    if self.connected(c):
                        self.fill(c)
                    continue
                if mask & epollin:
                    self.read(c)
                    if c.out is not None and mask & epollout and not c.dead:
                        self.flush(c)
                elif c.out is not None:
                    self.flush(c)
                elif mask & (select.EPOLLERR | select.EPOLLHUP):
                    self.error("connection error")
                    self.drop(c)
            now = monotonic()
            if now >= deadline:
                return
            if now >= next_check:
                next_check = now + 0.25
                self.check_timeouts()
                if until_idle and all(c.answered >= c.sent and not c.connecting for c in by_fd.values()):
                    return

    def check_timeouts(self) -> None:
        now = time.perf_counter()
        for c in list(self.by_fd.values()):
            if c.answered < c.sent and now - c.last_rx > self.io_timeout:
                self.error("timeout: no answer for %gs, %d owed" % (self.io_timeout, c.sent - c.answered))
                self.drop(c)


def _cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def worker_main(args: argparse.Namespace) -> int:
    """Run as one worker: ``ready`` on stdout, ``go`` (or EOF for hold) on stdin, JSON result on stdout."""
    worker = Worker(args)

    def ready() -> None:
        sys.stdout.write("ready %d\n" % len(worker.by_fd))
        sys.stdout.flush()

    def wait_go() -> None:
        sys.stdin.readline()  # "go", or EOF: the parent ends a hold this way too

    result = worker.run(ready, wait_go)
    sys.stdout.write(json.dumps(result) + "\n")
    sys.stdout.flush()
    return 0


# -- the parent: spawn workers, merge results -------------------------------------
@dataclass
class LoadSpec:
    """One load run."""

    address: str
    conns: int = 8
    window: int = 1
    size: int = 16
    duration: float = 10.0
    churn: int = 0
    procs: int = 2
    io_timeout: float = 5.0
    hold: bool = False
    seed: int = 1
    rate: float = 0.0  # paced: requests per second per connection (0: as fast as answers come)


@dataclass
class LoadResult:
    """The merged report of all workers."""

    spec: LoadSpec
    elapsed_s: float = 0.0
    sent: int = 0
    answered: int = 0
    sent_in_window: int = 0
    answered_in_window: int = 0
    naks: int = 0
    late: int = 0
    errors: int = 0
    error_texts: list[str] = field(default_factory=list)
    conns_opened: int = 0
    held: int = 0
    cpu_s: float = 0.0
    worker_cpu_s: list[float] = field(default_factory=list)
    p50_us: float = 0.0
    p90_us: float = 0.0
    p99_us: float = 0.0
    max_us: float = 0.0
    samples: int = 0

    @property
    def msgs_per_s(self) -> float:
        """REQs sent plus answers received per second, during the timed window."""
        return (self.sent_in_window + self.answered_in_window) / self.elapsed_s if self.elapsed_s else 0.0

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready summary."""
        out = asdict(self)
        out["msgs_per_s"] = round(self.msgs_per_s, 1)
        return out


class LoadGen:
    """Worker processes for one ``LoadSpec``: ``start()``, then ``run()`` (or ``release()`` for a hold)."""

    def __init__(self, spec: LoadSpec) -> None:
        self.spec = spec
        self.procs: list[subprocess.Popen] = []

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def start(self, timeout: float = 60.0) -> int:
        """Spawn the workers and wait until all are connected; return the connections open."""
        spec = self.spec
        nprocs = max(1, min(spec.procs, spec.conns))
        shares = [spec.conns // nprocs + (1 if i < spec.conns % nprocs else 0) for i in range(nprocs)]
        for i, share in enumerate(shares):
            cmd = [sys.executable, "-m", "harness.bench.loadgen", "--worker", "-connect", spec.address]
            cmd += ["-conns", str(share), "-window", str(spec.window), "-size", str(spec.size)]
            cmd += ["-duration", str(spec.duration), "-churn", str(spec.churn)]
            cmd += ["-io-timeout", str(spec.io_timeout), "-seed", str(spec.seed + i), "-rate", str(spec.rate)]
            cmd += ["-hold"] if spec.hold else []
            self.procs.append(
                subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)
            )
        opened = 0
        for p in self.procs:
            line = _readline(p, timeout)
            if not line.startswith("ready"):
                self.close()
                raise RuntimeError("loadgen worker %d did not start: %r" % (p.pid, line))
            opened += int(line.split()[1])
        return opened

    def go(self) -> None:
        """Start the timed run in every worker."""
        for p in self.procs:
            assert p.stdin is not None
            p.stdin.write("go\n")
            p.stdin.flush()

    def wait(self, timeout: float | None = None) -> LoadResult:
        """Collect and merge the workers' reports."""
        timeout = timeout or self.spec.duration + DRAIN + 30
        reports = []
        for p in self.procs:
            line = _readline(p, timeout)
            try:
                reports.append(json.loads(line))
            except ValueError:
                reports.append({"errors": 1, "error_texts": ["worker %d: no report (%r)" % (p.pid, line[:200])]})
        self.close()
        return merge(self.spec, reports)

    def run(self) -> LoadResult:
        """``go()`` then ``wait()``."""
        self.go()
        return self.wait()

    def release(self) -> LoadResult:
        """End a hold: close the workers' stdin and collect their reports."""
        for p in self.procs:
            if p.stdin is not None:
                p.stdin.close()
        return self.wait(timeout=30)

    def close(self) -> None:
        """Stop any worker still running (by PID) and reap it."""
        for p in self.procs:
            if p.poll() is None:
                try:
                    if p.stdin is not None and not p.stdin.closed:
                        p.stdin.close()
                except OSError:
                    pass
                try:
                    p.wait(timeout=2)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
            for stream in (p.stdout,):
                if stream is not None:
                    stream.close()


def _readline(p: subprocess.Popen, timeout: float) -> str:
    assert p.stdout is not None
    ready, _, _ = select.select([p.stdout], [], [], timeout)
    if not ready:
        return ""
    return p.stdout.readline().strip()


def merge(spec: LoadSpec, reports: list[dict[str, Any]]) -> LoadResult:
    """One ``LoadResult`` from the workers' JSON reports."""
    r = LoadResult(spec=spec)
    lat: list[float] = []
    for rep in reports:
        r.elapsed_s = max(r.elapsed_s, rep.get("elapsed_s", 0.0))
        for name in ("sent", "answered", "sent_in_window", "answered_in_window", "naks", "late", "errors"):
            setattr(r, name, getattr(r, name) + rep.get(name, 0))
        r.conns_opened += rep.get("conns_opened", 0)
        r.held += rep.get("held", 0)
        r.error_texts.extend(rep.get("error_texts", []))
        r.worker_cpu_s.append(round(rep.get("cpu_s", 0.0), 3))
        lat.extend(rep.get("lat_us", []))
    r.cpu_s = round(sum(r.worker_cpu_s), 3)
    if lat:
        lat.sort()
        r.samples = len(lat)
        r.p50_us, r.p90_us, r.p99_us = (_quantile(lat, q) for q in (0.50, 0.90, 0.99))
        r.max_us = lat[-1]
    return r


def _quantile(values: list[float], q: float) -> float:
    return values[min(len(values) - 1, int(q * len(values)))]


# -- command line ------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Flags, Go style (``-conns 8``) or GNU style (``--conns 8``)."""
    p = argparse.ArgumentParser(prog="python -m harness.bench.loadgen", description=__doc__.split("\n\n")[0])
    p.add_argument("-connect", "--connect", default="127.0.0.1:8001", help="server or proxy host:port")
    p.add_argument("-conns", "--conns", type=int, default=8, help="connections")
    p.add_argument("-window", "--window", type=int, default=1, help="requests in flight per connection")
    p.add_argument("-size", "--size", type=int, default=16, help="data bytes per request")
    p.add_argument("-duration", "--duration", type=float, default=10.0, help="seconds of load")
    p.add_argument("-churn", "--churn", type=int, default=0, help="a new connection every K requests")
    p.add_argument("-procs", "--procs", type=int, default=2, help="worker processes")
    p.add_argument("-io-timeout", "--io-timeout", type=float, default=5.0, help="longest wait for an answer")
    p.add_argument("-seed", "--seed", type=int, default=1, help="seed of the request data")
    p.add_argument("-rate", "--rate", type=float, default=0.0, help="paced lockstep: requests/s per connection")
    p.add_argument("-hold", "--hold", action="store_true", help="open, one exchange, hold until stdin closes")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run a load (or, with ``--worker``, one worker of it); exit 1 on any error."""
    args = parse_args(argv)
    if args.worker:
        return worker_main(args)
    spec = LoadSpec(args.connect, args.conns, args.window, args.size, min(args.duration, 600.0), args.churn, args.procs)
    spec.io_timeout, spec.rate = args.io_timeout, args.rate
    gen = LoadGen(spec)
    try:
        gen.start()
        result = gen.run()
    finally:
        gen.close()
    out = result.as_dict()
    out.pop("spec")
    print(json.dumps(out))
    return 1 if result.errors or not result.answered else 0


if __name__ == "__main__":
    sys.exit(main())
