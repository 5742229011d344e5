"""Listening sockets (``fooproxy.listeners``): bound before serving, with one-line errors."""

from __future__ import annotations

import socket as _stdsocket

import pytest

from fooproxy.config import Address
from fooproxy.listeners import StartupError, bind, probe_free
from tests.helpers import connect


def test_port_zero_binds_a_free_port_that_accepts():
    sock = bind(Address("127.0.0.1", 0))
    try:
        port = sock.getsockname()[1]
        assert port != 0
        client = connect(("127.0.0.1", port))
        peer, _ = sock.accept()
        peer.close()
        client.close()
    finally:
        sock.close()


def test_an_empty_host_accepts_ipv4_and_ipv6_clients():
    sock = bind(Address("", 0))
    try:
        port = sock.getsockname()[1]
        hosts = ["127.0.0.1"] + (["::1"] if sock.family == _stdsocket.AF_INET6 else [])
        for host in hosts:
            client = _stdsocket.create_connection((host, port), timeout=5)
            sock.accept()[0].close()
            client.close()
    finally:
        sock.close()


def test_a_busy_port_is_one_clear_line():
    held = bind(Address("127.0.0.1", 0))
    port = held.getsockname()[1]
    try:
        with pytest.raises(StartupError, match=r"^cannot listen on 127\.0\.0\.1:%d: address already in use$" % port):
            bind(Address("127.0.0.1", port))
    finally:
        held.close()


def test_reuse_port_still_refuses_a_port_someone_else_holds():
    """SO_REUSEPORT would silently share a port with another reuse-port listener: probed first."""
    other = _stdsocket.socket()
    other.setsockopt(_stdsocket.SOL_SOCKET, _stdsocket.SO_REUSEPORT, 1)
    other.bind(("127.0.0.1", 0))
    other.listen()
    port = other.getsockname()[1]
    try:
        with pytest.raises(StartupError, match="address already in use"):
            bind(Address("127.0.0.1", port), reuse_port=True)
        with pytest.raises(StartupError, match="address already in use"):
            probe_free(Address("127.0.0.1", port))
        # A worker skips the probe: its siblings hold the port on purpose.
        sibling = bind(Address("127.0.0.1", port), reuse_port=True, probe=False)
        sibling.close()
    finally:
        other.close()


def test_an_address_not_on_this_machine_is_named():
    with pytest.raises(StartupError, match=r"cannot listen on 192\.0\.2\.1:\d+: address not available"):
        bind(Address("192.0.2.1", 0))
