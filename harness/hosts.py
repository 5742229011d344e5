"""Where a role runs: ``local``, ``netns:NAME`` or ``ssh://user@host``, and the network that joins them.

A ``Host`` starts a command there and returns a process handle with the
interface of ``harness.processes.Process`` (``pid``, ``alive()``,
``send_signal()``, ``stop()``, ``close()``, ``stdout_path``, ``tail()`` ...), so
``harness.sigusr2.read_stats`` and the tasks work on any host:

* ``LocalHost`` runs the command as it is;
* ``NetnsHost`` runs it under ``ip netns exec NAME`` (iproute2 execs the command,
  so the PID is the command's own and signals reach it directly);
* ``SshHost`` runs it through Fabric (the ``hosts`` extra, imported only here),
  with its output streamed into local files and signals sent with ``kill`` over
  the same connection.

``Network`` is the context manager that makes the namespaces: one bridge in
the root namespace (it has the subnet's first address, so the harness itself
reaches every namespace), one veth pair per namespace, addresses from a
private /24, and on exit removes everything it made (namespaces, veths,
bridge), whatever happened. Every name starts ``fh<pid><n>`` (n: which Network of this process) so two runs never
collide and ``leftovers()`` can prove that nothing stayed behind.
"""

from __future__ import annotations

import ipaddress
import itertools
import os
import shlex
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from harness.processes import KEEP_LOGS_ENV, POLL, Process, ProcessError, wait_for_port

LOCAL = "local"
NETNS = "netns:"
SSH = "ssh://"


class HostError(RuntimeError):
    """A host could not be made, reached or understood (a bad inventory entry, ``ip`` failed...)."""


def ip(*args: str, check: bool = True, timeout: float = 10.0) -> subprocess.CompletedProcess:
    """Run ``ip ARGS...`` (iproute2); ``HostError`` with its message when it fails and ``check``."""
    cmd = ["ip", *args]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError:
        raise HostError("`ip` (iproute2) is not installed") from None
    except subprocess.TimeoutExpired:
        raise HostError("`%s` did not finish within %gs" % (" ".join(cmd), timeout)) from None
    if check and done.returncode != 0:
        raise HostError("`%s` failed: %s" % (" ".join(cmd), done.stderr.strip() or done.stdout.strip()))
    return done


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


class NetnsHost(Host):
    """A Linux network namespace made by ``Network``; commands run under ``ip netns exec``."""

    kind = "netns"

    def __init__(self, name: str, netns: str, address: str) -> None:
        super().__init__(name, address)
        self.netns = netns

    def wrap(self, cmd: Sequence[str]) -> list[str]:
        return ["ip", "netns", "exec", self.netns, *[str(c) for c in cmd]]


