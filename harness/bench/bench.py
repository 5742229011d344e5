"""``foo-harness bench`` (``make bench``): the same load direct to the server and through fooproxy.

A benchmark, not a test. For each load workload (W1 pipelined, W2 lockstep,
W3 fan-in, W4 churn) a fresh server, and for the second run a fresh fooproxy
in front of it, get the same ``harness.bench.loadgen`` load for ``--duration``
seconds; W5 holds idle connections through the proxy and reads its RSS; W6
reads the idle proxy's CPU. For every run: msgs/s (REQs + answers), p50/p99
latency, errors, the CPU seconds of the load generator, the proxy and the
server (from ``/proc``), the proxy's CPU µs per message (its CPU time ÷ the
messages it counted), and which process saturated. The proxy's SIGUSR2 counts
are checked against the load generator's. A table goes to stdout and the
whole record to ``bench-results/<timestamp>.json``.
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness.bench.loadgen import LoadGen, LoadResult, LoadSpec
from harness.binaries import REFERENCE, Peers, find_peers, python_peers
from harness.sigusr2 import read_stats
from harness.tasks import start_proxy, start_server

USAGE = """\
foo-harness bench: the same load direct to the server and through fooproxy.

Usage:
  foo-harness bench [options]

Options:
  -h --help           Show this help and exit.
  --duration S        Seconds per load run (each workload runs twice) [default: 10].
  --rounds N          Repeat the direct/proxied pair of each load workload N times,
                      interleaved, and summarise the ratios (median, range) [default: 1].
  --only LIST         Workloads to run, comma-separated [default: W1,W2,W3,W4,W5,W6].
  --procs N           Load generator worker processes [default: 2].
  --idle-conns N      Connections held for W5 [default: 2000].
  --idle-seconds S    Seconds over which W6 reads the idle CPU [default: 3].
  --out DIR           Directory for the JSON record [default: bench-results].
  --python            Use foo-server even when $FOO_BIN_DIR has the reference server.
  --proxy-args ARGS   Extra fooproxy flags, e.g. "-workers 2" [default: ].
  --py-spy DIR        Record a py-spy profile of the proxy in each proxied run (needs py-spy).
  --monitor-thread    Run the proxy and foo-server with gevent's monitor thread (a little
                      slower; it reports hub blocking on stderr).
  --proxy-cmd CMD     Run this command as the proxy instead of the installed fooproxy (to
                      compare builds); it gets fooproxy's flags appended.
"""

CLK_TCK = os.sysconf("SC_CLK_TCK")
SATURATED = 0.90  # share of one core above which a single-threaded process is saturated


@dataclass(frozen=True)
class Workload:
    """One load workload: what the load generator does."""

    key: str
    title: str
    conns: int
    window: int = 1
    size: int = 16
    churn: int = 0
    target: float = 0.0  # the ratio target


LOADS = (
    Workload("W1", "pipelined", 8, 64, 32, target=0.80),
    Workload("W2", "lockstep", 8, 1, target=0.50),
    Workload("W3", "fan-in 500", 500, 1, target=0.55),
    Workload("W4", "churn /10", 8, 1, churn=10, target=0.45),
)
MEMORY_TARGET_KIB, IDLE_TARGET_PCT = 10.0, 0.0


# -- /proc -------------------------------------------------------------------------
def cpu_seconds(pid: int) -> float:
    """utime + stime of ``pid`` and its live descendants (``-workers N``), from /proc."""
    stats = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open("/proc/%s/stat" % entry) as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue  # exited meanwhile
            stats[int(entry)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / CLK_TCK)
    if pid not in stats:
        raise ProcessLookupError(pid)
    tree, total, grew = {pid}, 0.0, True
    while grew:
        grew = False
        for child, (ppid, _cpu) in stats.items():
            if ppid in tree and child not in tree:
                tree.add(child)
                grew = True
    for member in tree:
        total += stats[member][1]
    return total


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
    """Our environment with gevent's monitor thread on or off (``None``: as inherited).

    The monitor thread installs a greenlet trace function that runs on every
    switch (measured: about 5-10 % more proxy CPU per message in W2), so the
    bench turns it off unless asked, to measure what production runs.
    """
    if monitor is None:
        return None
    return {**os.environ, "GEVENT_MONITOR_THREAD_ENABLE": "true" if monitor else "false"}


def server_args(peers: Peers, close_on_eof: bool = False) -> list[str]:
    """A load run's server flags: foo-server gets ``-quiet`` (and ``-close-on-eof`` if asked), the reference none."""
    if peers.kind == REFERENCE:
        return []
    return ["-quiet"] + (["-close-on-eof"] if close_on_eof else [])


