"""Recovery file: round trip, aging, corrupt files set aside, unwritable paths."""

from __future__ import annotations

import json
import logging
import os

import pytest

from fooproxy import recovery
from fooproxy.protocol import Counts
from fooproxy.stats import Stats


class FakeClock:
    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def busy_stats(clock: FakeClock) -> Stats:
    """Stats with totals, gauges and buckets spread over the last 10 s."""
    stats = Stats(clock=clock)
    stats.connection_opened()
    stats.connection_opened()
    stats.connection_closed()  # connections_active = 1 (a gauge: must not be restored)
    stats.set("pool_idle", 3)
    stats.upstream_error()
    for i in range(10):  # one REQ per second for 10 s, answered 0.5 s later
        clock.t = 1000.0 + i
        stats.record(True, 12, Counts(req=1))
        clock.t = 1000.5 + i
        stats.record(False, 40, Counts(ack=1))
    stats.record(True, 5, Counts(invalid=1))
    return stats  # clock.t == 1009.5


def test_round_trip_restores_totals_and_buckets(tmp_path):
    clock = FakeClock()
    stats = busy_stats(clock)
    before = stats.snapshot()
    path = str(tmp_path / "state" / "recovery.json")
    saver = recovery.Saver(path, stats.snapshot, wall_clock=lambda: 5000.0)
    assert saver.save_now() and saver.healthy and saver.last_error is None

    snap = recovery.load(path, now=5000.0)  # no wall-clock time has passed
    assert snap is not None
    assert snap.buckets == before.buckets
    assert snap.windows == before.windows
    # Gauges describe the old process: left out of the file.
    assert "connections_active" not in snap.totals and "pool_idle" not in snap.totals

    fresh_clock = FakeClock(50.0)  # a new process: unrelated monotonic clock
    fresh = Stats(clock=fresh_clock)
    fresh.restore(snap)
    after = fresh.snapshot()
    for name in (
        "msg_req",
        "msg_ack",
        "msg_invalid",
        "connections_total",
        "bytes_client_to_server",
        "bytes_server_to_client",
        "upstream_errors",
    ):
        assert after.totals[name] == before.totals[name], name
    assert after.totals["connections_active"] == 0 and after.totals["pool_idle"] == 0
    assert after.windows == before.windows
    assert after.as_dict()["request_rate_10s"] == before.as_dict()["request_rate_10s"] == 1.0


def test_aging_by_wall_clock_drops_old_buckets(tmp_path):
    clock = FakeClock()
    stats = busy_stats(clock)  # REQs at ages 0.5 s, 1.5 s, ... 9.5 s; ACKs at 0, 1, ... 9 s
    path = str(tmp_path / "recovery.json")
    recovery.Saver(path, stats.snapshot, wall_clock=lambda: 5000.0).save_now()

    snap = recovery.load(path, now=5003.0)  # 3 s later: everything is 3 s older
    assert snap is not None
    assert all(0 <= age < 1000 for age, _, _ in snap.buckets)
    req_ages = sorted(age for age, r, _ in snap.buckets if r)
    assert req_ages == [350 + 100 * i for i in range(7)]  # 3.5 s .. 9.5 s; older ones dropped
    r1, r10, s1, s10 = snap.windows
    assert (r1, r10, s1, s10) == (0, 7, 0, 7)
    assert snap.totals["msg_req"] == 10  # totals never age

    assert recovery.load(path, now=5020.0).buckets == []  # all older than 10 s


def test_clock_set_backwards_does_not_rejuvenate(tmp_path):
    path = str(tmp_path / "recovery.json")
    clock = FakeClock()
    recovery.Saver(path, busy_stats(clock).snapshot, wall_clock=lambda: 5000.0).save_now()
    then = recovery.load(path, now=5000.0)
    assert recovery.load(path, now=4000.0).buckets == then.buckets


