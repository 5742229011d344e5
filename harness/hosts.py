"""Where a role runs: ``local``, ``netns:NAME`` or ``ssh://user@host``.

A ``Host`` starts a command there and returns a process handle with the
interface of ``harness.processes.Process`` (``pid``, ``alive()``,
``send_signal()``, ``stop()``, ``close()``, ``stdout_path``, ``tail()`` ...), so
``harness.sigusr2.read_stats`` and the tasks work on any host:

* ``LocalHost`` (here) runs the command as it is;
* ``NetnsHost`` (``harness.netns``) runs it under ``ip netns exec NAME`` in a
  namespace that ``harness.netns.Network`` made;
* ``SshHost`` (``harness.ssh``) runs it through Fabric, imported only for ssh hosts.

``parse_host`` turns an inventory entry into one of them.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from harness.processes import Process

if TYPE_CHECKING:
    from harness.netns import Network

LOCAL = "local"
NETNS = "netns:"
SSH = "ssh://"


class HostError(RuntimeError):
    """A host could not be made, reached or understood (a bad inventory entry, ``ip`` failed...)."""


class Host:
    """A place to run roles. ``address`` is how the other hosts (and the harness) reach it."""

    kind = "?"

    def __init__(self, name: str, address: str) -> None:
        self.name = name
        self.address = address

    def wrap(self, cmd: Sequence[str]) -> list[str]:
        """The local command line that runs ``cmd`` on this host."""
        return [str(c) for c in cmd]

    def run(
        self,
        cmd: Sequence[str],
        *,
        name: str | None = None,
        env: Mapping[str, str] | None = None,
        ready_port: tuple[str, int] | None = None,
        ready_regex: str | None = None,
        ready_stream: str = "stderr",
        ready_timeout: float = 30.0,
        log_dir: str | os.PathLike | None = None,
    ) -> Process:
        """Start ``cmd`` here and wait until it is ready (see ``Process``); the started handle.

        ``env`` holds only the variables to add to the host's environment.
        """
        full_env = dict(os.environ)
        full_env.update(env or {})
        proc = Process(
            self.wrap(cmd),
            name=name or Path(str(cmd[0])).name,
            env=full_env,
            ready_port=ready_port,
            ready_regex=ready_regex,
            ready_stream=ready_stream,
            ready_timeout=ready_timeout,
            log_dir=log_dir,
        )
        return proc.start()

    def write_file(self, path: str, text: str) -> None:
        """Write ``text`` to ``path`` on this host (a config file for a role)."""
        Path(path).write_text(text)

    def temp_dir(self, prefix: str = "foo-") -> str:
        """A new directory on this host (``remove_dir`` removes it)."""
        return tempfile.mkdtemp(prefix=prefix)

    def probe(self) -> None:
        """``HostError`` unless commands can run here now (an ssh host: connect and run ``true``)."""

    def remove_dir(self, path: str) -> None:
        """Remove a directory made by ``temp_dir``."""
        shutil.rmtree(path, ignore_errors=True)

    def close(self) -> None:
        """Release what this host holds (connections); the processes are closed by their owners."""

    def describe(self) -> str:
        return "%s (%s, %s)" % (self.name, self.kind, self.address)

    def __repr__(self) -> str:
        return "<%s %s>" % (type(self).__name__, self.describe())


class LocalHost(Host):
    """This machine; its address is loopback unless given (e.g. a LAN address for remote workers)."""

    kind = "local"

    def __init__(self, name: str = LOCAL, address: str = "127.0.0.1") -> None:
        super().__init__(name, address)


def parse_host(name: str, spec: str | Mapping[str, Any], network: Network | None = None) -> Host:
    """A ``Host`` from an inventory entry: ``"local"``, ``"netns:NAME"``, ``"ssh://user@host[:port]"``,
    or a table with ``url`` (one of those) and optional ``address`` / ``key`` (an ssh identity file).

    ``netns:`` hosts need ``network`` (the ``Network`` that makes them).
    """
    options: dict[str, Any] = {}
    if isinstance(spec, Mapping):
        options = dict(spec)
        url = options.pop("url", None)
        if not isinstance(url, str):
            raise HostError('host %r: a table needs url = "local" | "netns:NAME" | "ssh://user@host"' % name)
    elif isinstance(spec, str):
        url = spec
    else:
        raise HostError("host %r: expected a string or a table, not %r" % (name, spec))
    address = options.pop("address", None)
    key = options.pop("key", None)
    if options:
        raise HostError("host %r: unknown key(s) %s" % (name, ", ".join(sorted(options))))
    if url == LOCAL:
        return LocalHost(name, address or "127.0.0.1")
    if url.startswith(NETNS):
        netns = url[len(NETNS) :]
        if not netns or not all(c.isalnum() or c in "-_" for c in netns) or len(netns) > 40:
            raise HostError("host %r: bad namespace name in %r (letters, digits, - and _)" % (name, url))
        if network is None:
            raise HostError("host %r: netns hosts need a Network (run as root on Linux)" % name)
        return network.add(netns)
    if url.startswith(SSH):
        rest = url[len(SSH) :].rstrip("/")
        user, _, hostport = rest.rpartition("@")
        hostname, port = hostport, 22
        if hostport.count(":") == 1:
            hostname, _, port_text = hostport.partition(":")
            if not port_text.isdigit():
                raise HostError("host %r: bad port in %r" % (name, url))
            port = int(port_text)
        if not hostname:
            raise HostError("host %r: no host name in %r" % (name, url))
        from harness.ssh import SshHost

        kwargs = {"key_filename": str(key)} if key else {}
        return SshHost(name, hostname, user or None, port, kwargs, address)
    raise HostError("host %r: %r is not local, netns:NAME or ssh://user@host" % (name, url))
