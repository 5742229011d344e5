"""atheris target A: ``MessageCounter`` against a decoder written from the contract, any segmentation.

The fuzzer's input is split in two: its first bytes choose up to 15 cut points
(two bytes each), the rest is the byte stream. The stream is fed to a
``MessageCounter`` in the chunks the cuts give, and the summed counts must be
exactly those of ``contract_counts``: a deliberately plain, slow line parser
written from foo-protocol.md and the measurements against server-linux,
sharing no code with fooproxy/protocol.py.

    .venv/bin/python fuzz/fuzz_counter.py fuzz/corpus/counter -max_total_time=60
"""

from __future__ import annotations

import sys

import atheris

with atheris.instrument_imports():
    from fooproxy.protocol import MessageCounter

# The contract's own constants, not fooproxy's.
LINE_LIMIT = 65536  # bytes, newline included; a longer line is never a message
SEQ_MIN, SEQ_MAX = -(2**63), 2**63 - 1
sys.set_int_max_str_digits(0)  # the contract decoder may int() any digit string


def contract_type(line: bytes) -> str | None:
    """``"req"``/``"ack"``/``"nak"`` if the reference accepts ``line`` (no newline), else None."""
    if len(line) + 1 > LINE_LIMIT:
        return None
    for _ in range(2):  # server-linux drops at most two trailing carriage returns
        if line.endswith(b"\r"):
            line = line[: len(line) - 1]
    fields = line.split(b" ")
    if len(fields) not in (2, 3):
        return None
    kind, seq = fields[0], fields[1]
    if kind not in (b"REQ", b"ACK", b"NAK"):
        return None
    digits = seq[1:] if seq[:1] in (b"+", b"-") else seq
    if len(digits) == 0 or any(byte not in b"0123456789" for byte in digits):
        return None
    if not SEQ_MIN <= int(seq) <= SEQ_MAX:
        return None
    return kind.decode().lower()


def contract_counts(stream: bytes) -> tuple[int, int, int, int]:
    """``(req, ack, nak, invalid)`` over the complete lines of ``stream``."""
    tally = {"req": 0, "ack": 0, "nak": 0, None: 0}
    for line in stream.split(b"\n")[:-1]:
        tally[contract_type(line)] += 1
    return (tally["req"], tally["ack"], tally["nak"], tally[None])


def split_input(data: bytes) -> tuple[bytes, list[int]]:
    """The stream and its cut points, from one fuzzer input."""
    ncuts = data[0] % 16 if data else 0
    head, stream = data[1 : 1 + 2 * ncuts], data[1 + 2 * ncuts :]
    cuts = sorted({int.from_bytes(head[i : i + 2], "big") % (len(stream) + 1) for i in range(0, len(head) - 1, 2)})
    return stream, cuts


def test_one_input(data: bytes) -> None:
    stream, cuts = split_input(data)
    counter = MessageCounter()
    total = [0, 0, 0, 0]
    prev = 0
    for cut in [*cuts, len(stream)]:
        for i, n in enumerate(counter.feed(stream[prev:cut])):
            total[i] += n
        prev = cut
    want = contract_counts(stream)
    if tuple(total) != want:
        raise AssertionError("counted %r, contract says %r, cuts %r, stream %r" % (total, want, cuts, stream[:300]))
    if counter.pending != (not stream.endswith(b"\n") and stream != b""):
        raise AssertionError("pending=%r after stream ending %r" % (counter.pending, stream[-20:]))


def main() -> None:
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