def proxy_options(extra: Sequence[str] = (), monitor: bool | None = None) -> dict[str, Any]:
    """A load run's ``start_proxy`` keywords: ``-log-level warning`` (no per-connection line), ``extra``, the monitor.

    ``monitor`` turns gevent's monitor thread on or off (``None``: as inherited; see ``gevent_env``).
    """
    env = None if monitor is None else {"GEVENT_MONITOR_THREAD_ENABLE": "true" if monitor else "false"}
    return {"extra_args": ["-log-level", "warning", *extra], "env": env}


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
    via_proxy: bool,
    duration: float,
    procs: int,
    proxy_args: Sequence[str],
    spy_dir: str | None = None,
    monitor: bool = False,
    proxy_cmd: Sequence[str] | None = None,
) -> dict[str, Any]:
    """One workload, direct or through a fresh proxy, with a fresh server; the run's record.

    The churn workload's server closes after each client's EOF (``-close-on-eof``,
    foo-server only): a server that never closes would hold one descriptor per
    finished connection, tens of thousands in 10 s.
    """
    server = start_server(peers=peers, args=server_args(peers, load.churn > 0), env=gevent_env(monitor))
    proxy = spy = None
    try:
        if via_proxy:
            proxy = start_proxy(server.address, command=proxy_cmd, **proxy_options(proxy_args, monitor))
        target = proxy.address if proxy else server.address
        gen = LoadGen(LoadSpec(target, load.conns, load.window, load.size, duration, load.churn, procs))
        try:
            gen.start()
            before = read_stats(proxy) if proxy else None
            if proxy and spy_dir:
                spy = PySpy(proxy.pid, Path(spy_dir) / ("%s-proxy.speedscope.json" % load.key))
            pids = {"server": server.pid, **({"proxy": proxy.pid} if proxy else {})}
            cpu0 = {name: cpu_seconds(pid) for name, pid in pids.items()}
            busy0, t0 = machine_busy_seconds(), time.monotonic()
            result = gen.run()
            wall = time.monotonic() - t0
            cpu = {name: cpu_seconds(pid) - cpu0[name] for name, pid in pids.items()}
            busy = machine_busy_seconds() - busy0
        finally:
            gen.close()
            if spy is not None:
                spy.stop()
        after = read_stats(proxy) if proxy else None
        rec = record(load, via_proxy, result, wall, cpu, before, after)
        # What else ran meanwhile (other users of a shared machine): CPU % of one core.
        rec["other_cpu_pct"] = round(max(0.0, busy - result.cpu_s - sum(cpu.values())) * 100 / wall, 1)
        return rec
    finally:
        for service in (proxy, server):
            if service is not None:
                service.close()


