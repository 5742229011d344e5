"""The released artefacts work for a new user: ``python -m build`` gives a wheel and an
sdist, the wheel installs into a fresh venv with only its runtime dependencies, and the
commands it brings run a real client through a real proxy.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tarfile
import urllib.request
import venv
import zipfile
from pathlib import Path

import pytest

from fooproxy import __version__, speedups
from fooproxy.dashboard import STATIC_FILES
from harness.processes import Process, free_port

ROOT = Path(__file__).resolve().parents[2]
# Names normalised as PEP 503 does.
RUNTIME = {"gevent", "docopt-ng", "prometheus-client", "python-json-logger", "orjson"}


def _run(cmd: list[str], timeout: float = 600, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kwargs)


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    res = _run([sys.executable, "-m", "build", "--outdir", str(out), str(ROOT)])
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return out


def test_build_gives_a_wheel_and_an_sdist_with_only_the_runtime_requirements(dist: Path) -> None:
    wheels = list(dist.glob("fooproxy-%s-*.whl" % __version__))
    sdists = list(dist.glob("fooproxy-%s.tar.gz" % __version__))
    assert len(wheels) == 1 and len(sdists) == 1, sorted(p.name for p in dist.iterdir())
    with zipfile.ZipFile(wheels[0]) as whl:
        names = whl.namelist()
        metadata = whl.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    assert "fooproxy/__main__.py" in names
    # The live page works offline: its files, the vendored uPlot and its licence are in the wheel.
    assert {"fooproxy/static/" + f for f in STATIC_FILES} <= set(names), sorted(n for n in names if "static" in n)
    assert any(n.startswith("harness/") and n.endswith("locustfile.py") for n in names), names
    # Requires-Dist without an `extra ==` marker is what `pip install fooproxy` pulls in.
    runtime = {
        re.split(r"[\s;<>=!~\[]", line.split(":", 1)[1].strip())[0].lower().replace("_", "-")
        for line in metadata.splitlines()
        if line.startswith("Requires-Dist:") and "extra ==" not in line
    }
    assert runtime == RUNTIME, runtime
    with tarfile.open(sdists[0]) as sdist:
        members = {m.split("/", 1)[1] for m in sdist.getnames() if "/" in m}
    assert {"fooproxy/static/" + f for f in STATIC_FILES} <= members, sorted(m for m in members if "static" in m)


def test_the_wheel_installs_in_a_fresh_venv_and_proxies_a_client(dist: Path, tmp_path: Path) -> None:
    wheel = next(dist.glob("fooproxy-*.whl"))
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    bin_dir = env_dir / "bin"
    res = _run([str(bin_dir / "pip"), "install", "--quiet", str(wheel)])
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    # The fresh venv has only the runtime dependencies: no pytest, no locust.
    res = _run(
        [
            str(bin_dir / "python"),
            "-c",
            "import importlib.util as u; print(u.find_spec('locust'), u.find_spec('pytest'))",
        ]
    )
    assert res.stdout.split() == ["None", "None"], res.stdout + res.stderr

    res = _run([str(bin_dir / "fooproxy"), "--version"], timeout=60)
    assert res.returncode == 0 and __version__ in res.stdout, res.stdout + res.stderr
    if speedups.HOT_PATH == "c":  # built here, so the wheel must carry it too
        assert "(hot path: c)" in res.stdout, "the wheel lacks the compiled fooproxy._flow: " + res.stdout

    clean_env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    server_port, proxy_port, http_port = free_port(), free_port(), free_port()
    server = Process(
        [str(bin_dir / "foo-server"), "-listen", "127.0.0.1:%d" % server_port],
        env=clean_env,
        cwd=tmp_path,
        ready_port=("127.0.0.1", server_port),
        ready_timeout=30,
    )
    proxy = Process(
        [
            str(bin_dir / "fooproxy"),
            "-forward",
            "127.0.0.1:%d" % server_port,
            "-listen",
            "127.0.0.1:%d" % proxy_port,
            "-http",
            "127.0.0.1:%d" % http_port,
            "-recovery-path",
            "off",
        ],
        env=clean_env,
        cwd=tmp_path,
        ready_port=("127.0.0.1", proxy_port),
        ready_timeout=30,
    )
    with server.start(), proxy.start():
        res = _run([str(bin_dir / "foo-client"), "-connect", "127.0.0.1:%d" % proxy_port], timeout=60, env=clean_env)
        # The live page and the vendored chart library come from the installed wheel.
        for path, needle in (("/", b"/stats/stream"), ("/static/uPlot.iife.min.js", b"uPlot")):
            with urllib.request.urlopen("http://127.0.0.1:%d%s" % (http_port, path), timeout=10) as resp:
                assert resp.status == 200 and needle in resp.read(), path
    assert res.returncode == 0 and res.stdout.strip().endswith("OK!"), (res.stdout, res.stderr, proxy.tail())
