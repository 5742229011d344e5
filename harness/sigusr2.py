"""Ask a running fooproxy for its stats: SIGUSR2, then read the next JSON line of its stdout."""

from __future__ import annotations

import json
import signal
import time
from typing import Any

from harness.processes import POLL, Process, ProcessError

#: The fields foo-protocol.md requires in every stats line.
REQUIRED_FIELDS = (
    "msg_total",
    "msg_req",
    "msg_ack",
    "msg_nak",
    "request_rate_1s",
    "request_rate_10s",
    "response_rate_1s",
    "response_rate_10s",
)


class StatsError(ProcessError):
    """No stats line arrived in time, or it was not a JSON object."""


def complete_lines_end(data: bytes, start: int = 0) -> int:
    """The offset just past the last ``\\n`` in ``data`` at or after ``start`` (``start`` if none)."""
    end = data.rfind(b"\n", start)
    return start if end < 0 else end + 1


def next_line(proc: Process, timeout: float = 5.0) -> bytes:
    """Wait for the next complete line after ``proc.stdout_offset`` on its stdout file; advance the offset."""
    deadline = time.monotonic() + timeout
    while True:
        with open(proc.stdout_path, "rb") as f:
            f.seek(proc.stdout_offset)
            data = f.read()
        end = data.find(b"\n")
        if end >= 0:
            proc.stdout_offset += end + 1
            return data[:end]
        if not proc.alive():
            raise StatsError(
                "%s exited (status %s) without printing a line\n%s" % (proc.name, proc.returncode, proc.tail())
            )
        if time.monotonic() >= deadline:
            raise StatsError("%s printed no line on stdout within %gs\n%s" % (proc.name, timeout, proc.tail()))
        time.sleep(POLL)


def skip_to_end(proc: Process) -> None:
    """Move ``proc.stdout_offset`` past every complete line already written."""
    with open(proc.stdout_path, "rb") as f:
        f.seek(proc.stdout_offset)
        data = f.read()
    proc.stdout_offset += complete_lines_end(data)


def parse_stats(line: bytes | str, where: str = "stats") -> dict[str, Any]:
    """Parse one stats line; ``StatsError`` unless it is a JSON object with the required fields."""
    try:
        value = json.loads(line)
    except ValueError as exc:
        raise StatsError("%s: not JSON (%s): %r" % (where, exc, line[:200])) from None
    if not isinstance(value, dict):
        raise StatsError("%s: not a JSON object: %r" % (where, line[:200]))
    missing = [f for f in REQUIRED_FIELDS if f not in value]
    if missing:
        raise StatsError("%s: missing field(s) %s: %r" % (where, ", ".join(missing), line[:200]))
    return value


def read_stats(proc: Process, timeout: float = 5.0) -> dict[str, Any]:
    """Send SIGUSR2 to ``proc`` and return the parsed JSON of the next new line on its stdout.

    Lines already on stdout before the signal are skipped (a late answer to an
    earlier signal that lands after this point is taken as this one's answer:
    both are current stats).
    """
    skip_to_end(proc)
    proc.send_signal(signal.SIGUSR2)
    return parse_stats(next_line(proc, timeout), proc.name)


def read_stats_when_idle(proc: Process, timeout: float = 10.0, interval: float = 0.05) -> dict[str, Any]:
    """``read_stats`` until no client session is open (``connections_active`` 0); the last read at the deadline.

    After its clients closed, a proxy still ends their sessions (the upstream
    side, the accounting): polling for that replaces a guessed sleep. The
    caller checks the result; at the deadline it gets what was there.
    """
    deadline = time.monotonic() + timeout
    while True:
        stats = read_stats(proc, timeout=max(0.5, deadline - time.monotonic()))
        if stats.get("connections_active", 0) == 0 or time.monotonic() >= deadline:
            return stats
        time.sleep(interval)
