"""``make bench``'s report: the figures are numbers computed from the runs; the tables only format them."""

from __future__ import annotations

import copy

from harness.bench.bench import LOADS, annotate, idle_verdicts, ratios, run_table, summarise, summary_table


def run(workload: str, path: str, msgs_per_s: float, round_: int = 1) -> dict:
    """A run record with the fields the tables read."""
    return {
        "workload": workload,
        "title": "t",
        "path": path,
        "round": round_,
        "msgs_per_s": msgs_per_s,
        "p50_us": 10.0,
        "p99_us": 20.0,
        "errors": 0,
        "count_problems": 0,
        "late": 0,
        "load": {"sent": 100},
        "cpu_s": {"loadgen": 1.0, "server": 1.0, **({path: 1.0} if path != "direct" else {})},
        "proxy_us_per_msg": 3.0 if path != "direct" else None,
        "other_cpu_pct": 0.0,
        "saturated": "none",
    }


def test_ratios_divide_by_the_mean_of_the_rounds_direct_runs() -> None:
    runs = [
        run("W1", "direct", 1000.0),
        run("W1", "proxy", 800.0),
        run("W1", "direct", 600.0),
        run("W2", "proxy", 50.0),  # no direct figure for W2
        run("W1", "direct", 2000.0, 2),
        run("W1", "proxy", 500.0, 2),
    ]
    assert ratios(runs) == [None, 1.0, None, None, None, 0.25]


def test_annotate_records_the_ratios_that_ratios_computes() -> None:
    runs = [run("W2", "direct", 900.0), run("W2", "haproxy", 700.0), run("W2", "proxy", 650.0)]
    runs.append(run("W2", "direct", 1100.0))
    want = ratios(runs)
    annotate(runs)
    assert [r.get("ratio") for r in runs] == want == [None, 0.7, 0.65, None]


def test_the_tables_format_the_figures_and_change_nothing() -> None:
    target = {w.key: w.target for w in LOADS}["W2"]
    runs = [run("W2", "direct", 1000.0), run("W2", "haproxy", 800.0)]
    runs += [run("W2", "proxy", 800.0 * (target - 0.1)), run("W2", "direct", 1000.0)]
    annotate(runs)
    summary = summarise(runs)
    verdicts = idle_verdicts(None, None)
    before = copy.deepcopy((runs, summary, verdicts))
    lines = run_table(runs).splitlines()
    text = summary_table(summary, None, None, verdicts, "")
    assert (runs, summary, verdicts) == before  # formatting writes nothing into the figures
    foo = next(line for line in lines if line.startswith("W2") and " fooproxy " in line)
    assert "%.2f" % runs[2]["vs_haproxy"] in foo
    row = next(line for line in text.splitlines() if line.startswith("W2"))
    assert ">= %.2f MISSED" % target in row and summary["W2"]["verdict"] == "MISSED"


def test_summarise_reads_the_figures_without_a_table() -> None:
    runs = [run("W1", "direct", 100.0), run("W1", "proxy", 90.0), run("W1", "direct", 100.0, 2)]
    runs.append(run("W1", "proxy", 70.0, 2))
    annotate(runs)
    row = summarise(runs)["W1"]
    assert (row["rounds"], row["ratio_median"], row["ratio_min"], row["ratio_max"]) == (2, 0.8, 0.7, 0.9)
    assert row["us_per_msg_median"] == 3.0 and row["verdict"] == "n/a"  # no HAProxy: the target is not judged
