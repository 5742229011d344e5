"""Reloader: one reload at a time; SIGHUPs during one coalesce into exactly one more; never lost."""

from __future__ import annotations

import dataclasses
import logging

import gevent
from gevent.event import Event

from fooproxy.config import Config, ConfigError
from fooproxy.reload import Reloader, changes, keep_restart_only


def test_requests_during_a_reload_coalesce_into_one_more_run():
    gate = Event()
    running = []
    overlap = []

    def apply() -> str:
        overlap.append(len(running))
        running.append(1)
        gate.wait(5)
        running.pop()
        return "x"

    reloader = Reloader(apply)
    reloader.request()
    gevent.sleep(0)  # the first run has started and waits on the gate
    assert reloader.busy and reloader.runs == 0
    for _ in range(5):
        reloader.request()  # during the run: remembered once
    gate.set()
    gevent.wait([reloader._runner], timeout=5)
    assert reloader.runs == 2
    assert overlap == [0, 0]
    assert not reloader.busy
    reloader.request()  # after the runs: a new one
    gevent.wait([reloader._runner], timeout=5)
    assert reloader.runs == 3


def test_a_rejected_or_failing_reload_is_logged_and_the_next_still_runs(caplog):
    caplog.set_level(logging.INFO, logger="fooproxy.reload")
    outcomes = iter([ConfigError("f.toml: line 2: key grace: bad"), RuntimeError("bug"), "grace 1 -> 2"])

    def apply() -> str:
        item = next(outcomes)
        if isinstance(item, Exception):
            raise item
        return item

    reloader = Reloader(apply)
    for _ in range(3):
        reloader.request()
        gevent.wait([reloader._runner], timeout=5)
    text = caplog.text
    assert "reload rejected, running settings kept: f.toml: line 2: key grace: bad" in text
    assert "reload failed" in text and "reload: grace 1 -> 2" in text
    assert reloader.runs == 3


def test_changes_and_restart_only():
    old = Config()
    new = dataclasses.replace(old, grace=2.0, listen=dataclasses.replace(old.listen, port=9), workers=3)
    kept, notes = keep_restart_only(old, new)
    assert kept.listen == old.listen and kept.workers == old.workers and kept.grace == 2.0
    assert [n.split(" ", 1)[0] for n in notes] == ["listen", "workers"]
    assert changes(old, kept) == ["grace 10 -> 2"]
