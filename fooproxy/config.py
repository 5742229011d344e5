"""Config: the validated, immutable settings the runtime is built from.

Validators raise ``ConfigError`` with a message naming the flag; runtime
modules take a ``Config`` and never see argv or the environment.
"""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass
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


def positive_float(text: str, flag: str, allow_zero: bool = True) -> float:
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
    try:
        value = int(text, 10)
    except ValueError:
        raise ConfigError("%s: expected an integer, got %r" % (flag, text)) from None
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(
            "%s: expected a %s integer, got %r" % (flag, "non-negative" if allow_zero else "positive", text)
        )
    return value


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


LOG_LEVELS = ("debug", "info", "warning", "error")
#: Workers stamp a heartbeat every 0.5 s (workers.HEARTBEAT_INTERVAL): allow at least two.
MIN_HEARTBEAT_TIMEOUT = 1.0


@dataclass(frozen=True)
class Config:
    """Everything the proxy needs to run."""

    listen: Address = Address("", 8002)
    forward: Address = Address("", 8001)
    http: Address | None = Address("127.0.0.1", 8088)
    #: Source networks the HTTP endpoint answers (403 for others); None = everyone.
    http_allow: tuple[IPNetwork, ...] | None = None
    recovery_path: str | None = ".data/recovery.json"
    log_level: str = "info"
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
    #: Set in a worker process started by the master: its slot number.
    worker_id: int | None = None

    @classmethod
    def from_options(cls, opts: dict[str, Any]) -> Config:
        """Build from docopt's option dict (keys like ``--listen``)."""
        http = optional(opts["--http"])
        http_address = parse_address(http, "-http", allow_port_zero=True) if http else None
        recovery = optional(opts["--recovery-path"])
        level = opts["--log-level"].lower()
        if level not in LOG_LEVELS:
            raise ConfigError("-log-level: expected one of %s, got %r" % ("/".join(LOG_LEVELS), level))
        workers_s = opts["--workers"]
        if workers_s.strip().lower() == "auto":
            workers = os.cpu_count() or 1
        else:
            workers = positive_int(workers_s, "-workers")
        worker_id = opts.get("--worker-id")
        heartbeat = positive_float(opts["--heartbeat-timeout"], "-heartbeat-timeout", allow_zero=False)
        if heartbeat < MIN_HEARTBEAT_TIMEOUT:
            raise ConfigError("-heartbeat-timeout: at least %g seconds, got %r" % (MIN_HEARTBEAT_TIMEOUT, heartbeat))
        return cls(
            listen=parse_address(opts["--listen"], "-listen", allow_port_zero=True),
            forward=parse_address(opts["--forward"], "-forward"),
            http=http_address,
            http_allow=parse_allow(opts["--http-allow"], http_address),
            recovery_path=recovery,
            log_level=level,
            grace=positive_float(opts["--grace"], "-grace"),
            linger=positive_float(opts["--linger"], "-linger"),
            connect_timeout=positive_float(opts["--connect-timeout"], "-connect-timeout", allow_zero=False),
            idle_timeout=positive_float(opts["--idle-timeout"], "-idle-timeout"),
            max_conns=positive_int(opts["--max-conns"], "-max-conns"),
            pool_size=positive_int(opts["--pool-size"], "-pool-size", allow_zero=True),
            pool_wait=positive_float(opts["--pool-wait"], "-pool-wait"),
            pool_idle=positive_float(opts["--pool-idle"], "-pool-idle", allow_zero=False),
            health_interval=positive_float(opts["--health-interval"], "-health-interval", allow_zero=False),
            workers=workers,
            heartbeat_timeout=heartbeat,
            worker_id=positive_int(worker_id, "--worker-id", allow_zero=True) if worker_id else None,
        )
