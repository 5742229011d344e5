"""The ``fooproxy`` command. Monkey-patches first, before anything else is imported."""

from gevent import monkey

monkey.patch_all()

import logging  # noqa: E402
import resource  # noqa: E402
import sys  # noqa: E402

from fooproxy import cli  # noqa: E402
from fooproxy.listeners import StartupError  # noqa: E402


def setup_logging(level: str) -> None:
    """Logs go to stderr only: stdout carries nothing but the SIGUSR2 stats."""
    logging.basicConfig(
        stream=sys.stderr,
        level=getattr(logging, level.upper()),
        format="%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s",
    )


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
    setup_logging(config.log_level)
    raise_fd_limit()
    try:
        if config.worker_id is not None:  # started by a master: -workers N
            from fooproxy.worker import run_worker

            return run_worker(config)
        if config.workers > 1:
            from fooproxy.supervisor import run_master

            return run_master(config, args)
        from fooproxy.dispatcher import Dispatcher

        return Dispatcher(config, source=source).run()
    except StartupError as exc:
        logging.getLogger("fooproxy").error("%s", exc)
        return 1


if __name__ == "__main__":
    sys.exit(main())