def record(
    load: Workload,
    via_proxy: bool,
    result: LoadResult,
    wall: float,
    cpu: dict[str, float],
    before: dict | None,
    after: dict | None,
) -> dict[str, Any]:
    """The record of one run, with the proxy's count check and the saturation verdict."""
    problems = list(result.error_texts)
    rec: dict[str, Any] = {
        "workload": load.key,
        "title": load.title,
        "path": "proxy" if via_proxy else "direct",
        "msgs_per_s": round(result.msgs_per_s, 1),
        "answers_per_s": round(result.answered_in_window / result.elapsed_s, 1) if result.elapsed_s else 0.0,
        "p50_us": result.p50_us,
        "p99_us": result.p99_us,
        "errors": result.errors,
        "wall_s": round(wall, 3),
        "cpu_s": {"loadgen": result.cpu_s, **{k: round(v, 3) for k, v in cpu.items()}},
        "loadgen_worker_cpu_s": result.worker_cpu_s,
        "load": result.as_dict(),
    }
    if before is not None and after is not None:
        delta = {k: after[k] - before[k] for k in ("msg_total", "msg_req", "msg_ack", "msg_nak", "msg_invalid")}
        rec["proxy_counts"] = delta
        rec["proxy_us_per_msg"] = round(cpu["proxy"] * 1e6 / delta["msg_total"], 2) if delta["msg_total"] else None
        if delta["msg_req"] != result.sent:
            problems.append("proxy msg_req %d != %d REQs sent" % (delta["msg_req"], result.sent))
        if delta["msg_ack"] + delta["msg_nak"] != result.answered:
            problems.append(
                "proxy msg_ack+msg_nak %d != %d answers" % (delta["msg_ack"] + delta["msg_nak"], result.answered)
            )
        if delta["msg_nak"] != result.naks:
            problems.append("proxy msg_nak %d != %d NAKs received" % (delta["msg_nak"], result.naks))
    rec["server_us_per_msg"] = (
        round(cpu["server"] * 1e6 / (result.sent + result.answered), 2) if result.sent + result.answered else None
    )
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
    idle_conns: int,
    idle_seconds: float,
    procs: int,
    proxy_args: Sequence[str],
    do_memory: bool,
    monitor: bool = False,
    proxy_cmd: Sequence[str] | None = None,
) -> dict[str, Any]:
    """W6 (idle CPU with no connections, then with ``idle_conns`` held) and W5 (RSS per held connection)."""
    out: dict[str, Any] = {"problems": []}
    with (
        start_server(peers=peers, args=server_args(peers), env=gevent_env(monitor)) as server,
        start_proxy(server.address, command=proxy_cmd, **proxy_options(proxy_args, monitor)) as proxy,
    ):
        time.sleep(0.5)  # let start-up settle
        out["idle_cpu_pct"] = round(idle_cpu_pct(proxy.pid, idle_seconds), 3)
        if not do_memory:
            return out
        rss0 = rss_kib(proxy.pid)
        gen = LoadGen(LoadSpec(proxy.address, idle_conns, 1, 16, 0, procs=procs, hold=True, io_timeout=20))
        try:
            held = gen.start(timeout=120)
            time.sleep(1.0)
            rss1 = rss_kib(proxy.pid)
            out["idle_cpu_held_pct"] = round(idle_cpu_pct(proxy.pid, idle_seconds), 3)
            stats = read_stats(proxy)
        finally:
            result = gen.release()
        out.update(
            conns=idle_conns,
            held=held,
            rss_before_kib=rss0,
            rss_held_kib=rss1,
            kib_per_conn=round((rss1 - rss0) / max(held, 1), 2),
            proxy_connections_active=stats.get("connections_active"),
            errors=result.errors,
        )
        out["problems"] += result.error_texts
        if held != idle_conns:
            out["problems"].append("held %d of %d connections" % (held, idle_conns))
        if stats["msg_req"] != idle_conns or stats["msg_ack"] + stats["msg_nak"] != idle_conns:
            out["problems"].append(
                "proxy counted %d REQs, %d answers for %d held connections"
                % (stats["msg_req"], stats["msg_ack"] + stats["msg_nak"], idle_conns)
            )
    return out


# -- report ------------------------------------------------------------------------------------
def ratios(runs: list[dict[str, Any]]) -> list[float | None]:
    """Per run: its msgs/s over that of the direct run of its workload just before it; ``None`` for a direct run.

    (``None`` too when there is no direct figure to divide by.)
    """
    direct: dict[str, float] = {}
    out: list[float | None] = []
    for r in runs:
        if r["path"] == "direct":
            direct[r["workload"]] = r["msgs_per_s"]
            out.append(None)
        else:
            base = direct.get(r["workload"])
            out.append(round(r["msgs_per_s"] / base, 3) if base else None)
    return out


