"""The live page in a real browser: Debian's headless Chromium through chromedriver (selenium).

fooproxy runs in front of a server as the user runs it (alone, and with
``-workers 2``); a paced load generator (another process) sends a known rate
of REQs; the test reads what a person sees on the page: the totals (they
must equal SIGUSR2's), the rate shown (near the generated one), the charts'
points, "no latency data" while this build has no latency fields, the
"disconnected, reconnecting…" line while the proxy is down, and the page
coming back by itself after a restart on the same ports. A stand-in process
whose stats carry the latency fields (``latency_p50_ms``, ``latency_p99_ms``:
another branch adds them) shows that the page charts them by name. Screenshots (laptop
and phone width) are saved under the test's directory, and also in
``$FOO_ARTEFACTS_DIR`` when that is set (``docs/dashboard.png`` is made so).

Skipped, saying which, when selenium, ``/usr/bin/chromium`` or
``/usr/bin/chromedriver`` is missing (``.ci/run`` installs the Debian packages).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness import tasks
from harness.processes import Process, free_port
from harness.sigusr2 import read_stats_when_idle
from tests.helpers import wait_until

pytestmark = pytest.mark.e2e

CHROMIUM = os.environ.get("FOO_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("FOO_CHROMEDRIVER", "/usr/bin/chromedriver")
CHROME_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
)
#: The load: CONNS paced connections at PER_CONN requests/s each, for LOAD_S seconds.
CONNS, PER_CONN, LOAD_S = 4, 50, 8.0
RATE = CONNS * PER_CONN
#: Three Python processes start before "listening on" with workers: slow on a loaded 2-core machine.
READY_TIMEOUT = 60.0
TOTALS = ("msg_total", "msg_req", "msg_ack", "msg_nak")


def _need(path: str, package: str) -> None:
    if not (os.path.isfile(path) and os.access(path, os.X_OK)):
        pytest.skip("%s not found (Debian package %s): the live page's browser test did not run" % (path, package))


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[object]:
    """Headless Chromium with a fresh profile, driven by chromedriver; quit at teardown."""
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError as exc:
        pytest.skip(
            "selenium is not installed (pip install '.[test]'): the live page's browser test did not run (%s)" % exc
        )
    _need(CHROMIUM, "chromium")
    _need(CHROMEDRIVER, "chromium-driver")
    profile = tempfile.mkdtemp(prefix="chromium-", dir=tmp_path)
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (*CHROME_FLAGS, "--user-data-dir=" + profile, "--window-size=1280,1000"):
        options.add_argument(flag)
    service = Service(executable_path=CHROMEDRIVER, log_output=str(tmp_path / "chromedriver.log"))
    driver = webdriver.Chrome(options=options, service=service)
    driver.set_page_load_timeout(30)
    driver.set_script_timeout(10)
    try:
        yield driver
    finally:
        driver.quit()


# -- what a person sees -------------------------------------------------------------------------
def shown(driver, element_id: str) -> str:
    return driver.find_element("id", element_id).text


def shown_field(driver, field: str) -> str | None:
    """The text of the number shown for ``field`` ("" or None when not shown yet)."""
    found = driver.find_elements("css selector", 'dd[data-field="%s"]' % field)
    return found[0].text if found else None


def shown_number(driver, field: str) -> float | None:
    text = shown_field(driver, field)
    if not text or text == "—":
        return None
    return float(text.replace(",", ""))


def shown_totals(driver) -> dict[str, float | None]:
    return {f: shown_number(driver, f) for f in TOTALS}


def points(driver, chart_id: str) -> int:
    return int(driver.find_element("id", chart_id).get_attribute("data-points") or 0)


def state(driver) -> str:
    return driver.find_element("id", "conn").get_attribute("data-state")


def waited(predicate, timeout: float, what: str, interval: float = 0.2):
    value = wait_until(predicate, timeout, interval)
    assert value, "timed out after %gs waiting for %s" % (timeout, what)
    return value


def save(driver, tmp_path: Path, name: str) -> Path:
    """A screenshot in the test's directory, and in $FOO_ARTEFACTS_DIR when set."""
    path = tmp_path / name
    assert driver.save_screenshot(str(path)), "screenshot failed"
    if os.environ.get("FOO_ARTEFACTS_DIR"):
        out = Path(os.environ["FOO_ARTEFACTS_DIR"])
        out.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, out / name)
    print("screenshot: %s" % path)
    return path


