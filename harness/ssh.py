"""``ssh://user@host`` hosts, through Fabric (``pip install 'fooproxy[hosts]'``; imported on first use).

A command started on an ``SshHost`` is a ``RemoteProcess``: the ``Process``
interface, its output streamed into local files by Fabric, its signals and
its stop sent as ``kill`` over the same connection, so SIGUSR2 stats work
as they do locally.
"""

from __future__ import annotations

import io
import logging
import os
import shlex
import shutil
import signal
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from harness.hosts import Host, HostError
from harness.processes import KEEP_LOGS_ENV, POLL, Process, ProcessError


class SshHost(Host):
    """A machine reached over ssh with Fabric (``pip install 'fooproxy[hosts]'``).

    ``connect_kwargs`` go to paramiko (e.g. ``{"key_filename": "..."}``).
    Commands run in their own session there (sshd makes each command a session
    leader), so the remote PID is also its process group, which ``stop()`` signals.
    """

    kind = "ssh"

    def __init__(
        self,
        name: str,
        host: str,
        user: str | None = None,
        port: int = 22,
        connect_kwargs: Mapping[str, Any] | None = None,
        address: str | None = None,
    ) -> None:
        super().__init__(name, address or host)
        self.host, self.user, self.port = host, user, port
        self.connect_kwargs = dict(connect_kwargs or {})
        self._conn = None
        self._lock = threading.Lock()

    @property
    def connection(self):
        """The Fabric ``Connection`` (opened on first use)."""
        with self._lock:
            if self._conn is None:
                try:
                    from fabric import Connection
                except ImportError:
                    raise HostError("ssh hosts need Fabric: pip install 'fooproxy[hosts]' (fabric>=3,<4)") from None
                # paramiko logs a failed handshake with a traceback from its transport thread;
                # the error reaches the user once, as a HostError line, instead.
                logging.getLogger("paramiko").addHandler(logging.NullHandler())
                kwargs = dict(self.connect_kwargs)
                kwargs.setdefault("timeout", 10)
                self._conn = Connection(self.host, user=self.user, port=self.port, connect_kwargs=kwargs)
            return self._conn

    def check(self, cmd: str, timeout: float = 30.0) -> str:
        """Run a short shell command there and return its stdout; ``HostError`` when it fails."""
        try:
            result = self.connection.run(cmd, hide=True, warn=True, in_stream=False, timeout=timeout)
        except Exception as exc:  # paramiko / socket / invoke errors: one message, no traceback
            raise HostError("%s: `%s`: %s" % (self.describe(), cmd, exc)) from None
        if result.exited != 0:
            raise HostError("%s: `%s` exited %s: %s" % (self.describe(), cmd, result.exited, result.stderr.strip()))
        return result.stdout

    def probe(self) -> None:
        self.check("true")

    def run(
        self,
        cmd: Sequence[str],
        *,
        name: str | None = None,
        env: Mapping[str, str] | None = None,
        ready_port: tuple[str, int] | None = None,
        ready_regex: str | None = None,
        ready_stream: str = "stderr",
        ready_timeout: float = 30.0,
        log_dir: str | os.PathLike | None = None,
    ) -> Process:
        proc = RemoteProcess(
            self,
            cmd,
            name=name or Path(str(cmd[0])).name,
            env=env,
            ready_port=ready_port,
            ready_regex=ready_regex,
            ready_stream=ready_stream,
            ready_timeout=ready_timeout,
            log_dir=log_dir,
        )
        return proc.start()

    def write_file(self, path: str, text: str) -> None:
        try:
            self.connection.put(io.BytesIO(text.encode()), remote=path)
        except Exception as exc:
            raise HostError("%s: cannot write %s: %s" % (self.describe(), path, exc)) from None

    def temp_dir(self, prefix: str = "foo-") -> str:
        return self.check("mktemp -d /tmp/%sXXXXXX" % shlex.quote(prefix)).strip()

    def remove_dir(self, path: str) -> None:
        try:
            self.check("rm -rf %s" % shlex.quote(path))
        except HostError:
            pass

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None


