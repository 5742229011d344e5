"""LiveSamples without a network: the ring's bound, what a sample holds, a failing source."""

from __future__ import annotations

import json
import logging
import re

from fooproxy.dashboard import STATIC_FILES, LiveSamples, load_static, page_routes, sse


def test_the_ring_keeps_the_last_history_samples_in_order() -> None:
    n = iter(range(100))
    live = LiveSamples(lambda: {"msg_total": next(n)}, history=3, clock=lambda: 5.0)
    for _ in range(5):
        live.take()
    assert live.taken == 5
    assert [json.loads(s)["stats"]["msg_total"] for s in live.ring] == [2, 3, 4]
    assert json.loads(live.ring[-1]) == {"t": 5.0, "stats": {"msg_total": 4}}


def test_a_sample_carries_the_health_gauges_when_given() -> None:
    live = LiveSamples(lambda: {"a": 1}, lambda: {"upstream_up": 0.0}, clock=lambda: 1.5)
    assert json.loads(live.take()) == {"t": 1.5, "stats": {"a": 1}, "health": {"upstream_up": 0.0}}


def test_a_failing_source_is_logged_once_and_sampling_goes_on(caplog) -> None:
    calls = []

    def stats() -> dict:
        calls.append(1)
        if len(calls) <= 3:
            raise RuntimeError("boom")
        return {"ok": 1}

    live = LiveSamples(stats, logger=logging.getLogger("t.live"))
    with caplog.at_level(logging.ERROR, logger="t.live"):
        assert [live.take() for _ in range(3)] == [None, None, None]
        assert live.take() is not None
    assert len([r for r in caplog.records if "taking a sample failed" in r.getMessage()]) == 1
    assert len(live.ring) == 1


def test_the_first_chunk_of_a_stream_is_retry_info_and_the_history() -> None:
    live = LiveSamples(lambda: {"x": 1}, info={"version": "v"}, clock=lambda: 2.0)
    live.take()
    live.take()
    body = live.stream()
    first = next(body)
    assert first.startswith(b"retry: 1000\n\n")
    assert sse("info", b'{"version":"v"}') in first
    history = first.split(b"event: history\ndata: ", 1)[1].rstrip(b"\n")
    assert json.loads(history) == [{"t": 2.0, "stats": {"x": 1}}] * 2
    assert live.streams == 1
    body.close()  # what pywsgi does when the client has gone
    assert live.streams == 0


def test_the_page_and_every_file_it_names_are_in_the_package() -> None:
    files = load_static()
    assert set(files) == set(STATIC_FILES)
    routes = page_routes(files)
    assert routes["/"] == routes["/dashboard"] == files["dashboard.html"]
    page = files["dashboard.html"][1].decode()
    for name in ("uPlot.iife.min.js", "uPlot.min.css", "dashboard.js", "dashboard.css"):
        assert "/static/" + name in page
    # Offline: our files name no other host (no CDN, no web font); uPlot's code names only XML namespaces.
    for name in ("dashboard.html", "dashboard.js", "dashboard.css"):
        text = files[name][1].decode()
        assert "http://" not in text and "https://" not in text and "@import" not in text, name
    uplot = files["uPlot.iife.min.js"][1].decode().split("*/", 1)[1]  # past its licence header
    assert set(re.findall(r"https?://[^\"' ]+", uplot)) <= {
        "http://www.w3.org/2000/svg",
        "http://www.w3.org/1999/xhtml",
    }


def test_a_stream_sends_every_sample_it_missed_and_a_comment_when_none_comes() -> None:
    n = iter(range(100))
    live = LiveSamples(lambda: {"n": next(n)}, keepalive=0.05)
    body = live.stream()
    next(body)  # the history (empty)
    for _ in range(3):  # three samples while the page's last write was still going
        live.take()
    chunk = next(body)
    assert [json.loads(part.split(b"data: ", 1)[1])["stats"]["n"] for part in chunk.split(b"\n\n") if part] == [0, 1, 2]
    assert next(body) == b": no sample\n\n"  # nothing for 0.05 s: a comment, which finds a client that has gone
    live.stop()
    assert list(body) == [] and live.streams == 0