# -- the proxy and the load ---------------------------------------------------------------------
def start(procs, server: tasks.Service, listen: str, http: str, workers: tuple[str, ...], name: str):
    proxy = procs.proxy(server.address, *workers, listen=listen, http=http, name=name, ready_timeout=READY_TIMEOUT)
    # With workers the port listens once the first worker does; the master's line means all of them.
    proxy.wait_for_output(tasks.PROXY_READY, READY_TIMEOUT, "stderr")
    return proxy


def load(address: str, duration: float, log: Path) -> subprocess.Popen:
    """The paced load generator (its own process: selenium's calls block this one)."""
    cmd = [sys.executable, "-m", "harness.bench.loadgen", "-connect", address, "-conns", str(CONNS)]
    cmd += ["-rate", str(PER_CONN), "-duration", str(duration), "-procs", "1"]
    return subprocess.Popen(cmd, stdout=open(log, "wb"), stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)


def finished(gen: subprocess.Popen, log: Path, timeout: float) -> dict:
    rc = gen.wait(timeout=timeout)
    text = log.read_text()
    assert rc == 0, "load generator exit %s: %s" % (rc, text[-2000:])
    return json.loads(text.strip().splitlines()[-1])


@pytest.mark.parametrize("workers", [(), ("-workers", "2")], ids=["single", "workers2"])
def test_live_page_shows_the_traffic_and_survives_a_restart(procs, server, browser, tmp_path, workers) -> None:
    driver = browser
    listen, http = "127.0.0.1:%d" % free_port(), "127.0.0.1:%d" % free_port()
    proxy = start(procs, server, listen, http, workers, "fooproxy")
    driver.get("http://%s/" % http)
    assert "fooproxy" in driver.title
    waited(lambda: state(driver) == "live", 15, "the page to connect")
    assert shown(driver, "st-workers") == ("2" if workers else "1")

    gen = load(listen, LOAD_S, tmp_path / "load.json")
    try:
        # The rate shown, read as a person would while the load runs: near the generated rate.
        rates: list[float] = []

        def rate_near() -> bool:
            text = shown(driver, "now-req")
            if text.endswith("/s") and text != "—/s":
                rates.append(float(text[:-2].replace(",", "")))
            return bool(rates) and 0.7 * RATE <= rates[-1] <= 1.3 * RATE

        waited(rate_near, LOAD_S, "a REQ rate near %d/s on the page (shown: %s)" % (RATE, rates[-10:]))
        assert 0.7 * RATE <= (shown_number(driver, "request_rate_1s") or 0) <= 1.3 * RATE
        result = finished(gen, tmp_path / "load.json", LOAD_S + 30)
    finally:
        if gen.poll() is None:
            gen.kill()
            gen.wait()
    assert result["answered"] == result["sent"] > 0, result

    # The totals on the page equal SIGUSR2's (the page catches up within a sample or two).
    stats = read_stats_when_idle(proxy)
    assert stats["msg_req"] == result["sent"], (stats, result)
    want = {f: float(stats[f]) for f in TOTALS}
    waited(
        lambda: shown_totals(driver) == want,
        5,
        "the page's totals %s to be SIGUSR2's %s" % (shown_totals(driver), want),
    )
    assert shown_number(driver, "connections_total") == stats["connections_total"]
    # The charts have points: one per second since the proxy started (the history).
    assert points(driver, "chart-rates") >= 2 * int(LOAD_S), points(driver, "chart-rates")
    assert points(driver, "chart-conns") >= int(LOAD_S)
    if "latency_p50_ms" in stats:
        assert points(driver, "chart-latency") > 0
        assert shown(driver, "now-p50") != "—"
    else:  # this build has no latency fields: the page says so instead of drawing zeros
        assert points(driver, "chart-latency") == 0
        assert shown(driver, "latency-empty") == "no latency data"
        assert shown(driver, "now-p50") == shown(driver, "now-p99") == "—"
    assert shown(driver, "st-upstream") == "up"
    assert shown(driver, "st-draining") == "no"
    assert shown(driver, "st-version") != "—"
    save(driver, tmp_path, "dashboard%s.png" % ("-workers" if workers else ""))

    # A phone's width: one column, nothing wider than the screen.
    driver.set_window_size(390, 844)
    waited(
        lambda: driver.execute_script("return document.documentElement.scrollWidth <= window.innerWidth"),
        5,
        "no sideways scrolling at 390 px",
    )
    save(driver, tmp_path, "dashboard-phone%s.png" % ("-workers" if workers else ""))
    driver.set_window_size(1280, 1000)

    # The proxy goes away: the page says so; a new one on the same ports: the page is live again by itself.
    proxy.stop()
    waited(lambda: shown(driver, "conn") == "disconnected, reconnecting…", 10, "the page to notice the proxy is gone")
    again = start(procs, server, listen, http, workers, "fooproxy-again")
    waited(lambda: state(driver) == "live", 20, "the page to reconnect to the restarted proxy")
    gen = load(listen, 1.0, tmp_path / "load-again.json")
    try:
        result = finished(gen, tmp_path / "load-again.json", 30)
    finally:
        if gen.poll() is None:
            gen.kill()
            gen.wait()
    stats = read_stats_when_idle(again)
    assert stats["msg_req"] == result["sent"] > 0, (stats, result)  # a new process: recovery is off
    want = {f: float(stats[f]) for f in TOTALS}
    waited(
        lambda: shown_totals(driver) == want,
        5,
        "the page's totals %s to be the new proxy's %s" % (shown_totals(driver), want),
    )


