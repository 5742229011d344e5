"""Config: the validated, immutable settings the runtime is built from.

Validators raise ``ConfigError`` with a message naming the flag; runtime
modules take a ``Config`` and never see argv or the environment.
"""

from __future__ import annotations

import ipaddress
import os
import socket
from dataclasses import dataclass, fields
from typing import Any

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
#: What ``-http-allow auto`` means for an HTTP endpoint bound to all interfaces.
LOOPBACK = (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128"))


class ConfigError(ValueError):
    """A flag's value is unusable; the message names the flag."""


@dataclass(frozen=True)
class Address:
    """A TCP address. ``host`` is ``""`` for "all interfaces" / "this machine"."""

    host: str
    port: int

    def __str__(self) -> str:
        if ":" in self.host:
            return "[%s]:%d" % (self.host, self.port)
        return "%s:%d" % (self.host, self.port)

    @property
    def connect_host(self) -> str:
        """Where to dial: an empty host means this machine, as in Go."""
        return self.host or "127.0.0.1"


def parse_address(text: str, flag: str, allow_port_zero: bool = False) -> Address:
    """Parse ``:8001``, ``host:8001``, ``[::1]:8001`` (and a bare port)."""
    text = text.strip()
    if text.startswith("["):
        end = text.find("]")
        if end < 0 or text[end + 1 : end + 2] != ":":
            raise ConfigError("%s: bad address %r (expected [ipv6]:port)" % (flag, text))
        host, port_s = text[1:end], text[end + 2 :]
    elif ":" in text:
        host, _, port_s = text.rpartition(":")
        if ":" in host:
            raise ConfigError("%s: bad address %r (write IPv6 as [addr]:port)" % (flag, text))
    else:
        host, port_s = "", text
    if host == "*":
        host = ""
    try:
        port = int(port_s, 10)
    except ValueError:
        raise ConfigError("%s: bad port in %r" % (flag, text)) from None
    if not (0 if allow_port_zero else 1) <= port <= 65535:
        raise ConfigError("%s: port out of range in %r" % (flag, text))
    return Address(host, port)


def positive_float(text: str, flag: str, allow_zero: bool = False) -> float:
    """A finite number of seconds above zero (or at least zero with ``allow_zero``), like ``positive_int``."""
    try:
        value = float(text)
    except ValueError:
        raise ConfigError("%s: expected a number of seconds, got %r" % (flag, text)) from None
    if value != value or value < 0 or (value == 0 and not allow_zero) or value == float("inf"):
        raise ConfigError(
            "%s: expected a %s number, got %r" % (flag, "non-negative" if allow_zero else "positive", text)
        )
    return value


def positive_int(text: str, flag: str, allow_zero: bool = False) -> int:
    """A decimal integer above zero (or at least zero with ``allow_zero``)."""
    try:
        value = int(text, 10)
    except ValueError:
        raise ConfigError("%s: expected an integer, got %r" % (flag, text)) from None
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(
            "%s: expected a %s integer, got %r" % (flag, "non-negative" if allow_zero else "positive", text)
        )
    return value


def in_range(value: float, flag: str, low: float, high: float, zero_ok: bool = False) -> float:
    """``value`` if ``low <= value <= high`` (or 0 with ``zero_ok``), else ``ConfigError`` naming the flag.

    The ranges (``RANGES``) are stated in the usage text; a value outside one
    is a mistake (``-workers 1000`` forks away the machine, ``-health-interval
    0.0001`` dials the upstream 790 times a second, a huge timeout overflows
    the event loop's timers), never a setting.
    """
    if (zero_ok and value == 0) or low <= value <= high:
        return value
    raise ConfigError(
        "%s: expected %s%s to %s, got %s" % (flag, "0 or " if zero_ok else "", _num(low), _num(high), _num(value))
    )


def _num(x: float) -> str:
    # 1000000, not 1e+06: the number as the usage text writes it.
    return "%d" % x if float(x).is_integer() and abs(x) < 1e15 else "%g" % x


def _worker_slot(text: str) -> int:
    return in_range(positive_int(text, "--worker-id", allow_zero=True), "--worker-id", 0, 3 * max_workers())


def max_workers() -> int:
    """The most ``-workers`` accepted here: 4 per usable core, at least 4.

    Each worker is a whole process (tens of MB) and the proxy is CPU-bound, so
    workers beyond the cores only add context switches (on 2 cores a second
    worker already costs throughput, see README); 4 per core leaves room for
    experiments without letting a typo fork the machine away.
    """
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    return max(4, 4 * cores)


#: ``flag: (low, high, 0 also allowed)``; the usage text says the same.
RANGES: dict[str, tuple[float, float, bool]] = {
    "-heartbeat-timeout": (1, 3600, False),
    "-pool-size": (0, 100_000, False),
    "-pool-wait": (0, 3600, False),
    "-pool-idle": (0.1, 86400, False),
    "-max-conns": (1, 1_000_000, False),
    "-connect-timeout": (0.01, 300, False),
    "-idle-timeout": (0.1, 86400, True),
    "-linger": (0, 3600, False),
    "-grace": (0, 3600, False),
    "-health-interval": (0.1, 3600, False),
    "-connect-retries": (0, 15, False),
    "-max-fails": (0, 1000, False),
}


def _ranged(value: float, flag: str) -> Any:
    low, high, zero_ok = RANGES[flag]
    return in_range(value, flag, low, high, zero_ok)


def refuse_self_forward(listen: Address, forward: Address) -> None:
    """``ConfigError`` if ``forward`` is this proxy's own ``listen`` address.

    Forwarding to itself turns one client into a connection loop. Same port,
    and the forward host is an address the listener accepts on: the same IP,
    or any address of this host when listening on all interfaces (``:P``,
    ``0.0.0.0:P``, ``[::]:P``); ``:P``, ``0.0.0.0`` and ``::`` as a forward
    host mean this host. Cheap: nothing is resolved unless the ports are
    equal, numeric hosts are not resolved, and "is this IP mine" is a local
    bind, not a packet. A name that does not resolve is left to the connector.
    """
    if listen.port != forward.port:
        return
    targets = _ips(forward.host or "127.0.0.1")
    if listen.host in ("", "0.0.0.0", "::"):
        every = listen.host == "" or listen.host == "::"  # an empty host is dual-stack, as is [::] on Linux
        hit = any((every or ip.version == 4) and _is_local(ip) for ip in targets)
    else:
        hit = bool(targets & _ips(listen.host))
    if hit:
        raise ConfigError(
            "-forward: %s is this proxy's own -listen address %s (it would forward to itself)" % (forward, listen)
        )


def _ips(host: str) -> set[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    out = set()
    try:
        infos = [(None, None, None, None, (host,))] if _numeric(host) else socket.getaddrinfo(host, None)
    except (OSError, UnicodeError):
        return out
    for *_, sockaddr in infos:
        try:
            ip = ipaddress.ip_address(str(sockaddr[0]).split("%", 1)[0])
        except ValueError:
            continue
        if ip.version == 6 and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        if ip.is_unspecified:  # connecting to 0.0.0.0 / :: reaches this host
            ip = ipaddress.ip_address("127.0.0.1" if ip.version == 4 else "::1")
        out.add(ip)
    return out


def _numeric(host: str) -> bool:
    try:
        ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    return True


def _is_local(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    # Binding succeeds only for an address this host has (any 127.x, ::1, its interfaces).
    if ip.is_loopback:
        return True
    family = socket.AF_INET if ip.version == 4 else socket.AF_INET6
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as probe:
            probe.bind((str(ip), 0))
    except OSError:
        return False
    return True


#: The most ``-forward`` upstreams (the stats block has a fixed-size section for them).
MAX_UPSTREAMS = 16
#: The longest upstream address, as text (it is the key of its stats entry).
MAX_ADDRESS_BYTES = 256
#: ``-balance`` policies; the first is the default.
POLICIES = ("roundrobin", "leastconn", "first")


def parse_forward(text: str, listen: Address) -> tuple[Address, ...]:
    """``-forward a:8001,b:8001``: one or more upstreams, each distinct, none the proxy itself."""
    items = [item.strip() for item in text.split(",")]
    if not any(items) or not all(items):
        raise ConfigError("-forward: empty address in %r (a list is a:8001,b:8001)" % text)
    if len(items) > MAX_UPSTREAMS:
        raise ConfigError("-forward: at most %d upstreams, got %d" % (MAX_UPSTREAMS, len(items)))
    out: list[Address] = []
    seen: dict[tuple[str, int], str] = {}
    for item in items:
        address = parse_address(item, "-forward")
        if len(str(address).encode("utf-8")) > MAX_ADDRESS_BYTES:
            raise ConfigError("-forward: address longer than %d bytes: %.40r..." % (MAX_ADDRESS_BYTES, item))
        key = (address.connect_host.lower(), address.port)
        if key in seen:
            raise ConfigError("-forward: %s is given twice (as %s and %s)" % (address, seen[key], item))
        seen[key] = item
        refuse_self_forward(listen, address)
        out.append(address)
    return tuple(out)


def optional(text: str) -> str | None:
    """``off`` / ``none`` / empty disable an optional feature."""
    return None if text.strip().lower() in ("", "off", "none", "no", "0", "false") else text


def parse_allow(text: str, http: Address | None) -> tuple[IPNetwork, ...] | None:
    """``-http-allow``: networks (``10.0.0.0/8,::1``) allowed to use the HTTP endpoint; None = everyone.

    ``auto`` (the default): loopback only when ``-http`` listens on all
    interfaces (an empty host, ``0.0.0.0`` or ``::``), else everyone who can
    reach the address given. ``all`` allows everyone.
    """
    word = text.strip().lower()
    if word == "all":
        return None
    if word == "auto":
        everywhere = http is not None and http.host in ("", "0.0.0.0", "::")
        return LOOPBACK if everywhere else None
    nets = []
    for item in text.split(","):
        try:
            nets.append(ipaddress.ip_network(item.strip(), strict=False))
        except ValueError:
            raise ConfigError("-http-allow: %r is not an address or CIDR network (e.g. 10.0.0.0/8)" % item) from None
    return tuple(nets)


def on_off(text: str, flag: str) -> bool:
    """``on`` / ``off`` (any case) as a bool; anything else is a ``ConfigError`` naming ``flag``."""
    value = str(text).strip().lower()
    if value not in ("on", "off"):
        raise ConfigError("%s: expected on or off, got %r" % (flag, text))
    return value == "on"


LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("text", "json")
#: Workers stamp a heartbeat every 0.5 s (worker.HEARTBEAT_INTERVAL): allow at least two.
MIN_HEARTBEAT_TIMEOUT = 1.0


@dataclass(frozen=True)
class Config:
    """Everything the proxy needs to run."""

    listen: Address = Address("", 8002)
    #: The upstreams, in the order given (``first`` fails over in this order). A single
    #: ``Address`` given in code is taken as a list of one.
    forward: tuple[Address, ...] = (Address("", 8001),)
    #: ``-balance``: how new sessions pick an upstream (one of ``POLICIES``).
    balance: str = "roundrobin"
    #: A client whose upstream connect fails is retried on this many other upstreams.
    connect_retries: int = 1
    #: Connect failures within ``health_interval`` that take an upstream out of rotation (0: never).
    max_fails: int = 2
    http: Address | None = Address("127.0.0.1", 8088)
    #: Source networks the HTTP endpoint answers (403 for others); None = everyone.
    http_allow: tuple[IPNetwork, ...] | None = None
    recovery_path: str | None = ".data/recovery.json"
    log_level: str = "info"
    #: ``text`` or ``json`` (one object per line).
    log_format: str = "text"
    grace: float = 10.0
    linger: float = 5.0
    connect_timeout: float = 5.0
    idle_timeout: float = 300.0
    max_conns: int = 10000
    pool_size: int = 0
    pool_wait: float = 5.0
    pool_idle: float = 60.0
    health_interval: float = 2.0
    workers: int = 1
    heartbeat_timeout: float = 10.0
    #: Time every request until its answer (the latency histograms); ``-latency off`` measures nothing.
    latency: bool = True
    #: Set in a worker process started by the master: its slot number.
    worker_id: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.forward, Address):
            object.__setattr__(self, "forward", (self.forward,))
        elif not isinstance(self.forward, tuple):
            object.__setattr__(self, "forward", tuple(self.forward))

    @classmethod
    def from_options(cls, opts: dict[str, Any]) -> Config:
        """Build from docopt's option dict (keys like ``--listen``)."""
        http = optional(opts["--http"])
        http_address = parse_address(http, "-http", allow_port_zero=True) if http else None
        recovery = optional(opts["--recovery-path"])
        level = opts["--log-level"].lower()
        if level not in LOG_LEVELS:
            raise ConfigError("-log-level: expected one of %s, got %r" % ("/".join(LOG_LEVELS), level))
        log_format = opts["--log-format"].strip().lower()
        if log_format not in LOG_FORMATS:
            raise ConfigError("-log-format: expected text or json, got %r" % opts["--log-format"])
        workers_s = opts["--workers"]
        if workers_s.strip().lower() == "auto":
            workers = os.cpu_count() or 1
        else:
            workers = positive_int(workers_s, "-workers")
            if workers > max_workers():
                raise ConfigError(
                    "-workers: at most %d on this machine (4 per core), got %s" % (max_workers(), workers_s.strip())
                )
        worker_id = opts.get("--worker-id")
        heartbeat = positive_float(opts["--heartbeat-timeout"], "-heartbeat-timeout")
        if heartbeat < MIN_HEARTBEAT_TIMEOUT:
            raise ConfigError("-heartbeat-timeout: at least %g seconds, got %r" % (MIN_HEARTBEAT_TIMEOUT, heartbeat))
        listen = parse_address(opts["--listen"], "-listen", allow_port_zero=True)
        forward = parse_forward(opts["--forward"], listen)
        balance = opts["--balance"].strip().lower()
        if balance not in POLICIES:
            raise ConfigError("-balance: expected one of %s, got %r" % ("/".join(POLICIES), opts["--balance"]))
        return cls(
            listen=listen,
            forward=forward,
            balance=balance,
            connect_retries=_ranged(
                positive_int(opts["--connect-retries"], "-connect-retries", allow_zero=True), "-connect-retries"
            ),  # fmt: skip
            max_fails=_ranged(positive_int(opts["--max-fails"], "-max-fails", allow_zero=True), "-max-fails"),
            http=http_address,
            http_allow=parse_allow(opts["--http-allow"], http_address),
            recovery_path=recovery,
            log_level=level,
            log_format=log_format,
            grace=_ranged(positive_float(opts["--grace"], "-grace", allow_zero=True), "-grace"),
            linger=_ranged(positive_float(opts["--linger"], "-linger", allow_zero=True), "-linger"),
            connect_timeout=_ranged(positive_float(opts["--connect-timeout"], "-connect-timeout"), "-connect-timeout"),
            idle_timeout=_ranged(
                positive_float(opts["--idle-timeout"], "-idle-timeout", allow_zero=True), "-idle-timeout"
            ),
            max_conns=_ranged(positive_int(opts["--max-conns"], "-max-conns"), "-max-conns"),
            pool_size=_ranged(positive_int(opts["--pool-size"], "-pool-size", allow_zero=True), "-pool-size"),
            pool_wait=_ranged(positive_float(opts["--pool-wait"], "-pool-wait", allow_zero=True), "-pool-wait"),
            pool_idle=_ranged(positive_float(opts["--pool-idle"], "-pool-idle"), "-pool-idle"),
            health_interval=_ranged(positive_float(opts["--health-interval"], "-health-interval"), "-health-interval"),
            workers=workers,
            heartbeat_timeout=_ranged(heartbeat, "-heartbeat-timeout"),
            latency=on_off(opts["--latency"], "-latency"),
            # Three slots per worker position (supervisor.SLOTS_PER_POSITION).
            worker_id=_worker_slot(worker_id) if worker_id else None,
        )


def config_defaults() -> dict[str, str]:
    """``Config()``'s defaults as flag text, by field name: what the usage text shows and docopt parses back."""
    shown: dict[str, str] = {}
    for f in fields(Config):
        value = getattr(_DEFAULT, f.name)
        if isinstance(value, bool):
            shown[f.name] = "on" if value else "off"
        elif value is None:
            shown[f.name] = "off"
        elif isinstance(value, tuple):
            shown[f.name] = ",".join(str(v) for v in value)
        elif isinstance(value, float):
            shown[f.name] = "%g" % value
        else:
            shown[f.name] = str(value)
    return shown


_DEFAULT = Config()
