"""Whether the compiled extension ``fooproxy._flow`` is used: the one place that decides.

``make install`` compiles ``_flow.c`` (setup.py's optional extension: without a
C compiler the install still succeeds and the pure-Python path runs). The
environment variable ``FOOPROXY_PURE=1`` chooses the pure-Python path even
when the extension is there. This module imports nothing of fooproxy, so that
the modules ``speedups.py`` configures the extension from (stats.py,
latency.py) can take their C-backed state types from here without a cycle.
"""

from __future__ import annotations

import os
from types import ModuleType


def _load() -> ModuleType | None:
    if os.environ.get("FOOPROXY_PURE", "") not in ("", "0"):
        return None
    try:
        from fooproxy import _flow
    except ImportError:
        return None
    return _flow


#: The extension module (not yet configured: speedups.py does that), or None.
EXT = _load()
