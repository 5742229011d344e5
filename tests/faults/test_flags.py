"""A careless operator at the real ``fooproxy`` command line: every mistake is one line and exit 2.

The README promises that nothing a user types gives a traceback. Each case
runs the installed command as a subprocess, as a user would.
"""

from __future__ import annotations

import os
import re
import subprocess

import pytest

from fooproxy.config import RANGES, max_workers
from harness import tasks
from harness.binaries import fooproxy_command
from tests.helpers import run_fooproxy

pytestmark = pytest.mark.e2e


def fooproxy(*args: str, timeout: float = 20) -> subprocess.CompletedProcess:
    # HTTP and recovery off, so a case that wrongly starts cannot touch anything shared.
    return run_fooproxy("-http", "off", "-recovery-path", "off", *args, timeout=timeout)


def assert_usage_error(result: subprocess.CompletedProcess, flag: str) -> str:
    assert "Traceback" not in result.stderr, result.stderr
    assert result.returncode == 2, result
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert flag in lines[0], lines[0]
    assert "Option(" not in lines[0] and "Argument(" not in lines[0], lines[0]
    assert result.stdout == ""
    return lines[0]


PORT = tasks.split_address(tasks.local_address())[1]

BAD_VALUES = [
    (["-workers", "99999999999999999999"], "-workers"),  # was: OverflowError traceback
    (["-workers", "1000000000000"], "-workers"),  # was: ENOMEM traceback
    (["-workers", "1000"], "-workers"),  # was: accepted, forked away
    (["-workers", str(max_workers() + 1)], "-workers"),
    (["-workers", "9" * 5000], "-workers"),  # past Python's int() digit limit
    (["-health-interval", "0.0001"], "-health-interval"),  # was: 790 upstream connects/s
    (["-health-interval", "1e300"], "-health-interval"),
    (["-grace", "1e300"], "-grace"),
    (["-grace", "inf"], "-grace"),
    (["-linger", "nan"], "-linger"),
    (["-linger", "99999"], "-linger"),
    (["-idle-timeout", "0.001"], "-idle-timeout"),
    (["-idle-timeout", "1e9"], "-idle-timeout"),
    (["-connect-timeout", "1e9"], "-connect-timeout"),
    (["-connect-timeout", "0.0001"], "-connect-timeout"),
    (["-max-conns", "99999999999999999999"], "-max-conns"),
    (["-pool-size", "10000000"], "-pool-size"),
    (["-pool-wait", "1e12"], "-pool-wait"),
    (["-pool-idle", "0.001"], "-pool-idle"),
    (["-heartbeat-timeout", "1e12"], "-heartbeat-timeout"),
    (["-http-allow", "10.0.0.0/33"], "-http-allow"),
    (["-http-allow", "everyone"], "-http-allow"),
    # forwarding to itself: one client would become thousands of connections
    (["-listen", ":%d" % PORT, "-forward", ":%d" % PORT], "-forward"),
    (["-listen", "%d" % PORT, "-forward", "%d" % PORT], "-forward"),
    (["-listen", ":%d" % PORT, "-forward", "127.0.0.1:%d" % PORT], "-forward"),
    (["-listen", "127.0.0.1:%d" % PORT, "-forward", ":%d" % PORT], "-forward"),
    (["-listen", "0.0.0.0:%d" % PORT, "-forward", "127.0.0.1:%d" % PORT], "-forward"),
    (["-listen", ":%d" % PORT, "-forward", "0.0.0.0:%d" % PORT], "-forward"),
    (["-listen", "127.0.0.1:%d" % PORT, "-forward", "localhost:%d" % PORT], "-forward"),
    (["-listen", "[::]:%d" % PORT, "-forward", "[::1]:%d" % PORT], "-forward"),
    # several upstreams
    (["-listen", ":%d" % PORT, "-forward", "127.0.0.1:1,:%d" % PORT], "-forward"),  # itself, second in the list
    (["-forward", "127.0.0.1:1,127.0.0.1:1"], "-forward"),  # twice
    (["-forward", ":1,127.0.0.1:1"], "-forward"),  # twice: an empty host is this machine
    (["-forward", "127.0.0.1:1,"], "-forward"),
    (["-forward", ",".join("127.0.0.1:%d" % p for p in range(1, 18))], "-forward"),  # 17 > 16
    (["-forward", "h%s:1" % ("x" * 300)], "-forward"),  # longer than the stats key
    (["-balance", "random"], "-balance"),
    (["-connect-retries", "16"], "-connect-retries"),
    (["-connect-retries", "-1"], "-connect-retries"),
    (["-max-fails", "1001"], "-max-fails"),
    (["extra"], "extra"),
]


