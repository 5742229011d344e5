"""Out of file descriptors: the real ``fooproxy`` under a low ``ulimit -n`` and a crowd of clients.

At the limit, accept() fails with EMFILE. gevent's default printed a full
traceback for every attempt (276 of them for 400 clients at a limit of 256).
The proxy must say it once per period with a count, keep the clients it has,
and accept again as soon as descriptors free up.
"""

from __future__ import annotations

import re
import socket
from collections.abc import Iterator

import pytest

from harness import tasks
from harness.binaries import fooproxy_command
from harness.processes import Process
from tests.faults import running
from tests.faults.running import poll
from tests.helpers import connect, recv_lines, split_address

pytestmark = pytest.mark.e2e
FD_LIMIT = 64
CLIENTS = 200


@pytest.fixture
def procs(tmp_path) -> Iterator[running.Running]:
    yield from running.processes(tmp_path)


def test_emfile_on_accept_is_said_once_with_a_count_and_accepting_resumes(procs, tmp_path):
    server = procs.server()
    listen = tasks.local_address()
    cmd = [*fooproxy_command(), "-listen", listen, "-forward", server.address, "-http", "off", "-recovery-path", "off"]
    # The shell's ulimit sets soft and hard limits, so the proxy cannot raise it back.
    proxy = Process(["sh", "-c", 'ulimit -n %d && exec "$@"' % FD_LIMIT, "sh", *cmd], name="fooproxy",
                    env=tasks.proxy_env(), log_dir=tmp_path, ready_listen=split_address(listen)[1])  # fmt: skip
    procs.started.append(proxy)
    proxy.start()
    clients: list[socket.socket] = []
    try:
        for i in range(CLIENTS):  # the kernel completes each handshake; the proxy accepts what it can
            sock = connect(listen, timeout=10)
            sock.sendall(b"REQ %d crowd\n" % i)
            clients.append(sock)
        assert poll(lambda: "EMFILE" in proxy.stderr_text() or "Too many open files" in proxy.stderr_text(), 10), (
            proxy.tail()
        )
        # Still out of descriptors 10 s later (the warning period): one more line, with the count.
        assert poll(lambda: re.search(r"Too many open files.*\(and \d+ more times\)", proxy.stderr_text()), 15), (
            proxy.tail()
        )
        served = 0
        for sock in clients[:10]:  # the first ones were accepted before the limit: served
            served += len(recv_lines(sock, 1, timeout=5))
        assert served == 10
        assert proxy.alive(), proxy.tail()
    finally:
        for sock in clients:
            sock.close()
    # Descriptors free again: a new client is served, and so are the ones left in the backlog.
    with connect(listen, timeout=10) as sock:
        sock.sendall(b"REQ 1 after\n")
        [answer] = recv_lines(sock, 1, timeout=10)
    assert answer.split()[:2] in ([b"ACK", b"1"], [b"NAK", b"1"]), answer
    err = proxy.stderr_text()
    assert "Traceback" not in err, proxy.tail(60)
    lines = [line for line in err.splitlines() if "Too many open files" in line or "EMFILE" in line]
    assert 1 <= len(lines) <= 5, "\n".join(lines)
    print("\n".join(lines))
    assert proxy.stop() == 0, proxy.tail()


def test_the_repeat_lines_carry_a_count():
    """RepeatFilter's text, which the EMFILE lines reuse (a unit check beside the process test)."""
    import logging

    from fooproxy.ratelimit import RepeatFilter

    records: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record.getMessage())

    logger = logging.getLogger("test.repeat")
    logger.addHandler(Collect())
    logger.propagate = False
    repeats = RepeatFilter(logger, period=0.0)
    repeats.warn("k", "first")
    repeats.period = 60.0
    for _ in range(3):
        repeats.warn("k", "again")
    repeats.period = 0.0
    repeats.warn("k", "later")
    assert records == ["first", "later (and 3 more times)"], records
    assert re.search(r"\(and \d+ more times\)", records[-1])
