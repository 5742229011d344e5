"""``-config FILE`` and ``-check-config`` through the real ``fooproxy`` command.

Every mistake in the file is one line naming the file, the line and the key,
exit 2, as a bad flag is; the shipped example has every key and validates.
"""

from __future__ import annotations

import socket
import tomllib
from pathlib import Path

import pytest

from fooproxy.cli import KINDS
from fooproxy.configfile import NOT_IN_FILE
from harness import tasks
from harness.binaries import fooproxy_command
from tests.faults import running
from tests.helpers import run_fooproxy as fooproxy

pytestmark = pytest.mark.e2e

SELF_PORT = tasks.split_address(tasks.local_address())[1]
EXAMPLE = Path(__file__).resolve().parents[2] / "deploy" / "fooproxy.toml"


@pytest.fixture
def procs(tmp_path):
    yield from running.processes(tmp_path)


def test_example_has_every_key_and_checks():
    keys = set(tomllib.loads(EXAMPLE.read_text()))
    settings = {k for k in KINDS if k not in NOT_IN_FILE}
    assert keys == settings, "missing: %s, extra: %s" % (settings - keys, keys - settings)
    result = fooproxy("-config", str(EXAMPLE), "-check-config")
    assert result.returncode == 0, result.stderr
    printed = tomllib.loads(result.stdout)
    assert printed == tomllib.loads(EXAMPLE.read_text())


def test_flags_override_the_file(tmp_path):
    path = tmp_path / "f.toml"
    path.write_text('grace = 3\nmax-conns = 7\nlisten = ":9"\n')
    result = fooproxy("-config", str(path), "-grace", "4.5", "-check-config")
    assert result.returncode == 0, result.stderr
    printed = tomllib.loads(result.stdout)
    assert printed["grace"] == 4.5  # the flag
    assert printed["max-conns"] == 7  # the file
    assert printed["listen"] == ":9"
    assert printed["linger"] == 5  # the default, from the usage text


def test_check_config_refuses_a_bad_flag_too():
    result = fooproxy("-check-config", "-grace", "nan")
    assert result.returncode == 2
    assert "-grace" in result.stderr and result.stdout == ""


BAD_FILES = [
    ("grace = 1\nbogus = 2\n", "line 2: key bogus", "unknown setting"),
    ('\n\ngrace = "ten"\n', "line 3: key grace", "expected a number of seconds"),
    ("max-conns = 1.5\n", "line 1: key max-conns", "expected an integer"),
    ("max-conns = true\n", "line 1: key max-conns", "expected an integer"),
    ("listen = 8002\n", "line 1: key listen", "expected a string"),
    ("# c\ngrace = 99999\n", "line 2: key grace", "expected 0 to 3600"),
    ('"idle-timeout" = 0.001\n', "line 1: key idle-timeout", "expected 0 or 0.1 to 86400"),
    ('log-level = "loud"\n', "line 1: key log-level", "expected one of"),
    ("worker-id = 1\n", "line 1: key worker-id", "unknown setting"),
    ("config = 'x.toml'\n", "line 1: key config", "unknown setting"),
    ("[section]\ngrace = 1\n", "key section", "unknown setting"),
    ("grace = \n", "not valid TOML", "line 1"),
    (
        'listen = ":%d"\nforward = ":%d"\n' % (SELF_PORT, SELF_PORT),
        "key forward",
        "itself",
    ),
]


@pytest.mark.parametrize("content,place,why", BAD_FILES)
def test_bad_file_is_one_line_exit_2(tmp_path, content, place, why):
    path = tmp_path / "bad.toml"
    path.write_text(content)
    for extra in (["-check-config"], ["-http", "off", "-recovery-path", "off"]):
        result = fooproxy("-config", str(path), *extra)
        assert "Traceback" not in result.stderr, result.stderr
        assert result.returncode == 2, result
        lines = result.stderr.splitlines()
        assert len(lines) == 1, result.stderr
        assert str(path) in lines[0] and place in lines[0] and why in lines[0], lines[0]
        assert result.stdout == ""


def test_a_flag_overrides_a_bad_key(tmp_path):
    path = tmp_path / "f.toml"
    path.write_text("grace = 99999\n")
    assert fooproxy("-config", str(path), "-grace", "1", "-check-config").returncode == 0


def test_missing_file(tmp_path):
    result = fooproxy("-config", str(tmp_path / "nope.toml"), "-check-config")
    assert result.returncode == 2
    assert "cannot read" in result.stderr and "nope.toml" in result.stderr


def test_proxy_serves_as_the_file_says(procs, tmp_path):
    server = procs.server()
    listen = tasks.local_address()
    path = tmp_path / "f.toml"
    path.write_text('listen = "%s"\nforward = "%s"\nhttp = "off"\nrecovery-path = "off"\n' % (listen, server.address))
    proxy = procs.command([*fooproxy_command(), "-config", str(path)])
    proxy.wait_for_output("listening on", timeout=20)
    with socket.create_connection(tasks.split_address(listen), timeout=5) as sock:
        sock.sendall(b"REQ 1 hello\n")
        assert sock.makefile("rb").readline().split()[:2] in ([b"ACK", b"1"], [b"NAK", b"1"])
