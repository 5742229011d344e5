"""Child processes for tests and demos: own process group, output to files, readiness, stop.

``Process`` starts a command in its own session (so its process group id is its
PID), sends stdout and stderr to files in a temporary directory (never to a
pipe nobody reads), waits until a TCP port listens (seen in the kernel's
socket table, no connection), accepts, or a regex shows up in its output,
and on ``stop()`` (always run by ``__exit__``) sends SIGTERM to that group,
waits, and falls back to SIGKILL. ``tail()`` gives the captured output for
assertion messages.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

#: Keep the captured output files after a Process is closed.
KEEP_LOGS_ENV = "FOO_HARNESS_KEEP_LOGS"
POLL = 0.005  # seconds between readiness / output polls


class ProcessError(RuntimeError):
    """A child did not become ready, or exited when it should not have."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` right now (bound once with port 0, then released)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def port_accepts(host: str, port: int, timeout: float = 0.2) -> bool:
    """True if a TCP connect to ``host:port`` succeeds now."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def wait_for_port(host: str, port: int, timeout: float = 10.0, alive=None) -> None:
    """Poll-connect until ``host:port`` accepts; ``ProcessError`` at the deadline.

    ``alive`` (optional callable) is checked between attempts: when it returns
    False the wait ends at once with a ``ProcessError``.
    """
    deadline = time.monotonic() + timeout
    while True:
        if port_accepts(host, port):
            return
        if alive is not None and not alive():
            raise ProcessError("exited before %s:%d accepted connections" % (host, port))
        if time.monotonic() >= deadline:
            raise ProcessError("%s:%d did not accept connections within %gs" % (host, port, timeout))
        time.sleep(POLL * 4)


#: ``st`` of a socket in TCP LISTEN state in /proc/net/tcp and tcp6.
_TCP_LISTEN = "0A"
_TCP_TABLES = ("/proc/net/tcp", "/proc/net/tcp6")


def port_listening(port: int) -> bool:
    """True if a socket is in TCP LISTEN state on ``port`` (any address, IPv4 or IPv6).

    Read from the kernel's socket tables, not by connecting: the listener sees
    nothing, so a proxy counts no connection and a server logs none.
    """
    suffix = ":%04X" % port
    found_table = False
    for table in _TCP_TABLES:
        try:
            with open(table) as f:
                found_table = True
                next(f, None)  # header
                for line in f:
                    fields = line.split(None, 4)
                    if len(fields) > 3 and fields[3] == _TCP_LISTEN and fields[1].endswith(suffix):
                        return True
        except FileNotFoundError:
            continue
    if not found_table:
        raise ProcessError("no %s: telling a listening port without connecting needs Linux" % _TCP_TABLES[0])
    return False


def wait_for_listen(port: int, timeout: float = 10.0, alive=None) -> None:
    """Poll the kernel's socket tables until ``port`` listens; ``ProcessError`` at the deadline.

    ``alive`` (optional callable) is checked between polls: when it returns
    False the wait ends at once with a ``ProcessError``.
    """
    deadline = time.monotonic() + timeout
    while True:
        if alive is not None and not alive():
            raise ProcessError("exited before port %d listened" % port)
        if port_listening(port):
            return
        if time.monotonic() >= deadline:
            raise ProcessError("port %d did not listen within %gs" % (port, timeout))
        time.sleep(POLL * 2)


class Process:
    """One child process in its own process group; a context manager.

    ``ready_listen`` (a port that must be in LISTEN state), ``ready_port``
    (``(host, port)`` that must accept a connection) and/or ``ready_regex``
    (searched in the captured ``ready_stream``: ``"stderr"``, ``"stdout"`` or
    ``"any"``) decide when ``start()`` returns. Output goes to ``stdout_path`` / ``stderr_path``
    under ``log_dir`` (a new temporary directory unless given; a temporary one
    is removed by ``close()`` unless ``$FOO_HARNESS_KEEP_LOGS`` is set).
    """

    def __init__(
        self,
        cmd: Sequence[str],
        *,
        name: str | None = None,
        env: Mapping[str, str] | None = None,
        cwd: str | os.PathLike | None = None,
        ready_listen: int | None = None,
        ready_port: tuple[str, int] | None = None,
        ready_regex: str | None = None,
        ready_stream: str = "stderr",
        ready_timeout: float = 10.0,
        log_dir: str | os.PathLike | None = None,
    ) -> None:
        self.cmd = [str(c) for c in cmd]
        self.name = name or Path(self.cmd[0]).name
        self.env = None if env is None else dict(env)
        self.cwd = cwd
        self.ready_listen = ready_listen
        self.ready_port = ready_port
        self.ready_regex = re.compile(ready_regex) if ready_regex else None
        if ready_stream not in ("stderr", "stdout", "any"):
            raise ValueError("ready_stream must be stderr, stdout or any")
        self.ready_stream = ready_stream
        self.ready_timeout = ready_timeout
        self._own_dir = log_dir is None
        self.log_dir = Path(tempfile.mkdtemp(prefix="foo-%s-" % self.name) if log_dir is None else log_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        stem = "%s-%d" % (self.name, time.monotonic_ns())
        self.stdout_path = self.log_dir / (stem + ".out")
        self.stderr_path = self.log_dir / (stem + ".err")
        self.popen: subprocess.Popen | None = None
        self.stdout_offset = 0  # harness.sigusr2 reads stdout lines from here on
        self.ready_match: re.Match | None = None

    # -- lifecycle --------------------------------------------------------
    def start(self) -> Process:
        """Start the command and wait until it is ready; on failure stop it and raise ``ProcessError``."""
        if self.popen is not None:
            raise ProcessError("%s already started" % self.name)
        with open(self.stdout_path, "wb") as out, open(self.stderr_path, "wb") as err:
            self.popen = subprocess.Popen(
                self.cmd,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                env=self.env,
                cwd=self.cwd,
                start_new_session=True,
            )
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def wait_ready(self, timeout: float | None = None) -> None:
        """Wait for ``ready_regex``, ``ready_listen`` and ``ready_port`` (those given).

        ``ProcessError`` (with the output) if not in time.
        """
        timeout = self.ready_timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        try:
            if self.ready_regex is not None:
                self.ready_match = self.wait_for_output(
                    self.ready_regex, deadline - time.monotonic(), self.ready_stream
                )
            if self.ready_listen is not None:
                wait_for_listen(self.ready_listen, timeout=max(0.0, deadline - time.monotonic()), alive=self.alive)
            if self.ready_port is not None:
                wait_for_port(*self.ready_port, timeout=max(0.0, deadline - time.monotonic()), alive=self.alive)
        except ProcessError as exc:
            raise ProcessError("%s: %s\n%s" % (self.name, exc, self.tail())) from None

    def wait_for_output(self, pattern: str | re.Pattern, timeout: float = 10.0, stream: str = "any") -> re.Match:
        """Wait until ``pattern`` matches the captured ``stream`` output; return the match."""
        regex = re.compile(pattern) if isinstance(pattern, str) else pattern
        if stream not in ("stderr", "stdout", "any"):
            raise ValueError("stream must be stderr, stdout or any")
        deadline = time.monotonic() + timeout
        while True:
            exited = not self.alive()  # checked first: output written before the exit is read below
            for name in ("stderr", "stdout"):
                if stream in (name, "any"):
                    match = regex.search(self.stderr_text() if name == "stderr" else self.stdout_text())
                    if match:
                        return match
            if exited:
                raise ProcessError("exited (status %s) before %r appeared" % (self.returncode, regex.pattern))
            if time.monotonic() >= deadline:
                raise ProcessError("%r did not appear within %gs" % (regex.pattern, timeout))
            time.sleep(POLL)

    def stop(self, timeout: float = 10.0, sig: int = signal.SIGTERM) -> int | None:
        """Signal the whole process group (``sig``, then SIGKILL after ``timeout``); return the exit status.

        The leader is reaped last: while it is a zombie its PID, which is the
        group id, cannot be reused, so the final SIGKILL to the group (for
        anything the leader left behind) reaches only what it started. Safe to
        call more than once.
        """
        if self.popen is None:
            return None
        if self.popen.returncode is not None:  # already reaped
            return self.popen.returncode
        pid = self.popen.pid
        try:
            if self._peek() is None:
                _killpg(pid, sig)
                if not self._wait_exit(timeout):
                    _killpg(pid, signal.SIGKILL)
                    self._wait_exit(10.0)
        finally:
            if self._peek() is not None:
                _killpg(pid, signal.SIGKILL)  # stragglers; the zombie leader still holds the group id
                self.popen.wait()
        return self.popen.returncode

    def close(self) -> None:
        """``stop()``, then remove the temporary log directory (unless kept)."""
        try:
            self.stop()
        finally:
            if self._own_dir and not os.environ.get(KEEP_LOGS_ENV):
                shutil.rmtree(self.log_dir, ignore_errors=True)

    def __enter__(self) -> Process:
        if self.popen is None:
            self.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    # -- state ------------------------------------------------------------
    @property
    def pid(self) -> int:
        """The child's PID (also its process group id)."""
        if self.popen is None:
            raise ProcessError("%s not started" % self.name)
        return self.popen.pid

    @property
    def returncode(self) -> int | None:
        """Exit status once exited (negative: killed by that signal), else ``None``."""
        return None if self.popen is None else self._peek()

    def alive(self) -> bool:
        """True while the child runs."""
        return self.popen is not None and self._peek() is None

    def send_signal(self, sig: int) -> None:
        """Send ``sig`` to the child only (not its group)."""
        if self._peek() is None:
            os.kill(self.pid, sig)

    def wait(self, timeout: float | None = None) -> int:
        """Wait for the child to exit and return its status; ``subprocess.TimeoutExpired`` after ``timeout``.

        The child is not reaped here (``stop()`` does that), so its group id stays valid.
        """
        if self.popen is None:
            raise ProcessError("%s not started" % self.name)
        if not self._wait_exit(timeout):
            raise subprocess.TimeoutExpired(self.cmd, timeout or 0)
        code = self._peek()
        assert code is not None
        return code

    def _wait_exit(self, timeout: float | None) -> bool:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self._peek() is None:
            if deadline is not None and time.monotonic() >= deadline:
                return False
            time.sleep(POLL)
        return True

    def _peek(self) -> int | None:
        """The exit status without reaping the child (``waitid`` with ``WNOWAIT``), or ``None`` if running."""
        assert self.popen is not None
        if self.popen.returncode is not None:
            return self.popen.returncode
        try:
            info = os.waitid(os.P_PID, self.popen.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:  # reaped elsewhere (e.g. a SIGCHLD handler)
            return self.popen.poll()
        if info is None:
            return None
        return info.si_status if info.si_code == os.CLD_EXITED else -info.si_status

    # -- output -----------------------------------------------------------
    def stdout_text(self) -> str:
        """Everything captured on stdout so far."""
        return _read(self.stdout_path)

    def stderr_text(self) -> str:
        """Everything captured on stderr so far."""
        return _read(self.stderr_path)

    def tail(self, lines: int = 20) -> str:
        """The last ``lines`` lines of stdout and stderr, labelled, for failure messages."""
        parts = [
            "--- %s (pid %s, %s) %s"
            % (self.name, self.popen.pid if self.popen else "-", self._status(), " ".join(self.cmd))
        ]
        for label, text in (("stdout", self.stdout_text()), ("stderr", self.stderr_text())):
            kept = text.splitlines()[-lines:]
            parts.append("--- %s: %s" % (label, "(empty)" if not kept else ""))
            parts.extend("    " + line for line in kept)
        return "\n".join(parts)

    def _status(self) -> str:
        if self.popen is None:
            return "not started"
        rc = self._peek()
        return "running" if rc is None else "exit %d" % rc

    def __repr__(self) -> str:
        return "<Process %s pid=%s %s>" % (self.name, self.popen.pid if self.popen else "-", self._status())


def _killpg(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _read(path: Path) -> str:
    try:
        return path.read_bytes().decode("utf-8", "replace")
    except FileNotFoundError:
        return ""
