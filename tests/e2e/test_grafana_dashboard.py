"""The shipped Grafana dashboard asks only for metrics a running fooproxy serves."""

from __future__ import annotations

import json
import re
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from harness.processes import free_port

pytestmark = pytest.mark.e2e

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "fooproxy.json"
#: PromQL words that are not metric names: functions, aggregations, keywords.
PROMQL_WORDS = frozenset(
    "sum min max avg count rate irate increase histogram_quantile time by without on ignoring group_left "
    "group_right label_values bool offset and or unless".split()
)


def expressions(node) -> list[str]:
    """Every PromQL expression in the dashboard: targets' ``expr`` and the variables' queries."""
    found = []
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "expr" and isinstance(value, str):
                found.append(value)
            elif key == "query" and isinstance(value, dict) and isinstance(value.get("query"), str):
                found.append(value["query"])
            else:
                found.extend(expressions(value))
    elif isinstance(node, list):
        for item in node:
            found.extend(expressions(item))
    return found


def metric_names(expr: str) -> set[str]:
    """The metric names an expression reads (labels, ranges, strings and grouping clauses removed)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', "", expr)
    text = re.sub(r"\{[^}]*\}", "", text)
    text = re.sub(r"\[[^\]]*\]", "", text)
    text = re.sub(r"\b(?:by|without)\s*\([^)]*\)", "", text)
    text = re.sub(r"label_values\(([^,]*),[^)]*\)", r"\1", text)
    names = set(re.findall(r"(?<![\w$.])[a-zA-Z_:][a-zA-Z0-9_:]*", text))
    return {n for n in names if n not in PROMQL_WORDS}


def test_metric_names_parse():
    assert metric_names('histogram_quantile(0.5, sum by (le) (rate(a_bucket{x=~"$i"}[$__rate_interval])))') == {
        "a_bucket"
    }
    assert metric_names('time() - process_start_time_seconds{instance=~"$instance"}') == {"process_start_time_seconds"}


def test_every_dashboard_metric_is_served(procs, server):
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = expressions(dashboard)
    assert len(exprs) >= 10
    wanted = set().union(*(metric_names(e) for e in exprs))
    http = "127.0.0.1:%d" % free_port()
    procs.proxy(server.address, http=http)
    with urllib.request.urlopen("http://%s/metrics" % http, timeout=10) as resp:
        body = resp.read().decode()
    served = {sample.name for family in text_string_to_metric_families(body) for sample in family.samples}
    assert wanted <= served, "the dashboard asks for metrics /metrics does not serve: %s" % sorted(wanted - served)
    # Every panel the issue asks for is there.
    titles = " ".join(p["title"].lower() for p in dashboard["panels"])
    for word in ("messages", "heatmap", "quantiles", "connections", "upstream up"):
        assert word in titles, word
