"""``foo-harness``: the Makefile's entry point for e2e tests, the demo, load and benchmarks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

from docopt import DocoptExit, docopt

USAGE = """\
foo-harness: drive fooproxy end to end.

Usage:
  foo-harness <command> [<args>...]
  foo-harness -h | --help

Commands:
  e2e     Run the end-to-end tests (pytest tests/e2e); further arguments go to pytest.
  demo    Start a Foo server and fooproxy, run clients through it, print and check the stats.
  swarm   Locust load through fooproxy (harness.bench.swarm).
  bench   Direct vs through-proxy benchmark table (harness.bench.bench).
  msgcost Instructions per message through fooproxy and HAProxy, by callgrind (harness.bench.msgcost).
  logcost The cost of one close log line, -log-format text vs json (harness.bench.logcost).

Options:
  -h --help  Show this help and exit.

Run "foo-harness <command> -h" for a command's options (demo, swarm, bench, msgcost, logcost).
"""

DEMO_USAGE = """\
foo-harness demo: a Foo server, fooproxy in front of it, clients through it, stats checked.

Usage:
  foo-harness demo [options]

Options:
  -h --help         Show this help and exit.
  --sequential N    Client runs one after the other [default: 10].
  --parallel N      Client runs started at once [default: 10].
  --python          Use the Python peers even when the reference binaries are present.
  --http            Also serve fooproxy's HTTP endpoint and show its /stats.
"""


def main(argv: list[str] | None = None) -> int:
    """Dispatch ``foo-harness <command> [<args>...]``; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        opts = docopt(USAGE, argv=argv, options_first=True, default_help=False)
    except DocoptExit:
        return _usage_error("expected a command")
    if opts["--help"]:
        sys.stdout.write(USAGE)
        return 0
    command, args = opts["<command>"], opts["<args>"]
    if command == "e2e":
        return e2e(args)
    if command == "demo":
        return demo_main(args)
    if command in ("swarm", "bench", "msgcost", "logcost"):
        return delegate(command, args)
    return _usage_error("unknown command %r" % command)


def _usage_error(message: str, help_cmd: str = "foo-harness -h") -> int:
    sys.stderr.write("foo-harness: %s (see %s)\n" % (message, help_cmd))
    return 2


# -- e2e --------------------------------------------------------------------
def e2e_dir() -> Path:
    """``tests/e2e`` under the current directory, else next to the installed harness package."""
    here = Path("tests/e2e")
    if here.is_dir():
        return here
    return Path(__file__).resolve().parent.parent / "tests" / "e2e"


def e2e(args: Sequence[str]) -> int:
    """``pytest tests/e2e ARGS...`` in a child, with ``GEVENT_MONITOR_THREAD_ENABLE=1`` by default."""
    tests = e2e_dir()
    if not tests.is_dir():
        sys.stderr.write("foo-harness: no tests/e2e directory here or at %s\n" % tests)
        return 2
    env = dict(os.environ)
    env.setdefault("GEVENT_MONITOR_THREAD_ENABLE", "1")
    return subprocess.call([sys.executable, "-m", "pytest", str(tests), *args], env=env)


# -- swarm / bench ------------------------------------------------------------
def delegate(command: str, args: Sequence[str]) -> int:
    """Run ``harness.bench.<command>.main(args)``; a clear message if that module is not there."""
    module_name = "harness.bench.%s" % command
    try:
        module = __import__(module_name, fromlist=["main"])
    except ModuleNotFoundError as exc:
        if exc.name != module_name:
            raise
        sys.stderr.write("foo-harness: %s is not available (no module %s in this install)\n" % (command, module_name))
        return 1
    status = module.main(list(args))
    return int(status or 0)


# -- demo -------------------------------------------------------------------
class Progress:
    """One progress line on ``stream`` (default stdout): rewritten in place on a terminal, printed once otherwise."""

    def __init__(self, label: str, total: int, stream: TextIO | None = None) -> None:
        self.label, self.total = label, total
        self.stream = stream or sys.stdout
        self.tty = self.stream.isatty()
        self.ok = self.failed = 0
        self.started = time.monotonic()

    def __call__(self, done: int, total: int, result) -> None:
        if result.ok:
            self.ok += 1
        else:
            self.failed += 1
        if self.tty:
            self.stream.write("\r  %s" % self.line(done))
            self.stream.flush()

    def line(self, done: int | None = None) -> str:
        done = self.ok + self.failed if done is None else done
        return "%-10s %3d/%d runs, %d OK, %d FAILED, %.2fs" % (
            self.label,
            done,
            self.total,
            self.ok,
            self.failed,
            time.monotonic() - self.started,
        )

    def finish(self) -> None:
        self.stream.write(("\r  %s\n" if self.tty else "  %s\n") % self.line())
        self.stream.flush()


