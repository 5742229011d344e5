"""``foo-harness msgcost`` counts a proxy's instructions per message under callgrind, end to end."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys

import pytest

from harness.bench.msgcost import MsgcostError, ir_per_message, total_ir

HARNESS = [sys.executable, "-m", "harness.cli"]


def test_the_figure_is_the_extra_runs_instructions_per_message() -> None:
    # 1000 more requests are 2000 more messages (each REQ and its answer).
    assert ir_per_message(5_000_000, 25_000_000, 1000) == 10_000.0


def test_total_ir_reads_the_summary_line_and_refuses_a_file_without_one(tmp_path) -> None:
    out = tmp_path / "callgrind.out"
    out.write_text("version: 1\ncmd: fooproxy\nevents: Ir\nfn=main\n1 5\nsummary: 123456789\n")
    assert total_ir(out) == 123456789
    out.write_text("version: 1\nevents: Ir\n")
    with pytest.raises(MsgcostError, match="no summary line"):
        total_ir(out)


def test_unknown_workload_is_one_line_and_exit_2() -> None:
    run = subprocess.run([*HARNESS, "msgcost", "--only", "W9"], capture_output=True, text=True, timeout=60)
    assert run.returncode == 2
    assert run.stderr.count("\n") == 1 and "workloads are lockstep, pipelined, churn" in run.stderr


NO_VALGRIND = "valgrind not installed (Debian: apt-get install valgrind)"


@pytest.mark.skipif(shutil.which("valgrind") is None, reason=NO_VALGRIND)
def test_msgcost_runs_fooproxy_under_callgrind_and_prints_a_figure() -> None:
    run = subprocess.run(
        [*HARNESS, "msgcost", "--requests", "64", "--only", "lockstep", "--no-haproxy"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr
    row = re.search(r"^W2 lockstep, 8\s+fooproxy\s+(\d+)", run.stdout, re.M)
    assert row, run.stdout
    # A Python proxy cannot relay a message in fewer than a few hundred instructions, nor
    # should it take millions: a figure outside that means the subtraction is broken.
    assert 300 < int(row.group(1)) < 1_000_000, run.stdout
