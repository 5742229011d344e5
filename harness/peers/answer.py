"""The reference server's answer rule, shared by foo-server and foo-client.

A decodable line ``Type Seq [Data]`` is answered ``T SEQ HEX\\n`` where
``HEX = md5(Type + str(Seq) + hex(Data) + "weaveworks")`` in lowercase hex and
``T`` is ``NAK`` when HEX starts with ``2`` or ``d``, else ``ACK``. Seq is the
parsed integer in plain decimal (``+5`` -> ``5``, ``007`` -> ``7``, ``-0`` -> ``0``).
A line ``fooproxy.protocol.parse_line`` rejects is answered ``NAK 0 ERRDECODE``.

``hex(Data)`` is what the reference's Go code writes (found by tracing its md5
writes): Data ranged over as UTF-8, each code point as ``%x`` without padding,
an invalid byte as U+FFFD. For bytes 0x10-0x7f that is plain lowercase hex; a
tab gives ``9``, not ``09``, and ``\\xff`` gives ``fffd``.
"""

from __future__ import annotations

import re
from binascii import hexlify
from hashlib import md5

from fooproxy.protocol import ACK, NAK, REQ, parse_line

SALT = b"weaveworks"
#: The answer to a line that does not decode.
ERRDECODE = b"NAK 0 ERRDECODE\n"
_NAK_FIRST = frozenset(b"2d")
#: Data whose every byte is 0x10-0x7f: the reference's hex is plain hexlify.
_PLAIN_HEX = re.compile(rb"[\x10-\x7f]*").fullmatch
_SURROGATE_ESCAPES = range(0xDC80, 0xDD00)  # where "surrogateescape" puts invalid UTF-8 bytes


def data_hex(data: bytes) -> bytes:
    """Data as the reference hashes it: ``%x`` of each UTF-8 code point, U+FFFD per invalid byte."""
    if _PLAIN_HEX(data):
        return hexlify(data)
    # Python's decoder marks the same bytes invalid as Go's range loop, one
    # escape per byte (Go yields one RuneError per invalid byte too).
    text = data.decode("utf-8", "surrogateescape")
    return "".join(["%x" % (0xFFFD if ord(c) in _SURROGATE_ESCAPES else ord(c)) for c in text]).encode("ascii")


def answer_hash(msg_type: bytes, seq: int, data: bytes) -> bytes:
    """``md5(Type + str(Seq) + hex(Data) + "weaveworks")`` as lowercase hex bytes (``hex`` is ``data_hex``)."""
    return md5(b"%s%d%s%s" % (msg_type, seq, data_hex(data), SALT)).hexdigest().encode("ascii")


def answer_type(digest: bytes) -> bytes:
    """``NAK`` when the hash starts with ``2`` or ``d``, else ``ACK``."""
    return NAK if digest[0] in _NAK_FIRST else ACK


def answer(msg_type: bytes, seq: int, data: bytes = b"") -> bytes:
    """The full answer line (with ``\\n``) the reference server gives to this message."""
    # answer_hash inlined: this is the benchmark server's per-line hot path. The
    # clients' Data is [a-z0-9]: bytes.isalnum (ASCII only, C) skips data_hex's regex.
    hexed = hexlify(data) if data.isalnum() else data_hex(data)
    digest = md5(b"%s%d%s%s" % (msg_type, seq, hexed, SALT)).hexdigest().encode("ascii")
    return b"%s %d %s\n" % (NAK if digest[0] in _NAK_FIRST else ACK, seq, digest)


def answer_for(line: bytes) -> bytes:
    """The answer line to one received line (``\\n`` and a trailing ``\\r`` optional)."""
    msg = parse_line(line)
    if msg is None:
        return ERRDECODE
    return answer(msg.type, msg.seq, msg.data)


def lie_about(answer_line: bytes) -> bytes:
    """Corrupt a hashed answer (its last hash digit changes); ERRDECODE stays as is."""
    if answer_line == ERRDECODE or len(answer_line) < 3:
        return answer_line
    last = answer_line[-2]
    return answer_line[:-2] + (b"1" if last == ord("0") else b"0") + b"\n"


def check_answer(line: bytes, seq: int, data: bytes, msg_type: bytes = REQ) -> str | None:
    """Validate an answer line to the request ``msg_type seq data``; ``None`` if correct.

    Otherwise returns the reason, e.g. ``"corrupted data"`` when Seq matches but
    the type or hash are not what the rule gives.
    """
    want = answer(msg_type, seq, data)
    if line == want or line + b"\n" == want:
        return None
    got = parse_line(line)
    if got is None:
        return "undecodable answer %r" % bytes(line[:80])
    if got.seq != seq:
        return "unexpected seq %d (want %d) in %r" % (got.seq, seq, bytes(line[:80]))
    return "corrupted data"
