"""Packaging for fooproxy: the proxy, its harness peers and test driver."""

from setuptools import Extension, find_packages, setup

# The per-chunk hot path in C (fooproxy/_flow.c; fooproxy/speedups.py says which path runs).
# optional: without a C compiler the install still succeeds, with databus.py's pure-Python Flow.
FLOW_EXTENSION = Extension("fooproxy._flow", ["fooproxy/_flow.c"], optional=True)

setup(
    name="fooproxy",
    version="0.1.0",
    description="A statistics-gathering proxy for the Foo protocol, on gevent",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["fooproxy", "fooproxy.*", "harness", "harness.*"]),
    # The live page's files (fooproxy/static/README.md says where the vendored uPlot comes from).
    package_data={"fooproxy": ["static/*"]},
    ext_modules=[FLOW_EXTENSION],
    python_requires=">=3.11",
    install_requires=[
        "gevent>=24.10.1,<27",
        "docopt-ng>=0.9,<1",
        "prometheus_client>=0.14,<1",
        # -log-format json: a maintained formatter rather than a hand-written one (its orjson formatter: 3.1+).
        "python-json-logger>=3.1,<5",
        # python-json-logger's serializer for -log-format json, imported only then: formatting the close line with
        # the stdlib's json takes 2.6 times the instructions of the text line, with orjson 1.0 (README, logs).
        "orjson>=3.10,<4",
    ],
    # Extras by use: the runtime install above stays gevent, docopt-ng, prometheus_client, python-json-logger
    # and orjson.
    extras_require={
        "test": [
            "pytest>=8,<10",
            "hypothesis>=6.100,<7",
            "build>=1.0,<2",
            # gevent's monitor thread (GEVENT_MONITOR_THREAD_ENABLE, on in tests) warns on stderr without it.
            "psutil>=5.9,<8",
            # The live page's browser test (tests/e2e/test_dashboard.py) drives Debian's chromium.
            "selenium>=4.20,<5",
        ],
        "load": [
            "locust>=2.20,<3",
        ],
        "lint": [
            "ruff>=0.5,<1",
        ],
        # ssh:// hosts of harness.hosts (foo-harness swarm --inventory); imported only for them.
        "hosts": ["fabric>=3,<4"],
        # Coverage-guided fuzzing (make fuzz); atheris ships manylinux wheels for CPython 3.11.
        "fuzz": ["atheris>=2.3,<3"],
    },
    entry_points={
        "console_scripts": [
            "fooproxy = fooproxy.__main__:main",
            "foo-server = harness.peers.server:main",
            "foo-client = harness.peers.client:main",
            "foo-harness = harness.cli:main",
        ],
    },
)
