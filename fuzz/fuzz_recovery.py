"""atheris target B: the recovery-file decoder never fails but with its documented "corrupt" error.

``fooproxy.recovery.decode(data, now)`` is what ``load()`` runs on a file's
content. Its contract: a ``Snapshot``, or ``RecoveryFormatError`` (or the
``ValueError`` its JSON/UTF-8 parsing raises, which ``RecoveryFormatError``
subclasses) for content it cannot use. Anything else raised is a finding. A
``Snapshot`` it returns must hold only counts a proxy could have produced:
ints in 0..2**63-1 (issue 16: "values outside int64 are accepted and then break
the proxy"). The fuzzer's first 4 bytes choose ``now`` relative to a fixed
wall-clock time, the rest is the file.

    .venv/bin/python fuzz/fuzz_recovery.py fuzz/corpus/recovery -max_total_time=60
"""

from __future__ import annotations

import sys

import atheris

with atheris.instrument_imports():
    from fooproxy import recovery

INT64_MAX = 2**63 - 1
BASE_TIME = 1_764_633_600.0  # 2025-12-02 00:00 UTC: the seed files are saved around it


def check_counts(where: str, values) -> None:
    for value in values:
        if type(value) is not int or not 0 <= value <= INT64_MAX:
            raise AssertionError("decode accepted %s = %r, which no proxy can produce" % (where, value))


def test_one_input(data: bytes) -> None:
    now = BASE_TIME + int.from_bytes(data[:4], "big", signed=True) / 1000.0
    content = data[4:]
    try:
        snap = recovery.decode(content, now)
    except ValueError:  # RecoveryFormatError, or the JSON/UTF-8 parser's: the documented "corrupt"
        return
    check_counts("a total", snap.totals.values())
    check_counts("a window", snap.windows)
    for bucket in snap.buckets:
        check_counts("a bucket", bucket)


def main() -> None:
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
