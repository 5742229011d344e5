"""``deploy/systemd/fooproxy.service`` and sd_notify readiness, with real processes and a real socket.

``systemd-analyze verify`` checks the unit (skipped, saying why, where it is
not installed). The notify tests play systemd's part: they bind the AF_UNIX
datagram socket themselves, start the real ``fooproxy`` with
``NOTIFY_SOCKET`` pointing at it, and check what arrives and when.
"""

from __future__ import annotations

import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from harness import tasks
from harness.binaries import fooproxy_command
from harness.processes import Process, port_accepts
from tests.faults import running

pytestmark = pytest.mark.e2e

UNIT = Path(__file__).resolve().parents[2] / "deploy" / "systemd" / "fooproxy.service"
GRACE_DEFAULT = 10.0  # Config.grace
STOP_MARGIN = 5.0  # supervisor.STOP_MARGIN: the master waits -grace + this for its workers


@pytest.fixture
def procs(tmp_path):
    yield from running.processes(tmp_path)


def unit_settings(text: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            out.setdefault(key.strip(), []).append(value.strip())
    return out


def verify(unit_text: str, tmp_path: Path) -> subprocess.CompletedProcess:
    """``systemd-analyze verify`` on a copy of the unit (the name must stay ``fooproxy.service``)."""
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed (Debian: apt-get install systemd)")
    directory = tmp_path / "unit"
    directory.mkdir(exist_ok=True)
    path = directory / "fooproxy.service"
    path.write_text(unit_text)
    return subprocess.run([analyze, "verify", str(path)], capture_output=True, text=True, timeout=60)


def installed_unit() -> str:
    """The unit with ExecStart pointing at this checkout's fooproxy (verify needs the binary to exist)."""
    binary = shutil.which(fooproxy_command()[0]) or fooproxy_command()[0]
    if not Path(binary).is_file():
        pytest.skip("no installed fooproxy console script to point ExecStart at (run make install)")
    return UNIT.read_text().replace("/opt/fooproxy/bin/fooproxy", binary)


def test_unit_verifies_and_has_the_promised_settings(tmp_path):
    text = installed_unit()
    result = verify(text, tmp_path)
    # verify exits 0 on an unknown value ("ignoring"): any complaint at all fails the test.
    assert result.returncode == 0 and not (result.stdout + result.stderr).strip(), result.stdout + result.stderr
    # The check can fail: a typo in the same unit is reported.
    broken = verify(text.replace("Type=notify", "Type=notfy"), tmp_path)
    assert "notfy" in broken.stdout + broken.stderr
    s = unit_settings(UNIT.read_text())
    assert s["Type"] == ["notify"]
    assert s["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert s["KillMode"] == ["mixed"]  # SIGTERM to the master only: it drains its workers
    assert float(s["TimeoutStopSec"][0]) > GRACE_DEFAULT + STOP_MARGIN
    state = s["StateDirectory"][0]
    recovery = re.search(r"-recovery-path (\S+)", s["ExecStart"][0]).group(1)
    assert recovery.startswith("/var/lib/%s/" % state), recovery
    for key, value in (("NoNewPrivileges", "yes"), ("ProtectSystem", "strict"), ("DynamicUser", "yes")):
        assert s[key] == [value], key


class NotifySocket:
    """The service manager's end: an AF_UNIX datagram socket; records (time, message)."""

    def __init__(self, address: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(("\0" + address[1:]) if address.startswith("@") else address)
        self.address = address

    def next(self, timeout: float = 60.0) -> str:
        self.sock.settimeout(timeout)
        return self.sock.recv(4096).decode()

    def close(self) -> None:
        self.sock.close()


def start_notified(procs, notify: NotifySocket, server: tasks.Service, *args: str) -> tuple[Process, str]:
    listen = tasks.local_address()
    env = tasks.proxy_env({"NOTIFY_SOCKET": notify.address})
    cmd = [*fooproxy_command(), "-listen", listen, "-forward", server.address, "-http", "off",
           "-recovery-path", "off", *args]  # fmt: skip
    proc = procs._add(Process(cmd, name="fooproxy", env=env, log_dir=procs.log_dir).start())
    return proc, listen


@pytest.mark.parametrize("workers", ["1", "2"])
def test_ready_only_once_the_port_accepts_then_reloading_and_stopping(procs, tmp_path, workers):
    server = procs.server()
    notify = NotifySocket(str(tmp_path / "notify.sock"))
    try:
        proc, listen = start_notified(procs, notify, server, "-workers", workers)
        first = notify.next()
        # The moment READY=1 arrives, the port already accepts (and the log says so).
        assert port_accepts(*tasks.split_address(listen), timeout=2), first
        assert first.splitlines()[0] == "READY=1" and "MAINPID=%d" % proc.pid in first, first
        assert "listening on" in proc.stderr_text()
        proc.send_signal(signal.SIGHUP)
        assert notify.next(30).startswith("RELOADING=1")
        assert notify.next(60) == "READY=1"
        proc.send_signal(signal.SIGTERM)
        assert notify.next(30) == "STOPPING=1"
        assert proc.wait(30) == 0
    finally:
        notify.close()


def test_abstract_notify_socket(procs):
    server = procs.server()
    notify = NotifySocket("@fooproxy-test-%d-%d" % (time.monotonic_ns(), id(procs)))
    try:
        proc, listen = start_notified(procs, notify, server)
        assert notify.next().startswith("READY=1")
        assert port_accepts(*tasks.split_address(listen), timeout=2)
    finally:
        notify.close()


def test_a_notify_socket_nobody_listens_on_changes_nothing(procs, tmp_path):
    server = procs.server()
    notify = NotifySocket(str(tmp_path / "gone.sock"))
    notify.close()  # the path stays, nobody reads it: every send fails
    proc, listen = start_notified(procs, notify, server)
    proc.wait_for_output("listening on", 30)
    assert port_accepts(*tasks.split_address(listen), timeout=2)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0
    assert "Traceback" not in proc.stderr_text()
