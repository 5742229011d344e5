"""foo-client: a Foo client that checks answers like the reference ``client-linux``.

By default: one connection, ``REQ 1`` .. ``REQ 100`` strictly one at a time,
Data 4-31 chars of ``[a-z0-9]`` from a fixed seed, each write split at a random
point into two sends, every answer checked against the server's answer rule;
a dot every ten answers, then ``OK!`` (exit 0) or ``FAILED!`` and ``Errors:``
(exit 1). Options add pipelining (``-window``), concurrent connections
(``-conns``) and a JSON summary, so that it doubles as a load generator.

In-process use::

    result = run(ClientOptions(address=Address("127.0.0.1", port), window=32))
    assert result.ok

Answers are validated by comparing the received bytes with the expected answer
stream (C-level slice comparison, segmentation-agnostic), so a pipelined run
does no per-byte Python work. Only explicit gevent APIs are used.
"""

from __future__ import annotations

import functools
import json
import random
import sys
import time
from dataclasses import dataclass, field
from typing import Any, NamedTuple, TextIO

import gevent
import gevent.event
import gevent.pool
import gevent.socket as gsocket

from fooproxy.config import Address, ConfigError, parse_address, positive_float, positive_int
from fooproxy.protocol import REQ, parse_line
from harness.peers.answer import answer
from harness.peers.flags import parse_cli, usage_error

USAGE = """\
foo-client: a Foo protocol client that validates answers like the reference client-linux.

Usage:
  foo-client [options]
  foo-client -h | --help

Options:
  -h --help          Show this help and exit.
  --connect ADDR     Server address (host:port, :port, [v6]:port) [default: localhost:8001].
  --requests N       Requests per connection, REQ 1 .. REQ N [default: 100].
  --window W         Requests in flight per connection; 1 waits for each answer
                     before the next request [default: 1].
  --conns C          Concurrent connections, each doing the full run [default: 1].
  --seed S           Seed of the request data; the same seed gives the same data
                     [default: 1].
  --no-split         Send each write whole (by default each is split at a random
                     point into two sends, as the reference client does).
  --timeout SECONDS  Fail when no answer arrives for this long [default: 10].
  --quiet            Print no progress dots.
  --summary          Also print one JSON line: answers, errors, duration_s,
                     msgs_per_s, conns.
"""

ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789"
DATA_MIN, DATA_MAX = 4, 31
BLOCK = 1024  # messages per generated block
MAX_BATCH = 4096  # requests per write in pipelined mode
RECV_SIZE = 65536
_TO_ALPHABET = bytes(ord(ALPHABET[b % len(ALPHABET)]) for b in range(256))


@dataclass(frozen=True)
class ClientOptions:
    """What one foo-client run does."""

    address: Address = Address("localhost", 8001)
    requests: int = 100
    window: int = 1
    conns: int = 1
    seed: int = 1
    split: bool = True
    timeout: float = 10.0
    quiet: bool = False


@dataclass
class Result:
    """Outcome of a run: validated answers, error reasons (one per failed connection)."""

    answers: int = 0
    errors: list[str] = field(default_factory=list)
    duration_s: float = 0.0
    conns: int = 1
    expected: int = 0

    @property
    def ok(self) -> bool:
        return not self.errors and self.answers == self.expected

    def summary(self) -> dict[str, Any]:
        """The ``-summary`` JSON object."""
        rate = self.answers / self.duration_s if self.duration_s > 0 else 0.0
        return {
            "answers": self.answers,
            "errors": len(self.errors),
            "duration_s": round(self.duration_s, 6),
            "msgs_per_s": round(rate, 1),
            "conns": self.conns,
        }


class _Block(NamedTuple):
    requests: bytes
    req_offsets: list[int]
    answers: bytes
    ans_offsets: list[int]


def request_data(seed: int, block: int, count: int) -> list[bytes]:
    """The Data of ``count`` requests of block ``block``: 4-31 chars of ``[a-z0-9]``, fixed per seed."""
    rng = random.Random("%d/%d" % (seed, block))
    lengths = [DATA_MIN + b % (DATA_MAX - DATA_MIN + 1) for b in rng.randbytes(count)]
    chars = rng.randbytes(sum(lengths)).translate(_TO_ALPHABET)
    out, pos = [], 0
    for length in lengths:
        out.append(chars[pos : pos + length])
        pos += length
    return out


@functools.lru_cache(maxsize=256)
def _block(seed: int, index: int, count: int) -> _Block:
    reqs, answers = [], []
    first = index * BLOCK + 1
    for seq, data in enumerate(request_data(seed, index, count), first):
        reqs.append(b"REQ %d %s\n" % (seq, data))
        answers.append(answer(REQ, seq, data))
    return _Block(b"".join(reqs), _offsets(reqs), b"".join(answers), _offsets(answers))


