"""``foo-harness msgcost``: a proxy's cost per message in CPU instructions, counted by callgrind.

A benchmark, not a test, and the repeatable companion of ``make bench``:
wall-clock µs per message moves with whatever else the 2 cores are doing,
while valgrind's callgrind counts the instructions (Ir) the proxy process
executes, the same for the same binary and inputs whatever the machine's
load. This is how a change on the hot path is judged before and after.

For each workload and each proxy (fooproxy, and HAProxy when installed) the
proxy runs twice under callgrind in front of a fresh server, once carrying
``N`` requests and once ``2N``; everything else (start, imports, stop) is the
same in both runs, so ``(Ir(2N) - Ir(N)) / (2 * N)`` is the cost of one
message, a REQ or its answer, as ``make bench``'s µs/msg counts them. The
client is a plain blocking one in this process (not under valgrind), so each
lockstep REQ and each answer is its own chunk, as in W2; the pipelined
workload sends 64 REQs per write, as in W1; churn opens a new connection for
every 10 requests, as in W4.

What is not constant between the two runs is time: the proxy's timers (the
stats windows, idle timeouts) fire more often in the longer run. The runs
are short and the proxy has HTTP, recovery and logging off, so that share is
small; ``--repeat`` shows the spread.
"""

from __future__ import annotations

import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from harness.bench.bench import HAProxy, choose_peers, describe_server, find_haproxy
from harness.binaries import fooproxy_command
from harness.processes import ProcessError
from harness.tasks import Service, split_address, start_proxy, start_server

USAGE = """\
foo-harness msgcost: instructions per message through fooproxy and HAProxy (callgrind).

Usage:
  foo-harness msgcost [options]

Options:
  -h --help           Show this help and exit.
  --requests N        Requests in the shorter run; the longer one carries twice as many
                      [default: 1000].
  --only LIST         Workloads, comma-separated: lockstep (W2), pipelined (W1), churn (W4)
                      [default: lockstep,pipelined,churn].
  --repeat K          Measure each pair K times and show the median and range [default: 1].
  --no-haproxy        Measure fooproxy only.
  --haproxy PATH      The haproxy binary [default: haproxy].
  --proxy-args ARGS   Extra fooproxy flags, e.g. "-pool-size 8" [default: ].
  --proxy-cmd CMD     Run this command as the proxy instead of the installed fooproxy (to
                      compare builds); it gets fooproxy's flags appended.
  --python            Use foo-server even when $FOO_BIN_DIR has the reference server.
  --profile K         Also print, per workload and proxy, the K functions that cost the most
                      per message (callgrind_annotate of both runs, subtracted) [default: 0].

The figure is (Ir of the 2N run - Ir of the N run) / 2N: instructions the proxy executes
per message, a REQ or an answer. Run it against the reference server (FOO_BIN_DIR with
server-linux): it splits its answers into several writes, which the proxy pays for.
"""

CONNECTIONS = 8  # as W1 and W2
PIPELINE = 64  # REQs per write in the pipelined workload, as W1
CHURN = 10  # requests per connection in the churn workload, as W4
READY_TIMEOUT = 180.0  # Python's start under callgrind takes tens of seconds on a loaded machine


class MsgcostError(RuntimeError):
    """Something the user must fix (no valgrind, a proxy that did not start); one line."""


# -- the client ----------------------------------------------------------------
def _read_lines(sock: socket.socket, lines: int) -> None:
    """Read until ``lines`` newlines have arrived (the server may split an answer)."""
    seen = 0
    while seen < lines:
        data = sock.recv(65536)
        if not data:
            raise MsgcostError("the proxy closed a connection with %d answers owed" % (lines - seen))
        seen += data.count(b"\n")


def _connect(address: str) -> socket.socket:
    host, port = split_address(address)
    sock = socket.create_connection((host, port), timeout=60)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def lockstep(address: str, requests: int) -> None:
    """``requests`` REQs over 8 connections, each answered before the next is sent (W2)."""
    conns = [_connect(address) for _ in range(CONNECTIONS)]
    try:
        for i in range(requests):
            sock = conns[i % CONNECTIONS]
            sock.sendall(b"REQ %d msgcost\n" % i)
            _read_lines(sock, 1)
    finally:
        for sock in conns:
            sock.close()


