"""Reload on SIGHUP: re-read the ``-config`` file, keep the command line, apply what changed.

``Reloader`` runs one reload at a time: a SIGHUP that arrives during a
reload is remembered (however many arrive, they coalesce into one more run
once the current one ends), so none is lost and two never overlap. Each run
logs one line: what changed and how long it took, or why the new settings
were rejected (then nothing changes and the proxy serves on as before).

What changes live, and who applies it (one owner per setting):

* the Proxy (``Proxy.reconfigure``): limits and timeouts of new sessions
  (``max-conns``, ``linger``, ``idle-timeout``) and the Connector of new
  sessions (``forward``, ``connect-timeout``, ``pool-*``). Open sessions keep
  their upstream connection and their old connector, and finish normally;
* the Services (``Services.reconfigure``): the log level, the health checker
  (``forward``, ``health-interval``), HTTP (``http``: the new address is bound
  before the old server is stopped; ``http-allow``);
* the process (``Dispatcher``): ``grace``, read when a drain starts.

``RESTART_ONLY`` settings cannot change in a running single process; a new
value is refused, named in the reload line, and the running value kept.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable

import gevent

from fooproxy import sdnotify
from fooproxy.config import Config, ConfigError
from fooproxy.configfile import ConfigSource, read_file

log = logging.getLogger("fooproxy.reload")

#: Field -> why it needs a restart (single process; ``-workers N`` reloads by new workers instead).
RESTART_ONLY = {
    "listen": "needs a restart (the open sessions and the accept backlog are on the old socket)",
    "workers": "needs a restart",
    "recovery_path": "needs a restart (the file is locked by this instance)",
}


def read_config(source: ConfigSource | None, running: Config) -> Config:
    """The config a reload moves to: the file read again (off the hub), the command line kept.

    Without a ``-config`` file there is nothing to re-read: the running config.
    Raises ``ConfigError`` (one line) when the new settings do not validate.
    """
    if source is None or source.path is None:
        return running
    # Off the hub; the error comes back as a value (raised in the pool, gevent would print it too).
    text, error = gevent.get_hub().threadpool.apply(_read, (source.path,))
    if error is not None:
        raise error
    new = source.build(text)
    # Internal, set by the master on a worker's command line: never from the file.
    return dataclasses.replace(new, worker_id=running.worker_id)


def _read(path: str) -> tuple[str | None, ConfigError | None]:
    try:
        return read_file(path), None
    except ConfigError as exc:
        return None, exc


def changes(old: Config, new: Config) -> list[str]:
    """``name old -> new`` for each setting that differs, in field order, as flag names."""
    out = []
    for f in dataclasses.fields(Config):
        before, after = getattr(old, f.name), getattr(new, f.name)
        if before != after:
            out.append("%s %s -> %s" % (flag(f.name), _shown(before), _shown(after)))
    return out


def keep_restart_only(
    old: Config, new: Config, restart_only: dict[str, str] = RESTART_ONLY
) -> tuple[Config, list[str]]:
    """``new`` with the restart-only settings set back to ``old``'s, and a note for each one refused."""
    refused = {name: why for name, why in restart_only.items() if getattr(old, name) != getattr(new, name)}
    notes = [
        "%s refused: %s (kept %s)" % (flag(name), why, _shown(getattr(old, name))) for name, why in refused.items()
    ]
    return dataclasses.replace(new, **{name: getattr(old, name) for name in refused}), notes


def flag(name: str) -> str:
    """A Config field's flag name (``max_conns`` -> ``max-conns``)."""
    return name.replace("_", "-")


def _shown(value: object) -> str:
    if value is None:
        return "off"
    if isinstance(value, tuple):
        return ",".join(str(v) for v in value) or "none"
    if isinstance(value, float):
        return "%g" % value
    return str(value)


class Reloader:
    """One reload at a time; SIGHUPs during a reload coalesce into one more (see the module doc).

    ``apply()`` does a reload and returns what changed (for the log line);
    a ``ConfigError`` from it means "rejected, nothing changed".
    """

    def __init__(self, apply: Callable[[], str], logger: logging.Logger | None = None) -> None:
        self.apply = apply
        self.log = logger or log
        #: Reloads finished (applied or rejected), for tests and the log.
        self.runs = 0
        self._pending = False
        self._runner: gevent.Greenlet | None = None

    def request(self, *_signal_args) -> None:
        """SIGHUP: reload now, or once more after the reload in progress."""
        self._pending = True
        if self._runner is None:
            self._runner = gevent.spawn(self._run)

    @property
    def busy(self) -> bool:
        return self._runner is not None

    def _run(self) -> None:
        try:
            while self._pending:
                self._pending = False
                self._once()
        finally:
            self._runner = None

    def _once(self) -> None:
        started = time.monotonic()
        sdnotify.notify("RELOADING=1")  # systemctl reload waits for the READY=1 below
        try:
            what = self.apply()
        except ConfigError as exc:
            self.log.error("reload rejected, running settings kept: %s (%.3fs)", exc, time.monotonic() - started)
        except Exception:  # a bug: say so, keep serving
            self.log.exception("reload failed (%.3fs)", time.monotonic() - started)
        else:
            self.log.info("reload: %s (%.3fs)", what or "nothing changed", time.monotonic() - started)
        self.runs += 1
        sdnotify.notify("READY=1")

    def stop(self) -> None:
        """At shutdown: no reload after this one (a reload in progress is left to finish)."""
        self._pending = False
