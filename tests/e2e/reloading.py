"""Tools of the reload tests: a config file the test rewrites, a client loop that checks every answer.

``ClientLoop`` is what an operator's users do during a reload: connect,
send a few requests, read every answer, close, again, until told to stop.
It counts connection attempts, refused connects, sessions cut short and
wrong answers (checked against the reference server's answer rule).
"""

from __future__ import annotations

import re
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from harness import tasks
from harness.peers.answer import answer
from harness.processes import Process

LINES_PER_SESSION = 4


def write_config(path: Path, **settings: object) -> None:
    """Write a TOML settings file (atomically: a reload never reads half a file)."""
    lines = []
    for key, value in settings.items():
        key = key.replace("_", "-")
        lines.append("%s = %s" % (key, _toml(value)))
    tmp = path.with_suffix(".tmp")
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(path)


def _toml(value: object) -> str:
    if isinstance(value, str):
        return '"%s"' % value
    if isinstance(value, list | tuple):  # forward = ["a:1", "b:2"]
        return "[%s]" % ", ".join(_toml(v) for v in value)
    return str(value)


def sessions_after(loops: list[ClientLoop], more: int):
    """A condition: every loop has finished ``more`` sessions beyond what it has now."""
    marks = [(loop, loop.counts.sessions + more) for loop in loops]
    return lambda: all(loop.counts.sessions >= mark for loop, mark in marks)


def reload_lines(proc: Process) -> list[str]:
    """The proxy's reload log lines so far (applied and rejected)."""
    return re.findall(r"^.*reload(?: rejected|:).*$", proc.stderr_text(), re.M)


def sighup_and_wait(proc: Process, timeout: float = 20.0) -> str:
    """SIGHUP the proxy and wait for the reload line that answers it."""
    before = len(reload_lines(proc))
    proc.send_signal(__import__("signal").SIGHUP)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        lines = reload_lines(proc)
        if len(lines) > before:
            return lines[before]
        assert proc.alive(), proc.tail(30)
        time.sleep(0.02)
    raise AssertionError("no reload line within %gs\n%s" % (timeout, proc.tail(30)))


@dataclass
class LoopCounts:
    attempted: int = 0
    refused: int = 0
    wrong: int = 0
    sessions: int = 0
    requests: int = 0
    errors: list[str] = field(default_factory=list)
    cut_started: list[float] = field(default_factory=list)  # time.monotonic() when each cut session connected

    @property
    def cut(self) -> int:
        """Sessions cut short (connected, then closed or reset before every answer)."""
        return len(self.cut_started)


class ClientLoop(threading.Thread):
    """Sessions one after another against ``address`` until ``stop()`` (bounded by ``max_seconds``)."""

    def __init__(self, address: str, name: str, max_seconds: float = 180.0) -> None:
        super().__init__(name=name, daemon=True)
        self.address = tasks.split_address(address)
        self.counts = LoopCounts()
        self.max_seconds = max_seconds
        self._halt = threading.Event()
        self.tag = name.encode()

    def stop(self) -> LoopCounts:
        self._halt.set()
        self.join(30)
        assert not self.is_alive()
        return self.counts

    def run(self) -> None:
        deadline = time.monotonic() + self.max_seconds
        seq = 0
        while not self._halt.is_set() and time.monotonic() < deadline:
            c = self.counts
            c.attempted += 1
            started = time.monotonic()
            try:
                sock = socket.create_connection(self.address, timeout=10)
            except OSError as exc:
                c.refused += 1
                c.errors.append("connect: %s" % exc)
                continue
            with sock:
                sent = []
                for _ in range(LINES_PER_SESSION):
                    seq += 1
                    data = b"%sx%d" % (self.tag, seq)
                    sent.append((seq, data))
                try:
                    sock.sendall(b"".join(b"REQ %d %s\n" % item for item in sent))
                    reader = sock.makefile("rb")
                    got = [reader.readline() for _ in sent]
                except OSError as exc:
                    c.cut_started.append(started)
                    c.errors.append("session: %s (connected at %.6f)" % (exc, started))
                    continue
                if any(not line.endswith(b"\n") for line in got):
                    c.cut_started.append(started)
                    answers = sum(line.endswith(b"\n") for line in got)
                    c.errors.append("session cut after %d answers (connected at %.6f)" % (answers, started))
                    continue
                want = [answer(b"REQ", s, d) for s, d in sent]
                if got != want:
                    c.wrong += 1
                    c.errors.append("wrong answers %r, want %r" % (got, want))
                    continue
                c.sessions += 1
                c.requests += len(sent)
