"""Guards for the whole test process (every directory under tests/)."""

from __future__ import annotations

import gevent
import pytest
from gevent import monkey

# GEVENT_MONITOR_THREAD_ENABLE=1 (``make test``) is for the fooproxy processes the tests start,
# which inherit it and whose reports tests/e2e/conftest.py turns into failures. The test process
# itself blocks its hubs on purpose (plain sockets, threads, sleeps in the tests' own code), and its
# monitor thread printed a stack report of every thread for each, tens of thousands of lines per
# run. Set on gevent's config object, not in os.environ, so the children still get the variable.
gevent.config.monitor_thread = False


def pytest_collection_finish(session: pytest.Session) -> None:
    """No test module may monkey-patch the test process while it is collected.

    Only the ``fooproxy`` command patches (``fooproxy.__main__``, its first act).
    A test module that imports it patches pytest's own process: the tests'
    client threads (``tests/e2e/reloading.ClientLoop``) and servers then run as
    greenlets, whose blocking calls hold up one another, and the reload tests
    hung that way in CI. Import what a test needs from the module that has it
    (``fooproxy.logsetup``, not ``fooproxy.__main__``).
    """
    patched = [name for name in ("socket", "threading", "time", "select", "ssl") if monkey.is_module_patched(name)]
    if patched:
        raise pytest.UsageError(
            "collecting the tests monkey-patched the test process (%s): a test module imports a module that"
            " patches (fooproxy.__main__?)" % ", ".join(patched)
        )