def add_ratios(runs: list[dict[str, Any]]) -> None:
    """Record each proxied run's ``ratio`` (see ``ratios``) and the issue's ``target`` for its workload."""
    targets = {w.key: w.target for w in LOADS}
    for r, ratio in zip(runs, ratios(runs), strict=True):
        if ratio is not None:
            r["ratio"], r["target"] = ratio, targets.get(r["workload"], 0.0)


def table(runs: list[dict[str, Any]], extra: dict[str, Any] | None) -> str:
    """The human-readable results (``add_ratios`` first, for the ratio column); formats only."""
    head = "%-14s %-6s %10s %8s %9s %6s %7s %4s %22s %8s %6s  %s" % (
        "workload",
        "path",
        "msgs/s",
        "p50 µs",
        "p99 µs",
        "ratio",
        "target",
        "err",
        "CPU s gen/proxy/server",
        "µs/msg",
        "other%",
        "saturated",
    )
    lines = [head, "-" * len(head)]
    for r in runs:
        ratio = target = ""
        if r.get("ratio") is not None:
            ratio = "%.2f" % r["ratio"]
            target = ">=%.2f%s" % (r["target"], "" if r["ratio"] >= r["target"] else "!")
        cpu = r["cpu_s"]
        cpus = "%.2f/%s/%.2f" % (cpu["loadgen"], "%.2f" % cpu["proxy"] if "proxy" in cpu else "-", cpu["server"])
        per = "%.1f" % r["proxy_us_per_msg"] if r.get("proxy_us_per_msg") else "-"
        lines.append(
            "%-14s %-6s %10.0f %8.0f %9.0f %6s %7s %4d %22s %8s %6s  %s"
            % (
                "%s %s" % (r["workload"], r["title"]),
                r["path"],
                r["msgs_per_s"],
                r["p50_us"],
                r["p99_us"],
                ratio,
                target,
                r["errors"] + r["count_problems"],
                cpus,
                per,
                "%.0f" % r.get("other_cpu_pct", 0.0),
                r["saturated"],
            )
        )
    if extra:
        if "kib_per_conn" in extra:
            lines.append(
                "W5 memory      proxy RSS %.1f MiB -> %.1f MiB with %d idle connections: %.2f KiB/conn (target <= %g)"
                % (
                    extra["rss_before_kib"] / 1024,
                    extra["rss_held_kib"] / 1024,
                    extra["held"],
                    extra["kib_per_conn"],
                    MEMORY_TARGET_KIB,
                )
            )
        if "idle_cpu_pct" in extra:
            held = extra.get("idle_cpu_held_pct")
            lines.append(
                "W6 idle CPU    proxy %.2f %% with no connections%s (target %g %%)"
                % (
                    extra["idle_cpu_pct"],
                    ", %.2f %% with %d idle ones" % (held, extra["held"]) if held is not None else "",
                    IDLE_TARGET_PCT,
                )
            )
    lines.append("ratio: msgs/s through fooproxy / direct (same run); target: the issue's, '!' = missed;")
    lines.append("µs/msg: proxy CPU time / messages it counted (REQ + answers); saturated: a process >= 90% of a core;")
    lines.append("other%: CPU used meanwhile by processes not in the benchmark (% of one core): high means noisy")
    return "\n".join(lines)


