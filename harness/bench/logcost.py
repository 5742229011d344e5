"""``foo-harness logcost``: what one per-connection close line costs, ``-log-format text`` vs ``json``.

A benchmark, not a test. Each figure is measured in a child process that
starts as ``fooproxy`` does (``fooproxy.__main__`` monkey-patches first, then
``fooproxy.logsetup.setup_logging`` puts the real handler and formatter on the root logger),
with the handler's stream on ``/dev/null``. Two things are timed per format:

* ``call``: the whole close line, ``fooproxy.proxy._log_close(...)`` as the
  proxy calls it at a session's end (building its arguments, the record,
  the handler's lock, formatting, the write to the stream);
* ``format``: ``Formatter.format`` alone, on a close record made once.

The session given to ``_log_close`` is a stand-in with the counters as plain
attributes (the real DataBus reads them through properties; both formats pay
that the same). Wall-clock figures are the min and median µs per call over
``--repeat`` loops of ``--calls`` calls each (garbage collection off during a
loop, as timeit does). ``--callgrind`` also counts instructions per call:
the child runs under callgrind once with ``N`` calls and once with ``2N``;
everything else is the same in both, so ``(Ir(2N) - Ir(N)) / N`` is one call,
the same figure whatever else the machine is doing.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

USAGE = """\
foo-harness logcost: the cost of one close log line, -log-format text vs json.

Usage:
  foo-harness logcost [options]

Options:
  -h --help        Show this help and exit.
  --calls N        Calls per timed loop (and the shorter callgrind run) [default: 20000].
  --repeat K       Timed loops per figure; the min and median are shown [default: 9].
  --formats LIST   Log formats, comma-separated [default: text,json].
  --callgrind      Also count instructions per call (valgrind's callgrind; N and 2N calls).
  --json           Print the figures as one JSON object instead of a table.
"""

MODES = ("call", "format")
PEER = "127.0.0.1:54321"


# -- the child: one format, one mode --------------------------------------------
def child(log_format: str, mode: str, calls: int, repeat: int) -> list[float]:
    """In a fresh process: µs per call of ``mode`` for ``log_format``, one figure per loop."""
    import gc
    import logging
    import time
    from types import SimpleNamespace

    from fooproxy import proxy
    from fooproxy.logsetup import setup_logging  # CHILD imported fooproxy.__main__ first: patched as fooproxy is

    stream = open("/dev/null", "w")  # noqa: SIM115 (open for the whole child)
    setup_logging("info", log_format, stream)
    bus = SimpleNamespace(bytes_c2s=123_456, bytes_s2c=654_321, lines_c2s=1_000, lines_s2c=1_000,
                          timer=SimpleNamespace(max_s=0.001234))  # fmt: skip
    handler = logging.getLogger().handlers[0]

    if mode == "call":

        def run(n: int) -> None:
            for _ in range(n):
                proxy._log_close(PEER, "client closed", 1.2345678, bus)  # type: ignore[arg-type]

    elif mode == "format":
        records: list[logging.LogRecord] = []
        capture = logging.Handler()
        capture.emit = records.append  # type: ignore[method-assign]
        root = logging.getLogger()
        root.handlers[:] = [capture]
        proxy._log_close(PEER, "client closed", 1.2345678, bus)  # type: ignore[arg-type]
        root.handlers[:] = [handler]
        [record] = records
        formatter = handler.formatter
        assert formatter is not None

        def run(n: int) -> None:
            for _ in range(n):
                formatter.format(record)

    else:
        raise ValueError("unknown mode %r" % mode)

    run(min(calls, 1000))  # warm up: caches, the first record's lazy imports
    figures = []
    for _ in range(repeat):
        gc.disable()
        t0 = time.perf_counter_ns()
        run(calls)
        elapsed = time.perf_counter_ns() - t0
        gc.enable()
        figures.append(elapsed / calls / 1e3)
    stream.close()
    return figures


# The child imports fooproxy.__main__ before anything else, as the fooproxy command does (it monkey-patches).
CHILD = "import fooproxy.__main__, sys; from harness.bench.logcost import main; sys.exit(main(sys.argv[1:]))"


def _child_command(log_format: str, mode: str, calls: int, repeat: int) -> list[str]:
    return [sys.executable, "-c", CHILD, "--child", log_format, mode, str(calls), str(repeat)]


def timed(log_format: str, mode: str, calls: int, repeat: int) -> list[float]:
    """µs per call of ``mode`` for ``log_format``, one figure per loop, from a child process."""
    out = subprocess.run(_child_command(log_format, mode, calls, repeat), check=True, capture_output=True, text=True,
                         timeout=600)  # fmt: skip
    return [float(x) for x in out.stdout.split()]


def ir_per_call(log_format: str, mode: str, calls: int) -> float:
    """Instructions per call of ``mode``: (Ir of 2N calls - Ir of N calls) / N, each run under callgrind."""
    from harness.bench.msgcost import callgrind_prefix, total_ir

    totals = []
    with tempfile.TemporaryDirectory(prefix="logcost-") as tmp:
        for n in (calls, 2 * calls):
            out_file = Path(tmp) / ("callgrind.%d" % n)
            subprocess.run([*callgrind_prefix(out_file), *_child_command(log_format, mode, n, 1)], check=True,
                           capture_output=True, timeout=1800)  # fmt: skip
            totals.append(total_ir(out_file))
    return (totals[1] - totals[0]) / calls


def main(argv: Sequence[str] | None = None) -> int:
    """``foo-harness logcost [options]``; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--child"]:
        log_format, mode, calls, repeat = argv[1], argv[2], int(argv[3]), int(argv[4])
        print(" ".join("%.4f" % x for x in child(log_format, mode, calls, repeat)))
        return 0
    from harness.peers.flags import parse_cli

    opts = parse_cli(USAGE, ["logcost", *argv], "foo-harness logcost")
    try:
        calls, repeat = int(opts["--calls"]), int(opts["--repeat"])
    except ValueError:
        calls = repeat = 0
    formats = [f.strip() for f in opts["--formats"].split(",") if f.strip()]
    if not 1 <= calls <= 10_000_000 or not 1 <= repeat <= 1000 or not set(formats) <= {"text", "json"}:
        sys.stderr.write("foo-harness logcost: --calls 1..10000000, --repeat 1..1000, --formats text,json\n")
        return 2
    results: dict[str, dict[str, dict[str, float]]] = {}
    for log_format in formats:
        for mode in MODES:
            figures = timed(log_format, mode, calls, repeat)
            entry = {"us_min": min(figures), "us_median": statistics.median(figures)}
            if opts["--callgrind"]:
                # Fewer calls under valgrind (about 50 times slower): the difference of two runs stays exact.
                entry["ir"] = ir_per_call(log_format, mode, max(1, calls // 10))
            results.setdefault(log_format, {})[mode] = entry
    if opts["--json"]:
        print(json.dumps(results, indent=2))
        return 0
    header = "%-8s %-7s %9s %9s" % ("format", "what", "µs min", "µs med")
    print(header + ("  %9s" % "Ir/call" if opts["--callgrind"] else ""))
    for log_format, modes in results.items():
        for mode, entry in modes.items():
            line = "%-8s %-7s %9.2f %9.2f" % (log_format, mode, entry["us_min"], entry["us_median"])
            if "ir" in entry:
                line += "  %9.0f" % entry["ir"]
            print(line)
    print("(%d loops of %d calls each; call = the whole _log_close into a handler on /dev/null)" % (repeat, calls))
    return 0
