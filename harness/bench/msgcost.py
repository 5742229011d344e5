"""Callgrind instructions per message through fooproxy: a deterministic cost figure on a busy machine.

``python -m harness.bench.msgcost [--pythonpath DIR] [FLAG...]`` starts the
reference server (``$FOO_BIN_DIR/server-linux``) and, per mode, fooproxy under
``valgrind --tool=callgrind`` with collection off; after a warm-up it turns
collection on for a fixed exchange on one connection (lockstep: 3,000 REQ/answer
pairs; pipelined: 32,000 messages, 32 REQs per write), off again, and prints
the instructions per message (REQs + answers). ``--pythonpath`` runs another
build's ``fooproxy`` package (to compare before/after); extra flags go to
fooproxy (``-latency off``). Wall-clock benchmarks on a shared machine move by
tens of percent; these counts move by about 1 %.
"""

from __future__ import annotations

import glob
import os
import socket
import subprocess
import sys
import tempfile
import time

from harness.binaries import reference_server
from harness.processes import free_port, wait_for_port

MODES = {"lockstep": (1, 3000), "pipelined": (32, 32000)}


def _exchange(sock: socket.socket, messages: int, depth: int) -> None:
    got = seq = 0
    buf = b""
    while got < messages:
        sock.sendall(b"".join(b"REQ %d abcdefgh\n" % (seq + i) for i in range(depth)))
        seq += depth
        want = depth
        while want > 0:
            data = sock.recv(65536)
            if not data:
                raise SystemExit("the proxy closed the connection")
            buf += data
            lines = buf.count(b"\n")
            want -= lines
            got += lines
            buf = buf[buf.rfind(b"\n") + 1 :]


def _total(path: str) -> int:
    """The run's event total: the last ``summary:``/``totals:`` line of the dump (earlier parts may be empty)."""
    total = None
    with open(path) as f:
        for line in f:
            if line.startswith(("summary:", "totals:")):
                total = int(line.split()[1])
    if total is None:
        raise SystemExit("no totals in %s" % path)
    return total


def measure(mode: str, server: str, out: str, pythonpath: str | None, flags: list[str]) -> float:
    depth, exchanges = MODES[mode]
    port = free_port()
    env = dict(os.environ)
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    cmd = ["valgrind", "--tool=callgrind", "--instr-atstart=no", "--callgrind-out-file=%s/cg.%s.%%p" % (out, mode),
           sys.executable, "-m", "fooproxy", "-listen", "127.0.0.1:%d" % port, "-forward", server,
           "-http", "off", "-recovery-path", "off", "-log-level", "warning", *flags]  # fmt: skip
    proxy = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_port("127.0.0.1", port, timeout=120)
        sock = socket.create_connection(("127.0.0.1", port))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        _exchange(sock, 200, depth)  # warm-up, not collected
        subprocess.run(["callgrind_control", "-i", "on", str(proxy.pid)], capture_output=True, check=False)
        _exchange(sock, exchanges, depth)
        subprocess.run(["callgrind_control", "-i", "off", str(proxy.pid)], capture_output=True, check=False)
        sock.close()
    finally:
        proxy.terminate()
        proxy.wait(60)
    path = max(glob.glob("%s/cg.%s.*" % (out, mode)), key=os.path.getmtime)
    return _total(path) / (2 * exchanges)


def main(argv: list[str]) -> int:
    pythonpath = None
    if argv[:1] == ["--pythonpath"]:
        pythonpath, argv = argv[1], argv[2:]
    ref = reference_server()
    if ref is None:
        print("msgcost: needs the reference server-linux in $FOO_BIN_DIR", file=sys.stderr)
        return 2
    sport = free_port()
    server = subprocess.Popen([*ref, "-listen", "127.0.0.1:%d" % sport], stderr=subprocess.DEVNULL)
    try:
        wait_for_port("127.0.0.1", sport, timeout=10)
        with tempfile.TemporaryDirectory(prefix="msgcost-") as out:
            for mode in MODES:
                started = time.monotonic()
                cost = measure(mode, "127.0.0.1:%d" % sport, out, pythonpath, argv)
                print("%s: %.0f instructions per message (%.0f s)" % (mode, cost, time.monotonic() - started))
    finally:
        server.terminate()
        server.wait(10)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
