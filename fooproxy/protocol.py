"""The Foo message grammar, in one place.

``parse_line`` decodes one line the way the reference server does (measured
against ``server-linux``, see ``foo-protocol.md``): at most two trailing ``\\r``
are dropped, the rest is split on the space byte alone into two or three
fields: Type ``REQ``/``ACK``/``NAK``, Seq a signed 64-bit decimal integer
(optional ``+``/``-``, leading zeros allowed), Data any bytes but space and
newline (possibly empty). ``MessageCounter`` counts whole messages in a byte
stream of any segmentation, per chunk, with C-level scanning (``bytes.find``
and one regular expression) instead of a Python loop per message.

A Seq is never converted with ``int()`` before its digit string is known to fit
in int64: Python refuses ``int()`` of more than 4,300 digits, and any client
may send a line of 65,000 digits.
"""

from __future__ import annotations

import re
from typing import NamedTuple

REQ, ACK, NAK = b"REQ", b"ACK", b"NAK"
TYPES = (REQ, ACK, NAK)
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
#: int64's bounds as digit strings, to decide range from the digits (equal length
#: decimal strings compare like the numbers they write).
_MAX_DIGITS, _MIN_DIGITS = b"%d" % INT64_MAX, b"%d" % -INT64_MIN

#: The reference server stops handling a connection on a longer line (newline included).
MAX_LINE = 65536

# A whole valid message line, newline included, as the reference decodes it:
# either ``Type Seq`` followed by at most two ``\r`` (the reference drops two,
# a third is part of Seq and makes it invalid), or ``Type Seq Data`` where Data
# is any run of bytes but space and newline (``\r`` and tabs included; its
# trailing ``\r`` may be dropped or kept, Data stays valid either way).
# Seq is limited to 18 significant digits here, which always fits in int64; the
# rare longer ones go through ``_BIG_SEQ_RE`` and an exact check. The
# possessive ``0*+`` / ``{0,18}+`` (and the lookahead that asks for a digit)
# keep a line of thousands of zeros linear: no backtracking into the digits.
# The only capture is the type, so ``findall`` yields one small bytes object
# per valid message and nothing else.
_LINE_RE = re.compile(rb"^(REQ|ACK|NAK) [+-]?(?=[0-9])0*+[0-9]{0,18}+(?: [^ \n]*+|\r{0,2})\n", re.M)
_match_line = _LINE_RE.match
# A line whose Seq has 19 or more significant digits: maybe valid, decided by parse_line.
_BIG_SEQ_RE = re.compile(rb"^(?:REQ|ACK|NAK) [+-]?0*+[1-9][0-9]{18}", re.M)


class Message(NamedTuple):
    """A decoded Foo message: type (``b"REQ"``...), Seq, Data (``b""`` if none)."""

    type: bytes
    seq: int
    data: bytes


def parse_seq(field: bytes) -> int | None:
    """A Seq field as the reference's ``strconv.ParseInt(field, 10, 64)`` reads it; ``None`` if invalid.

    Range is decided on the digit string (sign and leading zeros stripped), so
    ``int()`` only ever sees at most 19 digits.
    """
    negative = field[:1] == b"-"
    digits = field[1:] if negative or field[:1] == b"+" else field
    if not digits.isdigit():  # bytes.isdigit: ASCII digits only, and at least one
        return None
    significant = digits.lstrip(b"0")
    if len(significant) >= 19:
        limit = _MIN_DIGITS if negative else _MAX_DIGITS
        if len(significant) > 19 or significant > limit:
            return None
    value = int(significant) if significant else 0
    return -value if negative else value


def parse_line(line: bytes) -> Message | None:
    """Decode one line (with or without its ``\\n``); ``None`` if it is not a Foo message."""
    if line.endswith(b"\n"):
        line = line[:-1]
    # The reference drops one trailing \r when it splits lines and one more when
    # it decodes the line (two bufio.ScanLines passes): exactly two, not all.
    if line.endswith(b"\r"):
        line = line[:-1]
        if line.endswith(b"\r"):
            line = line[:-1]
    if b"\n" in line:
        return None
    fields = line.split(b" ", 3)  # a fourth field is enough to reject; never split a long line fully
    if len(fields) == 2:
        data = b""
    elif len(fields) == 3:
        data = fields[2]
    else:
        return None
    msg_type = fields[0]
    if msg_type not in TYPES:
        return None
    seq = parse_seq(fields[1])
    if seq is None:
        return None
    return Message(msg_type, seq, data)


class Counts(NamedTuple):
    """Complete lines finished by one chunk, by kind: what ``count_lines`` and ``feed`` return.

    The hot path never builds one per lockstep message: a one-line chunk returns one
    of the prebuilt ``_ONE`` values; only a chunk of several lines builds a new one.
    """

    req: int = 0
    ack: int = 0
    nak: int = 0
    invalid: int = 0

    @property
    def lines(self) -> int:
        return self.req + self.ack + self.nak + self.invalid


ZERO = Counts()


def _classify(line: bytes) -> Counts:
    msg = parse_line(line)
    if msg is None:
        return _ONE_INVALID
    return _ONE[msg.type]


_ONE = {REQ: Counts(req=1), ACK: Counts(ack=1), NAK: Counts(nak=1)}
_ONE_INVALID = Counts(invalid=1)