@pytest.mark.parametrize("args, flag", BAD_VALUES, ids=[" ".join(a)[:40] for a, _ in BAD_VALUES])
def test_a_bad_value_is_one_line_naming_the_flag_and_exit_2(args, flag):
    assert_usage_error(fooproxy(*args), flag)


def test_forwarding_to_this_hosts_own_address_on_all_interfaces_is_refused():
    from tests.faults.test_http_hostile import local_non_loopback_ip

    ip = local_non_loopback_ip()
    if ip is None:
        pytest.skip("no non-loopback IPv4 address on this host")
    assert_usage_error(fooproxy("-listen", ":%d" % PORT, "-forward", "%s:%d" % (ip, PORT)), "-forward")


@pytest.mark.parametrize(
    "args",
    [["-listen", ":%d" % PORT, "-h"], ["-h", "-listen", ":%d" % PORT], ["-workers", "2", "--help"], ["-h", "-h"]],
)
def test_help_anywhere_prints_the_usage_and_exits_0(args):
    result = fooproxy(*args)
    assert result.returncode == 0, result  # was: docopt's "found unmatched (duplicate?) arguments [Option(...)]"
    assert result.stdout.startswith("fooproxy: a proxy") and "Usage:" in result.stdout
    assert result.stderr == ""


def test_every_range_is_stated_in_the_help():
    usage = fooproxy("-h").stdout
    blocks = re.split(r"\n  (?=--)", usage)
    for flag, (low, high, zero_ok) in RANGES.items():
        [block] = [b for b in blocks if b.startswith("-" + flag + " ")]
        words = " ".join(block.split())
        num = lambda x: "%d" % x if float(x).is_integer() else "%g" % x  # noqa: E731
        assert "%s to %s" % (num(low), num(high)) in words, (flag, words)
        assert ("0 disables" in words) == zero_ok, (flag, words)
    assert "4 per core" in usage


def test_values_at_the_edges_of_the_ranges_start_the_proxy():
    server = tasks.start_server()
    try:
        proxy = tasks.start_proxy(
            server.address,
            extra_args=[
                "-health-interval",
                "0.1",
                "-idle-timeout",
                "0.1",
                "-max-conns",
                "1000000",
                "-grace",
                "0",
                "-linger",
                "3600",
                "-connect-timeout",
                "0.01",
                "-workers",
                "1",
            ],
        )
        try:
            assert proxy.alive()
        finally:
            proxy.close()
    finally:
        server.close()


@pytest.mark.parametrize("flag", ["-check-config", "-h", "--version"])
def test_a_reader_that_went_away_is_no_traceback(flag) -> None:
    # `fooproxy -check-config | head -1`: the reader leaves before the text is written. The
    # pipe's read end is closed before fooproxy starts, so its first write always meets EPIPE.
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        run = subprocess.run(
            [*fooproxy_command(), flag],
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
            timeout=20,
            env=tasks.proxy_env(),
            stdin=subprocess.DEVNULL,
        )
    finally:
        os.close(write_end)
    assert run.returncode == 0, run.stderr
    assert run.stderr == "", run.stderr
