"""``-log-format json`` (``fooproxy.jsonlog``): the objects it writes, and the close line in both formats.

Speed is not tested here (``foo-harness logcost`` measures it); what is tested is
that the faster way of taking a line's fields loses nothing: the fields of a dict
argument, ``extra=`` fields, exception text, a dict logged as the message.
"""

from __future__ import annotations

import json
import logging
import os
from types import SimpleNamespace

import pytest

from fooproxy import proxy
from fooproxy.logsetup import log_formatter

BUS = SimpleNamespace(bytes_c2s=30, bytes_s2c=18, lines_c2s=3, lines_s2c=3, timer=SimpleNamespace(max_s=0.0012345))


class Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def records():
    """The records that the proxy's logger emits during the test."""
    capture = Capture()
    logger = logging.getLogger("fooproxy.proxy")
    old_level, old_propagate = logger.level, logger.propagate
    logger.addHandler(capture)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    yield capture.records
    logger.removeHandler(capture)
    logger.setLevel(old_level)
    logger.propagate = old_propagate


def as_json(record: logging.LogRecord) -> dict:
    line = log_formatter("json").format(record)
    assert "\n" not in line
    return json.loads(line)


def test_close_line_json_has_the_common_keys_and_the_session_fields(records) -> None:
    proxy._log_close("127.0.0.1:5555", "client closed", 1.2345678, BUS)  # type: ignore[arg-type]
    [record] = records
    obj = as_json(record)
    assert obj == {
        "ts": obj["ts"],
        "level": "INFO",
        "logger": "fooproxy.proxy",
        "pid": os.getpid(),
        "msg": "127.0.0.1:5555: closed (client closed) after 1.235s: client->server 30 bytes 3 msgs,"
        " server->client 18 bytes 3 msgs",
        "peer": "127.0.0.1:5555",
        "duration_s": 1.234568,
        "ended": "client closed",
        "bytes_c2s": 30,
        "bytes_s2c": 18,
        "msgs_c2s": 3,
        "msgs_s2c": 3,
        "latency_max_ms": 1.234,
    }
    assert obj["ts"].endswith("+00:00") and obj["ts"].startswith("20")


def test_close_line_text_is_the_message_alone(records) -> None:
    proxy._log_close("127.0.0.1:5555", "client closed", 1.2345678, BUS)  # type: ignore[arg-type]
    line = log_formatter("text").format(records[0])
    assert line.endswith(
        " INFO fooproxy.proxy[%d]: 127.0.0.1:5555: closed (client closed) after 1.235s:"
        " client->server 30 bytes 3 msgs, server->client 18 bytes 3 msgs" % os.getpid()
    )


def test_close_line_without_a_session_and_without_latency(records) -> None:
    proxy._log_close("[::1]:7", "error: upstream refused", 0.5, None)
    proxy._log_close("[::1]:8", "idle timeout", 2.0, SimpleNamespace(**{**vars(BUS), "timer": None}))  # type: ignore[arg-type]
    first, second = (as_json(r) for r in records)
    assert first["msg"] == "[::1]:7: closed (error: upstream refused) after 0.500s"
    assert {k: first[k] for k in ("peer", "ended", "duration_s")} == {
        "peer": "[::1]:7",
        "ended": "error: upstream refused",
        "duration_s": 0.5,
    }
    assert "bytes_c2s" not in first
    assert second["latency_max_ms"] is None and second["msgs_s2c"] == 3


def test_other_lines_extra_fields_exceptions_and_dict_messages(records) -> None:
    log = logging.getLogger("fooproxy.proxy")
    log.warning("listening on %s", "127.0.0.1:1")
    log.info("with extra", extra={"upstream": "a:1", "_private": 1})
    try:
        raise ValueError("boom")
    except ValueError:
        log.exception("failed")
    log.info({"event": "dict message", "n": 2})
    plain, extra, failed, as_dict = (as_json(r) for r in records)
    assert set(plain) == {"ts", "level", "logger", "pid", "msg"} and plain["msg"] == "listening on 127.0.0.1:1"
    assert plain["level"] == "WARNING"
    assert extra["upstream"] == "a:1" and "_private" not in extra and extra["msg"] == "with extra"
    assert failed["level"] == "ERROR" and "ValueError: boom" in failed["exc_info"]
    assert as_dict["event"] == "dict message" and as_dict["n"] == 2 and as_dict["msg"] == ""


def test_a_record_formatted_as_text_first_keeps_its_json_fields(records) -> None:
    # A text handler before the JSON one sets asctime on the record: the library's scan takes over, same object.
    log = logging.getLogger("fooproxy.proxy")
    proxy._log_close("127.0.0.1:5555", "client closed", 1.0, BUS)  # type: ignore[arg-type]
    log.info("with extra", extra={"upstream": "a:1"})
    close, extra = records
    before = (as_json(close), as_json(extra))
    for record in records:
        log_formatter("text").format(record)
    after = (as_json(close), as_json(extra))
    assert [{k: v for k, v in obj.items() if k != "asctime"} for obj in after] == list(before)
    assert "asctime" not in after[0]
