"""``foo-harness bench`` (``make bench``): the same load direct to the server, through HAProxy and through fooproxy.

A benchmark, not a test. For each load workload (W1 pipelined, W2 lockstep,
W3 fan-in, W4 churn, W7 paced latency) and round, four runs of the same
``harness.bench.loadgen`` load for ``--duration`` seconds, each with a fresh
server: direct, through HAProxy (TCP mode, ``nbthread 1``, when installed),
through fooproxy, and direct again, so the machine's drift shows and every
ratio compares runs close together in time. W5 holds idle connections through
each proxy and reads its RSS; W6 reads each idle proxy's CPU. For every run:
msgs/s (REQs + answers), p50/p99 latency, errors, the CPU seconds of the load
generator, the proxy and the server (from ``/proc``), the proxy's CPU µs per
message, and which process saturated. fooproxy's SIGUSR2 counts are checked
against the load generator's. A table goes to stdout and the whole record to
``bench-results/<timestamp>.json``.

The figures derived from the runs (ratios, drift, added latency, the
verdicts on the issue's targets) are pure functions of numbers, below
"figures", so they are unit-tested without running anything; they are
recorded before the tables, which only format them.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from harness.bench.loadgen import LoadGen, LoadResult, LoadSpec
from harness.binaries import REFERENCE, REFERENCE_SERVER, Peers, find_peers, python_peers
from harness.processes import ProcessError
from harness.sigusr2 import read_stats
from harness.tasks import Service, local_address, split_address, start_proxy, start_server

USAGE = """\
foo-harness bench: the same load direct to the server, through HAProxy and through fooproxy.

Usage:
  foo-harness bench [options]

Options:
  -h --help           Show this help and exit.
  --duration S        Seconds per load run [default: 10].
  --rounds N          Repeat each load workload's runs N times. A round of one workload is
                      four runs, each with a fresh server: direct, HAProxy, fooproxy, direct
                      again. Rounds go over all workloads before repeating. The summary gives
                      the median and range over the rounds [default: 1].
  --only LIST         Workloads to run, comma-separated [default: W1,W2,W3,W4,W5,W6,W7].
  --no-haproxy        Do not run HAProxy (the vs HAProxy column stays empty, saying so).
  --haproxy PATH      The haproxy binary; a bare name is looked up on $PATH. Debian's
                      haproxy package installs /usr/sbin/haproxy [default: haproxy].
  --w7-rate R         W7: requests per second on each of its 8 lockstep connections, on
                      the load generator's schedule [default: 200].
  --procs N           Load generator worker processes [default: 2].
  --idle-conns N      Connections held for W5 [default: 2000].
  --idle-seconds S    Seconds over which W6 reads the idle CPU [default: 3].
  --out DIR           Directory for the JSON record [default: bench-results].
  --python            Use foo-server even when $FOO_BIN_DIR has the reference server.
  --proxy-args ARGS   Extra fooproxy flags, e.g. "-workers 2" [default: ].
  --py-spy DIR        Record a py-spy profile of the proxy in each fooproxy run (needs py-spy).
  --monitor-thread    Run the proxy and foo-server with gevent's monitor thread (a little
                      slower; it reports hub blocking on stderr).
  --proxy-cmd CMD     Run this command as the proxy instead of the installed fooproxy (to
                      compare builds); it gets fooproxy's flags appended.

