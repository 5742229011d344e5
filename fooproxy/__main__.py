"""The ``fooproxy`` command. Monkey-patches first, before anything else is imported.

Even before that, the signals whose default action would kill the process
and that an operator sends at any time (SIGUSR2 for the stats; SIGUSR1 and
SIGHUP, which must never cost data) are ignored: importing gevent and the
proxy takes 0.1 s or more, and until ``Services.start`` installs the real
handlers, the default action of each of them is to terminate. SIG_IGN costs
nothing and is replaced by gevent's handlers; ``_signal`` is the interpreter's
built-in module (``signal`` would import ``enum`` first). What is left is the
interpreter's own start-up, before any code of ours runs (see the README).
The console script imports ``fooproxy`` (``__init__.py``, which imports
nothing) and then this module, as ``python -m fooproxy`` does: this is the
first statement of ours either way.
"""

import _signal

for _signum in (_signal.SIGUSR2, _signal.SIGUSR1, _signal.SIGHUP):
    _signal.signal(_signum, _signal.SIG_IGN)

from gevent import monkey  # noqa: E402

monkey.patch_all()

import logging  # noqa: E402
import resource  # noqa: E402
import sys  # noqa: E402

from fooproxy import cli  # noqa: E402
from fooproxy.listeners import StartupError  # noqa: E402
from fooproxy.logsetup import setup_logging  # noqa: E402


def raise_fd_limit() -> None:
    """Each client costs two descriptors: take the hard limit, as servers do."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard if hard != resource.RLIM_INFINITY else 65536, hard))
        except (ValueError, OSError):
            pass


def main(argv: list[str] | None = None) -> int:
    """Parse flags, then run a single proxy, a worker, or the master of several."""
    args = sys.argv[1:] if argv is None else argv
    config, source = cli.parse_command(args)
    setup_logging(config.log_level, config.log_format)
    raise_fd_limit()
    try:
        if config.worker_id is not None:  # started by a master: -workers N
            from fooproxy.worker import run_worker

            return run_worker(config)
        if config.workers > 1:
            from fooproxy.supervisor import run_master

            return run_master(config, args, source)
        from fooproxy.dispatcher import Dispatcher

        return Dispatcher(config, source=source).run()
    except StartupError as exc:
        logging.getLogger("fooproxy").error("%s", exc)
        return 1


if __name__ == "__main__":
    sys.exit(main())