#: A stand-in for a build whose /stats has the latency fields (another branch adds them): the real
#: HTTP server and LiveSamples, in their own process, over a stats object that carries them.
LATENCY_SOURCE = """
import itertools, sys, gevent
from fooproxy.config import Address
from fooproxy.dashboard import LiveSamples
from fooproxy.http import HttpServer, make_app
from fooproxy.stats import Stats
n = itertools.count()
def stats():
    d = Stats().snapshot().as_dict()
    i = next(n)
    d.update(latency_p50_ms=2.0 + i % 3, latency_p90_ms=5.0, latency_p99_ms=9.0 + i % 5, latency_max_ms=20.0)
    return d
live = LiveSamples(stats, lambda: {"upstream_up": 1.0, "draining": 0.0}, info={"version": "t", "workers": 1})
HttpServer(Address("127.0.0.1", int(sys.argv[1])), make_app(Stats().snapshot, lambda: (True, {}), live=live)).start()
live.start()
gevent.sleep(120)
"""


def test_latency_fields_when_present_are_charted_by_name(procs, browser, tmp_path) -> None:
    driver = browser
    port = free_port()
    procs.add(
        Process(
            [sys.executable, "-c", LATENCY_SOURCE, str(port)], name="latency-page", ready_listen=port, log_dir=tmp_path
        ).start()
    )
    driver.get("http://127.0.0.1:%d/" % port)
    waited(lambda: state(driver) == "live", 15, "the page to connect")
    waited(lambda: points(driver, "chart-latency") >= 6, 10, "latency points")  # p50 and p99, 3 samples
    assert "nodata" not in driver.find_element("id", "chart-latency").get_attribute("class")
    assert not driver.find_element("id", "latency-empty").is_displayed()
    p50, p99 = shown(driver, "now-p50"), shown(driver, "now-p99")
    assert p50.endswith(" ms") and 2 <= float(p50[:-3]) <= 4, p50
    assert p99.endswith(" ms") and 9 <= float(p99[:-3]) <= 13, p99
    assert shown_number(driver, "latency_max_ms") == 20.0  # the other latency fields are listed with the counters
