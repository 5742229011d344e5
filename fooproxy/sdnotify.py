"""sd_notify: tell systemd (``Type=notify``) that the service is ready, reloading or stopping.

The protocol is one datagram of ``KEY=value`` lines to the AF_UNIX socket
named by ``$NOTIFY_SOCKET`` (a leading ``@`` means the abstract namespace).
About ten lines, so written here rather than taken as a dependency (the PyPI
``sdnotify``/``systemd`` packages add nothing this needs). Without the
variable it does nothing, and it never raises: a service manager that went
away must not stop the proxy. The send is one non-blocking datagram.
"""

from __future__ import annotations

import _socket
import os
import time


def notify(state: str) -> bool:
    """Send ``state`` (``READY=1``, ``RELOADING=1``, ``STOPPING=1``...); True if it was sent."""
    address = os.environ.get("NOTIFY_SOCKET", "")
    if not address or address[0] not in "@/":
        return False
    if address[0] == "@":
        address = "\0" + address[1:]
    if state == "RELOADING=1":  # systemd >= 253 wants the time with it (Type=notify-reload)
        state += "\nMONOTONIC_USEC=%d" % (time.monotonic_ns() // 1000)
    try:
        # The interpreter's own socket, not gevent's: one non-blocking send, never a wait on the hub.
        sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_DGRAM | _socket.SOCK_NONBLOCK)
        try:
            sock.sendto(state.encode(), address)
        finally:
            sock.close()
    except OSError:
        return False
    return True
