"""How fooproxy's log lines are handled and formatted: ``-log-level`` and ``-log-format``.

Kept out of ``fooproxy.__main__`` (which monkey-patches the process as its
first act) so that tests and tools can use the formatter without patching
theirs: importing ``__main__`` turns every later thread and socket of the
importing process into gevent's.
"""

from __future__ import annotations

import logging
import sys
from typing import TextIO


def log_formatter(log_format: str = "text") -> logging.Formatter:
    """The formatter of ``-log-format`` (``text`` or ``json``), as the handler of every log line uses it.

    ``json``: one object per line (python-json-logger with orjson, ``fooproxy.jsonlog``)
    with ``ts`` (ISO 8601, UTC), ``level``, ``logger``, ``pid``, ``msg`` and the line's
    fields (the close line's ``peer``, ``duration_s``, ``ended``, bytes, msgs, ``latency_max_ms``).
    """
    if log_format == "json":
        from fooproxy.jsonlog import JsonLineFormatter

        return JsonLineFormatter()
    return logging.Formatter("%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s")


def setup_logging(level: str, log_format: str = "text", stream: TextIO | None = None) -> None:
    """Logs go to ``stream``, stderr by default: stdout carries nothing but the SIGUSR2 stats.

    Neither format shows where a line was logged from, nor its thread or process
    name, so records do not collect them (the logging HOWTO's "Optimization"
    switches; the pid stays): every line is cheaper, the close line by a sixth.
    (``stack_info=`` would show no stack: fooproxy logs none.)
    """
    logging._srcfile = None  # no sys._getframe walk for pathname, lineno, funcName
    logging.logThreads = False
    logging.logMultiprocessing = False
    logging.logAsyncioTasks = False  # Python 3.12+; fooproxy runs no asyncio tasks
    handler = logging.StreamHandler(sys.stderr if stream is None else stream)
    handler.setFormatter(log_formatter(log_format))
    logging.basicConfig(level=getattr(logging, level.upper()), handlers=[handler])
