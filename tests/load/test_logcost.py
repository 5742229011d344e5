"""``foo-harness logcost`` measures the close log line in both formats and prints its figures (not timed here)."""

from __future__ import annotations

import json
import subprocess
import sys

HARNESS = [sys.executable, "-m", "harness.cli"]


def test_logcost_prints_a_figure_per_format_and_part() -> None:
    run = subprocess.run(
        [*HARNESS, "logcost", "--calls", "200", "--repeat", "2", "--json"], capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stderr
    figures = json.loads(run.stdout)
    assert set(figures) == {"text", "json"}
    for parts in figures.values():
        assert set(parts) == {"call", "format"}
        for entry in parts.values():
            assert 0 < entry["us_min"] <= entry["us_median"], figures


def test_logcost_bad_arguments_are_one_line_and_exit_2() -> None:
    run = subprocess.run([*HARNESS, "logcost", "--formats", "xml"], capture_output=True, text=True, timeout=60)
    assert run.returncode == 2 and run.stderr.count("\n") == 1, run.stderr
