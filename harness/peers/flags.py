"""Command-line parsing shared by foo-server and foo-client (and the foo-harness bench commands).

The reference peers are Go programs: their flags are written ``-listen ADDR`` or
``-listen=ADDR``. ``parse_cli`` accepts those as well as docopt's ``--listen ADDR``
(``fooproxy.cli.normalise`` rewrites one into the other) and turns every bad
usage into one line on stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import re
import sys
from typing import Any

from docopt import DocoptExit, docopt

from fooproxy.cli import normalise


def parse_cli(usage: str, argv: list[str] | None, prog: str) -> dict[str, Any]:
    """Parse Go-style or docopt-style flags against ``usage``; exit 2 on bad usage.

    ``-h`` prints the usage and exits 0.
    """
    args = normalise(list(sys.argv[1:] if argv is None else argv))
    try:
        opts = docopt(usage, argv=args, default_help=False)
    except DocoptExit as exc:
        names = [a.split("=", 1)[0] for a in args if a.startswith("-")]
        unknown = [n for n in names if not re.search(r"\s%s[\s=]" % re.escape(n), usage)]
        first = str(exc).strip().splitlines()
        reason = "unknown flag -%s" % unknown[0].lstrip("-") if unknown else (first[0] if first else "bad usage")
        raise usage_error(prog, reason) from None
    if opts.get("--help"):
        sys.stdout.write(usage)
        raise SystemExit(0)
    return dict(opts)


def usage_error(prog: str, message: str) -> SystemExit:
    """Print one usage error line; return the SystemExit(2) to raise."""
    sys.stderr.write("%s: %s (see %s -h)\n" % (prog, message, prog))
    return SystemExit(2)
