"""End-to-end fixtures: the installed ``fooproxy`` and the Foo peers as real processes.

The peers are the reference binaries when ``$FOO_BIN_DIR`` (default ``bin/``)
holds ``server-linux`` and ``client-linux``, else the Python peers; the header
of the pytest run says which. Every process gets a free port, writes its output
to files under the test's ``tmp_path`` and is stopped (by its process group) at
teardown; a failing test prints the tail of each process's output.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator

import pytest

from harness import tasks
from harness.binaries import Peers, find_peers, python_peers, reference_client, reference_server
from harness.processes import Process

#: What gevent's monitor thread writes when the hub did not switch for too long.
BLOCKED = "appears to be blocked"
#: Set to make a blocked-hub report fail the test instead of warning.
STRICT_MONITOR_ENV = "FOO_E2E_STRICT_MONITOR"


def pytest_report_header(config: pytest.Config) -> str:
    return find_peers().describe()


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    # The header hook runs only when tests/e2e is given on the command line; this always does.
    terminalreporter.write_line("e2e " + find_peers().describe())


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    report = yield
    setattr(item, "rep_" + report.when, report)
    return report


@pytest.fixture(scope="session")
def peers() -> Peers:
    """The peers the suite runs against (reference when present)."""
    return find_peers()


@pytest.fixture(scope="session")
def py_peers() -> Peers:
    """The bundled Python peers (for their extra flags such as ``-lie``)."""
    return python_peers()


@pytest.fixture(scope="session")
def ref_server() -> tuple[str, ...]:
    """The reference server command, or skip."""
    cmd = reference_server()
    if cmd is None:
        pytest.skip("no executable server-linux in FOO_BIN_DIR (default bin/): reference interop not tested")
    return cmd


@pytest.fixture(scope="session")
def ref_client() -> tuple[str, ...]:
    """The reference client command, or skip."""
    cmd = reference_client()
    if cmd is None:
        pytest.skip("no executable client-linux in FOO_BIN_DIR (default bin/): reference interop not tested")
    return cmd


class Procs:
    """Processes started for one test: all closed at teardown, their output shown on failure."""

    def __init__(self, log_dir) -> None:
        self.log_dir = log_dir
        self.started: list[Process] = []
        self.allow_tracebacks = False

    def add(self, proc: Process) -> Process:
        self.started.append(proc)
        return proc

    def server(self, peers: Peers, *args: str, listen: str | None = None, name: str = "server") -> tasks.Service:
        """Start a Foo server on a free port (or ``listen``)."""
        return self.add(tasks.start_server(listen, peers=peers, args=args, name=name, log_dir=self.log_dir))

    def proxy(self, forward: str, *args: str, listen: str | None = None, **kwargs) -> tasks.Service:
        """Start fooproxy forwarding to ``forward``."""
        return self.add(tasks.start_proxy(forward, listen, args, log_dir=self.log_dir, **kwargs))

    def tails(self) -> str:
        return "\n".join(p.tail(40) for p in self.started)


@pytest.fixture
def procs(request: pytest.FixtureRequest, tmp_path) -> Iterator[Procs]:
    """Start processes through this; they are stopped after the test whatever happens.

    A module that sets ``CHECK_TRACEBACKS = True`` also fails a test whose
    fooproxy printed a traceback (unless the test sets ``procs.allow_tracebacks``).
    """
    registry = Procs(tmp_path)
    try:
        yield registry
    finally:
        for proc in reversed(registry.started):
            proc.close()
        report = getattr(request.node, "rep_call", None)
        if report is not None and report.failed:
            print("\n=== output of the test's processes ===\n" + registry.tails())
    if getattr(request.module, "CHECK_TRACEBACKS", False) and not registry.allow_tracebacks:
        noisy = [p for p in registry.started if p.name == "fooproxy" and "Traceback" in p.stderr_text()]
        if noisy:
            pytest.fail("fooproxy printed a traceback\n" + "\n".join(p.tail(60) for p in noisy))
    for proc in registry.started:
        report = blocking_report(proc)
        if report:
            message = "gevent monitor: %s's hub did not switch for too long"
            message += " (CPU starvation on a busy host can cause this too)\n%s"
            if os.environ.get(STRICT_MONITOR_ENV):
                pytest.fail(message % (proc.name, report))
            warnings.warn(message % (proc.name, report), HubBlockedWarning, stacklevel=1)


class HubBlockedWarning(UserWarning):
    """fooproxy's gevent monitor thread reported a blocked hub."""


def blocking_report(proc: Process, lines: int = 40) -> str:
    """The first gevent monitor report in ``proc``'s stderr ("" if none), for the warning."""
    text = proc.stderr_text()
    at = text.find(BLOCKED)
    if at < 0:
        return ""
    start = text.rfind("=" * 20, 0, at)
    start = text.rfind("\n", 0, start) + 1 if start >= 0 else at
    report = text[start:].splitlines()[:lines]
    return "\n".join(report) + "\n(%d report(s) in all)" % text.count(BLOCKED)


@pytest.fixture
def server(procs: Procs, peers: Peers) -> tasks.Service:
    """A Foo server of the suite's kind on a free port."""
    return procs.server(peers)


@pytest.fixture
def proxy(procs: Procs, server: tasks.Service) -> tasks.Service:
    """fooproxy in front of ``server`` (HTTP and recovery off)."""
    return procs.proxy(server.address)