def count_lines(buf: bytes | bytearray, start: int, end: int) -> Counts:
    """Count the complete lines in ``buf[start:end]`` (which must end with ``\\n``).

    Returns ``(req, ack, nak, invalid)``. ``start`` must be 0 or just after a ``\\n``.
    """
    types = _LINE_RE.findall(buf, start, end)
    lines = buf.count(b"\n", start, end)
    valid = len(types)
    if valid == lines == 1:  # lockstep traffic: one message per chunk
        return _ONE[types[0]]
    req, ack, nak = types.count(REQ), types.count(ACK), types.count(NAK)
    # Lines with 19 or more significant Seq digits were rejected above; decide them exactly.
    if valid < lines and _BIG_SEQ_RE.search(buf, start, end) is not None:
        for m in _BIG_SEQ_RE.finditer(buf, start, end):
            eol = buf.find(b"\n", m.start(), end)
            c = _classify(bytes(buf[m.start() : eol]))
            req, ack, nak = req + c.req, ack + c.ack, nak + c.nak
    return Counts(req, ack, nak, lines - req - ack - nak)


def answer_types(chunk: bytes, ack: int, nak: int) -> list[bytes]:
    """The ACK/NAK types of the ``ack + nak`` answer lines a chunk finished, in order.

    For a reply chunk that answers several owed chunks with both types. The
    first line may have begun in an earlier chunk: its type is what the counts
    say the lines after it do not account for (as in ``request_runs``). Returns
    a shorter list when the counts do not add up. ``_flow.c``'s answer_kinds
    gives the same order.
    """
    first = chunk.find(b"\n")
    if first < 0 or not ack + nak:
        return []
    rest = chunk[first + 1 : chunk.rfind(b"\n") + 1]
    if _BIG_SEQ_RE.search(rest) is None:
        types = [t for t in _LINE_RE.findall(rest) if t != REQ]
    else:  # a Seq of 19 or more digits: each line decided exactly
        types = [m.type for m in map(parse_line, rest.split(b"\n")[:-1]) if m is not None and m.type != REQ]
    acks, naks = types.count(ACK), types.count(NAK)
    if ack - acks == 1 and nak == naks:
        types.insert(0, ACK)
    elif nak - naks == 1 and ack == acks:
        types.insert(0, NAK)
    return types


def request_runs(chunk: bytes, req: int) -> list[tuple[int, int]]:
    """The complete lines of a client->server chunk with ``req`` REQs among them, as runs in order:
    ``(reqs, 0)`` or ``(0, others)``. For the rare chunk that also carries lines the
    server answers without being a REQ (invalid ones, a client's ACK/NAK): Python per line.

    The first line may have begun in an earlier chunk: its kind is what the count
    says the lines after it do not account for.
    """
    first = chunk.find(b"\n")
    last = chunk.rfind(b"\n")
    if first < 0:
        return []
    kinds = []
    for line in chunk[first + 1 : last + 1].split(b"\n")[:-1]:
        msg = parse_line(line)
        kinds.append(msg is not None and msg.type == REQ)
    kinds.insert(0, req > kinds.count(True))
    runs: list[list[int]] = []
    for is_req in kinds:
        if runs and bool(runs[-1][0]) == is_req:
            runs[-1][0 if is_req else 1] += 1
        else:
            runs.append([1, 0] if is_req else [0, 1])
    return [(r, o) for r, o in runs]


class MessageCounter:
    """Incremental per-direction line counter for a stream of arbitrary chunks.

    Keeps only the start of an unfinished line, capped at ``MAX_LINE`` bytes: a
    longer line is remembered as oversized (and counted invalid when its
    newline passes), so memory stays bounded however long a line is.
    """

    __slots__ = ("_partial", "_oversized")

    def __init__(self) -> None:
        self._partial = b""
        self._oversized = False

    @property
    def pending(self) -> bool:
        """True while an unfinished line is open (no newline seen yet)."""
        return bool(self._partial) or self._oversized

    def feed(self, chunk: bytes) -> Counts:
        """Account for ``chunk``; return ``(req, ack, nak, invalid)`` lines it completed."""
        last = chunk.rfind(b"\n")
        if last < 0:
            if chunk:
                self._extend(chunk)
            return ZERO
        size = len(chunk)
        if not (self._partial or self._oversized):  # the common case: no line was open
            if last + 1 == size:
                m = _match_line(chunk)
                if m is not None and m.end() == size:  # exactly one valid message
                    return _ONE[m.group(1)]
                return count_lines(chunk, 0, size)
            counts = count_lines(chunk, 0, last + 1)
            self._extend(chunk[last + 1 :])
            return counts
        cut = chunk.find(b"\n") + 1
        if self._oversized or len(self._partial) + cut > MAX_LINE:
            first = _ONE_INVALID
        else:
            line = self._partial + chunk[:cut]
            first = count_lines(line, 0, len(line))  # the C-speed path for the finished line too
        self._partial = b""
        self._oversized = False
        counts = count_lines(chunk, cut, last + 1) if cut <= last else ZERO
        if last + 1 < size:
            self._extend(chunk[last + 1 :])
        return Counts(counts[0] + first[0], counts[1] + first[1], counts[2] + first[2], counts[3] + first[3])

    def _extend(self, piece: bytes) -> None:
        if self._oversized:
            return
        if len(self._partial) + len(piece) > MAX_LINE:
            self._partial = b""
            self._oversized = True
        else:
            self._partial += piece
