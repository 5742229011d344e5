"""Which hot path runs: the C one (``fooproxy/_flow.c``) when it was built, else databus.py's Python.

Whether the extension is there and wanted is ``native.py``'s decision
(``FOOPROXY_PURE=1`` chooses the pure-Python path); CI runs the whole suite
both ways. The two are the same product: ``tests/unit/test_flow_speedups.py`` feeds the same chunks
through both and compares the counts and every cell they write.

The C module holds no layout of its own: ``configure`` hands it the cell
indices and tables of stats.py, timetable.py, latency.py and protocol.py.
"""

from __future__ import annotations

import time
from types import ModuleType

from fooproxy import latency, native, protocol, stats, timetable


def _configure(flow: ModuleType) -> None:
    flow.configure(
        {
            "header": stats._HEADER,
            "ticks": timetable.TICKS_PER_S,
            "slots": timetable.SLOTS,
            "stride": timetable.STRIDE,
            "req": stats._REQ,
            "ack": stats._ACK,
            "nak": stats._NAK,
            "inv": stats._INV,
            "b_c2s": stats._B_C2S,
            "b_s2c": stats._B_S2C,
            "cells": stats.BLOCK_CELLS,
            "max_line": protocol.MAX_LINE,
            "behind": stats._L_BEHIND,
            "nb": latency.NB,
            "p_ack_sum": stats._PENDING_ACK_SUM,
            "p_nak_sum": stats._PENDING_NAK_SUM,
            "p_max": stats._PENDING_MAX,
            "fast_per_s": latency.FAST_PER_S,
            "fast_s": latency.FAST_S,
            "fast": latency.FAST,
            "bounds": latency.BOUNDS,
            "Counts": protocol.Counts,
        }
    )


def load() -> ModuleType | None:
    """The configured C module, or None: ``FOOPROXY_PURE`` set, or the extension not built."""
    if native.EXT is not None:
        _configure(native.EXT)
    return native.EXT


#: The C module when it runs, else None (the pure-Python Flow and MessageCounter).
FLOW = load()
#: What ``fooproxy --version`` and ``fooproxy_build_info`` say about it.
HOT_PATH = "c" if FLOW is not None else "python"


def records_in_c(stats_: stats.Stats) -> bool:
    """Whether the C Flow may do ``stats_.record``'s work itself: only for Stats.record on time.monotonic.

    A subclass's own ``record`` (a test's planted bug, say), a patched one, or another
    clock keeps the Python ``record``, which the C Flow then calls per chunk.
    """
    return getattr(stats_.record, "__func__", None) is stats.Stats.record and stats_.clock is time.monotonic
