"""The packaging promises stay in step: tox's gevent-min/max pins are the ends of the range
setup.py admits, and the runtime requirements are only gevent, docopt-ng, prometheus_client, python-json-logger
and orjson (python-json-logger's serializer for -log-format json).
"""

from __future__ import annotations

import ast
import configparser
import re
from pathlib import Path

from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[2]


def _setup_kwargs() -> dict:
    tree = ast.parse((ROOT / "setup.py").read_text())
    call = next(n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "setup")
    return {kw.arg: kw.value for kw in call.keywords if kw.arg in ("install_requires", "extras_require")}


def _install_requires() -> list[Requirement]:
    return [Requirement(r) for r in ast.literal_eval(_setup_kwargs()["install_requires"])]


def _tox_deps() -> dict[str, str]:
    tox = configparser.ConfigParser(interpolation=None)
    tox.read(ROOT / "tox.ini")
    deps = {}
    for line in tox["testenv"]["deps"].splitlines():
        factor, sep, req = line.strip().partition(":")
        if sep:
            deps[factor.strip()] = req.strip()
    return deps


def test_runtime_requirements_are_only_the_five_chosen_libraries() -> None:
    chosen = {"gevent", "docopt-ng", "prometheus_client", "python-json-logger", "orjson"}
    assert {r.name for r in _install_requires()} == chosen
    assert all(r.specifier for r in _install_requires()), "every runtime requirement has a pinned range"


def test_tox_gevent_factors_pin_the_ends_of_the_setup_py_range() -> None:
    gevent = next(r for r in _install_requires() if r.name == "gevent")
    lowest = min(Version(s.version) for s in gevent.specifier if s.operator == ">=")
    deps = _tox_deps()
    low = Requirement(deps["gevent-min"])
    assert [(s.operator, Version(s.version)) for s in low.specifier] == [("==", lowest)], deps
    high = Requirement(deps["gevent-max"]).specifier
    upper = next(s for s in gevent.specifier if s.operator == "<")
    # gevent-max admits only releases setup.py admits, and nothing below the newest major.
    assert upper in high or any(s.operator == "<" and Version(s.version) <= Version(upper.version) for s in high)
    newest_major = int(upper.version.split(".")[0]) - 1
    assert not SpecifierSet(str(high)).contains("%d.0" % (newest_major - 1)), high


def test_tox_envlist_covers_each_python_with_both_gevent_ends() -> None:
    tox = configparser.ConfigParser(interpolation=None)
    tox.read(ROOT / "tox.ini")
    envlist = tox["tox"]["envlist"]
    assert re.search(r"py\{311,312,313\}-gevent-\{min,max\}", envlist), envlist
    for env in ("lint", "e2e", "load"):
        assert re.search(r"^\s*%s\s*$" % env, envlist, re.M), env
