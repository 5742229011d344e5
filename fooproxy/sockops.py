"""The socket calls each client costs (accept, the upstream connect, close): C when built, else the socket module.

Every one is a non-blocking call made from the hub. Python's socket methods
release the GIL around each call, also around one that cannot wait, and on
an interpreter with threads (gevent's threadpool) a release is a drop and a
take of the GIL: ~800 instructions each, eight per client (callgrind, ``foo-harness
msgcost --only churn``). The C versions in ``fooproxy/_flow.c`` make the
same calls holding the GIL, and ``accept4`` makes the client non-blocking
itself (no ``ioctl`` after). ``native.py`` decides which runs; the two
behave alike, and CI runs the suite both ways.
"""

from __future__ import annotations

import _socket
import errno
import socket as _stdsocket

from fooproxy import native

_SOCKET = _socket.socket
_NONBLOCK = getattr(_stdsocket, "SOCK_NONBLOCK", 0)  # Linux: created non-blocking, no fcntl/ioctl after
_STREAM = _stdsocket.SOCK_STREAM | _NONBLOCK
_C = native.EXT


def accept(listener: _stdsocket.socket) -> tuple[_socket.socket, tuple] | None:
    """One waiting client of ``listener`` as a bare non-blocking ``_socket.socket`` and its address, or None.

    None when nobody is waiting: that ends every accept loop, so it is a value,
    not an exception (a raised ``BlockingIOError`` costs more than the accept).
    Raises ``InterruptedError`` on a signal, and the ``OSError`` of accept(2)
    otherwise (EMFILE...).
    """
    if _C is not None:
        return _C.accept(listener.fileno(), _SOCKET)
    try:
        fd, address = listener._accept()
    except BlockingIOError:
        return None
    try:
        client = _SOCKET(listener.family, _stdsocket.SOCK_STREAM, 0, fd)  # family given: no getsockopt
    except BaseException:
        _stdsocket.close(fd)
        raise
    try:
        client.setblocking(False)  # accept() does not pass O_NONBLOCK on; the hub must never wait
    except BaseException:
        client.close()
        raise
    return client, address


def start_connect(family: int, sockaddr: tuple) -> tuple[_socket.socket, int]:
    """A bare non-blocking socket with its connect to ``sockaddr`` started, and where it stands.

    The error is 0 (connected), EINPROGRESS (still going: wait until
    writable), or the failure (ECONNREFUSED...; the socket is then the
    caller's to close). Raises ``OSError`` when no socket can be made (EMFILE).
    """
    sock = _SOCKET(family, _STREAM)
    try:
        if not _NONBLOCK:
            sock.setblocking(False)
        err = sock.connect_ex(sockaddr)  # non-blocking: returns at once
        if err == errno.EINPROGRESS:
            # Ask again before arming watchers: to a server on this machine (loopback)
            # the handshake has usually finished by now, and the second connect says
            # so (0), or gives the failure (ECONNREFUSED). That saves an io watcher, a
            # timer and a wake-up of the loop per connection; still in progress
            # (EALREADY) is the remote case, a cheap syscall more.
            err = sock.connect_ex(sockaddr)
            if err == errno.EISCONN:
                err = 0
            elif err == errno.EALREADY:
                err = errno.EINPROGRESS
    except BaseException:
        sock.close()
        raise
    return sock, err


def connect_now(family: int, sockaddr: tuple) -> _socket.socket | None:
    """A bare non-blocking socket connected to ``sockaddr`` with TCP_NODELAY, if the connect finished at once.

    Meant for a server on this machine: the first ``connect`` starts the
    handshake and the second finds it done. Anything else (refused, still in
    progress, out of descriptors) closes the socket and returns None: nothing
    is left open and nothing is reported.
    """
    if _C is not None:
        return _C.connect_now(family, sockaddr, _SOCKET)
    try:
        sock, err = start_connect(family, sockaddr)
    except OSError:
        return None
    try:
        if err == 0:
            sock.setsockopt(_stdsocket.IPPROTO_TCP, _stdsocket.TCP_NODELAY, 1)
            return sock
    except OSError:
        pass  # reset already: the full way tries again and reports
    sock.close()
    return None


def close(sock: _stdsocket.socket) -> None:
    """Close a client or upstream socket (a gevent one through its own ``close``, which wakes its waiters)."""
    if _C is not None:
        _C.close(sock, _SOCKET)
    else:
        sock.close()
