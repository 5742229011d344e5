"""foo-client: a Foo client that checks answers like the reference ``client-linux``.

By default: one connection, ``REQ 1`` .. ``REQ 100`` strictly one at a time,
Data 4-31 chars of ``[a-z0-9]`` from a fixed seed, each write split at a random
point into two sends, every answer checked against the server's answer rule;
a dot after answers 1, 11, 21, ..., then ``OK!`` (exit 0) or ``FAILED!`` on
stdout and ``Errors:`` plus the reason on stderr (exit 1), word for word what
the reference prints (its Go error texts come from ``harness.peers.gofmt``).
Options add pipelining (``-window``), concurrent connections (``-conns``) and a
JSON summary, so that it doubles as a load generator.

In-process use::

    result = run(ClientOptions(address=Address("127.0.0.1", port), window=32))
    assert result.ok

Answers are validated by comparing the received bytes with the expected answer
stream (C-level slice comparison, segmentation-agnostic), so a pipelined run
does no per-byte Python work. From the first byte that differs (or an EOF),
the connection checks answer by answer as the reference's decoder does
(``check_line``): it accepts what the reference accepts (``ACK 01 …``, a
``\r\n`` ending) and names a failure as it does. Only explicit gevent APIs are used.
"""

from __future__ import annotations

import functools
import json
import random
import re
import sys
import time
from dataclasses import dataclass, field
from typing import Any, NamedTuple, TextIO

import gevent
import gevent.event
import gevent.pool
import gevent.socket as gsocket

from fooproxy.config import Address, ConfigError, positive_float, positive_int
from fooproxy.protocol import REQ
from harness.peers.answer import answer
from harness.peers.flags import parse_cli, usage_error
from harness.peers.gofmt import AddrError, dial_error, io_error, join_host_port, lookup_error, quote, split_host_port

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
#: A Seq Go's ``strconv.ParseInt(s, 10, 64)`` reads (range checked apart).
_GO_INT = re.compile(rb"[+-]?[0-9]+")
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
    """Prints a dot after answers 1, 11, 21, ... (as the reference), over all connections."""

    def __init__(self, out: TextIO, quiet: bool) -> None:
        self.out = out
        self.quiet = quiet
        self.answers = 0
        self.dots = 0

    def add(self, count: int) -> None:
        self.answers += count
        dots = (self.answers + 9) // 10
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
        self.sent = 0
        self.room = gevent.event.Event()
        self.local = self.remote = "?"

    def _dial(self) -> gsocket.socket | None:
        """Connect as Go's ``net.Dial`` would, trying IPv4 first; on failure set its error (the first one)."""
        address = self.opts.address
        try:
            infos = gsocket.getaddrinfo(address.connect_host, address.port, 0, gsocket.SOCK_STREAM)
        except gsocket.gaierror:
            self.error = "dial tcp: %s" % lookup_error(address.host)
            return None
        infos.sort(key=lambda info: info[0] != gsocket.AF_INET)
        for family, kind, proto, _, sockaddr in infos:
            sock = gsocket.socket(family, kind, proto)
            sock.settimeout(self.opts.timeout)
            try:
                sock.connect(sockaddr)
                return sock
            except OSError as exc:
                sock.close()
                if self.error is None:
                    remote = join_host_port(sockaddr) if address.host else ":%d" % address.port
                    self.error = dial_error(exc, remote)
        return None

    def run(self) -> None:
        sock = self._dial()
        if sock is None:
            return
        self.sock = sock
        try:
            self.local, self.remote = join_host_port(sock.getsockname()), join_host_port(sock.getpeername())
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
                self.sent = sent
                if split and len(data) > 1:
                    cut = self.rng.randrange(1, len(data))
                    sock.sendall(data[:cut])
                    sock.sendall(data[cut:])
                else:
                    sock.sendall(data)
        except OSError as exc:
            self._fail("encoding request: %s" % io_error("write", exc, self.local, self.remote))

    def _read(self, sock: gsocket.socket) -> None:
        total = self.opts.requests
        expected = self.expected
        pos = 0
        progress = self.progress
        while self.answers < total and self.error is None:
            chunk = self._recv(sock)
            if chunk is None:
                return
            n = len(chunk)
            if not chunk or expected[pos : pos + n] != chunk:
                # Off the fast path for good: the rest is checked line by line, as the reference does.
                line_start = expected.rfind(b"\n", 0, pos) + 1
                self._read_lines(sock, bytes(expected[line_start:pos]) + chunk, line_start, eof=not chunk)
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

    def _recv(self, sock: gsocket.socket) -> bytes | None:
        """One read; ``None`` (and the reference's error text set) when it failed."""
        try:
            return sock.recv(RECV_SIZE)
        except OSError as exc:
            self._fail("decoding response: %s" % io_error("read", exc, self.local, self.remote))
            return None

    def _read_lines(self, sock: gsocket.socket, buf: bytes, at: int, eof: bool) -> None:
        """Check the answers line by line with ``check_line``; ``buf`` starts the answer due at ``expected[at:]``."""
        total, expected = self.opts.requests, self.expected
        while self.answers < total and self.error is None:
            nl = buf.find(b"\n")
            if nl < 0 and not eof:
                chunk = self._recv(sock)
                if chunk is None:
                    return
                eof = not chunk
                buf += chunk
                continue
            if nl < 0 and not buf:
                # Go's decoder gives an empty message (Seq 0) at EOF, so the reference blames the Seq.
                self._fail("validating response: unexpected seq no")
                return
            line, buf = (buf[:nl], buf[nl + 1 :]) if nl >= 0 else (buf, b"")  # at EOF, the last line as it is
            end = expected.find(b"\n", at)
            for _ in range(1000):  # the writer appends the next request's answer as soon as it runs
                if end >= 0 or self.sent >= total:
                    break
                gevent.sleep(0)
                end = expected.find(b"\n", at)
            if end < 0:
                self._fail("validating response: unexpected seq no")  # an answer to no request
                return
            reason = check_line(line, bytes(expected[at:end]))
            if reason is not None:
                self._fail(reason)
                return
            at = end + 1
            self.answers += 1
            self.in_flight -= 1
            self.progress.add(1)
            self.room.set()
            gevent.sleep(0)  # let the writer send the next request


