"""Real processes for the fault tests: a registry that stops them all and shows their output on failure.

Not a conftest (other fault modules bring their own fixtures): a module
defines its fixture as ``yield from running.processes(tmp_path)``.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from typing import Any

from harness import tasks
from harness.binaries import find_peers
from harness.processes import Process


class Running:
    """Processes started for one test; ``close()`` stops every one of them (by process group)."""

    def __init__(self, log_dir) -> None:
        self.log_dir = log_dir
        self.started: list[Process] = []

    def server(self) -> tasks.Service:
        """A Foo server (the reference one when ``$FOO_BIN_DIR`` has it) on a free port."""
        return self._add(tasks.start_server(peers=find_peers(), log_dir=self.log_dir))

    def proxy(self, forward: str, *args: str, **kwargs: Any) -> tasks.Service:
        """``fooproxy`` forwarding to ``forward``, started and ready ("listening on")."""
        return self._add(tasks.start_proxy(forward, extra_args=args, log_dir=self.log_dir, **kwargs))

    def command(self, cmd: list[str], name: str = "fooproxy") -> Process:
        """Any command, started without a readiness check."""
        return self._add(Process(cmd, name=name, env=tasks.proxy_env(), log_dir=self.log_dir).start())

    def _add(self, proc: Process) -> Process:
        self.started.append(proc)
        return proc

    def tails(self) -> str:
        return "\n".join(p.tail(30) for p in self.started)

    def close(self) -> None:
        for proc in reversed(self.started):
            proc.close()


def processes(tmp_path) -> Iterator[Running]:
    """The body of a ``procs`` fixture: every process is stopped after the test (output shown on failure)."""
    registry = Running(tmp_path)
    try:
        yield registry
    finally:
        tails = registry.tails()
        registry.close()
        print("\n=== output of the test's processes ===\n" + tails)


def http_get(address: str, path: str, timeout: float = 5.0) -> tuple[int, dict[str, Any] | str]:
    """GET ``path`` from ``host:port``: ``(status, parsed JSON or text)``."""
    try:
        with urllib.request.urlopen("http://%s%s" % (address, path), timeout=timeout) as resp:
            status, body = resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        status, body = exc.code, exc.read()
    text = body.decode("utf-8", "replace")
    try:
        return status, json.loads(text)
    except ValueError:
        return status, text


def poll(condition: Callable[[], bool], timeout: float = 10.0, interval: float = 0.05) -> bool:
    """True as soon as ``condition()`` is, False after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        if condition():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)
