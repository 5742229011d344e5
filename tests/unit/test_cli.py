"""Flag parsing: Go-style and GNU-style forms, defaults, and every error path."""

from __future__ import annotations

import pytest

from fooproxy.cli import USAGE, normalise, parse
from fooproxy.config import Address, Config, ConfigError, parse_address


def test_defaults_are_the_original_tools():
    cfg = parse([])
    assert cfg.listen == Address("", 8002)
    assert cfg.forward == (Address("", 8001),)
    assert cfg.forward[0].connect_host == "127.0.0.1"


@pytest.mark.parametrize(
    "argv",
    [
        ["-forward", ":9001", "-listen", ":9002"],
        ["-forward=:9001", "-listen=:9002"],
        ["--forward", ":9001", "--listen=:9002"],
        ["--forward=:9001", "-listen", ":9002"],
    ],
)
def test_flag_forms(argv):
    cfg = parse(argv)
    assert cfg.forward == (Address("", 9001),) and cfg.listen == Address("", 9002)


@pytest.mark.parametrize(
    "text,expected",
    [
        (":8001", Address("", 8001)),
        ("localhost:8001", Address("localhost", 8001)),
        ("127.0.0.1:1", Address("127.0.0.1", 1)),
        ("[::1]:8001", Address("::1", 8001)),
        ("8001", Address("", 8001)),
    ],
)
def test_address_forms(text, expected):
    assert parse_address(text, "-forward") == expected


@pytest.mark.parametrize("text", ["", ":", "host:", ":x", ":70000", ":0", "::1:80", "[::1]", "[::1]80", "a:-1"])
def test_bad_addresses(text):
    with pytest.raises(ConfigError, match="-forward"):
        parse_address(text, "-forward")


def test_every_flag_in_usage_parses():
    cfg = parse(
        "-http off -recovery-path off -workers 2 -pool-size 4 -pool-wait 1.5 -pool-idle 30 -max-conns 50 "
        "-connect-timeout 2 -idle-timeout 0 -linger 1 -grace 3 -health-interval 1 -log-level DEBUG "
        "-heartbeat-timeout 2.5".split()
    )
    assert cfg.http is None and cfg.recovery_path is None
    assert (cfg.workers, cfg.pool_size, cfg.pool_wait, cfg.max_conns) == (2, 4, 1.5, 50)
    assert (cfg.idle_timeout, cfg.linger, cfg.grace, cfg.log_level) == (0.0, 1.0, 3.0, "debug")
    assert cfg.heartbeat_timeout == 2.5 and parse([]).heartbeat_timeout == 10.0


def test_workers_auto_is_cores():
    import os

    assert parse(["-workers", "auto"]).workers == (os.cpu_count() or 1)


@pytest.mark.parametrize(
    "argv,flag",
    [
        (["-bogus", "1"], "-bogus"),
        (["-listen", ":99999"], "-listen"),
        (["-forward", "nope"], "-forward"),
        (["-grace", "-1"], "-grace"),
        (["-grace", "soon"], "-grace"),
        (["-workers", "0"], "-workers"),
        (["-pool-size", "-2"], "-pool-size"),
        (["-max-conns", "many"], "-max-conns"),
        (["-log-level", "loud"], "-log-level"),
        (["-connect-timeout", "0"], "-connect-timeout"),
        (["-heartbeat-timeout", "0.5"], "-heartbeat-timeout"),  # under two 0.5 s heartbeats
        (["-http", "127.0.0.1:http"], "-http"),
        (["-forward"], "forward"),
    ],
)
def test_bad_values_exit_2_with_one_line_naming_the_flag(argv, flag, capsys):
    with pytest.raises(SystemExit) as exc:
        parse(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and flag in err and "Traceback" not in err


def test_http_allow_default_is_loopback_only_on_all_interfaces():
    import ipaddress

    from fooproxy.config import LOOPBACK

    assert parse([]).http_allow is None  # 127.0.0.1:8088: local anyway
    assert parse(["-http", ":8088"]).http_allow == LOOPBACK
    assert parse(["-http", "0.0.0.0:8088"]).http_allow == LOOPBACK
    assert parse(["-http", "10.1.2.3:8088"]).http_allow is None
    assert parse(["-http", ":8088", "-http-allow", "all"]).http_allow is None
    assert parse(["-http", ":8088", "-http-allow", "10.0.0.0/8, ::1"]).http_allow == (
        ipaddress.ip_network("10.0.0.0/8"),
        ipaddress.ip_network("::1/128"),
    )


def test_forward_to_another_port_or_host_is_fine():
    assert parse(["-listen", ":9002", "-forward", ":9001"]).forward[0].port == 9001
    assert parse(["-listen", "127.0.0.1:9002", "-forward", "192.0.2.77:9002"]).forward[0].host == "192.0.2.77"
    assert parse(["-listen", "127.0.0.2:9002", "-forward", "127.0.0.1:9002"]).listen.host == "127.0.0.2"


def test_help_and_version(capsys):
    with pytest.raises(SystemExit) as exc:
        parse(["-h"])
    assert exc.value.code == 0 and capsys.readouterr().out == USAGE
    with pytest.raises(SystemExit) as exc:
        parse(["--version"])
    assert exc.value.code == 0 and "fooproxy" in capsys.readouterr().out


def test_help_lists_every_flag_with_its_default():
    for flag in ("--listen", "--forward", "--http", "--recovery-path", "--workers", "--pool-size", "--grace"):
        assert flag in USAGE
    assert "[default: :8002]" in USAGE and "[default: :8001]" in USAGE


def test_normalise_leaves_values_alone():
    assert normalise(["-listen", ":1", "-grace", "-1", "-h"]) == ["--listen", ":1", "--grace", "-1", "-h"]


def test_a_repeated_flag_keeps_its_last_value_as_in_go():
    cfg = parse(["-log-level", "warning", "-grace=3", "-log-level=debug", "--grace", "4"])
    assert (cfg.log_level, cfg.grace) == ("debug", 4.0)
    assert normalise(["-grace", "1", "-h", "-grace=2"]) == ["-h", "--grace=2"]


def test_positive_validators_agree_on_zero():
    from fooproxy.config import positive_float, positive_int

    for validate in (positive_float, positive_int):
        with pytest.raises(ConfigError, match="positive"):
            validate("0", "-x")
        assert validate("0", "-x", allow_zero=True) == 0
    assert parse(["-grace", "0", "-linger", "0", "-idle-timeout", "0", "-pool-wait", "0"]).grace == 0
    with pytest.raises(SystemExit):
        parse(["-connect-timeout", "0"])


def test_no_flags_give_the_config_defaults():
    """The usage text shows Config's defaults and docopt parses them back: one source, no drift."""
    assert parse([]) == Config()
    for line in ("[default: :8002]", "[default: 127.0.0.1:8088]", "[default: 10]", "[default: info]"):
        assert line in USAGE