class Network:
    """The namespaces of one run, joined by a bridge; a context manager that removes all it made.

    ``add(name)`` creates namespace ``fh<pid><n>-<name>`` with a veth to the bridge
    and returns its ``NetnsHost``. The bridge (``fh<pid><n>br``) holds the first
    address of ``subnet`` (default: a free 10.201.X.0/24), the namespaces the
    following ones. Interface names stay within Linux's 15 characters.
    """

    _made = itertools.count()  # networks made by this process: one more character in the prefix

    def __init__(self, subnet: str | None = None, prefix: str | None = None) -> None:
        self.prefix = prefix or run_prefix() + "0123456789abcdefghijklmnopqrstuvwxyz"[next(Network._made) % 36]
        if len(self.prefix) > 8:
            raise HostError("network prefix %r too long: interface names are at most 15 characters" % self.prefix)
        self.bridge = self.prefix + "br"
        self.subnet = ipaddress.ip_network(subnet) if subnet else None
        self.hosts: dict[str, NetnsHost] = {}
        self._veths: list[str] = []
        self._namespaces: list[str] = []
        self._bridge_made = False

    # -- lifecycle --
    def __enter__(self) -> Network:
        try:
            self.create()
        except BaseException:
            self.teardown()
            raise
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.teardown()

    def create(self) -> None:
        """Make the bridge with the subnet's first address, up."""
        if self.subnet is None:
            self.subnet = free_subnet()
        ip("link", "add", self.bridge, "type", "bridge")
        self._bridge_made = True
        ip("addr", "add", "%s/%d" % (self.gateway, self.subnet.prefixlen), "dev", self.bridge)
        ip("link", "set", self.bridge, "up")

    @property
    def gateway(self) -> str:
        """The bridge's address: how the namespaces reach the root namespace (and the harness them)."""
        assert self.subnet is not None
        return str(self.subnet.network_address + 1)

    def add(self, name: str) -> NetnsHost:
        """A new namespace ``fh<pid><n>-<name>`` wired to the bridge, with loopback up; its host."""
        if name in self.hosts:
            return self.hosts[name]
        assert self.subnet is not None, "use Network as a context manager (or call create())"
        index = len(self.hosts)
        netns = "%s-%s" % (self.prefix, name)
        outside, inside = "%sh%d" % (self.prefix, index), "%sn%d" % (self.prefix, index)
        address = str(self.subnet.network_address + 2 + index)
        ip("netns", "add", netns)
        self._namespaces.append(netns)
        ip("link", "add", outside, "type", "veth", "peer", "name", inside, "netns", netns)
        self._veths.append(outside)
        ip("link", "set", outside, "master", self.bridge, "up")
        ip("-n", netns, "addr", "add", "%s/%d" % (address, self.subnet.prefixlen), "dev", inside)
        ip("-n", netns, "link", "set", inside, "up")
        ip("-n", netns, "link", "set", "lo", "up")
        ip("-n", netns, "route", "add", "default", "via", self.gateway)
        host = NetnsHost(name, netns, address)
        self.hosts[name] = host
        return host

    def teardown(self) -> None:
        """Remove every namespace (after killing what still runs in it), veth and the bridge made here."""
        errors = []
        for netns in reversed(self._namespaces):
            _kill_namespace_pids(netns)
            done = ip("netns", "del", netns, check=False)
            if done.returncode != 0 and netns in namespaces():
                errors.append("netns del %s: %s" % (netns, done.stderr.strip()))
        self._namespaces.clear()
        for veth in self._veths:  # gone with their namespace's end, normally
            if veth in links():
                ip("link", "del", veth, check=False)
        self._veths.clear()
        if self._bridge_made:
            ip("link", "del", self.bridge, check=False)
            self._bridge_made = False
        self.hosts.clear()
        if errors:
            raise HostError("; ".join(errors))

    def leftovers(self) -> list[str]:
        """Namespaces and links with this run's prefix that still exist (``[]`` after ``teardown``)."""
        return leftovers(self.prefix)


def run_prefix() -> str:
    """``fh<pid>``: the start of every namespace and link name this process makes (7 characters)."""
    return "fh%05d" % (os.getpid() % 100000)


def namespaces() -> list[str]:
    """The names of the existing network namespaces (``ip netns list``)."""
    out = ip("netns", "list", check=False).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def links() -> list[str]:
    """The names of the root namespace's network interfaces (veth peers without their ``@...``)."""
    out = ip("-o", "link", "show", check=False).stdout
    names = []
    for line in out.splitlines():
        parts = line.split(":", 2)
        if len(parts) >= 2:
            names.append(parts[1].strip().split("@")[0])
    return names


def leftovers(prefix: str) -> list[str]:
    """Namespaces and root-namespace links whose names start with ``prefix``."""
    found = ["netns %s" % n for n in namespaces() if n.startswith(prefix)]
    found += ["link %s" % n for n in links() if n.startswith(prefix)]
    return found


def free_subnet(base: str = "10.201.0.0/16") -> ipaddress.IPv4Network:
    """A /24 in ``base`` that no route of this machine overlaps, starting at an offset from the PID."""
    used = []
    for line in ip("-4", "route", "show", "table", "all", check=False).stdout.splitlines():
        word = line.split()[0] if line.split() else ""
        if word in ("local", "broadcast"):
            word = line.split()[1]
        try:
            used.append(ipaddress.ip_network(word, strict=False))
        except ValueError:
            continue
    subnets = list(ipaddress.ip_network(base).subnets(new_prefix=24))
    start = os.getpid() % len(subnets)
    for i in range(len(subnets)):
        candidate = subnets[(start + i) % len(subnets)]
        if not any(candidate.overlaps(u) for u in used if u.prefixlen > 0):
            return candidate
    raise HostError("no free /24 left in %s" % base)


def _kill_namespace_pids(netns: str) -> None:
    """SIGKILL what still runs in our namespace ``netns`` (only processes this run started live there)."""
    out = ip("netns", "pids", netns, check=False).stdout
    for word in out.split():
        try:
            os.kill(int(word), signal.SIGKILL)
        except (ValueError, ProcessLookupError, PermissionError):
            pass


