"""``make bench``'s report: ratios are numbers computed from the runs; the table only formats them."""

from __future__ import annotations

import copy

from harness.bench.bench import LOADS, add_ratios, ratios, summarise, table


def run(workload: str, path: str, msgs_per_s: float, round_: int = 1) -> dict:
    """A run record with the fields the table reads."""
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
        "cpu_s": {"loadgen": 1.0, "server": 1.0, **({"proxy": 1.0} if path != "direct" else {})},
        "proxy_us_per_msg": 3.0 if path != "direct" else None,
        "other_cpu_pct": 0.0,
        "saturated": "none",
    }


def test_ratios_divide_by_the_direct_run_just_before() -> None:
    runs = [
        run("W1", "direct", 1000.0),
        run("W1", "proxy", 800.0),
        run("W2", "proxy", 50.0),  # no direct figure for W2
        run("W1", "direct", 2000.0, 2),
        run("W1", "proxy", 500.0, 2),
    ]
    assert ratios(runs) == [None, 0.8, None, None, 0.25]


def test_the_table_formats_the_ratios_and_changes_nothing() -> None:
    target = {w.key: w.target for w in LOADS}["W2"]
    runs = [run("W2", "direct", 1000.0), run("W2", "proxy", 1000.0 * (target - 0.1))]
    add_ratios(runs)
    assert runs[1]["ratio"] == round(target - 0.1, 3) and runs[1]["target"] == target
    before = copy.deepcopy(runs)
    text = table(runs, None)
    assert runs == before  # formatting writes nothing into the records
    row = next(line for line in text.splitlines() if line.startswith("W2") and " proxy " in line)
    assert "%.2f" % (target - 0.1) in row and ">=%.2f!" % target in row  # '!': missed the target


def test_summarise_reads_the_ratios_without_a_table() -> None:
    runs = [run("W1", "direct", 100.0), run("W1", "proxy", 90.0), run("W1", "direct", 100.0, 2)]
    runs.append(run("W1", "proxy", 70.0, 2))
    add_ratios(runs)
    assert summarise(runs)["W1"] == {
        "rounds": 2,
        "ratio_median": 0.8,
        "ratio_min": 0.7,
        "ratio_max": 0.9,
        "us_per_msg_median": 3.0,
    }
