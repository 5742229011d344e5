"""Command line: the docopt usage text is the single source of flags; it shows ``Config``'s defaults.

Go-style flags (``-forward :8001``, ``-listen=:8002``), as users of the original
Go tool type them, are rewritten to docopt's ``--forward`` form first.
"""

from __future__ import annotations

import os
import re
import sys
from typing import NoReturn

from docopt import DocoptExit, docopt

from fooproxy import __version__
from fooproxy.config import Config, ConfigError, config_defaults
from fooproxy.configfile import ConfigSource, read_file, settings_text

_USAGE = """\
fooproxy: a proxy for the Foo protocol that counts what passes through it.

Usage:
  fooproxy [options]
  fooproxy -h | --help
  fooproxy --version

Options:
  -h --help                  Show this help and exit.
  --version                  Show the version and exit.
  --config PATH              Read settings from this TOML file: its keys are the flag
                             names without the dash; flags given here override it.
  --check-config             Validate the settings (file and flags), print them and exit:
                             0 if valid, 2 with the error otherwise.
  --listen ADDR              Accept clients on ADDR (:port, host:port, [v6]:port) [default: {listen}].
  --forward ADDRS            Forward to the Foo server(s) at ADDRS: one address or a
                             comma-separated list (a:8001,b:8001), at most 16, each
                             distinct [default: {forward}].
  --balance POLICY           How a new session picks an upstream: roundrobin, leastconn,
                             or first (failover in the order of -forward) [default: {balance}].
  --connect-retries N        A client whose upstream connect fails is tried on up to N
                             other upstreams before it is closed; 0 to 15 [default: {connect_retries}].
  --max-fails N              Connect failures within -health-interval that take an
                             upstream out of rotation until its health check passes
                             (0 = never); 0 to 1000 [default: {max_fails}].
  --http ADDR                Serve /health, /stats and /metrics on ADDR; "off" disables
                             [default: {http}].
  --http-allow CIDRS         Source networks the HTTP endpoint answers, comma-separated
                             (10.0.0.0/8,::1); others get 403. "auto": loopback only
                             when -http is on all interfaces; "all": anyone [default: auto].
  --recovery-path PATH       Save stats here every second and restore them at start; "off"
                             disables [default: {recovery_path}].
  --workers N                Worker processes sharing the listen port, 1 to 4 per core;
                             "auto" = one per core [default: {workers}].
  --heartbeat-timeout SECONDS
                             With workers: a worker whose heartbeat stops for this long
                             (hub stuck, process stopped) is aborted and replaced;
                             1 to 3600 [default: {heartbeat_timeout}].
  --pool-size N              Keep up to N upstream connections and reuse clean ones;
                             0 = one upstream connection per client; 0 to 100000
                             [default: {pool_size}].
  --pool-wait SECONDS        With a pool, how long a new client may wait for an upstream
                             connection; 0 to 3600 [default: {pool_wait}].
  --pool-idle SECONDS        Close pooled connections idle this long; 0.1 to 86400
                             [default: {pool_idle}].
  --max-conns N              Clients served at once; more wait in the accept backlog;
                             1 to 1000000 [default: {max_conns}].
  --connect-timeout SECONDS  Upstream connect timeout; 0.01 to 300 [default: {connect_timeout}].
  --idle-timeout SECONDS     Close a session with no bytes either way for this long;
                             0 disables, else 0.1 to 86400 [default: {idle_timeout}].
  --linger SECONDS           After a client's EOF, wait this long at most for the answers
                             it is owed before closing the upstream; 0 to 3600 [default: {linger}].
  --grace SECONDS            On SIGTERM/SIGINT, let open sessions finish for this long;
                             0 to 3600 [default: {grace}].
  --health-interval SECONDS  How often each upstream is checked (it accepts
                             connections); 0.1 to 3600 [default: {health_interval}].
  --log-level LEVEL          debug, info, warning or error [default: {log_level}].
  --log-format FORMAT        "text", or "json": one object per line [default: {log_format}].
  --latency STATE            "on": time every request until its answer (the latency
                             histograms and latency_* stats fields); "off" [default: {latency}].
  --worker-id N              (internal) run as worker N of a master process.

A value outside its range exits 2 naming the flag; so does a -forward address
that is the proxy's own -listen address.

Signals: SIGUSR2 prints the stats as one JSON line on stdout; SIGTERM/SIGINT
drain and exit (a second one exits at once); SIGHUP reloads the -config file.
"""

#: Config's defaults, shown in the usage text, are what docopt fills in: one source.
USAGE = _USAGE.format(**config_defaults())

_FLAG_RE = re.compile(r"^-([a-z][a-z0-9-]+)(=.*)?$")


_VALUED = frozenset(re.findall(r"^  (--[a-z-]+) [A-Z]", USAGE, re.M))  # flags that take a value


