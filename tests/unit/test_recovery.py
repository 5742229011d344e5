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
    "total int64 max": with_(totals={"msg_req": (1 << 63) - 1}),
    "total past MAX_COUNT": with_(totals={"msg_req": recovery.MAX_COUNT + 1}),
    "bucket int64 max": with_(totals={"msg_req": 1}, buckets=[[0, (1 << 63) - 1, 0]]),
    "bucket bool": with_(buckets=[[0, True, 0]]),
    "bucket float": with_(buckets=[[0.0, 1, 0]]),
    "bucket older than the window": with_(buckets=[[1000, 1, 0]]),
    "bucket age twice": with_(totals={"msg_req": 2}, buckets=[[0, 1, 0], [0, 1, 0]]),
    "more requests in buckets than msg_req": with_(totals={"msg_req": 1}, buckets=[[0, 2, 0]]),
    "more responses in buckets than answers": with_(totals={"msg_req": 1, "msg_ack": 1}, buckets=[[0, 1, 2]]),
    "saved_at negative": with_(saved_at=-1e308),
    "saved_at zero": with_(saved_at=0),
    "saved_at year 10000": with_(saved_at=2.6e11),
    "bucket_s int": with_(bucket_s=0),
    "huge number": b'{"format": "fooproxy-recovery", "version": 1, "saved_at": 1' + b"0" * 5000 + b"}",
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


def test_directory_in_place_of_file_is_left_alone(tmp_path, caplog):
    path = tmp_path / "recovery.json"
    path.mkdir()
    (path / "inside").write_text("x")
    with caplog.at_level(logging.WARNING, logger="fooproxy.recovery"):
        assert recovery.load(str(path)) is None
    assert (path / "inside").read_text() == "x"
    assert not list(tmp_path.glob("recovery.json.corrupt-*"))
    assert "is a directory" in caplog.text


@pytest.mark.parametrize("kind", ["fifo", "symlink to a directory", "symlink to a file", "socket"])
def test_anything_but_a_regular_file_is_left_alone(tmp_path, caplog, kind):
    import socket

    path = tmp_path / "recovery.json"
    target = tmp_path / "target"
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "socket":
        sock = socket.socket(socket.AF_UNIX)
        sock.bind(str(path))
        sock.close()
    elif kind == "symlink to a directory":
        target.mkdir()
        path.symlink_to(target)
    else:
        target.write_bytes(b"{not json")
        path.symlink_to(target)
    before = os.lstat(path)
    with caplog.at_level(logging.WARNING, logger="fooproxy.recovery"):
        assert recovery.load(str(path)) is None
    after = os.lstat(path)
    assert (after.st_ino, after.st_mode) == (before.st_ino, before.st_mode)
    assert not list(tmp_path.glob("recovery.json.corrupt-*"))
    assert "not a regular file" in caplog.text
    saver = recovery.Saver(str(path), Stats().snapshot)
    assert saver.save_now() is False and "not a regular file" in saver.last_error
    assert os.lstat(path).st_ino == before.st_ino
    if kind == "symlink to a file":
        assert target.read_bytes() == b"{not json"


def test_saver_start_reports_a_directory_at_once(tmp_path):
    path = tmp_path / "recovery.json"
    path.mkdir()
    saver = recovery.Saver(str(path), Stats().snapshot, interval=3600)
    saver.start()
    try:
        assert saver.healthy is False and "is a directory" in saver.last_error
    finally:
        saver.stop()