def check_line(line: bytes, want: bytes) -> str | None:
    """The reference client's verdict on one answer ``line`` (no ``\\n``) where ``want`` was due; ``None``: accepted.

    Its decoder, measured against client-linux: one trailing ``\\r`` is dropped,
    the line is split on single spaces into 2 or 3 fields (Data may be absent);
    the type must be REQ/ACK/NAK (its message shows an empty type, as Go's
    does) and Seq a signed 64-bit decimal (``+1`` and ``01`` are 1). Then the
    answer is validated: Seq, then type, then the hash.
    """
    if line.endswith(b"\r"):
        line = line[:-1]
    fields = line.split(b" ")
    if len(fields) < 2:
        return "decoding response: not enough fields"
    if len(fields) > 3:
        return "decoding response: too many fields"
    if fields[0] not in (b"REQ", b"ACK", b"NAK"):
        return 'decoding response: bad type ""'
    text = fields[1]
    if not _GO_INT.fullmatch(text):
        return "decoding response: bad seq: strconv.ParseInt: parsing %s: invalid syntax" % quote(text)
    seq = int(text)
    if not -(2**63) <= seq < 2**63:
        return "decoding response: bad seq: strconv.ParseInt: parsing %s: value out of range" % quote(text)
    want_type, want_seq, want_hash = want.split(b" ")
    if seq != int(want_seq):
        return "validating response: unexpected seq no"
    if fields[0] != want_type:
        return "validating response: unexpected response type"
    if (fields[2] if len(fields) == 3 else b"") != want_hash:
        return "validating response: corrupted data"
    return None


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


def report(result: Result, out: TextIO, summary: bool = False, err: TextIO | None = None) -> None:
    """``OK!`` or ``FAILED!`` on ``out``; on failure ``Errors:`` and one reason a line, unindented, on ``err``.

    As the reference client: stdout carries the verdict, stderr (``err``,
    default ``sys.stderr``) the reasons. The ``-summary`` JSON line follows on ``out``.
    """
    err = err or sys.stderr
    if result.ok:
        out.write("OK!\n")
    else:
        out.write("FAILED!\n")
        out.flush()
        counts: dict[str, int] = {}
        for reason in result.errors:
            counts[reason] = counts.get(reason, 0) + 1
        lines = [
            "%s%s\n" % (reason, " (%d connections)" % count if count > 1 else "") for reason, count in counts.items()
        ]
        err.write("Errors:\n" + "".join(lines))
        err.flush()
    if summary:
        out.write(json.dumps(result.summary()) + "\n")
    out.flush()


def parse(argv: list[str] | None) -> tuple[ClientOptions, bool]:
    """argv -> (options, summary flag); exits 2 on bad usage.

    A ``-connect`` that Go's ``net`` refuses raises ``AddrError``: for the
    reference that is not a usage error but a failed run (``dial tcp: address
    abc: missing port in address``, exit 1), and ``main`` reports it so.
    """
    opts = parse_cli(USAGE, argv, "foo-client")
    host, port = split_host_port(opts["--connect"])
    try:
        seed_s = opts["--seed"]
        try:
            seed = int(seed_s, 10)
        except ValueError:
            raise ConfigError("-seed: expected an integer, got %r" % seed_s) from None
        options = ClientOptions(
            address=Address(host, port),
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
    try:
        options, summary = parse(argv)
    except AddrError as exc:
        report(Result(errors=["dial tcp: %s" % exc], expected=1), sys.stdout)
        return 1
    result = run(options)
    report(result, sys.stdout, summary)
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())