def normalise(argv: list[str]) -> list[str]:
    """Rewrite Go-style ``-flag`` / ``-flag=v`` to ``--flag`` / ``--flag=v``.

    A flag given twice keeps its last value, as Go's ``flag`` package does
    (docopt alone would reject the repeat).
    """
    out = []
    for arg in argv:
        m = _FLAG_RE.match(arg)
        out.append("--" + arg[1:] if m and arg != "-h" else arg)
    return _last_wins(out)


def _last_wins(args: list[str]) -> list[str]:
    groups: list[list[str]] = []  # one per flag with its value, or a lone token
    where: dict[str, int] = {}  # flag -> index of its group in effect
    i = 0
    while i < len(args):
        name = args[i].split("=", 1)[0]
        take = 1
        if name in _VALUED:
            take = 1 if "=" in args[i] or i + 1 == len(args) else 2
            if name in where:
                groups[where[name]] = []  # an earlier value, overridden
            where[name] = len(groups)
        groups.append(args[i : i + take])
        i += take
    return [token for group in groups for token in group]


def _flag_named(message: str, argv: list[str]) -> str:
    for arg in argv:
        if arg.startswith("-") and arg != "-h":
            name = arg.split("=", 1)[0]
            if not re.search(r"^  (-h )?%s[ =]" % re.escape("--" + name.lstrip("-")), USAGE, re.M):
                return "unknown flag %s" % name
    stray = _stray(normalise(argv))
    if stray is not None:
        return "unexpected argument %r (flags take the form -flag value)" % stray
    first = message.strip().splitlines()[0] if message.strip() else ""
    if not first or "Option(" in first or "Argument(" in first:
        return "bad usage"  # never show docopt's internals
    return first


def _lone_tokens(args: list[str]) -> list[str]:
    """The tokens of ``args`` that are not the value of a flag."""
    out = []
    i = 0
    while i < len(args):
        token = args[i]
        out.append(token)
        i += 2 if token in _VALUED else 1  # "--flag value"; "--flag=value" is one token
    return out


def _stray(args: list[str]) -> str | None:
    """The first token that is neither a flag nor a flag's value (``fooproxy extra``)."""
    return next((t for t in _lone_tokens(args) if not t.startswith("-")), None)


def parse(argv: list[str]) -> Config:
    """Parse argv (without the program name) into a Config, or exit 2 with one line.

    ``-h`` and ``--version`` print and exit 0; so does ``-check-config`` (after
    printing the effective settings), or it exits 2 with the error.
    """
    return parse_command(argv)[0]


#: Setting key (flag name without dashes) -> its metavar in the usage text (``SECONDS``, ``N``, ``ADDR``...).
KINDS: dict[str, str] = dict(re.findall(r"^  --([a-z-]+) ([A-Z]+)", USAGE, re.M))


def _version() -> str:
    """``--version``: the version, and which hot path runs (the C extension or its Python fallback)."""
    from fooproxy import speedups

    return "fooproxy %s (hot path: %s)\n" % (__version__, speedups.HOT_PATH)


def parse_command(argv: list[str]) -> tuple[Config, ConfigSource]:
    """Like ``parse``, and also the ``ConfigSource`` a SIGHUP reload builds the next Config from."""
    args = normalise(argv)
    # Help and version win wherever they appear (docopt takes them only alone).
    lone = _lone_tokens(args)
    if "-h" in lone or "--help" in lone:
        _print_and_exit(USAGE)
    if "--version" in lone:
        _print_and_exit(_version())
    try:
        opts = docopt(USAGE, argv=args, default_help=False, version=None)
    except DocoptExit as exc:
        _fail(_flag_named(str(exc), argv))
    if opts["--help"]:
        _print_and_exit(USAGE)
    if opts["--version"]:
        _print_and_exit(_version())
    given = frozenset(t.split("=", 1)[0][2:] for t in lone if t.startswith("--"))
    source = ConfigSource(opts, given, KINDS)
    try:
        text = read_file(source.path) if source.path else None
        config = source.build(text)
        if opts["--check-config"]:
            _print_and_exit(settings_text(source.effective(text)[0], KINDS) + "# the configuration is valid\n")
    except ConfigError as exc:
        _fail(str(exc))
    return config, source


def _print_and_exit(text: str) -> NoReturn:
    """Write ``text`` on stdout and exit 0; a reader that went away (``| head``) is no error.

    As Python's documentation advises for SIGPIPE: stdout is pointed at /dev/null so that the
    flush at exit does not raise again.
    """
    try:
        sys.stdout.write(text)
        sys.stdout.flush()
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    raise SystemExit(0)


def _fail(message: str) -> NoReturn:
    sys.stderr.write("fooproxy: %s (see fooproxy -h)\n" % message)
    raise SystemExit(2)