Figures:
  ratio       msgs/s through a proxy / the mean of the same round's two direct runs (the
              one before HAProxy and the one after fooproxy), so HAProxy and fooproxy are
              judged against the same baseline.
  vs HAProxy  fooproxy msgs/s / HAProxy msgs/s in the same round (= fooproxy's ratio /
              HAProxy's ratio); the target column holds the issue's targets for it.
  drift       the second direct run / the first: how much the machine moved meanwhile.
  µs/msg      the proxy's CPU time / the messages that went through it, REQs + answers
              both counted, for fooproxy and HAProxy alike (fooproxy's own count, which
              must equal the load generator's; for HAProxy the load generator's).
  W7 added    p50 (p99) through a proxy minus the p50 (p99) of the mean of the round's
              two direct runs, in µs.
"""

CLK_TCK = os.sysconf("SC_CLK_TCK")
SATURATED = 0.90  # share of one core above which a single-threaded process is saturated


@dataclass(frozen=True)
class Workload:
    """One load workload: what the load generator does, and the issue's target for fooproxy ÷ HAProxy."""

    key: str
    title: str
    conns: int
    window: int = 1
    size: int = 16
    churn: int = 0
    rate: float = 0.0  # paced requests/s per connection (W7); 0: closed loop
    target: float = 0.0  # minimum fooproxy msgs/s ÷ HAProxy msgs/s (issue 10 §2); 0: none (W7 is judged on latency)


LOADS = (
    Workload("W1", "pipelined", 8, 64, 32, target=0.90),
    Workload("W2", "lockstep", 8, 1, target=1.00),
    Workload("W3", "fan-in 500", 500, 1, target=1.00),
    Workload("W4", "churn /10", 8, 1, churn=10, target=1.00),
    Workload("W7", "latency", 8, 1, rate=200.0),
)
IDLE_TARGET_PCT = 0.0  # W6; W5's target is HAProxy's KiB per connection
PATHS = ("direct", "haproxy", "proxy")  # JSON "path"; "proxy" is fooproxy, as in earlier records
SHOWN = {"direct": "direct", "haproxy": "HAProxy", "proxy": "fooproxy"}


# -- /proc -------------------------------------------------------------------------
def cpu_seconds(pid: int) -> float:
    """utime + stime of ``pid`` and its live descendants (``-workers N``), from /proc."""
    return sum(cpu_split(pid))


def cpu_split(pid: int) -> tuple[float, float]:
    """(utime, stime) of ``pid`` and its live descendants, from /proc: user and kernel seconds.

    A proxy's kernel time is the system calls it makes (a loopback ``send``
    also does the receiver's TCP work and wakes it), so the split shows how
    much of a proxy's cost its own code can still change.
    """
    stats = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open("/proc/%s/stat" % entry) as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue  # exited meanwhile
            stats[int(entry)] = (int(fields[1]), int(fields[11]) / CLK_TCK, int(fields[12]) / CLK_TCK)
    if pid not in stats:
        raise ProcessLookupError(pid)
    tree, user, system, grew = {pid}, 0.0, 0.0, True
    while grew:
        grew = False
        for child, (ppid, _user, _system) in stats.items():
            if ppid in tree and child not in tree:
                tree.add(child)
                grew = True
    for member in tree:
        user += stats[member][1]
        system += stats[member][2]
    return user, system


def machine_busy_seconds() -> float:
    """CPU seconds the whole machine spent busy (all cores, all processes), from /proc/stat."""
    with open("/proc/stat") as f:
        fields = [int(v) for v in f.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / CLK_TCK


def rss_kib(pid: int) -> int:
    """VmRSS of ``pid`` in KiB, from /proc."""
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


# -- processes ----------------------------------------------------------------------
def choose_peers(python: bool = False) -> Peers:
    """The reference server when ``$FOO_BIN_DIR`` has it (unless ``python``), else foo-server."""
    peers = find_peers()
    if python and peers.kind == REFERENCE:
        return python_peers("--python given")
    if peers.kind != REFERENCE:
        from harness.binaries import reference_server

        ref = reference_server()
        if ref and not python:  # the server alone is enough for load runs
            return Peers(REFERENCE, ref, peers.client, "reference server only")
    return peers


def gevent_env(monitor: bool | None) -> dict[str, str] | None:
    """What to add to the environment (``env`` of ``start_server``/``start_proxy``) for gevent's monitor thread.

    ``True``/``False`` turn it on or off; ``None`` adds nothing (as inherited).

    The monitor thread installs a greenlet trace function that runs on every
    switch (measured: about 5-10 % more proxy CPU per message in W2), so the
    bench turns it off unless asked, to measure what production runs.
    """
    if monitor is None:
        return None
    return {"GEVENT_MONITOR_THREAD_ENABLE": "true" if monitor else "false"}


def server_args(peers: Peers, close_on_eof: bool = False) -> list[str]:
    """A load run's server flags: foo-server gets ``-quiet`` (and ``-close-on-eof`` if asked), the reference none."""
    if peers.kind == REFERENCE:
        return []
    return ["-quiet"] + (["-close-on-eof"] if close_on_eof else [])


def proxy_options(extra: Sequence[str] = (), monitor: bool | None = None) -> dict[str, Any]:
    """A load run's ``start_proxy`` keywords: ``-log-level warning`` (no per-connection line), ``extra``, the monitor.

    ``monitor`` turns gevent's monitor thread on or off (``None``: as inherited; see ``gevent_env``).
    """
    return {"extra_args": ["-log-level", "warning", *extra], "env": gevent_env(monitor)}


def describe_server(peers: Peers) -> str:
    """Which server the bench ran against, for the table header: server-linux with its sha256 prefix, or foo-server."""
    if peers.kind != REFERENCE:
        return "Python foo-server (not the reference)"
    path = Path(peers.server[0])
    try:
        digest = hashlib.sha256(path.read_bytes()).hexdigest()[:12]
    except OSError as exc:
        digest = "unreadable (%s)" % exc.strerror
    return "reference %s sha256 %s… (%s)" % (REFERENCE_SERVER, digest, path)


# -- HAProxy ------------------------------------------------------------------------
#: Where Debian's haproxy package puts the binary: /usr/sbin is not on every user's $PATH.
HAPROXY_DIRS = ("/usr/sbin", "/usr/local/sbin")
HAPROXY_INSTALL = "Debian: apt-get install haproxy"


def find_haproxy(name: str) -> tuple[str | None, str]:
    """``(absolute path, "")`` of the haproxy binary ``name``, else ``(None, why not)``.

    ``name`` with a slash is taken as a path; a bare name is looked up on
    ``$PATH``, then in ``HAPROXY_DIRS``.
    """
    if "/" in name:
        candidates = [Path(name)]
    else:
        found = shutil.which(name)
        candidates = [Path(found)] if found else [Path(d) / name for d in HAPROXY_DIRS]
    for path in candidates:
        if path.is_file() and os.access(path, os.X_OK):
            return str(path.absolute()), ""
    where = name if "/" in name else "%s on $PATH or in %s" % (name, ", ".join(HAPROXY_DIRS))
    return None, "haproxy not installed: no executable %s (%s)" % (where, HAPROXY_INSTALL)


def haproxy_version(binary: str) -> str:
    """``2.6.12-1+deb12u4`` from ``haproxy -v``; ``unknown`` if it does not say."""
    try:
        out = subprocess.run([binary, "-v"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    words = out.split()
    return words[2] if len(words) > 2 and words[:2] == ["HAProxy", "version"] else "unknown"


def haproxy_config(listen: str, forward: str, maxconn: int) -> str:
    """HAProxy's config for the bench: a plain TCP relay from ``listen`` to ``forward``, one thread, no logging.

    It does what fooproxy does for a Foo session, minus the counting: one
    upstream connection per client, bytes relayed both ways. ``option
    splice-auto`` stays off (the default): fooproxy reads every byte to count
    messages, so it cannot splice, and zero-copy relaying would measure a
    different job. No ``log`` line: fooproxy runs at ``-log-level warning``,
    with no per-connection line. The timeouts are long because W5 holds
    connections idle, and ``maxconn`` is above what W3 and W5 open.
    """
    return (
        "# written by foo-harness bench; removed after the run\n"
        "global\n"
        "    nbthread 1\n"
        "    maxconn %(maxconn)d\n"
        "defaults\n"
        "    mode tcp\n"
        "    timeout connect 10s\n"
        "    timeout client 10m\n"
        "    timeout server 10m\n"
        "    maxconn %(maxconn)d\n"
        "frontend bench\n"
        "    bind %(listen)s\n"
        "    default_backend foo\n"
        "backend foo\n"
        "    server foo %(forward)s\n"
    ) % {"listen": listen, "forward": forward, "maxconn": maxconn}


class HAProxy(Service):
    """HAProxy in the foreground (``-db``: no daemon, no master process) in front of ``forward``.

    Not started by ``harness.tasks.start_proxy``, which gives fooproxy's flags:
    HAProxy takes a config file, written to a temporary directory and removed
    by ``close()``. Ready by the rule of ``start_proxy`` (its port in LISTEN
    state, so no probe connection is relayed to the server); stopped like
    every ``Service``, by SIGTERM to its process group, whose id is its PID.
    """

    def __init__(self, binary: str, forward: str, maxconn: int) -> None:
        listen = local_address()
        self.config_dir = Path(tempfile.mkdtemp(prefix="foo-haproxy-cfg-"))
        config = self.config_dir / "haproxy.cfg"
        config.write_text(haproxy_config(listen, forward, maxconn))
        cmd = [binary, "-db", "-f", str(config)]
        super().__init__(cmd, listen, name="haproxy", ready_listen=split_address(listen)[1], ready_timeout=30.0)

    def close(self) -> None:
        try:
            super().close()
        finally:
            shutil.rmtree(self.config_dir, ignore_errors=True)


@dataclass(frozen=True)
class Fronts:
    """How the bench starts what goes in front of the server: fooproxy's flags, and HAProxy (``None``: not run)."""

    proxy_args: tuple[str, ...] = ()
    monitor: bool = False
    proxy_cmd: tuple[str, ...] | None = None
    haproxy: str | None = None
    haproxy_maxconn: int = 4096

    def start(self, path: str, forward: str) -> Service:
        """A fresh ``"proxy"`` (fooproxy) or ``"haproxy"`` in front of ``forward``, ready."""
        if path == "haproxy":
            if self.haproxy is None:
                raise ValueError("HAProxy is not available")
            return HAProxy(self.haproxy, forward, self.haproxy_maxconn).start()  # type: ignore[return-value]
        return start_proxy(forward, command=self.proxy_cmd, **proxy_options(self.proxy_args, self.monitor))


class PySpy:
    """``py-spy record`` of one PID into ``path`` (speedscope JSON), if py-spy is installed."""

    def __init__(self, pid: int, path: Path) -> None:
        exe = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
        self.proc: subprocess.Popen | None = None
        if os.access(exe, os.X_OK):
            path.parent.mkdir(parents=True, exist_ok=True)
            cmd = [exe, "record", "--pid", str(pid), "--rate", "250", "--format", "speedscope", "-o", str(path)]
            self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        else:
            sys.stderr.write("bench: py-spy not found, no profile\n")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # py-spy writes its file on SIGINT
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


# -- one run ---------------------------------------------------------------------------
def load_run(
    load: Workload,
    peers: Peers,
    path: str,
    duration: float,
    procs: int,
    fronts: Fronts,
    spy_dir: str | None = None,
) -> dict[str, Any]:
    """One workload, ``path`` ``"direct"``, ``"haproxy"`` or ``"proxy"`` (fooproxy), with a fresh server; its record.

    The churn workload's server closes after each client's EOF (``-close-on-eof``,
    foo-server only): a server that never closes would hold one descriptor per
    finished connection, tens of thousands in 10 s. The proxy's CPU is read
    from /proc the same way for fooproxy and HAProxy.
    """
    server = start_server(peers=peers, args=server_args(peers, load.churn > 0), env=gevent_env(fronts.monitor))
    front = spy = None
    try:
        if path != "direct":
            front = fronts.start(path, server.address)
        target = front.address if front else server.address
        spec = LoadSpec(target, load.conns, load.window, load.size, duration, load.churn, procs, rate=load.rate)
        gen = LoadGen(spec)
        fooproxy = front if path == "proxy" else None
        try:
            gen.start()
            before = read_stats(fooproxy) if fooproxy else None
            if fooproxy and spy_dir:
                spy = PySpy(fooproxy.pid, Path(spy_dir) / ("%s-proxy.speedscope.json" % load.key))
            pids = {"server": server.pid, **({path: front.pid} if front else {})}
            cpu0 = {name: cpu_split(pid) for name, pid in pids.items()}
            busy0, t0 = machine_busy_seconds(), time.monotonic()
            result = gen.run()
            wall = time.monotonic() - t0
            cpu1 = {name: cpu_split(pid) for name, pid in pids.items()}
            cpu = {name: sum(cpu1[name]) - sum(cpu0[name]) for name in pids}
            kernel = {name: cpu1[name][1] - cpu0[name][1] for name in pids}
            busy = machine_busy_seconds() - busy0
        finally:
            gen.close()
            if spy is not None:
                spy.stop()
        after = read_stats(fooproxy) if fooproxy else None
        rec = record(load, path, result, wall, cpu, before, after, kernel)
        # What else ran meanwhile (other users of a shared machine): CPU % of one core.
        rec["other_cpu_pct"] = round(max(0.0, busy - result.cpu_s - sum(cpu.values())) * 100 / wall, 1)
        return rec
    finally:
        for service in (front, server):
            if service is not None:
                service.close()


def record(
    load: Workload,
    path: str,
    result: LoadResult,
    wall: float,
    cpu: dict[str, float],
    before: dict | None,
    after: dict | None,
    kernel: dict[str, float] | None = None,
) -> dict[str, Any]:
    """The record of one run, with fooproxy's count check and the saturation verdict.

    ``cpu`` has ``"server"`` and, through a proxy, ``path`` (``"proxy"`` or
    ``"haproxy"``); ``kernel``, the same keys, the part of it spent in the
    kernel. Both proxies' µs/msg divide by REQs + answers: fooproxy's
    own count (checked equal to the load generator's), HAProxy's from the
    load generator, which sent and received every message it relayed.
    """
    problems = list(result.error_texts)
    messages = result.sent + result.answered
    rec: dict[str, Any] = {
        "workload": load.key,
        "title": load.title,
        "path": path,
        "msgs_per_s": round(result.msgs_per_s, 1),
        "answers_per_s": round(result.answered_in_window / result.elapsed_s, 1) if result.elapsed_s else 0.0,
        "p50_us": result.p50_us,
        "p99_us": result.p99_us,
        "errors": result.errors,
        "late": result.late,
        "wall_s": round(wall, 3),
        "cpu_s": {"loadgen": result.cpu_s, **{k: round(v, 3) for k, v in cpu.items()}},
        "loadgen_worker_cpu_s": result.worker_cpu_s,
        "load": result.as_dict(),
    }
    if before is not None and after is not None:
        delta = {k: after[k] - before[k] for k in ("msg_total", "msg_req", "msg_ack", "msg_nak", "msg_invalid")}
        rec["proxy_counts"] = delta
        rec["proxy_us_per_msg"] = us_per_msg(cpu["proxy"], delta["msg_total"])
        if delta["msg_req"] != result.sent:
            problems.append("proxy msg_req %d != %d REQs sent" % (delta["msg_req"], result.sent))
        if delta["msg_ack"] + delta["msg_nak"] != result.answered:
            problems.append(
                "proxy msg_ack+msg_nak %d != %d answers" % (delta["msg_ack"] + delta["msg_nak"], result.answered)
            )
        if delta["msg_nak"] != result.naks:
            problems.append("proxy msg_nak %d != %d NAKs received" % (delta["msg_nak"], result.naks))
    elif path == "haproxy":
        rec["proxy_us_per_msg"] = us_per_msg(cpu["haproxy"], messages)
    if kernel is not None:
        rec["cpu_kernel_s"] = {k: round(v, 3) for k, v in kernel.items()}
        if cpu.get(path):  # a proxy run (a direct run has no "direct" entry)
            rec["proxy_kernel_share"] = round(kernel[path] / cpu[path], 3)
    rec["server_us_per_msg"] = us_per_msg(cpu["server"], messages)
    share = {"loadgen": max(result.worker_cpu_s or [0.0]) / wall, **{k: v / wall for k, v in cpu.items()}}
    rec["cpu_share"] = {k: round(v, 3) for k, v in share.items()}
    busiest = max(share, key=lambda k: share[k])
    total = (result.cpu_s + sum(cpu.values())) / wall
    if share[busiest] >= SATURATED:
        rec["saturated"] = "%s %d%%" % (busiest, round(share[busiest] * 100))
    elif total >= (os.cpu_count() or 1) * SATURATED:
        rec["saturated"] = "all cores %d%%" % round(total * 100)
    else:
        rec["saturated"] = "none (%s %d%%)" % (busiest, round(share[busiest] * 100))
    rec["count_problems"] = len(problems) - len(result.error_texts)
    rec["problems"] = problems
    return rec


# -- W5 and W6 -------------------------------------------------------------------------------
def idle_cpu_pct(pid: int, seconds: float) -> float:
    """CPU % of ``pid`` over ``seconds`` of (presumed) idleness."""
    c0, t0 = cpu_seconds(pid), time.monotonic()
    time.sleep(seconds)
    return 100.0 * (cpu_seconds(pid) - c0) / (time.monotonic() - t0)


def memory_and_idle(
    peers: Peers,
    path: str,
    idle_conns: int,
    idle_seconds: float,
    procs: int,
    fronts: Fronts,
    do_memory: bool,
) -> dict[str, Any]:
    """W6 (idle CPU with no connections, then with ``idle_conns`` held) and W5 (RSS per held connection).

    For ``path`` ``"proxy"`` (fooproxy, whose counts are checked too) or ``"haproxy"``.
    """
    out: dict[str, Any] = {"path": path, "problems": []}
    with (
        start_server(peers=peers, args=server_args(peers), env=gevent_env(fronts.monitor)) as server,
        fronts.start(path, server.address) as front,
    ):
        time.sleep(0.5)  # let start-up settle
        out["idle_cpu_pct"] = round(idle_cpu_pct(front.pid, idle_seconds), 3)
        if not do_memory:
            return out
        rss0 = rss_kib(front.pid)
        gen = LoadGen(LoadSpec(front.address, idle_conns, 1, 16, 0, procs=procs, hold=True, io_timeout=20))
        try:
            held = gen.start(timeout=120)
            time.sleep(1.0)
            rss1 = rss_kib(front.pid)
            out["idle_cpu_held_pct"] = round(idle_cpu_pct(front.pid, idle_seconds), 3)
            stats = read_stats(front) if path == "proxy" else None
        finally:
            result = gen.release()
        out.update(
            conns=idle_conns,
            held=held,
            rss_before_kib=rss0,
            rss_held_kib=rss1,
            kib_per_conn=round((rss1 - rss0) / max(held, 1), 2),
            errors=result.errors,
        )
        out["problems"] += result.error_texts
        if held != idle_conns:
            out["problems"].append("held %d of %d connections" % (held, idle_conns))
        if stats is not None:
            out["proxy_connections_active"] = stats.get("connections_active")
            if stats["msg_req"] != idle_conns or stats["msg_ack"] + stats["msg_nak"] != idle_conns:
                out["problems"].append(
                    "proxy counted %d REQs, %d answers for %d held connections"
                    % (stats["msg_req"], stats["msg_ack"] + stats["msg_nak"], idle_conns)
                )
    return out


# -- figures: pure functions of the runs' numbers ---------------------------------------------
def mean(values: Sequence[float | None]) -> float | None:
    """The mean of the values that are there (``None`` skipped); ``None`` if none are."""
    have = [v for v in values if v is not None]
    return sum(have) / len(have) if have else None


def ratio(value: float | None, baseline: float | None) -> float | None:
    """``value / baseline`` to 3 places; ``None`` when either is missing or the baseline is 0."""
    if value is None or not baseline:
        return None
    return round(value / baseline, 3)


def us_per_msg(cpu_s: float, messages: int) -> float | None:
    """CPU µs per message (``cpu_s`` over ``messages``, REQs + answers), 2 places; ``None`` for no messages."""
    return round(cpu_s * 1e6 / messages, 2) if messages else None


def added_us(through: float | None, direct: Sequence[float | None]) -> float | None:
    """What a proxy adds to a latency figure: ``through`` minus the mean of the ``direct`` runs' figure, in µs."""
    base = mean(direct)
    if through is None or base is None:
        return None
    return round(through - base, 1)


def verdict(value: float | None, target: float | None, at_least: bool = True) -> str:
    """``"met"`` / ``"MISSED"``: ``value >= target`` (``<=`` unless ``at_least``); ``"n/a"`` if either is missing."""
    if value is None or target is None:
        return "n/a"
    ok = value >= target if at_least else value <= target
    return "met" if ok else "MISSED"


def spread(values: Sequence[float | None]) -> dict[str, float] | None:
    """``{"median", "min", "max"}`` of the values that are there; ``None`` if none are."""
    have = [v for v in values if v is not None]
    if not have:
        return None
    return {"median": round(statistics.median(have), 3), "min": min(have), "max": max(have)}


def rounds_of(runs: list[dict[str, Any]]) -> dict[tuple[str, int], list[dict[str, Any]]]:
    """The runs grouped by (workload, round), each group in the order it ran."""
    groups: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for r in runs:
        groups.setdefault((r["workload"], r.get("round", 1)), []).append(r)
    return groups


def baselines(runs: list[dict[str, Any]]) -> list[float | None]:
    """Per run: the mean msgs/s of the direct runs of its workload and round; ``None`` if it has none."""
    base = {
        key: mean([r["msgs_per_s"] for r in group if r["path"] == "direct"]) for key, group in rounds_of(runs).items()
    }
    return [base[(r["workload"], r.get("round", 1))] for r in runs]


def ratios(runs: list[dict[str, Any]]) -> list[float | None]:
    """Per run: its msgs/s ÷ its baseline (see ``baselines``); ``None`` for a direct run or without a baseline.

    The one rule for ``ratio``: a round's direct runs (normally one before
    HAProxy, one after fooproxy) are the baseline of both proxies.
    """
    return [
        None if r["path"] == "direct" else ratio(r["msgs_per_s"], base)
        for r, base in zip(runs, baselines(runs), strict=True)
    ]


def annotate(runs: list[dict[str, Any]], loads: Sequence[Workload] = LOADS) -> None:
    """Record the derived figures in each run, in place, before any table formats them.

    Each proxied run gets ``baseline_msgs_per_s`` and ``ratio`` (see
    ``ratios``). The fooproxy run gets ``vs_haproxy`` (fooproxy msgs/s ÷
    HAProxy msgs/s, same round; not W7) and ``target``, the issue's minimum
    for it; the second direct run gets ``drift`` (÷ the first). Paced (W7)
    runs get ``added_p50_us`` / ``added_p99_us``: through a proxy minus the
    direct mean.
    """
    targets = {w.key: w.target for w in loads}
    for r, base, got in zip(runs, baselines(runs), ratios(runs), strict=True):
        if r["path"] != "direct":
            r["baseline_msgs_per_s"] = round(base, 1) if base is not None else None
            r["ratio"] = got
    for group in rounds_of(runs).values():
        direct = [r for r in group if r["path"] == "direct"]
        if len(direct) >= 2:
            direct[-1]["drift"] = ratio(direct[-1]["msgs_per_s"], direct[0]["msgs_per_s"])
        by_path = {r["path"]: r for r in group if r["path"] != "direct"}
        if group[0]["workload"] == "W7":
            for r in by_path.values():
                r["added_p50_us"] = added_us(r["p50_us"], [d["p50_us"] for d in direct])
                r["added_p99_us"] = added_us(r["p99_us"], [d["p99_us"] for d in direct])
        # W7's msgs/s is its schedule's, so it is judged on latency, not on vs HAProxy.
        elif "proxy" in by_path and "haproxy" in by_path:
            foo = by_path["proxy"]
            foo["vs_haproxy"] = ratio(foo["msgs_per_s"], by_path["haproxy"]["msgs_per_s"])
            if targets.get(foo["workload"]):
                foo["target"] = targets[foo["workload"]]


def summarise(runs: list[dict[str, Any]], loads: Sequence[Workload] = LOADS) -> dict[str, dict[str, Any]]:
    """Per workload over its rounds (after ``annotate``): medians and ranges, and the verdict on its target.

    ``ratio_*`` and ``us_per_msg_median`` are fooproxy's (as in earlier
    records); ``haproxy_*`` are HAProxy's. The load workloads' verdict is
    the median ``vs_haproxy`` against ``target``; W7's is fooproxy's median
    added p50 against HAProxy's.
    """
    targets = {w.key: w.target for w in loads}
    out: dict[str, dict[str, Any]] = {}
    for key in dict.fromkeys(r["workload"] for r in runs):
        of = [r for r in runs if r["workload"] == key]
        foo = [r for r in of if r["path"] == "proxy"]
        hap = [r for r in of if r["path"] == "haproxy"]
        direct = [r for r in of if r["path"] == "direct"]
        row: dict[str, Any] = {"rounds": len({r.get("round", 1) for r in of})}
        row["direct_msgs_per_s"] = spread([r["msgs_per_s"] for r in direct])
        row["drift"] = spread([r.get("drift") for r in direct])
        foo_ratios = spread([r.get("ratio") for r in foo])
        if foo_ratios:
            row.update(ratio_median=foo_ratios["median"], ratio_min=foo_ratios["min"], ratio_max=foo_ratios["max"])
        costs = spread([r.get("proxy_us_per_msg") for r in foo])
        row["us_per_msg_median"] = costs["median"] if costs else None
        row["haproxy_ratio"] = spread([r.get("ratio") for r in hap])
        hap_costs = spread([r.get("proxy_us_per_msg") for r in hap])
        row["haproxy_us_per_msg_median"] = hap_costs["median"] if hap_costs else None
        for who, rs in (("proxy", foo), ("haproxy", hap)):
            share = spread([r.get("proxy_kernel_share") for r in rs])
            row["%s_kernel_share_median" % who] = share["median"] if share else None
        row["vs_haproxy"] = spread([r.get("vs_haproxy") for r in foo])
        if key == "W7":
            row["direct_p50_us"] = spread([r["p50_us"] for r in direct])
            row["direct_p99_us"] = spread([r["p99_us"] for r in direct])
            for who, rs in (("proxy", foo), ("haproxy", hap)):
                row["%s_added_p50_us" % who] = spread([r.get("added_p50_us") for r in rs])
                row["%s_added_p99_us" % who] = spread([r.get("added_p99_us") for r in rs])
            # Paced sends more than one interval late: the run was not far below saturation (or the
            # machine was busy), so some latency includes waiting. Shown, not an error.
            row["late_sends"] = sum(r.get("late", 0) for r in of)
            row["paced_sends"] = sum(r["load"]["sent"] for r in of)
            foo50, hap50 = row["proxy_added_p50_us"], row["haproxy_added_p50_us"]
            row["target"] = "added p50 <= HAProxy's"
            row["verdict"] = verdict(foo50 and foo50["median"], hap50 and hap50["median"], at_least=False)
        else:
            vs = row["vs_haproxy"]
            row["target"] = targets.get(key)
            row["verdict"] = verdict(vs and vs["median"], targets.get(key) or None)
        out[key] = row
    return out


def idle_verdicts(foo: dict[str, Any] | None, hap: dict[str, Any] | None) -> dict[str, str]:
    """W5: fooproxy's KiB per idle connection <= HAProxy's; W6: fooproxy's idle CPU 0 % (with and without idle ones)."""
    foo, hap = foo or {}, hap or {}
    out = {"W5": verdict(foo.get("kib_per_conn"), hap.get("kib_per_conn"), at_least=False)}
    idle = [foo[k] for k in ("idle_cpu_pct", "idle_cpu_held_pct") if k in foo]
    out["W6"] = verdict(max(idle), IDLE_TARGET_PCT, at_least=False) if idle else "n/a"
    return out


# -- report ------------------------------------------------------------------------------------
def _fmt(value: float | None, form: str = "%.2f", missing: str = "-") -> str:
    return missing if value is None else form % value


def _range(s: dict[str, float] | None, form: str = "%.2f") -> str:
    """``median [min-max]`` (just the median for one value); ``-`` for none."""
    if not s:
        return "-"
    if s["min"] == s["max"]:
        return form % s["median"]
    return ("%s [%s-%s]" % (form, form, form)) % (s["median"], s["min"], s["max"])


def run_table(runs: list[dict[str, Any]]) -> str:
    """One line per run, in the order they ran; formats the figures ``annotate`` recorded."""
    form = "%-14s %2s %-8s %10s %8s %9s %6s %6s %7s %4s %22s %7s %6s  %s"
    head = form % (
        "workload",
        "rd",
        "path",
        "msgs/s",
        "p50 µs",
        "p99 µs",
        "ratio",
        "vs HAP",
        "drift",
        "err",
        "CPU s gen/proxy/server",
        "µs/msg",
        "other%",
        "saturated",
    )
    lines = [head, "-" * len(head)]
    for r in runs:
        cpu = r["cpu_s"]
        front = cpu.get("proxy", cpu.get("haproxy"))
        drift = r.get("drift")
        lines.append(
            form
            % (
                "%s %s" % (r["workload"], r["title"]),
                r.get("round", 1),
                SHOWN[r["path"]],
                "%.0f" % r["msgs_per_s"],
                "%.0f" % r["p50_us"],
                "%.0f" % r["p99_us"],
                _fmt(r.get("ratio")),
                _fmt(r.get("vs_haproxy")),
                "%+.1f%%" % ((drift - 1) * 100) if drift is not None else "",
                r["errors"] + r["count_problems"],
                "%.2f/%s/%.2f" % (cpu["loadgen"], _fmt(front), cpu["server"]),
                _fmt(r.get("proxy_us_per_msg"), "%.1f"),
                "%.0f" % r.get("other_cpu_pct", 0.0),
                r["saturated"],
            )
        )
    return "\n".join(lines)


def kernel_shares(row: dict[str, Any]) -> str:
    """`` (kernel 92 / 90 %)``: fooproxy's and HAProxy's median kernel share of CPU, or nothing if unrecorded."""
    foo, hap = row.get("proxy_kernel_share_median"), row.get("haproxy_kernel_share_median")
    if foo is None and hap is None:
        return ""
    return " (kernel %s / %s %%)" % (_fmt(foo and foo * 100, "%.0f"), _fmt(hap and hap * 100, "%.0f"))


def summary_table(
    summary: dict[str, dict[str, Any]],
    foo_idle: dict[str, Any] | None,
    hap_idle: dict[str, Any] | None,
    idle_verdict: dict[str, str],
    haproxy_note: str,
) -> str:
    """Per workload: the ratios, fooproxy vs HAProxy, µs/msg beside µs/msg, the issue's target and its verdict.

    Formats only: ``summary`` is ``summarise``'s, ``idle_verdict`` is ``idle_verdicts``'.
    """
    empty = "-" if not haproxy_note else "(none)"
    form = "%-14s %13s %-18s %-18s %-18s %-16s %s"
    head = form % (
        "workload",
        "direct msgs/s",
        "ratio HAProxy",
        "ratio fooproxy",
        "vs HAProxy",
        "target",
        "µs/msg fooproxy / HAProxy",
    )
    load_keys = [k for k in summary if k != "W7"]
    lines = [head, "-" * len(head)] if load_keys else []
    titles = {w.key: w.title for w in LOADS}
    for key, row in summary.items():
        if key == "W7":
            continue
        target = row.get("target")
        lines.append(
            form
            % (
                "%s %s" % (key, titles.get(key, "")),
                _fmt(row["direct_msgs_per_s"] and row["direct_msgs_per_s"]["median"], "%.0f"),
                _range(row["haproxy_ratio"]) if row["haproxy_ratio"] else empty,
                _range(
                    {"median": row["ratio_median"], "min": row["ratio_min"], "max": row["ratio_max"]}
                    if "ratio_median" in row
                    else None
                ),
                _range(row["vs_haproxy"]) if row["vs_haproxy"] else empty,
                ">= %.2f %s" % (target, row["verdict"]) if target else "-",
                "%s / %s%s"
                % (
                    _fmt(row["us_per_msg_median"], "%.1f"),
                    _fmt(row["haproxy_us_per_msg_median"], "%.1f"),
                    kernel_shares(row),
                ),
            )
        )
    if "W7" in summary:
        row = summary["W7"]

        def added(who: str) -> str:
            p50, p99 = row["%s_added_p50_us" % who], row["%s_added_p99_us" % who]
            return "%s / %s" % (_range(p50, "%+.0f"), _range(p99, "%+.0f")) if p50 else empty

        lines.append(
            "W7 latency     direct p50 / p99 %s / %s µs; added p50 / p99: HAProxy %s, fooproxy %s µs; "
            "target fooproxy's added p50 <= HAProxy's: %s; %d of %d paced requests sent late"
            % (
                _range(row["direct_p50_us"], "%.0f"),
                _range(row["direct_p99_us"], "%.0f"),
                added("haproxy"),
                added("proxy"),
                row["verdict"],
                row["late_sends"],
                row["paced_sends"],
            )
        )
    if foo_idle and "kib_per_conn" in foo_idle:
        hap_kib = _fmt((hap_idle or {}).get("kib_per_conn"), "%.2f", empty)
        lines.append(
            "W5 memory      KiB per idle connection (%d held): fooproxy %.2f (RSS %.1f -> %.1f MiB), HAProxy %s; "
            "target <= HAProxy's: %s"
            % (
                foo_idle["held"],
                foo_idle["kib_per_conn"],
                foo_idle["rss_before_kib"] / 1024,
                foo_idle["rss_held_kib"] / 1024,
                hap_kib,
                idle_verdict["W5"],
            )
        )
    if foo_idle and "idle_cpu_pct" in foo_idle:

        def idle(d: dict[str, Any] | None) -> str:
            if not d:
                return empty
            held = d.get("idle_cpu_held_pct")
            return "%.2f %%%s" % (
                d["idle_cpu_pct"],
                " (%.2f %% with %d idle)" % (held, d["held"]) if held is not None else "",
            )

        lines.append(
            "W6 idle CPU    fooproxy %s, HAProxy %s; target %g %%: %s"
            % (idle(foo_idle), idle(hap_idle), IDLE_TARGET_PCT, idle_verdict["W6"])
        )
    if haproxy_note:
        lines.append("vs HAProxy is empty: %s" % haproxy_note)
    lines.append(
        "ratio: msgs/s through the proxy / mean of the round's two direct runs; vs HAProxy: fooproxy msgs/s /"
        " HAProxy msgs/s, same round;"
    )
    lines.append(
        "target: issue 10 §2 (against server-linux, median of --rounds 3); µs/msg: proxy CPU / (REQs + answers)"
        " through it, both proxies;"
    )
    lines.append(
        "kernel: the part of each proxy's CPU spent in the kernel (its system calls), median;"
        " drift: 2nd direct run / 1st;"
    )
    lines.append("other%: CPU used meanwhile by processes not in the benchmark (% of a core): high means noisy")
    return "\n".join(lines)


def git_revision() -> str:
    """``HEAD``'s short hash, with ``-dirty`` when the tree has changes; ``unknown`` outside git."""
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True, timeout=5
        )
    except OSError:
        return "unknown"
    return rev.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "") if rev.returncode == 0 else "unknown"


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; 0 when every run was error-free with exact counts, else 1 (a missed target is no error).

    A server or proxy that does not start (a broken ``--haproxy``, a bad
    ``--proxy-args``) ends the bench with one line saying which and why.
    """
    try:
        return bench(argv)
    except ProcessError as exc:
        sys.stderr.write("foo-harness bench: %s\n" % start_failure(str(exc)))
        return 1


def start_failure(text: str) -> str:
    """One line from a ``ProcessError``'s text: its first line, and the last line the process wrote, if any."""
    lines = text.splitlines()
    said = [line.strip() for line in lines[1:] if line.startswith("    ")]
    return lines[0] + ("; it said: %s" % said[-1] if said else "; it wrote nothing") if lines else "a process failed"


def bench(argv: list[str] | None) -> int:
    """``main`` without the start-failure handling."""
    from harness.peers.flags import parse_cli

    opts = parse_cli(USAGE, ["bench", *(sys.argv[1:] if argv is None else argv)], "foo-harness bench")
    numbers: dict[str, Any] = {}
    for name, kind in (
        ("--duration", float),
        ("--rounds", int),
        ("--procs", int),
        ("--w7-rate", float),
        ("--idle-conns", int),
        ("--idle-seconds", float),
    ):
        try:
            numbers[name] = kind(opts[name])
        except ValueError:
            what = "a whole number" if kind is int else "a number"
            sys.stderr.write("foo-harness bench: %s: expected %s, got %r\n" % (name, what, opts[name]))
            return 2
    duration, rounds, procs = numbers["--duration"], numbers["--rounds"], numbers["--procs"]
    w7_rate, idle_conns, idle_seconds = numbers["--w7-rate"], numbers["--idle-conns"], numbers["--idle-seconds"]
    if rounds < 1:
        sys.stderr.write("foo-harness bench: --rounds: expected a positive number, got %r\n" % opts["--rounds"])
        return 2
    if w7_rate <= 0:
        sys.stderr.write("foo-harness bench: --w7-rate: expected a positive rate, got %r\n" % opts["--w7-rate"])
        return 2
    only = {w.strip().upper() for w in opts["--only"].split(",") if w.strip()}
    known = [w.key for w in LOADS] + ["W5", "W6"]
    if not only or only - set(known):
        sys.stderr.write(
            "foo-harness bench: --only: unknown workload %s (known: %s)\n"
            % (", ".join(sorted(only - set(known))) or "(none given)", ",".join(sorted(known)))
        )
        return 2
    peers = choose_peers(opts["--python"])
    if opts["--no-haproxy"]:
        haproxy, haproxy_note = None, "skipped (--no-haproxy)"
    else:
        haproxy, haproxy_note = find_haproxy(opts["--haproxy"])
    fronts = Fronts(
        proxy_args=tuple(shlex.split(opts["--proxy-args"] or "")),
        monitor=bool(opts["--monitor-thread"]),
        proxy_cmd=tuple(shlex.split(opts["--proxy-cmd"])) if opts["--proxy-cmd"] else None,
        haproxy=haproxy,
        # Above W3's 500 and W5's held connections.
        haproxy_maxconn=max(4096, 2 * idle_conns),
    )
    loads = [replace(w, rate=w7_rate) if w.rate else w for w in LOADS if w.key in only]
    spy = opts["--py-spy"]
    started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    server_text = describe_server(peers)
    haproxy_text = (
        "%s %s, TCP mode, nbthread 1" % (haproxy, haproxy_version(haproxy)) if haproxy else "none: %s" % haproxy_note
    )
    say = print
    say(
        "bench %s: %s; %g s per run, %d load generator processes, %d cores, Python %s, fooproxy %s, "
        "gevent monitor thread %s"
        % (
            started,
            peers.describe(),
            duration,
            procs,
            os.cpu_count() or 0,
            platform.python_version(),
            git_revision(),
            "on" if fronts.monitor else "off",
        )
    )
    if fronts.proxy_cmd:
        say("proxy command: %s" % " ".join(fronts.proxy_cmd))
    # Per round and workload: direct, HAProxy, fooproxy, direct again. Rounds
    # go over all workloads before repeating, so a slow drift of the machine
    # spreads over every workload instead of landing on one.
    paths = ["direct", *(["haproxy"] if haproxy else []), "proxy", "direct"]
    runs: list[dict[str, Any]] = []
    for rnd in range(1, rounds + 1):
        for load in loads:
            for leg, path in enumerate(paths, 1):
                where = {"direct": "direct", "haproxy": "through HAProxy", "proxy": "through fooproxy"}[path]
                where += " again" if leg > 1 and path == "direct" else ""
                of = " (round %d of %d)" % (rnd, rounds) if rounds > 1 else ""
                say("  %s %s %s%s ..." % (load.key, load.title, where, of), flush=True)
                rec = load_run(load, peers, path, duration, procs, fronts, spy)
                rec["round"], rec["leg"] = rnd, leg
                runs.append(rec)
    annotate(runs)
    foo_idle = hap_idle = None
    if only & {"W5", "W6"}:
        for path in ("proxy", *(["haproxy"] if haproxy else [])):
            say("  W6 idle CPU%s, %s ..." % (" and W5 memory" if "W5" in only else "", SHOWN[path]), flush=True)
            got = memory_and_idle(peers, path, idle_conns, idle_seconds, procs, fronts, "W5" in only)
            if path == "proxy":
                foo_idle = got
            else:
                hap_idle = got
    summary = summarise(runs, loads)
    idle_verdict = idle_verdicts(foo_idle, hap_idle)
    say()
    say("server: %s" % server_text)
    say("HAProxy: %s" % haproxy_text)
    if runs:
        say(run_table(runs))
        say()
    say(summary_table(summary, foo_idle, hap_idle, idle_verdict, haproxy_note))
    problems = [(r["workload"] + " " + SHOWN[r["path"]], p) for r in runs for p in r["problems"]]
    for where, got in (("W5/W6 fooproxy", foo_idle), ("W5/W6 HAProxy", hap_idle)):
        problems += [(where, p) for p in (got or {}).get("problems", [])]
    for where, problem in problems:
        say("PROBLEM %s: %s" % (where, problem))
    out_dir = Path(opts["--out"])
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / ("%s.json" % time.strftime("%Y%m%d-%H%M%S"))
    doc = {
        "started": started,
        "fooproxy": git_revision(),
        "peers": peers.describe(),
        "server": server_text,
        "haproxy": {"binary": haproxy, "version": haproxy_version(haproxy) if haproxy else None, "note": haproxy_note},
        "machine": {"cores": os.cpu_count(), "python": platform.python_version(), "kernel": platform.release()},
        "duration_s": duration,
        "procs": procs,
        "w7_rate_per_conn": w7_rate,
        "proxy_args": list(fronts.proxy_args),
        "gevent_monitor_thread": fronts.monitor,
        "proxy_cmd": list(fronts.proxy_cmd) if fronts.proxy_cmd else None,
        "rounds": rounds,
        "runs": runs,
        "summary": summary,
        "idle_and_memory": foo_idle,
        "idle_and_memory_haproxy": hap_idle,
        "idle_verdicts": idle_verdict,
        "ok": not problems,
    }
    path.write_text(json.dumps(doc, indent=1) + "\n")
    say("\nresults: %s%s" % (path, "" if not problems else " (%d problems)" % len(problems)))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