def _offsets(parts: list[bytes]) -> list[int]:
    out, pos = [0], 0
    for part in parts:
        pos += len(part)
        out.append(pos)
    return out


class Plan:
    """The requests ``REQ 1`` .. ``REQ n`` and their expected answers, made in cached blocks."""

    def __init__(self, seed: int, requests: int) -> None:
        self.seed = seed
        self.requests = requests

    def slice(self, start: int, end: int) -> tuple[bytes, bytes]:
        """Requests ``start+1`` .. ``end`` (0-based half-open) and their answers, joined."""
        reqs, answers = [], []
        while start < end:
            index, offset = divmod(start, BLOCK)
            base = index * BLOCK
            block = _block(self.seed, index, min(BLOCK, self.requests - base))
            stop = min(end - base, len(block.req_offsets) - 1)
            reqs.append(block.requests[block.req_offsets[offset] : block.req_offsets[stop]])
            answers.append(block.answers[block.ans_offsets[offset] : block.ans_offsets[stop]])
            start = base + stop
        return b"".join(reqs), b"".join(answers)


class _Progress:
    """Prints a dot every ten answers, over all connections."""

    def __init__(self, out: TextIO, quiet: bool) -> None:
        self.out = out
        self.quiet = quiet
        self.answers = 0
        self.dots = 0

    def add(self, count: int) -> None:
        self.answers += count
        dots = self.answers // 10
        if dots > self.dots and not self.quiet:
            self.out.write("." * (dots - self.dots))
        self.dots = dots


class _Connection:
    """One connection's run: a writer greenlet and a reader (the caller's greenlet)."""

    def __init__(self, opts: ClientOptions, plan: Plan, progress: _Progress, rng: random.Random) -> None:
        self.opts = opts
        self.plan = plan
        self.progress = progress
        self.rng = rng
        self.sock: gsocket.socket | None = None
        self.error: str | None = None
        self.answers = 0
        self.in_flight = 0
        self.expected = bytearray()
        self.room = gevent.event.Event()

    def run(self) -> None:
        address = self.opts.address
        try:
            sock = gsocket.create_connection((address.connect_host, address.port), timeout=self.opts.timeout)
        except OSError as exc:
            self.error = "connecting to %s: %s" % (address, _reason(exc))
            return
        self.sock = sock
        try:
            sock.setsockopt(gsocket.IPPROTO_TCP, gsocket.TCP_NODELAY, 1)
            writer = gevent.spawn(self._write, sock)
            try:
                self._read(sock)
            finally:
                if self.error is not None:
                    writer.kill(block=False)
                writer.join()
            try:
                sock.shutdown(gsocket.SHUT_WR)
            except OSError:
                pass
        finally:
            sock.close()

    def _fail(self, reason: str) -> None:
        if self.error is None:
            self.error = reason
        self.room.set()
        try:
            if self.sock is not None:
                self.sock.shutdown(gsocket.SHUT_RDWR)
        except OSError:
            pass

    def _write(self, sock: gsocket.socket) -> None:
        total, window, split = self.opts.requests, self.opts.window, self.opts.split
        sent = 0
        try:
            while sent < total:
                while self.in_flight >= window and self.error is None:
                    self.room.clear()
                    self.room.wait()
                if self.error is not None:
                    return
                count = min(window - self.in_flight, total - sent, MAX_BATCH)
                data, answers = self.plan.slice(sent, sent + count)
                self.expected += answers
                self.in_flight += count
                sent += count
                if split and len(data) > 1:
                    cut = self.rng.randrange(1, len(data))
                    sock.sendall(data[:cut])
                    sock.sendall(data[cut:])
                else:
                    sock.sendall(data)
        except TimeoutError:
            self._fail("sending request: timeout after %gs" % self.opts.timeout)
        except OSError as exc:
            self._fail("sending request: %s" % _reason(exc))

    def _read(self, sock: gsocket.socket) -> None:
        total = self.opts.requests
        expected = self.expected
        pos = 0
        progress = self.progress
        while self.answers < total and self.error is None:
            try:
                chunk = sock.recv(RECV_SIZE)
            except TimeoutError:
                self._fail("reading response: timeout after %gs" % self.opts.timeout)
                return
            except OSError as exc:
                self._fail("reading response: %s" % _reason(exc))
                return
            if not chunk:
                self._fail("reading response: EOF (connection closed by the server)")
                return
            n = len(chunk)
            if expected[pos : pos + n] != chunk:
                self._fail("validating response: %s" % _diagnose(expected, pos, chunk))
                return
            pos += n
            lines = chunk.count(b"\n")
            if lines:
                self.answers += lines
                self.in_flight -= lines
                progress.add(lines)
                self.room.set()
                gevent.sleep(0)  # let the writer refill the window (recv need not switch)
            if pos > RECV_SIZE and pos * 2 > len(expected):
                del expected[:pos]
                pos = 0


