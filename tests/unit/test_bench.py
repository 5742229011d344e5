"""``harness.bench.bench``'s figures on numbers: ratios, drift, vs HAProxy, added latency, targets; finding haproxy."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from harness.bench import bench
from harness.bench.bench import (
    added_us,
    annotate,
    cpu_split,
    find_haproxy,
    haproxy_config,
    idle_verdicts,
    ratio,
    start_failure,
    summarise,
    summary_table,
    us_per_msg,
    verdict,
)


def run(workload: str, path: str, msgs: float, rnd: int = 1, p50: float = 100.0, p99: float = 400.0, **kw) -> dict:
    """A run record with just the numbers the figures read."""
    return {"workload": workload, "path": path, "msgs_per_s": msgs, "round": rnd, "p50_us": p50, "p99_us": p99, **kw}


def round_of(workload: str, direct1: float, hap: float | None, foo: float, direct2: float, rnd: int = 1) -> list:
    runs = [run(workload, "direct", direct1, rnd)]
    if hap is not None:
        runs.append(run(workload, "haproxy", hap, rnd, proxy_us_per_msg=8.0))
    runs += [run(workload, "proxy", foo, rnd, proxy_us_per_msg=10.0), run(workload, "direct", direct2, rnd)]
    return runs


# -- the small functions ----------------------------------------------------------------
def test_ratio_divides_and_refuses_a_missing_or_zero_baseline() -> None:
    assert ratio(50.0, 80.0) == 0.625
    assert ratio(2.0, 3.0) == 0.667  # rounded to 3 places
    assert ratio(50.0, 0.0) is None and ratio(50.0, None) is None and ratio(None, 80.0) is None


def test_us_per_msg_is_cpu_over_messages() -> None:
    assert us_per_msg(1.5, 150_000) == 10.0
    assert us_per_msg(0.25, 3) == 83333.33
    assert us_per_msg(1.0, 0) is None


def test_added_latency_is_against_the_mean_of_the_direct_runs() -> None:
    assert added_us(150.0, [100.0, 120.0]) == 40.0
    assert added_us(90.0, [100.0, 120.0]) == -20.0  # faster than direct shows as negative, not hidden
    assert added_us(150.0, [100.0, None]) == 50.0  # a missing direct figure is skipped
    assert added_us(150.0, []) is None and added_us(None, [100.0]) is None


@pytest.mark.parametrize(
    ("value", "target", "at_least", "want"),
    [
        (1.00, 1.00, True, "met"),  # equal meets "at least"
        (0.99, 1.00, True, "MISSED"),
        (0.91, 0.90, True, "met"),
        (2.5, 2.5, False, "met"),  # equal meets "at most"
        (2.51, 2.5, False, "MISSED"),
        (None, 1.0, True, "n/a"),
        (1.0, None, True, "n/a"),
    ],
)
def test_verdict(value, target, at_least, want) -> None:
    assert verdict(value, target, at_least) == want


# -- annotate: one round's figures ----------------------------------------------------------
def test_a_round_judges_both_proxies_against_the_mean_of_its_two_direct_runs() -> None:
    runs = round_of("W2", 100.0, 60.0, 50.0, 80.0)
    annotate(runs)
    d1, hap, foo, d2 = runs
    assert hap["baseline_msgs_per_s"] == foo["baseline_msgs_per_s"] == 90.0
    assert hap["ratio"] == 0.667 and foo["ratio"] == 0.556
    assert foo["vs_haproxy"] == 0.833  # 50 / 60: fooproxy's ratio / HAProxy's, the baseline cancels
    assert d2["drift"] == 0.8 and "drift" not in d1
    assert "vs_haproxy" not in hap and "ratio" not in d1
    assert foo["target"] == 1.00 and "target" not in hap  # W2's target is for fooproxy ÷ HAProxy


def test_without_haproxy_there_is_no_vs_haproxy() -> None:
    runs = round_of("W1", 100.0, None, 120.0, 100.0)
    annotate(runs)
    assert runs[1]["ratio"] == 1.2 and "vs_haproxy" not in runs[1]


def test_rounds_are_figured_separately() -> None:
    runs = round_of("W2", 100.0, 50.0, 50.0, 100.0, rnd=1) + round_of("W2", 200.0, 100.0, 150.0, 200.0, rnd=2)
    annotate(runs)
    foo = [r for r in runs if r["path"] == "proxy"]
    assert [r["ratio"] for r in foo] == [0.5, 0.75] and [r["vs_haproxy"] for r in foo] == [1.0, 1.5]


def test_w7_gets_the_latency_each_proxy_adds() -> None:
    runs = [
        run("W7", "direct", 3200.0, p50=100.0, p99=300.0),
        run("W7", "haproxy", 3200.0, p50=150.0, p99=420.0),
        run("W7", "proxy", 3200.0, p50=140.0, p99=500.0),
        run("W7", "direct", 3200.0, p50=120.0, p99=340.0),
    ]
    annotate(runs)
    assert (runs[1]["added_p50_us"], runs[1]["added_p99_us"]) == (40.0, 100.0)
    assert (runs[2]["added_p50_us"], runs[2]["added_p99_us"]) == (30.0, 180.0)
    assert "vs_haproxy" not in runs[2]  # the schedule sets W7's msgs/s: judged on latency only


# -- summarise: medians, ranges, the issue's targets --------------------------------------------
def test_summary_takes_medians_and_ranges_over_rounds_and_judges_vs_haproxy() -> None:
    runs = []
    for rnd, (hap, foo) in enumerate([(100.0, 95.0), (100.0, 104.0), (100.0, 101.0)], 1):
        runs += round_of("W2", 200.0, hap, foo, 200.0, rnd)
    annotate(runs)
    row = summarise(runs)["W2"]
    assert row["rounds"] == 3
    assert row["vs_haproxy"] == {"median": 1.01, "min": 0.95, "max": 1.04}
    assert row["target"] == 1.00 and row["verdict"] == "met"
    assert (row["ratio_median"], row["ratio_min"], row["ratio_max"]) == (0.505, 0.475, 0.52)
    assert row["haproxy_ratio"]["median"] == 0.5
    assert (row["us_per_msg_median"], row["haproxy_us_per_msg_median"]) == (10.0, 8.0)


def test_the_summary_shows_each_proxys_kernel_share_of_its_cpu() -> None:
    runs = []
    for rnd, (foo_share, hap_share) in enumerate([(0.9, 0.8), (0.92, 0.85), (0.5, 0.86)], 1):
        rs = round_of("W2", 200.0, 100.0, 100.0, 200.0, rnd)
        rs[1]["proxy_kernel_share"], rs[2]["proxy_kernel_share"] = hap_share, foo_share
        runs += rs
    annotate(runs)
    summary = summarise(runs)
    row = summary["W2"]
    assert (row["proxy_kernel_share_median"], row["haproxy_kernel_share_median"]) == (0.9, 0.85)
    assert "10.0 / 8.0 (kernel 90 / 85 %)" in summary_table(summary, None, None, {}, "")
    for r in runs:  # an older record, without the split: the column is as it was
        r.pop("proxy_kernel_share", None)
    assert "10.0 / 8.0\n" in summary_table(summarise(runs), None, None, {}, "") + "\n"


_BURN = (
    "import os, sys, time\n"
    "end = time.monotonic() + 0.5\n"
    "if sys.argv[1] == 'kernel':\n"
    "    fd = os.open('/dev/zero', os.O_RDONLY)\n"
    "    while time.monotonic() < end: os.read(fd, 1 << 20)\n"
    "else:\n"
    "    while time.monotonic() < end: sum(range(1000))\n"
    "print('done', flush=True)\n"
    "sys.stdin.read()\n"
)


@pytest.mark.parametrize("where", ["kernel", "user"])
def test_cpu_split_tells_kernel_time_from_user_time(where: str) -> None:
    """A process reading /dev/zero spends its CPU in the kernel; one summing numbers, in user space."""
    child = subprocess.Popen(
        [sys.executable, "-c", _BURN, where], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert child.stdout.readline() == "done\n"
        user, system = cpu_split(child.pid)
    finally:
        child.stdin.close()
        child.wait(timeout=10)
    assert user + system >= 0.3
    assert (system > 2 * user) if where == "kernel" else (user > 2 * system), (user, system)


@pytest.mark.parametrize(("key", "foo", "want"), [("W1", 91.0, "met"), ("W1", 89.0, "MISSED"), ("W3", 99.0, "MISSED")])
def test_each_load_workload_has_the_issues_target(key: str, foo: float, want: str) -> None:
    runs = round_of(key, 200.0, 100.0, foo, 200.0)
    annotate(runs)
    row = summarise(runs)[key]
    assert row["target"] == {"W1": 0.90, "W3": 1.00}[key] and row["verdict"] == want


def test_without_haproxy_the_target_is_not_judged() -> None:
    runs = round_of("W4", 200.0, None, 150.0, 200.0)
    annotate(runs)
    row = summarise(runs)["W4"]
    assert row["vs_haproxy"] is None and row["verdict"] == "n/a" and row["ratio_median"] == 0.75


@pytest.mark.parametrize(("foo_p50", "want"), [(140.0, "met"), (150.0, "met"), (151.0, "MISSED")])
def test_w7_target_is_fooproxys_added_p50_at_most_haproxys(foo_p50: float, want: str) -> None:
    runs = [
        run("W7", "direct", 3200.0, p50=100.0, load={"sent": 1600}, late=2),
        run("W7", "haproxy", 3200.0, p50=150.0, load={"sent": 1600}),
        run("W7", "proxy", 3200.0, p50=foo_p50, load={"sent": 1600}),
        run("W7", "direct", 3200.0, p50=100.0, load={"sent": 1600}),
    ]
    annotate(runs)
    row = summarise(runs)["W7"]
    assert row["haproxy_added_p50_us"]["median"] == 50.0
    assert row["proxy_added_p50_us"]["median"] == foo_p50 - 100.0
    assert row["verdict"] == want
    assert (row["late_sends"], row["paced_sends"]) == (2, 6400)


def test_w5_and_w6_verdicts() -> None:
    foo = {"kib_per_conn": 2.2, "idle_cpu_pct": 0.0, "idle_cpu_held_pct": 0.0}
    assert idle_verdicts(foo, {"kib_per_conn": 2.5}) == {"W5": "met", "W6": "met"}
    assert idle_verdicts({**foo, "kib_per_conn": 2.6}, {"kib_per_conn": 2.5})["W5"] == "MISSED"
    assert idle_verdicts(foo, None)["W5"] == "n/a"  # no HAProxy: nothing to compare with
    assert idle_verdicts({**foo, "idle_cpu_held_pct": 0.33}, None)["W6"] == "MISSED"
    assert idle_verdicts(None, None) == {"W5": "n/a", "W6": "n/a"}


# -- finding haproxy, its config ------------------------------------------------------------
def test_find_haproxy_reports_a_missing_binary_with_how_to_install(tmp_path: Path) -> None:
    path, why = find_haproxy(str(tmp_path / "haproxy"))
    assert path is None
    assert "haproxy not installed" in why and str(tmp_path / "haproxy") in why and "apt-get install haproxy" in why
    (tmp_path / "haproxy").write_text("not executable\n")
    assert find_haproxy(str(tmp_path / "haproxy"))[0] is None


def test_find_haproxy_looks_a_bare_name_up_on_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    exe = tmp_path / "haproxy-test-name"
    exe.write_text("#!/bin/sh\nexit 0\n")
    exe.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    assert find_haproxy("haproxy-test-name") == (str(exe), "")
    monkeypatch.setattr(bench, "HAPROXY_DIRS", (str(tmp_path / "nowhere"),))
    path, why = find_haproxy("no-such-haproxy")
    assert path is None and "on $PATH or in %s" % (tmp_path / "nowhere") in why


@pytest.mark.skipif(not shutil.which("haproxy", path=os.environ.get("PATH", "") + ":/usr/sbin"), reason="no haproxy")
def test_haproxy_accepts_the_bench_config(tmp_path: Path) -> None:
    binary = find_haproxy("haproxy")[0]
    assert binary is not None
    cfg = tmp_path / "haproxy.cfg"
    cfg.write_text(haproxy_config("127.0.0.1:1", "127.0.0.1:2", 4096))
    check = subprocess.run([binary, "-c", "-f", str(cfg)], capture_output=True, text=True, timeout=30)
    assert check.returncode == 0, check.stdout + check.stderr
    text = cfg.read_text()
    words = [line.split() for line in text.splitlines() if line.strip()]
    assert ["nbthread", "1"] in words and ["mode", "tcp"] in words
    assert not any(w[0] in ("log", "option") for w in words)  # no logging, no splice-auto, no http options


def test_a_process_that_did_not_start_is_one_line_with_what_it_said() -> None:
    text = (
        "haproxy: exited before port 1 listened\n--- haproxy (pid 1, exit 1) haproxy -db\n"
        "--- stdout: (empty)\n--- stderr: \n    [NOTICE] starting\n    [ALERT] parsing line 3\n"
    )
    assert start_failure(text) == "haproxy: exited before port 1 listened; it said: [ALERT] parsing line 3"
    assert start_failure("x: exited\n--- stdout: (empty)\n--- stderr: (empty)") == "x: exited; it wrote nothing"


def test_bad_numbers_are_one_line_errors(capsys: pytest.CaptureFixture[str]) -> None:
    assert bench.main(["--rounds", "x"]) == 2
    assert capsys.readouterr().err == "foo-harness bench: --rounds: expected a whole number, got 'x'\n"
    assert bench.main(["--w7-rate", "0"]) == 2
    assert "--w7-rate: expected a positive rate" in capsys.readouterr().err
    assert bench.main(["--only", "W2,W9"]) == 2
    assert capsys.readouterr().err == ("foo-harness bench: --only: unknown workload W9 (known: W1,W2,W3,W4,W5,W6,W7)\n")