def test_missing_file_is_silent(tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    assert recovery.load(str(tmp_path / "nope.json")) is None
    assert caplog.records == []


def valid_doc() -> dict:
    return {
        "format": "fooproxy-recovery",
        "version": 1,
        "saved_at": 5000.0,
        "bucket_s": 0.01,
        "totals": {"msg_req": 1},
        "buckets": [[0, 1, 0]],
    }


def with_(**changes) -> bytes:
    doc = valid_doc()
    doc.update(changes)
    return json.dumps(doc).encode()


BAD_CONTENTS = {
    "not json": b"{this is not json",
    "truncated": json.dumps(valid_doc()).encode()[:-7],
    "empty": b"",
    "binary": b"\xff\xfe\x00garbage",
    "a list": b"[1, 2, 3]",
    "wrong format tag": with_(format="something-else"),
    "future version": with_(version=2),
    "bool version": with_(version=True),
    "saved_at string": with_(saved_at="yesterday"),
    "saved_at nan": with_(saved_at=float("nan")),
    "bucket size": with_(bucket_s=0.1),
    "totals list": with_(totals=[1, 2]),
    "total string": with_(totals={"msg_req": "12"}),
    "total negative": with_(totals={"msg_req": -1}),
    "total bool": with_(totals={"msg_req": True}),
    "total float": with_(totals={"msg_req": 1.5}),
    "total overflow": with_(totals={"msg_req": 1 << 63}),
    "buckets object": with_(buckets={"0": 1}),
    "bucket short": with_(buckets=[[0, 1]]),
    "bucket negative age": with_(buckets=[[-5, 1, 0]]),
    "bucket string": with_(buckets=[[0, "1", 0]]),
    "deeply nested": b"[" * 100000 + b"]" * 100000,
}


@pytest.mark.parametrize("content", list(BAD_CONTENTS.values()), ids=list(BAD_CONTENTS))
def test_corrupt_file_is_logged_and_set_aside(tmp_path, caplog, content):
    path = tmp_path / "recovery.json"
    path.write_bytes(content)
    with caplog.at_level(logging.WARNING, logger="fooproxy.recovery"):
        assert recovery.load(str(path), now=5000.0) is None
    assert not path.exists()
    aside = list(tmp_path.glob("recovery.json.corrupt-*"))
    assert len(aside) == 1 and aside[0].read_bytes() == content
    [record] = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert str(path) in record.getMessage() and "moved to" in record.getMessage()


def test_directory_in_place_of_file_is_set_aside(tmp_path, caplog):
    path = tmp_path / "recovery.json"
    path.mkdir()
    (path / "inside").write_text("x")
    with caplog.at_level(logging.WARNING, logger="fooproxy.recovery"):
        assert recovery.load(str(path)) is None
    assert not path.exists()
    [aside] = list(tmp_path.glob("recovery.json.corrupt-*"))
    assert (aside / "inside").read_text() == "x"
    assert "is a directory" in caplog.text


def test_unknown_counters_are_ignored_not_fatal(tmp_path):
    path = tmp_path / "recovery.json"
    path.write_bytes(with_(totals={"msg_req": 4, "from_the_future": 9, "connections_active": 7}))
    snap = recovery.load(str(path), now=5000.0)
    assert snap is not None and snap.totals == {"msg_req": 4}
    assert path.exists()  # a good file stays where it is


def test_device_is_never_moved(caplog):
    with caplog.at_level(logging.WARNING, logger="fooproxy.recovery"):
        assert recovery.load(os.devnull) is None
    assert os.path.exists(os.devnull) and "not a regular file" in caplog.text


def test_unwritable_directory_marks_saver_unhealthy_and_logs_once(tmp_path, caplog):
    blocker = tmp_path / "a-file"
    blocker.write_text("I am a regular file, not a directory")
    path = str(blocker / "sub" / "recovery.json")  # parent is a regular file: even root cannot
    saver = recovery.Saver(path, Stats().snapshot)
    with caplog.at_level(logging.INFO, logger="fooproxy.recovery"):
        assert saver.save_now() is False
        assert saver.save_now() is False
    assert saver.healthy is False
    assert "Not a directory" in saver.last_error or "not a directory" in saver.last_error
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and path in errors[0].getMessage()

    # The problem goes away: healthy again, one INFO line.
    blocker.unlink()
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="fooproxy.recovery"):
        assert saver.save_now() is True
    assert saver.healthy and saver.last_error is None
    assert os.path.isfile(path)
    assert [r.levelno for r in caplog.records] == [logging.INFO]


def test_saver_refuses_to_replace_a_non_regular_file(tmp_path):
    path = tmp_path / "recovery.json"
    path.mkdir()
    saver = recovery.Saver(str(path), Stats().snapshot)
    assert saver.save_now() is False
    assert "not a regular file" in saver.last_error
    assert path.is_dir()


def test_save_is_atomic_and_leaves_no_temp_files(tmp_path):
    path = tmp_path / "recovery.json"
    path.write_text("old")
    stats = Stats()
    stats.record(True, 3, Counts(req=2))
    assert recovery.Saver(str(path), stats.snapshot).save_now()
    assert json.loads(path.read_text())["totals"]["msg_req"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["recovery.json"]


def test_periodic_saver_saves_and_stops(tmp_path):
    import gevent

    path = tmp_path / "recovery.json"
    stats = Stats()
    saver = recovery.Saver(str(path), stats.snapshot, interval=0.01)
    saver.start()
    try:
        with gevent.Timeout(5):
            while saver.saves < 3:
                gevent.sleep(0.005)
    finally:
        loop = saver._greenlet
        saver.stop()
    assert loop is not None and loop.dead  # stop() waited for the loop to end
    stats.record(True, 3, Counts(req=5))
    assert saver.save_now()  # the final save at shutdown
    assert json.loads(path.read_text())["totals"]["msg_req"] == 5