def demo_main(args: Sequence[str]) -> int:
    """Parse the demo's options and run it."""
    from fooproxy.cli import normalise

    try:
        opts = docopt(DEMO_USAGE, argv=["demo", *normalise(list(args))], default_help=False)
    except DocoptExit:
        return _usage_error("demo: bad arguments: %s" % " ".join(args), "foo-harness demo -h")
    if opts["--help"]:
        sys.stdout.write(DEMO_USAGE)
        return 0
    try:
        sequential, parallel = int(opts["--sequential"]), int(opts["--parallel"])
        if sequential < 0 or parallel < 0 or sequential + parallel == 0:
            raise ValueError
    except ValueError:
        return _usage_error("demo: --sequential and --parallel take counts >= 0, not both 0", "foo-harness demo -h")
    return demo(sequential, parallel, python=opts["--python"], http=opts["--http"])


def demo(
    sequential: int = 10, parallel: int = 10, *, python: bool = False, http: bool = False, out: TextIO | None = None
) -> int:
    """The whole product in one run; 0 if every client passed and the counts are exact, else 1."""
    from harness import tasks
    from harness.binaries import find_peers, python_peers
    from harness.processes import ProcessError

    out = out or sys.stdout
    peers = python_peers("--python given") if python else find_peers()

    def say(text: str = "") -> None:
        out.write(text + "\n")
        out.flush()

    say(peers.describe())
    runs = sequential + parallel
    problems: list[str] = []
    http_addr = tasks.local_address() if http else "off"
    try:
        with tasks.start_server(peers=peers, name="server") as server:
            say("server   %s on %s (pid %d)" % (peers.kind, server.address, server.pid))
            with tasks.start_proxy(server.address, http=http_addr) as proxy:
                say("fooproxy %s -> %s (pid %d, http %s)" % (proxy.address, server.address, proxy.pid, http_addr))
                results = []
                for label, count in (("sequential", sequential), ("parallel", parallel)):
                    if not count:
                        continue
                    progress = Progress(label, count, out)
                    if label == "sequential":
                        batch = tasks.run_clients_sequential(proxy.address, count, peers=peers, progress=progress)
                    else:
                        batch = tasks.run_clients_parallel(proxy.address, count, peers=peers, progress=progress)
                    progress.finish()
                    results.extend(batch)
                failed = tasks.failures(results)
                for result in failed[:3]:
                    problems.append("client failed:\n" + result.describe())
                if len(failed) > 3:
                    problems.append("... and %d more failed clients" % (len(failed) - 3))
                stats = tasks.signal_stats(proxy)
                say("stats after SIGUSR2 to pid %d:" % proxy.pid)
                say(json.dumps(stats, indent=2, sort_keys=True))
                count_problems = tasks.check_counts(stats, runs)
                problems.extend(count_problems)
                if not count_problems:
                    say(
                        "counts exact: msg_req %d = 100 x %d runs, msg_ack %d + msg_nak %d = msg_req, msg_total %d"
                        % (stats["msg_req"], runs, stats["msg_ack"], stats["msg_nak"], stats["msg_total"])
                    )
                if http:
                    problems.extend(_show_http(http_addr, stats, say))
                rc = proxy.stop()
                say("fooproxy stopped by SIGTERM: exit %s" % rc)
                if rc != 0:
                    problems.append("fooproxy exited %s on SIGTERM\n%s" % (rc, proxy.tail()))
    except ProcessError as exc:
        problems.append(str(exc))
    for problem in problems:
        sys.stderr.write("demo: PROBLEM: %s\n" % problem)
    say("demo: %s" % ("FAILED" if problems else "OK"))
    return 1 if problems else 0


def _show_http(address: str, stats: dict, say) -> list[str]:
    try:
        with urllib.request.urlopen("http://%s/stats" % address, timeout=5) as response:
            body = json.loads(response.read())
    except (OSError, ValueError) as exc:
        return ["GET http://%s/stats: %s" % (address, exc)]
    say(
        "GET /stats: msg_req %s, msg_ack %s, msg_nak %s"
        % (body.get("msg_req"), body.get("msg_ack"), body.get("msg_nak"))
    )
    diff = [k for k in ("msg_req", "msg_ack", "msg_nak", "msg_total") if body.get(k) != stats.get(k)]
    return ["/stats differs from the SIGUSR2 stats in %s" % ", ".join(diff)] if diff else []


if __name__ == "__main__":
    sys.exit(main())