def netns_supported() -> str:
    """``""`` when this process can make network namespaces and bridges, else the reason it cannot."""
    if os.geteuid() != 0:
        return "network namespaces need root (ip netns add)"
    try:
        probe = run_prefix() + "p"
        done = ip("netns", "add", probe, check=False)
        if done.returncode != 0:
            return "`ip netns add` failed: %s" % done.stderr.strip()
        ip("netns", "del", probe, check=False)
        done = ip("link", "add", probe + "b", "type", "bridge", check=False)
        if done.returncode != 0:
            return "`ip link add ... type bridge` failed: %s" % done.stderr.strip()
        ip("link", "del", probe + "b", check=False)
    except HostError as exc:
        return str(exc)
    return ""


# -- ssh ------------------------------------------------------------------------
class SshHost(Host):
    """A machine reached over ssh with Fabric (``pip install 'fooproxy[hosts]'``).

    ``connect_kwargs`` go to paramiko (e.g. ``{"key_filename": "..."}``).
    Commands run in their own session there (sshd makes each command a session
    leader), so the remote PID is also its process group, which ``stop()`` signals.
    """

    kind = "ssh"

    def __init__(
        self,
        name: str,
        host: str,
        user: str | None = None,
        port: int = 22,
        connect_kwargs: Mapping[str, Any] | None = None,
        address: str | None = None,
    ) -> None:
        super().__init__(name, address or host)
        self.host, self.user, self.port = host, user, port
        self.connect_kwargs = dict(connect_kwargs or {})
        self._conn = None
        self._lock = threading.Lock()

    @property
    def connection(self):
        """The Fabric ``Connection`` (opened on first use)."""
        with self._lock:
            if self._conn is None:
                try:
                    from fabric import Connection
                except ImportError:
                    raise HostError("ssh hosts need Fabric: pip install 'fooproxy[hosts]' (fabric>=3,<4)") from None
                kwargs = dict(self.connect_kwargs)
                kwargs.setdefault("timeout", 10)
                self._conn = Connection(self.host, user=self.user, port=self.port, connect_kwargs=kwargs)
            return self._conn

    def check(self, cmd: str, timeout: float = 30.0) -> str:
        """Run a short shell command there and return its stdout; ``HostError`` when it fails."""
        try:
            result = self.connection.run(cmd, hide=True, warn=True, in_stream=False, timeout=timeout)
        except Exception as exc:  # paramiko / socket / invoke errors: one message, no traceback
            raise HostError("%s: `%s`: %s" % (self.describe(), cmd, exc)) from None
        if result.exited != 0:
            raise HostError("%s: `%s` exited %s: %s" % (self.describe(), cmd, result.exited, result.stderr.strip()))
        return result.stdout

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
        proc = RemoteProcess(
            self,
            cmd,
            name=name or Path(str(cmd[0])).name,
            env=env,
            ready_port=ready_port,
            ready_regex=ready_regex,
            ready_stream=ready_stream,
            ready_timeout=ready_timeout,
            log_dir=log_dir,
        )
        return proc.start()

    def write_file(self, path: str, text: str) -> None:
        import io

        try:
            self.connection.put(io.BytesIO(text.encode()), remote=path)
        except Exception as exc:
            raise HostError("%s: cannot write %s: %s" % (self.describe(), path, exc)) from None

    def temp_dir(self, prefix: str = "foo-") -> str:
        return self.check("mktemp -d /tmp/%sXXXXXX" % shlex.quote(prefix)).strip()

    def remove_dir(self, path: str) -> None:
        try:
            self.check("rm -rf %s" % shlex.quote(path))
        except HostError:
            pass

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None