def test_decode_raises_only_its_corrupt_error_on_any_bytes():
    from hypothesis import given, settings
    from hypothesis import strategies as st

    good = json.dumps(valid_doc()).encode()
    scalars = st.one_of(
        st.none(),
        st.booleans(),
        st.integers(min_value=-(1 << 70), max_value=1 << 70),
        st.floats(allow_nan=True, allow_infinity=True),
        st.text(max_size=5),
    )
    values = st.recursive(
        scalars,
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
        max_leaves=12,
    )

    def docs():
        return st.fixed_dictionaries(
            {},
            optional={
                "format": st.sampled_from(["fooproxy-recovery"]) | values,
                "version": st.sampled_from([1]) | values,
                "saved_at": st.floats(min_value=-1e20, max_value=1e20) | values,
                "bucket_s": st.sampled_from([0.01]) | values,
                "totals": st.dictionaries(st.sampled_from(["msg_req", "msg_ack", "msg_nak", "x"]), values) | values,
                "buckets": st.lists(st.lists(values, max_size=4), max_size=5) | values,
            },
        )

    def check(data: bytes) -> None:
        try:
            snap = recovery.decode(data, now=5000.0)
        except recovery.RecoveryFormatError:
            return
        # Whatever decodes is restorable: every count fits, the windows add up.
        for value in snap.totals.values():
            assert 0 <= value <= recovery.MAX_COUNT
        stats = Stats()
        stats.restore(snap)

    @settings(max_examples=250, deadline=None, database=None)
    @given(
        st.binary(max_size=200)
        | st.builds(lambda cut, extra: good[:cut] + extra, st.integers(0, len(good)), st.binary(max_size=8))
    )
    def any_bytes(data):
        check(data)

    @settings(max_examples=250, deadline=None, database=None)
    @given(docs())
    def any_document(doc):
        check(json.dumps(doc).encode())

    any_bytes()
    any_document()


def test_what_encode_writes_decodes_even_when_buckets_ran_ahead_of_totals():
    # The -workers master reads totals before buckets while workers count:
    # encode trims the excess from the rates so the file stays valid.
    from fooproxy.stats import Snapshot

    snap = Snapshot(totals={"msg_req": 3, "msg_ack": 1}, buckets=[(0, 2, 1), (5, 2, 1)])
    back = recovery.decode(recovery.encode(snap, 5000.0), now=5000.0)
    assert back.totals["msg_req"] == 3 and back.totals["msg_ack"] == 1
    assert back.buckets == [(0, 1, 0), (5, 2, 1)]


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


def test_save_never_writes_through_a_planted_symlink(tmp_path):
    # The old temp name was .<name>.<pid>.tmp, opened with O_TRUNC and no
    # O_EXCL/O_NOFOLLOW: a symlink planted there had its target overwritten.
    path = tmp_path / "recovery.json"
    victim = tmp_path / "victim"
    victim.write_text("precious")
    for name in (".recovery.json.%d.tmp" % os.getpid(), ".recovery.json.tmp"):
        (tmp_path / name).symlink_to(victim)
    assert recovery.Saver(str(path), Stats().snapshot).save_now()
    assert victim.read_text() == "precious"
    assert json.loads(path.read_text())["format"] == "fooproxy-recovery"
    assert oct(path.stat().st_mode & 0o777) == oct(0o644)


def test_second_lock_on_one_file_is_refused_and_names_the_holder(tmp_path):
    path = str(tmp_path / "sub" / "recovery.json")
    first = recovery.lock(path)
    try:
        assert first.held and first.problem is None
        with pytest.raises(recovery.RecoveryInUse, match=r"in use by another fooproxy \(pid %d\)" % os.getpid()):
            recovery.lock(path)
    finally:
        first.release()
    again = recovery.lock(path)  # released: free again
    assert again.held
    again.release()


def test_a_symlink_at_the_lock_path_is_not_followed(tmp_path, caplog):
    path = tmp_path / "recovery.json"
    victim = tmp_path / "victim"
    victim.write_text("precious")
    (tmp_path / "recovery.json.lock").symlink_to(victim)
    with caplog.at_level(logging.WARNING, logger="fooproxy.recovery"):
        held = recovery.lock(str(path))
    assert not held.held and "symbolic link" in held.problem
    assert victim.read_text() == "precious"


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
