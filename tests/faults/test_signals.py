"""Hostile signals, as an operator or a careless script sends them, to the real ``fooproxy``.

SIGUSR2 from the first milliseconds after exec on, a proxy started with its
stdout closed, and SIGUSR1 / SIGHUP (which used to kill it silently, without
a final save), against a single process and ``-workers 2``: the proxy must
never die of them, must say what it did with them, and its counts and final
save must be intact.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterator

import pytest

from harness import tasks
from harness.binaries import fooproxy_command
from harness.processes import Process, port_listening
from harness.sigusr2 import read_stats
from tests.faults import running
from tests.faults.running import poll
from tests.helpers import connect, recv_lines

pytestmark = pytest.mark.e2e

#: A SIGUSR2 every STORM_INTERVAL seconds, at most STORM_MAX of them (a bounded loop).
STORM_INTERVAL = 0.002
STORM_MAX = 5000


@pytest.fixture
def procs(tmp_path) -> Iterator[running.Running]:
    yield from running.processes(tmp_path)


def proxy_command(forward: str, listen: str, *args: str, recovery: str = "off") -> list[str]:
    return [*fooproxy_command(), "-listen", listen, "-forward", forward, "-http", "off", "-recovery-path", recovery,
            *args]  # fmt: skip


def requests(address: str, count: int, first: int = 1) -> None:
    """``count`` REQs on one session, each answered."""
    with connect(address, timeout=5) as sock:
        for seq in range(first, first + count):
            sock.sendall(b"REQ %d sig\n" % seq)
            [answer] = recv_lines(sock, 1, timeout=5)
            assert answer.split()[1] == b"%d" % seq, answer


def startup_state(pid: int, maps: bool = True) -> tuple[bool, bool, bool] | None:
    """``(SIGUSR2 ignored, SIGUSR2 caught, gevent loaded)`` for ``pid`` now, from /proc; None once it is gone.

    The signal masks are SigIgn/SigCgt of /proc/PID/status; "gevent loaded"
    is its first extension module (or greenlet's) in /proc/PID/maps.
    """
    masks = {}
    mapped = ""
    try:
        # maps first, then status: the proxy ignores SIGUSR2 before it loads
        # gevent, so a gevent seen in maps must be matched by SigIgn read after
        # it. Read the other way round, the proxy can do both between the two
        # reads, and the test would see gevent without the ignore (CI did).
        if maps:  # a long read once gevent is in: skipped then (``maps=False``)
            with open("/proc/%d/maps" % pid) as f:
                mapped = f.read()
        with open("/proc/%d/status" % pid) as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("SigIgn", "SigCgt"):
                    masks[key] = int(value, 16)
    except OSError:
        return None
    bit = 1 << (signal.SIGUSR2 - 1)
    loaded = maps and ("/gevent/" in mapped or "/greenlet/" in mapped)
    return bool(masks.get("SigIgn", 0) & bit), bool(masks.get("SigCgt", 0) & bit), loaded


@pytest.mark.parametrize("workers", [1, 2], ids=["single", "workers-2"])
def test_sigusr2_from_the_first_import_on_never_kills(procs, workers):
    """A SIGUSR2 every 2 ms to the whole process group, from the moment gevent starts loading until ready.

    Before any Python code of ours runs (the interpreter's own start-up, a
    few tens of ms) nothing can be done, so the storm starts at the first
    point that is visible from outside and comes after our first statement:
    gevent's first extension module mapped into the process. The handler
    used to come hundreds of ms after that, and the first signal killed it.
    The figures (ms after Popen) are printed.
    """
    server = procs.server()
    listen = tasks.local_address()
    port = tasks.split_address(listen)[1]
    proc = procs.command(proxy_command(server.address, listen, "-workers", str(workers)))
    started = time.monotonic()
    sent = 0
    seen: dict[str, float] = {}
    default_after_gevent: list[float] = []
    while sent < STORM_MAX and time.monotonic() - started < 60:
        state = startup_state(proc.pid, maps="gevent" not in seen)
        if state is None or not proc.alive():
            break
        now = round((time.monotonic() - started) * 1000, 1)
        for name, flag in zip(("ignored", "caught", "gevent"), state, strict=True):
            if flag:
                seen.setdefault(name, now)
        if "gevent" in seen and not (state[0] or state[1]):
            # SigIgn/SigCgt are read after the maps: once gevent is mapped, SIGUSR2 must be
            # ignored or caught, never at its default action (which kills).
            default_after_gevent.append(now)
        if "gevent" in seen:
            os.killpg(proc.pid, signal.SIGUSR2)
            sent += 1
            if sent % 10 == 0 and port_listening(port) and "listening on" in proc.stderr_text():
                break
            time.sleep(STORM_INTERVAL)
        else:
            time.sleep(0.0002)  # poll /proc closely until gevent loads
    print("SIGUSR2 storm: %d signals; ms after Popen: %s" % (sent, seen))
    assert proc.alive(), "killed by SIGUSR2 number %d (status %s)\n%s" % (sent, proc.returncode, proc.tail())
    assert sent and "listening on" in proc.stderr_text(), proc.tail()
    # Not "ignored seen before gevent": on a loaded machine this poller can sleep through the
    # whole window between the ignore and the real handler (CI saw gevent and the handler
    # first, never the ignore). The property is that no reading after gevent saw the default.
    assert not default_after_gevent, "SIGUSR2 at its default action after gevent loaded (ms %s): %s" % (
        default_after_gevent[:5],
        seen,
    )
    assert "ignored" in seen or "caught" in seen, seen
    requests(listen, 3)
    stats = read_stats(proc)  # the real handler answers with one JSON line
    assert stats["msg_req"] == 3, stats
    assert "Traceback" not in proc.stderr_text(), proc.tail()


def test_stdout_closed_sigusr2_is_logged_once_and_the_final_save_happens(procs, tmp_path):
    """``fooproxy ... >&-``: SIGUSR2 must not kill it (sys.stdout is None), the final save must happen."""
    server = procs.server()
    listen = tasks.local_address()
    path = tmp_path / "recovery.json"
    cmd = ["sh", "-c", 'exec "$@" >&-', "sh", *proxy_command(server.address, listen, recovery=str(path))]
    proc = Process(cmd, name="fooproxy", env=tasks.proxy_env(), log_dir=tmp_path,
                   ready_listen=tasks.split_address(listen)[1])  # fmt: skip
    procs.started.append(proc)
    proc.start()
    requests(listen, 4)
    for _ in range(3):
        proc.send_signal(signal.SIGUSR2)
    assert poll(lambda: "stdout is closed" in proc.stderr_text(), timeout=5), proc.tail()
    requests(listen, 2, first=5)  # still serving
    assert proc.alive(), proc.tail()
    assert proc.stderr_text().count("stdout is closed") == 1, proc.tail()
    assert proc.stop() == 0, proc.tail()
    saved = json.loads(path.read_text())
    assert saved["totals"]["msg_req"] == 6, saved
    assert "Traceback" not in proc.stderr_text(), proc.tail()


@pytest.mark.parametrize("workers", [1, 2], ids=["single", "workers-2"])
def test_sigusr1_and_sighup_are_logged_and_cost_nothing(procs, tmp_path, workers):
    """SIGUSR1 and SIGHUP to the process group (master and workers): a log line each, no exit, counts kept."""
    server = procs.server()
    path = tmp_path / "recovery.json"
    proxy = procs.proxy(server.address, "-workers", str(workers), recovery_path=str(path))
    if workers > 1:
        proxy.wait_for_output("listening on", timeout=30, stream="stderr")
    requests(proxy.address, 5)
    os.killpg(proxy.pid, signal.SIGUSR1)
    assert poll(lambda: proxy.stderr_text().count("SIGUSR1 ignored") >= workers + (workers > 1), timeout=5), (
        proxy.tail()
    )
    os.killpg(proxy.pid, signal.SIGHUP)
    assert poll(lambda: proxy.stderr_text().count("SIGHUP") >= workers + (workers > 1), timeout=5), proxy.tail()
    requests(proxy.address, 3, first=6)
    assert proxy.alive(), proxy.tail()
    stats = read_stats(proxy)
    assert stats["msg_req"] == 8 and stats["msg_ack"] + stats["msg_nak"] == 8, stats
    if workers > 1:  # no worker died (a replaced worker is logged)
        assert "replacing it" not in proxy.stderr_text(), proxy.tail()
    assert proxy.stop() == 0, proxy.tail()
    saved = json.loads(path.read_text())
    assert saved["totals"]["msg_req"] == 8, saved
    assert "Traceback" not in proxy.stderr_text(), proxy.tail()
