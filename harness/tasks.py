"""Small composable tasks: start a server or a proxy, run clients, read stats, check counts.

Used by ``foo-harness demo``, the e2e fixtures and anyone scripting a scenario::

    with start_server() as server, start_proxy(server.address) as proxy:
        results = run_clients_parallel(proxy.address, 20)
        stats = signal_stats(proxy)
        assert not check_counts(stats, runs=20)

Addresses are ``"host:port"`` strings; every process gets a free port on
127.0.0.1 unless told otherwise. ``start_server`` and ``start_proxy`` are the
harness's only start functions (the bench and the swarm use them too), with one
readiness rule: the listen port is in LISTEN state (see ``start_proxy``).
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from harness.binaries import Peers, find_peers, fooproxy_command
from harness.processes import Process, free_port
from harness.sigusr2 import read_stats

HOST = "127.0.0.1"
REQUESTS_PER_RUN = 100  # the reference client's fixed run
#: What fooproxy logs (at -log-level info) once it serves; with -workers N, once every worker does.
PROXY_READY = r"listening on"


def local_address(port: int | None = None, host: str = HOST) -> str:
    """``host:port`` with a free port unless ``port`` is given."""
    return "%s:%d" % (host, free_port(host) if port is None else port)


def split_address(address: str) -> tuple[str, int]:
    """``"host:port"`` / ``"[v6]:port"`` / ``":port"`` -> ``(host, port)`` (empty host -> 127.0.0.1)."""
    host, _, port = address.rpartition(":")
    host = host.strip("[]") or HOST
    return host, int(port)


def proxy_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment for a proxy: ours plus ``GEVENT_MONITOR_THREAD_ENABLE=1`` (unless set)."""
    env = dict(os.environ)
    env.setdefault("GEVENT_MONITOR_THREAD_ENABLE", "1")
    env.update(extra or {})
    return env


class Service(Process):
    """A started server or proxy: a ``Process`` that also knows its ``address``."""

    def __init__(self, cmd: Sequence[str], address: str, **kwargs: Any) -> None:
        super().__init__(cmd, **kwargs)
        self.address = address


def start_server(
    listen: str | None = None,
    *,
    peers: Peers | None = None,
    args: Sequence[str] = (),
    name: str = "server",
    env: Mapping[str, str] | None = None,
    log_dir: str | os.PathLike | None = None,
    ready_timeout: float = 30.0,
) -> Service:
    """Start a Foo server (``peers.server``, default ``find_peers()``) on ``listen`` (default a free port).

    ``args`` go after ``-listen``; ``env`` adds to (or overrides) our environment.
    Ready by the rule of ``start_proxy``. Use as a context manager, or call ``close()``.
    """
    peers = peers or find_peers()
    listen = listen or local_address()
    service = Service(
        peers.server_cmd(listen, *args),
        listen,
        name=name,
        env=None if env is None else {**os.environ, **env},
        log_dir=log_dir,
        ready_listen=split_address(listen)[1],
        ready_timeout=ready_timeout,
    )
    return service.start()  # type: ignore[return-value]


def start_proxy(
    forward: str,
    listen: str | None = None,
    extra_args: Sequence[str] = (),
    *,
    http: str = "off",
    recovery_path: str = "off",
    env: Mapping[str, str] | None = None,
    command: Sequence[str] | None = None,
    name: str = "fooproxy",
    log_dir: str | os.PathLike | None = None,
    ready_timeout: float = 30.0,
) -> Service:
    """Start the installed ``fooproxy`` (or ``command``, which gets its flags) from ``listen`` to ``forward``.

    ``listen`` defaults to a free port; HTTP and recovery are off unless given;
    ``extra_args`` come last, so they override. ``env`` adds to ``proxy_env()``.

    The one readiness rule of every server and proxy the harness starts: ready
    once its listen port is in LISTEN state in the kernel's socket table. No
    probe connection, so the proxy's stats and the server's log stay untouched,
    and no log line, so it holds at any ``-log-level`` and for any program. A
    fooproxy installs its signal handlers and HTTP endpoint before it binds, so
    SIGUSR2 and HTTP work from then on. (With ``-workers N`` the port listens
    once the first worker does; wait for "listening on" for all of them.)
    """
    listen = listen or local_address()
    cmd = [*(command or fooproxy_command()), "-listen", listen, "-forward", forward]
    cmd += ["-http", http, "-recovery-path", recovery_path, *extra_args]
    service = Service(
        cmd,
        listen,
        name=name,
        env=proxy_env(env),
        log_dir=log_dir,
        ready_listen=split_address(listen)[1],
        ready_timeout=ready_timeout,
    )
    return service.start()  # type: ignore[return-value]


