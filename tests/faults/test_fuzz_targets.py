"""A CI-sized, bounded run of the atheris fuzz targets in fuzz/ (``make fuzz`` runs them longer).

Each target runs as its own process for ~10 s from the committed corpus
(fuzz/corpus/<target>); new inputs go to a temporary directory, so the
checkout is left as it was. A finding makes the process exit non-zero with the
reproducer written next to them; the test fails showing the fuzzer's output.
Skipped when atheris is not installed (``pip install -e '.[fuzz]'``).
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FUZZ = ROOT / "fuzz"
SECONDS = 10

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("atheris") is None,
    reason="atheris is not installed (pip install -e '.[fuzz]'): the bounded fuzz run is skipped",
)


def run_target(target: str, args: list[str], timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(FUZZ / ("fuzz_%s.py" % target)), *args],
        cwd=ROOT,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        timeout=timeout,
        text=True,
        errors="replace",
    )


@pytest.mark.parametrize("target", ["counter", "recovery"])
def test_bounded_fuzz_run_finds_nothing(target, tmp_path):
    corpus = FUZZ / "corpus" / target
    assert any(corpus.iterdir()), "no committed seed corpus in %s" % corpus
    work = tmp_path / "corpus"
    work.mkdir()
    proc = run_target(
        target,
        [
            str(work),
            str(corpus),
            "-max_total_time=%d" % SECONDS,
            "-runs=5000000",
            "-timeout=10",
            "-rss_limit_mb=2048",
            "-artifact_prefix=%s/" % tmp_path,
            "-print_final_stats=1",
        ],
        timeout=SECONDS * 6 + 30,
    )
    assert proc.returncode == 0, "fuzz_%s found something (exit %d):\n%s" % (
        target,
        proc.returncode,
        proc.stderr[-4000:],
    )
    assert "stat::number_of_executed_units" in proc.stderr, proc.stderr[-2000:]


def test_counter_target_catches_a_broken_counter(tmp_path):
    """The oracle works: a MessageCounter that drops tab Data must be caught at once."""
    broken = tmp_path / "fooproxy"
    broken.mkdir()
    src = (ROOT / "fooproxy" / "protocol.py").read_text()
    assert "[^ \\n]*+" in src
    (broken / "__init__.py").write_text("")
    (broken / "protocol.py").write_text(src.replace("[^ \\n]*+", "[^ \\t\\n]*+"))
    seed = tmp_path / "seed"
    seed.write_bytes(b"\x00REQ 1 a\tb\n")
    proc = subprocess.run(
        [sys.executable, str(FUZZ / "fuzz_counter.py"), str(seed)],
        cwd=tmp_path,
        env={"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin"},
        stdin=subprocess.DEVNULL,
        capture_output=True,
        timeout=60,
        text=True,
        errors="replace",
    )
    output = proc.stdout + proc.stderr  # atheris prints the uncaught exception on stdout
    assert proc.returncode != 0 and "contract says" in output, output[-2000:]


@pytest.mark.parametrize("finding", sorted(p.name for p in (FUZZ / "findings" / "recovery").iterdir()))
def test_recovery_findings_are_fixed(finding):
    proc = run_target("recovery", [str(FUZZ / "findings" / "recovery" / finding)], timeout=60)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-2000:]
