"""A Foo server that answers each request after a delay the request chooses: for the latency tests.

``REQ SEQ d<ms>[n][s]`` is answered ``ACK SEQ`` (``NAK SEQ`` with ``n``) ``ms``
milliseconds after it arrived, and never before the previous answer (answers
go in order, as the reference server's do: a 5 ms request behind a 50 ms one
is answered with it). ``s`` splits the answer line in two writes 20 ms apart,
so the proxy sees it in two chunks. Any other line is answered at once with
``NAK 0 ERRDECODE``, like the reference does. Never closes its side.

In process: ``DelayServer().start()`` on the current hub. As a process (for
``-workers``): ``python -m tests.latency_server PORT``.
"""

from __future__ import annotations

import socket
import sys
import time

import gevent
from gevent.event import Event
from gevent.queue import Queue
from gevent.server import StreamServer

#: The gap between the two halves of a split answer.
SPLIT_S = 0.020


def plan(line: bytes) -> tuple[float, bytes, bool]:
    """``(delay_s, answer_line, split)`` for one request line (without its newline)."""
    parts = line.split(b" ")
    if len(parts) == 3 and parts[0] == b"REQ" and parts[2].startswith(b"d"):
        spec = parts[2][1:]
        ms = int(spec.rstrip(b"ns"))
        kind = b"NAK" if b"n" in spec else b"ACK"
        return ms / 1000.0, b"%s %s\n" % (kind, parts[1]), b"s" in spec
    return 0.0, b"NAK 0 ERRDECODE\n", False


class DelayServer:
    def __init__(self, port: int = 0) -> None:
        self.server = StreamServer(("127.0.0.1", port), self.handle)
        self.done = Event()

    def start(self) -> DelayServer:
        self.server.start()
        return self

    @property
    def port(self) -> int:
        return self.server.server_port

    def handle(self, sock, _addr) -> None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # no Nagle wait between answers
        answers: Queue = Queue()
        writer = gevent.spawn(self._write, sock, answers)
        buf = b""
        due = 0.0
        try:
            while True:
                data = sock.recv(65536)
                if not data:
                    break
                now = time.monotonic()
                buf += data
                *lines, buf = buf.split(b"\n")
                for line in lines:
                    delay, answer, split = plan(line)
                    due = max(due, now + delay)
                    answers.put((due, answer, split))
        except OSError:
            pass
        self.done.wait()  # like the reference: never close our side
        writer.kill()

    @staticmethod
    def _write(sock, answers: Queue) -> None:
        while True:
            due, answer, split = answers.get()
            wait = due - time.monotonic()
            if wait > 0:
                gevent.sleep(wait)
            if split:
                sock.sendall(answer[:3])
                gevent.sleep(SPLIT_S)
                sock.sendall(answer[3:])
            else:
                sock.sendall(answer)

    def stop(self) -> None:
        self.done.set()
        self.server.stop(timeout=0.5)


def main(argv: list[str]) -> None:
    from gevent import monkey

    monkey.patch_all()
    srv = DelayServer(int(argv[0])).start()
    print("listening on 127.0.0.1:%d" % srv.port, file=sys.stderr, flush=True)
    srv.server.serve_forever()


if __name__ == "__main__":
    main(sys.argv[1:])
