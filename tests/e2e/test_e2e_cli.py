"""The installed ``fooproxy`` command line: help, version, usage errors, a busy port."""

from __future__ import annotations

import socket

import pytest

from fooproxy import __version__, speedups
from harness import tasks
from tests.helpers import run_fooproxy as fooproxy

pytestmark = pytest.mark.e2e


def test_help_exits_0_with_usage() -> None:
    result = fooproxy("-h")
    assert result.returncode == 0, result
    assert "Usage:" in result.stdout and "-forward" in result.stdout
    assert result.stderr == ""


def test_version() -> None:
    result = fooproxy("--version")
    assert result.returncode == 0, result
    assert result.stdout.strip() == "fooproxy %s (hot path: %s)" % (__version__, speedups.HOT_PATH)


@pytest.mark.parametrize(
    "args, flag",
    [
        (["-bogus", "1"], "-bogus"),
        (["-listen", ":abc"], "-listen"),
        (["-forward=nowhere"], "-forward"),
        (["-workers", "0"], "-workers"),
        (["-linger", "-1"], "-linger"),
    ],
)
def test_bad_flag_exits_2_with_one_line_naming_it(args: list[str], flag: str) -> None:
    result = fooproxy(*args)
    assert result.returncode == 2, result
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert flag in lines[0], result.stderr
    assert "Traceback" not in result.stderr
    assert result.stdout == ""


def test_port_in_use_exits_1_with_one_line_naming_the_address() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        address = "127.0.0.1:%d" % busy.getsockname()[1]
        result = fooproxy(
            "-listen", address, "-forward", tasks.local_address(), "-http", "off", "-recovery-path", "off"
        )
    assert result.returncode == 1, result
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert address in lines[0], result.stderr
    assert "Traceback" not in result.stderr


def test_http_port_in_use_exits_1_naming_the_address() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        address = "127.0.0.1:%d" % busy.getsockname()[1]
        result = fooproxy(
            "-listen",
            tasks.local_address(),
            "-forward",
            tasks.local_address(),
            "-http",
            address,
            "-recovery-path",
            "off",
        )
    assert result.returncode == 1, result
    assert address in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
