"""A real Prometheus for the harness: find or install it, configure it to scrape fooproxies, query it.

Used by ``tests/e2e/test_prometheus.py`` (two proxies on loopback) and by the
fleet (``harness.fleet``: proxies in other namespaces or machines). Prometheus
runs with a temporary config and storage directory, scrapes every second and
evaluates the shipped recording rules (``deploy/prometheus/fooproxy.rules.yml``)
when they are there.
"""

from __future__ import annotations

import json
import time
import urllib.parse
import urllib.request
from collections.abc import Sequence
from pathlib import Path

from harness.apt import apt_install
from harness.processes import Process

DEPLOY = Path(__file__).resolve().parents[1] / "deploy" / "prometheus"
RULES = DEPLOY / "fooproxy.rules.yml"
SAMPLE_CONFIG = DEPLOY / "prometheus.yml"
PACKAGE = "prometheus"


def find_prometheus() -> tuple[str | None, str]:
    """The ``prometheus`` binary (installing Debian's package as root if needed), or ``(None, why not)``."""
    return apt_install(PACKAGE, "prometheus")


def scrape_config(targets: Sequence[str], rules: Sequence[str] = (), job: str = "fooproxy") -> str:
    """A Prometheus config scraping ``targets`` (``host:port``) every second, with ``rules`` files."""
    text = "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
    if rules:
        text += "rule_files:\n" + "".join("  - %s\n" % r for r in rules)
    text += "scrape_configs:\n  - job_name: %s\n    static_configs:\n" % job
    text += "      - targets: [%s]\n" % ", ".join("'%s'" % t for t in targets)
    return text


def command(binary: str, config: str, data_dir: str, listen: str) -> list[str]:
    """The Prometheus command line for ``config``, storing in ``data_dir``, serving on ``listen``."""
    return [
        binary,
        "--config.file=%s" % config,
        "--storage.tsdb.path=%s" % data_dir,
        "--web.listen-address=%s" % listen,
        "--log.level=warn",
    ]


class Api:
    """Prometheus's HTTP API at ``base`` (``http://host:port``): readiness and instant queries."""

    def __init__(self, base: str) -> None:
        self.base = base.rstrip("/")

    def wait_ready(self, proc: Process | None = None, timeout: float = 60.0) -> None:
        """Poll ``/-/ready`` until 200; ``AssertionError`` (with ``proc``'s output) if it exits or times out."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                with urllib.request.urlopen(self.base + "/-/ready", timeout=2) as resp:
                    if resp.status == 200:
                        return
            except OSError:
                pass
            if proc is not None:
                assert proc.alive(), proc.tail()
            if time.monotonic() >= deadline:
                raise AssertionError(
                    "Prometheus not ready within %gs\n%s" % (timeout, proc.tail() if proc is not None else self.base)
                )
            time.sleep(0.1)

    def query(self, promql: str) -> list[dict]:
        """Instant query; the result vector."""
        url = "%s/api/v1/query?%s" % (self.base, urllib.parse.urlencode({"query": promql}))
        with urllib.request.urlopen(url, timeout=5) as resp:
            body = json.load(resp)
        assert body["status"] == "success", body
        return body["data"]["result"]

    def scalar(self, promql: str) -> float | None:
        """The single value of ``promql``, or None while it has no result yet."""
        result = self.query(promql)
        assert len(result) <= 1, result
        return float(result[0]["value"][1]) if result else None

    def wait_value(self, promql: str, want: float, timeout: float = 45.0) -> None:
        """Poll until ``promql`` evaluates to ``want`` (new scrapes and rule runs come every second)."""
        deadline = time.monotonic() + timeout
        seen = None
        while time.monotonic() < deadline:
            seen = self.scalar(promql)
            if seen == want:
                return
            time.sleep(0.2)
        raise AssertionError("%s = %s after %gs, want %s" % (promql, seen, timeout, want))