class RemoteProcess(Process):
    """A command running on an ``SshHost``: the ``Process`` interface, output copied into local files.

    The remote shell writes its PID to a file, then ``exec``s the command, so
    that PID is the command's (and its process group's). Signals and the stop
    go over ssh as ``kill``; output arrives through Fabric's streams.
    """

    def __init__(self, host: SshHost, cmd: Sequence[str], *, env: Mapping[str, str] | None = None, **kw: Any) -> None:
        super().__init__(cmd, **kw)
        self.host = host
        self.remote_env = dict(env or {})
        self._promise = None
        self._remote_pid: int | None = None
        self._exit: int | None = None
        self._out = self._err = None
        self._remote_dir: str | None = None

    def start(self) -> Process:
        if self._promise is not None:
            raise ProcessError("%s already started" % self.name)
        self._remote_dir = self.host.temp_dir("foo-%s-" % self.name)
        pidfile = "%s/pid" % self._remote_dir
        exports = " ".join("%s=%s" % (k, shlex.quote(v)) for k, v in self.remote_env.items())
        line = "echo $$ > %s; exec %s%s </dev/null" % (
            pidfile,
            "env %s " % exports if exports else "",
            shlex.join(self.cmd),
        )
        self._out = open(self.stdout_path, "w", buffering=1)
        self._err = open(self.stderr_path, "w", buffering=1)
        try:
            self._promise = self.host.connection.run(
                line, asynchronous=True, warn=True, hide=True, out_stream=self._out, err_stream=self._err, pty=False
            )
        except Exception as exc:
            raise ProcessError("%s on %s: cannot start: %s" % (self.name, self.host.describe(), exc)) from None
        deadline = time.monotonic() + self.ready_timeout
        while self._remote_pid is None:
            try:
                text = self.host.check("cat %s 2>/dev/null || true" % pidfile).strip()
            except HostError as exc:
                self.close()
                raise ProcessError(str(exc)) from None
            if text.isdigit():
                self._remote_pid = int(text)
            elif not self.alive() or time.monotonic() > deadline:
                tail = self.tail()
                self.close()
                raise ProcessError("%s on %s did not start\n%s" % (self.name, self.host.describe(), tail))
            else:
                time.sleep(POLL * 10)
        try:
            self.wait_ready()
        except BaseException:
            self.close()  # also removes the remote directory and closes the output files
            raise
        return self

    def wait_ready(self, timeout: float | None = None) -> None:
        # ready_port is checked from here: the harness reaches every host it drives.
        timeout = self.ready_timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        try:
            if self.ready_regex is not None:
                self.ready_match = self.wait_for_output(
                    self.ready_regex, deadline - time.monotonic(), self.ready_stream
                )
            if self.ready_port is not None:
                wait_for_port(*self.ready_port, timeout=max(0.0, deadline - time.monotonic()), alive=self.alive)
        except ProcessError as exc:
            raise ProcessError("%s: %s\n%s" % (self.name, exc, self.tail())) from None

    @property
    def pid(self) -> int:
        """The remote PID (``ProcessError`` before it is known)."""
        if self._remote_pid is None:
            raise ProcessError("%s not started" % self.name)
        return self._remote_pid

    @property
    def returncode(self) -> int | None:
        return self._peek()

    def alive(self) -> bool:
        return self._promise is not None and self._peek() is None

    def _peek(self) -> int | None:
        if self._promise is None:
            return None
        if self._exit is None and self._promise.runner.process_is_finished:
            try:
                result = self._promise.join()
                self._exit = result.exited
            except Exception:  # the connection broke: count it as gone
                self._exit = -1
            finally:
                for f in (self._out, self._err):
                    if f is not None:
                        f.flush()
        return self._exit

    def send_signal(self, sig: int) -> None:
        if self.alive():
            self.host.check("kill -%d %d" % (int(sig), self.pid))

    def stop(self, timeout: float = 10.0, sig: int = signal.SIGTERM) -> int | None:
        """Signal the remote group (``sig``, SIGKILL after ``timeout``); the exit status (-1 if unknown)."""
        if self._promise is None:
            return None
        if self._remote_pid is not None and self._peek() is None:
            try:
                self.host.check("kill -%d -- -%d 2>/dev/null || true" % (int(sig), self._remote_pid))
                if not self._wait_exit(timeout):
                    self.host.check("kill -9 -- -%d 2>/dev/null || true" % self._remote_pid)
                    self._wait_exit(10.0)
            except HostError:
                pass
        if self._peek() is None:  # still running: end the channel (the remote side gets EOF/SIGPIPE)
            try:
                self._promise.runner.kill()
            except Exception:
                pass
            self._wait_exit(5.0)
            if self._exit is None:
                self._exit = -1
        return self._exit

    def close(self) -> None:
        try:
            self.stop()
        finally:
            for f in (self._out, self._err):
                if f is not None and not f.closed:
                    f.close()
            if self._remote_dir:
                try:
                    self.host.check("rm -rf %s" % shlex.quote(self._remote_dir))
                except HostError:
                    pass
                self._remote_dir = None
            if self._own_dir and not os.environ.get(KEEP_LOGS_ENV):
                shutil.rmtree(self.log_dir, ignore_errors=True)


# -- parsing ------------------------------------------------------------------
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
        kwargs = {"key_filename": str(key)} if key else {}
        return SshHost(name, hostname, user or None, port, kwargs, address)
    raise HostError("host %r: %r is not local, netns:NAME or ssh://user@host" % (name, url))