def pipelined(address: str, requests: int) -> None:
    """``requests`` REQs in writes of 64 over 8 connections, each batch answered before the next (W1)."""
    conns = [_connect(address) for _ in range(CONNECTIONS)]
    batch = b"".join(b"REQ %d msgcost\n" % i for i in range(PIPELINE))
    try:
        for i in range(requests // PIPELINE):
            sock = conns[i % CONNECTIONS]
            sock.sendall(batch)
            _read_lines(sock, PIPELINE)
    finally:
        for sock in conns:
            sock.close()


def churn(address: str, requests: int) -> None:
    """``requests`` lockstep REQs, a new connection for every 10 (W4)."""
    for start in range(0, requests, CHURN):
        sock = _connect(address)
        try:
            for i in range(start, min(start + CHURN, requests)):
                sock.sendall(b"REQ %d msgcost\n" % i)
                _read_lines(sock, 1)
        finally:
            sock.close()


WORKLOADS: dict[str, Callable[[str, int], None]] = {"lockstep": lockstep, "pipelined": pipelined, "churn": churn}
SHOWN = {"lockstep": "W2 lockstep, 8", "pipelined": "W1 pipelined, 8 x 64", "churn": "W4 churn, 10 per conn"}


# -- callgrind -------------------------------------------------------------------
def callgrind_prefix(out_file: Path) -> list[str]:
    """The valgrind command line that runs a proxy under callgrind, writing its counts to ``out_file``."""
    valgrind = shutil.which("valgrind")
    if valgrind is None:
        raise MsgcostError("valgrind not installed (Debian: apt-get install valgrind)")
    return [valgrind, "--tool=callgrind", "--callgrind-out-file=%s" % out_file, "--dump-instr=no"]


def total_ir(out_file: Path) -> int:
    """The total Ir of a callgrind output file (its ``summary:`` or ``totals:`` line)."""
    for line in out_file.read_text(errors="replace").splitlines():
        if line.startswith(("summary:", "totals:")):
            return int(line.split()[1])
    raise MsgcostError("%s has no summary line: did the proxy exit cleanly?" % out_file)


@dataclass(frozen=True)
class Target:
    """A proxy to measure: fooproxy (its flags and command) or HAProxy (its binary)."""

    name: str
    haproxy: str | None = None
    proxy_args: tuple[str, ...] = ()
    proxy_cmd: tuple[str, ...] | None = None

    def start(self, forward: str, out_file: Path) -> Service:
        prefix = callgrind_prefix(out_file)
        if self.haproxy is not None:
            proxy = HAProxy(self.haproxy, forward, maxconn=4096)
            proxy.cmd = [*prefix, *proxy.cmd]  # type: ignore[attr-defined]
            proxy.ready_timeout = READY_TIMEOUT  # type: ignore[attr-defined]
            return proxy.start()  # type: ignore[return-value]
        command = [*prefix, *(self.proxy_cmd or fooproxy_command())]
        # A fixed hash seed: the same dict layouts, so the same instructions, in both runs.
        return start_proxy(
            forward,
            extra_args=("-log-level", "warning", *self.proxy_args),
            command=command,
            env={"PYTHONHASHSEED": "0", "GEVENT_MONITOR_THREAD_ENABLE": "0"},
            ready_timeout=READY_TIMEOUT,
        )


def measure_run(target: Target, workload: str, requests: int, python: bool, out_file: Path) -> int:
    """Total Ir of one proxy run carrying ``requests`` requests of ``workload`` to a fresh server."""
    with start_server(peers=choose_peers(python)) as server:
        proxy = target.start(server.address, out_file)
        try:
            WORKLOADS[workload](proxy.address, requests)
        finally:
            proxy.close()
    return total_ir(out_file)


_ANNOTATED = re.compile(r"\s*([\d,]+) \([ \d.]+%\)\s+(\S+?):(\S+)")


def function_costs(out_file: Path) -> dict[str, int]:
    """Ir per function (``file:function``, the file's base name) of a callgrind output, via callgrind_annotate."""
    annotate = shutil.which("callgrind_annotate")
    if annotate is None:
        raise MsgcostError("callgrind_annotate not found (it comes with valgrind)")
    text = subprocess.run(
        [annotate, "--threshold=100", str(out_file)], capture_output=True, text=True, timeout=300, check=True
    ).stdout
    costs: dict[str, int] = {}
    for line in text.splitlines():
        match = _ANNOTATED.match(line)
        if match and match.group(2) != "PROGRAM":
            name = "%s:%s" % (match.group(2).rsplit("/", 1)[-1], match.group(3))
            costs[name] = costs.get(name, 0) + int(match.group(1).replace(",", ""))
    return costs


def profile_per_message(
    short: dict[str, int], long: dict[str, int], requests: int, top: int
) -> list[tuple[str, float]]:
    """The ``top`` functions by extra Ir per message between the N and 2N runs, costliest first."""
    extra = {name: long.get(name, 0) - short.get(name, 0) for name in set(short) | set(long)}
    ranked = sorted(extra.items(), key=lambda item: -item[1])[:top]
    return [(name, ir / (2 * requests)) for name, ir in ranked]


def ir_per_message(short: int, long: int, requests: int) -> float:
    """Instructions per message from the N and 2N runs: the extra N requests are 2N messages."""
    return (long - short) / (2 * requests)


# -- the command -------------------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> int:
    """``foo-harness msgcost``; returns the exit status."""
    from harness.peers.flags import parse_cli

    opts = parse_cli(USAGE, ["msgcost", *(sys.argv[1:] if argv is None else argv)], "foo-harness msgcost")
    try:
        requests = int(opts["--requests"])
        repeat = int(opts["--repeat"])
        top = int(opts["--profile"])
    except ValueError:
        sys.stderr.write("foo-harness msgcost: --requests, --repeat and --profile take whole numbers\n")
        return 2
    workloads = [w.strip() for w in opts["--only"].split(",") if w.strip()]
    unknown = [w for w in workloads if w not in WORKLOADS]
    if unknown or requests < PIPELINE or repeat < 1 or top < 0:
        sys.stderr.write(
            "foo-harness msgcost: workloads are %s; --requests at least %d; --repeat at least 1\n"
            % (", ".join(WORKLOADS), PIPELINE)
        )
        return 2
    targets = [
        Target(
            "fooproxy",
            proxy_args=tuple(opts["--proxy-args"].split()),
            proxy_cmd=tuple(opts["--proxy-cmd"].split()) if opts["--proxy-cmd"] else None,
        )
    ]
    if not opts["--no-haproxy"]:
        binary, why = find_haproxy(opts["--haproxy"])
        if binary is None:
            sys.stderr.write("foo-harness msgcost: %s; measuring fooproxy only\n" % why)
        else:
            targets.append(Target("haproxy", haproxy=binary))
    server = describe_server(choose_peers(opts["--python"]))
    print("msgcost: Ir per message (REQ or answer), callgrind, N=%d and 2N requests; server: %s" % (requests, server))
    print("%-24s %-10s %12s %12s" % ("workload", "proxy", "Ir/msg", "range"))
    scratch = Path(tempfile.mkdtemp(prefix="foo-msgcost-"))
    try:
        for workload in workloads:
            for target in targets:
                figures = []
                runs = (
                    scratch / ("%s-%s-n.out" % (target.name, workload)),
                    scratch / ("%s-%s-2n.out" % (target.name, workload)),
                )
                for _ in range(repeat):
                    short = measure_run(target, workload, requests, opts["--python"], runs[0])
                    long = measure_run(target, workload, 2 * requests, opts["--python"], runs[1])
                    figures.append(ir_per_message(short, long, requests))
                spread = "%.0f-%.0f" % (min(figures), max(figures)) if repeat > 1 else ""
                print("%-24s %-10s %12.0f %12s" % (SHOWN[workload], target.name, statistics.median(figures), spread))
                if top:
                    ranked = profile_per_message(function_costs(runs[0]), function_costs(runs[1]), requests, top)
                    for name, ir in ranked:
                        print("    %10.0f  %s" % (ir, name))
                sys.stdout.flush()
    except (MsgcostError, ProcessError, OSError, subprocess.SubprocessError) as exc:
        sys.stderr.write("foo-harness msgcost: %s\n" % exc)
        return 1
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return 0