def summarise(runs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per workload over its rounds: median and range of the ratios, median proxy µs/msg.

    Needs ``add_ratios()`` to have set each proxied run's ``ratio``.
    """
    out: dict[str, dict[str, Any]] = {}
    for key in dict.fromkeys(r["workload"] for r in runs):
        proxied = [r for r in runs if r["workload"] == key and r.get("ratio") is not None]
        if not proxied:
            continue
        ratios = [r["ratio"] for r in proxied]
        costs = [r["proxy_us_per_msg"] for r in proxied if r.get("proxy_us_per_msg")]
        out[key] = {
            "rounds": len(proxied),
            "ratio_median": round(statistics.median(ratios), 3),
            "ratio_min": min(ratios),
            "ratio_max": max(ratios),
            "us_per_msg_median": round(statistics.median(costs), 2) if costs else 0.0,
        }
    return out


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
    """Run the benchmark; 0 when every run was error-free and the counts were exact, else 1."""
    from harness.peers.flags import parse_cli

    opts = parse_cli(USAGE, ["bench", *(sys.argv[1:] if argv is None else argv)], "foo-harness bench")
    duration = float(opts["--duration"])
    rounds = int(opts["--rounds"])
    if rounds < 1:
        sys.stderr.write("foo-harness bench: --rounds: expected a positive number, got %r\n" % opts["--rounds"])
        return 2
    procs = int(opts["--procs"])
    only = {w.strip().upper() for w in opts["--only"].split(",") if w.strip()}
    proxy_args = shlex.split(opts["--proxy-args"] or "")
    peers = choose_peers(opts["--python"])
    monitor = bool(opts["--monitor-thread"])
    proxy_cmd = shlex.split(opts["--proxy-cmd"]) if opts["--proxy-cmd"] else None
    spy = opts["--py-spy"]
    started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
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
            "on" if monitor else "off",
        )
    )
    if proxy_cmd:
        say("proxy command: %s" % " ".join(proxy_cmd))
    runs: list[dict[str, Any]] = []
    # Rounds go over all workloads before repeating, so a slow drift of the
    # machine spreads over every workload instead of landing on one.
    for rnd in range(1, rounds + 1):
        for load in LOADS:
            if load.key not in only:
                continue
            for via_proxy in (False, True):
                where = "through fooproxy" if via_proxy else "direct"
                of = " (round %d of %d)" % (rnd, rounds) if rounds > 1 else ""
                say("  %s %s %s%s ..." % (load.key, load.title, where, of), flush=True)
                rec = load_run(load, peers, via_proxy, duration, procs, proxy_args, spy, monitor, proxy_cmd)
                rec["round"] = rnd
                runs.append(rec)
    extra = None
    if only & {"W5", "W6"}:
        say("  W6 idle CPU%s ..." % (" and W5 memory" if "W5" in only else ""), flush=True)
        extra = memory_and_idle(
            peers,
            int(opts["--idle-conns"]),
            float(opts["--idle-seconds"]),
            procs,
            proxy_args,
            "W5" in only,
            monitor,
            proxy_cmd,
        )
    add_ratios(runs)
    say()
    say(table(runs, extra))
    summary = summarise(runs) if rounds > 1 else {}
    for key, row in summary.items():
        say(
            "%s over %d rounds: ratio median %.2f (%.2f-%.2f), proxy µs/msg median %.1f"
            % (key, row["rounds"], row["ratio_median"], row["ratio_min"], row["ratio_max"], row["us_per_msg_median"])
        )
    problems = [(r["workload"] + " " + r["path"], p) for r in runs for p in r["problems"]]
    problems += [("W5/W6", p) for p in (extra or {}).get("problems", [])]
    for where, problem in problems:
        say("PROBLEM %s: %s" % (where, problem))
    out_dir = Path(opts["--out"])
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / ("%s.json" % time.strftime("%Y%m%d-%H%M%S"))
    doc = {
        "started": started,
        "fooproxy": git_revision(),
        "peers": peers.describe(),
        "machine": {"cores": os.cpu_count(), "python": platform.python_version(), "kernel": platform.release()},
        "duration_s": duration,
        "procs": procs,
        "proxy_args": proxy_args,
        "gevent_monitor_thread": monitor,
        "proxy_cmd": proxy_cmd,
        "rounds": rounds,
        "runs": runs,
        "summary": summary,
        "idle_and_memory": extra,
        "ok": not problems,
    }
    path.write_text(json.dumps(doc, indent=1) + "\n")
    say("\nresults: %s%s" % (path, "" if not problems else " (%d problems)" % len(problems)))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