@dataclass
class ClientResult:
    """One client run: exit status, captured output, wall time in seconds."""

    rc: int
    stdout: str
    stderr: str
    duration: float
    cmd: list[str]

    @property
    def ok(self) -> bool:
        """Exit 0 and ``OK!`` printed, as the reference client does on success."""
        return self.rc == 0 and "OK!" in self.stdout

    @property
    def failed(self) -> bool:
        """Exit 1 and ``FAILED!`` printed, the reference client's failure."""
        return self.rc == 1 and "FAILED!" in self.stdout

    def describe(self) -> str:
        """The command, status and output, for failure messages."""
        return "$ %s\n-> exit %d in %.3fs\nstdout: %s\nstderr: %s" % (
            " ".join(self.cmd),
            self.rc,
            self.duration,
            self.stdout.strip() or "(empty)",
            self.stderr.strip() or "(empty)",
        )


def run_client(
    address: str, args: Sequence[str] = (), *, peers: Peers | None = None, timeout: float = 60.0
) -> ClientResult:
    """Run one Foo client (``peers.client``) against ``address`` to completion.

    The client runs in its own process group; its output is read until it exits
    (``communicate``), and on timeout the group is killed and ``rc`` is -9.
    """
    peers = peers or find_peers()
    cmd = peers.client_cmd(address, *args)
    started = time.monotonic()
    proc = subprocess.Popen(
        cmd,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_group(proc.pid)
        out, err = proc.communicate()
        err += b"\n[harness] killed after %gs timeout" % timeout
    finally:
        if proc.poll() is None:  # interrupted (e.g. KeyboardInterrupt)
            _kill_group(proc.pid)
            proc.wait()
    return ClientResult(
        rc=proc.returncode,
        stdout=out.decode("utf-8", "replace"),
        stderr=err.decode("utf-8", "replace"),
        duration=time.monotonic() - started,
        cmd=cmd,
    )


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


Progress = Callable[[int, int, ClientResult], None]


def run_clients_sequential(
    address: str,
    n: int,
    args: Sequence[str] = (),
    *,
    peers: Peers | None = None,
    timeout: float = 60.0,
    progress: Progress | None = None,
) -> list[ClientResult]:
    """Run ``n`` clients one after the other; ``progress(done, n, result)`` after each."""
    peers = peers or find_peers()
    results = []
    for i in range(n):
        result = run_client(address, args, peers=peers, timeout=timeout)
        results.append(result)
        if progress is not None:
            progress(i + 1, n, result)
    return results


def run_clients_parallel(
    address: str,
    n: int,
    concurrency: int | None = None,
    args: Sequence[str] = (),
    *,
    peers: Peers | None = None,
    timeout: float = 60.0,
    progress: Progress | None = None,
) -> list[ClientResult]:
    """Run ``n`` clients as concurrent processes, at most ``concurrency`` (default ``n``) at a time.

    Results come back in launch order; ``progress(done, n, result)`` is called
    (from a worker thread) as each finishes.
    """
    peers = peers or find_peers()
    if n <= 0:
        return []
    done = 0
    lock = threading.Lock()

    def one(_: int) -> ClientResult:
        nonlocal done
        result = run_client(address, args, peers=peers, timeout=timeout)
        with lock:
            done += 1
            if progress is not None:
                progress(done, n, result)
        return result

    with ThreadPoolExecutor(max_workers=concurrency or n) as pool:
        return list(pool.map(one, range(n)))


def signal_stats(proxy: Process, timeout: float = 5.0) -> dict[str, Any]:
    """SIGUSR2 the proxy and return the stats JSON it prints (see ``harness.sigusr2.read_stats``)."""
    return read_stats(proxy, timeout)


def check_counts(stats: Mapping[str, Any], runs: int, requests: int = REQUESTS_PER_RUN) -> list[str]:
    """What is wrong with ``stats`` after ``runs`` complete client runs of ``requests`` each ([] if exact).

    Exact means: msg_req = runs * requests, msg_ack + msg_nak = msg_req,
    msg_total = 2 * msg_req, msg_invalid = 0, and some NAKs (when there were
    enough requests for the reference rule to give one).
    """
    problems = []
    want = runs * requests
    req, ack, nak = stats.get("msg_req"), stats.get("msg_ack"), stats.get("msg_nak")
    if req != want:
        problems.append("msg_req = %s, want %d (%d runs x %d)" % (req, want, runs, requests))
    if not isinstance(ack, int) or not isinstance(nak, int) or ack + nak != req:
        problems.append("msg_ack + msg_nak = %s + %s, want msg_req = %s" % (ack, nak, req))
    if isinstance(req, int) and stats.get("msg_total") != 2 * req:
        problems.append("msg_total = %s, want 2 x msg_req = %d" % (stats.get("msg_total"), 2 * req))
    if stats.get("msg_invalid", 0) != 0:
        problems.append("msg_invalid = %s, want 0" % stats.get("msg_invalid"))
    if want >= 100 and not nak:
        problems.append("msg_nak = %s, want > 0 (about 1 in 8 answers is a NAK)" % nak)
    return problems


def failures(results: Sequence[ClientResult]) -> list[ClientResult]:
    """The results that are not ``ok``."""
    return [r for r in results if not r.ok]