class RemoteProcess(Process):
    """A command running on an ``SshHost``: the ``Process`` interface, output copied into local files.

    The remote shell writes its PID to a file, then ``exec``s the command, so
    that PID is the command's (and its process group's). Signals and the stop
    go over ssh as ``kill``; output arrives through Fabric's streams.
    """

    def __init__(self, host: SshHost, cmd: Sequence[str], *, env: Mapping[str, str] | None = None, **kw: Any) -> None:
        # Readiness is Process.wait_ready's: the regex through this class's wait_for_output,
        # ready_port checked from here (the harness reaches every host it drives). Not
        # ready_listen: that reads this machine's /proc, not the remote host's.
        if kw.get("ready_listen") is not None:
            raise ValueError("a remote process cannot be ready by ready_listen; use ready_port")
        super().__init__(cmd, **kw)
        self.host = host
        self.remote_env = dict(env or {})
        self._promise = None
        self._remote_pid: int | None = None
        self._exit: int | None = None
        self._out = self._err = None
        self._remote_dir: str | None = None

    def start(self) -> Process:
        if self._promise is not None:
            raise ProcessError("%s already started" % self.name)
        self._remote_dir = self.host.temp_dir("foo-%s-" % self.name)
        pidfile = "%s/pid" % self._remote_dir
        exports = " ".join("%s=%s" % (k, shlex.quote(v)) for k, v in self.remote_env.items())
        line = "echo $$ > %s; exec %s%s </dev/null" % (
            pidfile,
            "env %s " % exports if exports else "",
            shlex.join(self.cmd),
        )
        self._out = open(self.stdout_path, "w", buffering=1)
        self._err = open(self.stderr_path, "w", buffering=1)
        try:
            self._promise = self.host.connection.run(
                line, asynchronous=True, warn=True, hide=True, out_stream=self._out, err_stream=self._err, pty=False
            )
        except Exception as exc:
            raise ProcessError("%s on %s: cannot start: %s" % (self.name, self.host.describe(), exc)) from None
        deadline = time.monotonic() + self.ready_timeout
        while self._remote_pid is None:
            try:
                text = self.host.check("cat %s 2>/dev/null || true" % pidfile).strip()
            except HostError as exc:
                self.close()
                raise ProcessError(str(exc)) from None
            if text.isdigit():
                self._remote_pid = int(text)
            elif not self.alive() or time.monotonic() > deadline:
                tail = self.tail()
                self.close()
                raise ProcessError("%s on %s did not start\n%s" % (self.name, self.host.describe(), tail))
            else:
                time.sleep(POLL * 10)
        try:
            self.wait_ready()
        except BaseException:
            self.close()  # also removes the remote directory and closes the output files
            raise
        return self

    @property
    def pid(self) -> int:
        """The remote PID (``ProcessError`` before it is known)."""
        if self._remote_pid is None:
            raise ProcessError("%s not started" % self.name)
        return self._remote_pid

    @property
    def returncode(self) -> int | None:
        return self._peek()

    def alive(self) -> bool:
        return self._promise is not None and self._peek() is None

    def _peek(self) -> int | None:
        if self._promise is None:
            return None
        if self._exit is None and self._promise.runner.process_is_finished:
            try:
                result = self._promise.join()
                self._exit = result.exited
            except Exception:  # the connection broke: count it as gone
                self._exit = -1
            finally:
                for f in (self._out, self._err):
                    if f is not None:
                        f.flush()
        return self._exit

    def send_signal(self, sig: int) -> None:
        if self.alive():
            self.host.check("kill -%d %d" % (int(sig), self.pid))

    def stop(self, timeout: float = 10.0, sig: int = signal.SIGTERM) -> int | None:
        """Signal the remote group (``sig``, SIGKILL after ``timeout``); the exit status (-1 if unknown)."""
        if self._promise is None:
            return None
        if self._remote_pid is not None and self._peek() is None:
            try:
                self.host.check("kill -%d -- -%d 2>/dev/null || true" % (int(sig), self._remote_pid))
                if not self._wait_exit(timeout):
                    self.host.check("kill -9 -- -%d 2>/dev/null || true" % self._remote_pid)
                    self._wait_exit(10.0)
            except HostError:
                pass
        if self._peek() is None:  # still running: end the channel (the remote side gets EOF/SIGPIPE)
            try:
                self._promise.runner.kill()
            except Exception:
                pass
            self._wait_exit(5.0)
            if self._exit is None:
                self._exit = -1
        return self._exit

    def close(self) -> None:
        try:
            self.stop()
        finally:
            for f in (self._out, self._err):
                if f is not None and not f.closed:
                    f.close()
            if self._remote_dir:
                try:
                    self.host.check("rm -rf %s" % shlex.quote(self._remote_dir))
                except HostError:
                    pass
                self._remote_dir = None
            if self._own_dir and not os.environ.get(KEEP_LOGS_ENV):
                shutil.rmtree(self.log_dir, ignore_errors=True)