def _diagnose(expected: bytearray, pos: int, chunk: bytes) -> str:
    """Why ``chunk`` (received at ``pos`` of the expected answer stream) is wrong."""
    n = min(len(chunk), len(expected) - pos)
    i = next((k for k in range(n) if chunk[k] != expected[pos + k]), n)
    if pos + i >= len(expected):
        return "unexpected data %r" % bytes(chunk[i : i + 80])
    line_start = expected.rfind(b"\n", 0, pos + i) + 1
    want_end = expected.find(b"\n", pos + i)
    want = parse_line(bytes(expected[line_start:want_end]))
    got_end = chunk.find(b"\n", i)
    if got_end < 0 or want is None:
        return "corrupted data"
    got_line = bytes(expected[line_start:pos]) + chunk[:got_end]
    got = parse_line(got_line)
    if got is None:
        return "undecodable answer %r" % got_line[:80]
    if got.seq != want.seq:
        return "unexpected seq %d (want %d) in %r" % (got.seq, want.seq, got_line[:80])
    return "corrupted data"


def _reason(exc: OSError) -> str:
    if exc.strerror:
        return exc.strerror.lower() if isinstance(exc, ConnectionError) else exc.strerror
    return str(exc) or type(exc).__name__


def run(opts: ClientOptions, out: TextIO | None = None) -> Result:
    """Run the client (in the current gevent hub); dots go to ``out`` (stdout by default)."""
    out = out or sys.stdout
    plan = Plan(opts.seed, opts.requests)
    progress = _Progress(out, opts.quiet)
    conns = [
        _Connection(opts, plan, progress, random.Random("split/%d/%d" % (opts.seed, i))) for i in range(opts.conns)
    ]
    started = time.perf_counter()
    if len(conns) == 1:
        conns[0].run()
    else:
        group = gevent.pool.Group()
        for conn in conns:
            group.spawn(conn.run)
        group.join()
    result = Result(
        answers=sum(c.answers for c in conns),
        errors=[c.error for c in conns if c.error is not None],
        duration_s=time.perf_counter() - started,
        conns=opts.conns,
        expected=opts.requests * opts.conns,
    )
    if not result.errors and result.answers != result.expected:
        result.errors.append("only %d of %d answers" % (result.answers, result.expected))
    return result


def report(result: Result, out: TextIO, summary: bool = False) -> None:
    """Print ``OK!`` or ``FAILED!`` and the ``Errors:`` block (and the JSON summary)."""
    if result.ok:
        out.write("OK!\n")
    else:
        out.write("FAILED!\nErrors:\n")
        counts: dict[str, int] = {}
        for reason in result.errors:
            counts[reason] = counts.get(reason, 0) + 1
        for reason, count in counts.items():
            out.write("  %s%s\n" % (reason, " (%d connections)" % count if count > 1 else ""))
    if summary:
        out.write(json.dumps(result.summary()) + "\n")
    out.flush()


def parse(argv: list[str] | None) -> tuple[ClientOptions, bool]:
    """argv -> (options, summary flag); exits 2 on bad usage."""
    opts = parse_cli(USAGE, argv, "foo-client")
    try:
        seed_s = opts["--seed"]
        try:
            seed = int(seed_s, 10)
        except ValueError:
            raise ConfigError("-seed: expected an integer, got %r" % seed_s) from None
        options = ClientOptions(
            address=parse_address(opts["--connect"], "-connect"),
            requests=positive_int(opts["--requests"], "-requests", allow_zero=True),
            window=positive_int(opts["--window"], "-window"),
            conns=positive_int(opts["--conns"], "-conns"),
            seed=seed,
            split=not opts["--no-split"],
            timeout=positive_float(opts["--timeout"], "-timeout", allow_zero=False),
            quiet=bool(opts["--quiet"]),
        )
    except ConfigError as exc:
        raise usage_error("foo-client", str(exc)) from None
    return options, bool(opts["--summary"])


def main(argv: list[str] | None = None) -> int:
    """Run foo-client; returns 0 on OK!, 1 on FAILED!, 2 on bad usage."""
    options, summary = parse(argv)
    result = run(options)
    report(result, sys.stdout, summary)
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())
