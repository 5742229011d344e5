"""``-log-format json``: python-json-logger's orjson formatter, taking a line's fields from its argument.

Imported only for ``-log-format json`` (it imports orjson). Each line is one
object: ``ts`` (ISO 8601, UTC), ``level``, ``logger``, ``pid``, ``msg``, then
the line's fields. A line has fields when it is logged as logging's mapping
form, one dict as the only argument of a ``%(name)s`` message::

    log.info("%(peer)s: closed (%(ended)s)", {"peer": peer, "ended": how})

The text formatter makes the message from that dict as for any line; this
one also puts the dict's items in the object. That is the close line's way
(``fooproxy.proxy._log_close``): one dict, built once, for both formats.

Why not ``extra=``: python-json-logger finds extra attributes by scanning
every attribute of every record (``merge_record_extra``), which was most of
the JSON close line's cost. ``JsonLineFormatter`` overrides ``add_fields``,
the hook the library documents for this, so that a plain record is not
scanned; a record that has more attributes than a plain one (``extra=``, or
a handler before this one that set some) still goes through the library's
own ``merge_record_extra``, so ``extra=`` keeps working. Serializing stays
the library's (``OrjsonFormatter.jsonify_log_record``, orjson).
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Any

from pythonjsonlogger.core import merge_record_extra
from pythonjsonlogger.orjson import OrjsonFormatter

FORMAT = "{levelname}{name}{process}{message}"
RENAMES = {"levelname": "level", "name": "logger", "process": "pid", "message": "msg"}
TIMESTAMP = "ts"
_from_timestamp = datetime.fromtimestamp

# The attributes of a record nobody added to, and ``message``, which format() sets before add_fields.
_PLAIN_ATTRIBUTES = len(logging.makeLogRecord({}).__dict__) + 1


class JsonLineFormatter(OrjsonFormatter):
    """One JSON object per line: ``ts``, ``level``, ``logger``, ``pid``, ``msg`` and the line's fields."""

    def __init__(self) -> None:
        # The format and renames of the common keys, as the library's own add_fields would take them;
        # add_fields below writes the same keys directly, and the library's scan skips them.
        super().__init__(FORMAT, style="{", rename_fields=RENAMES, timestamp=TIMESTAMP)
        self._skip = set(self.parse()) | self.reserved_attrs

    def add_fields(self, log_data: dict[str, Any], record: logging.LogRecord, message_dict: dict[str, Any]) -> None:
        """``ts`` and the format's fields, then the line's (a dict argument), ``extra=`` ones, exception text."""
        log_data["ts"] = _from_timestamp(record.created, UTC)
        log_data["level"] = record.levelname
        log_data["logger"] = record.name
        log_data["pid"] = record.process
        log_data["msg"] = record.message
        args = record.args
        if isinstance(args, dict):  # logging's mapping form: the line's fields
            log_data.update(args)
        if len(record.__dict__) > _PLAIN_ATTRIBUTES:  # extra= (or attributes another handler's formatter set)
            merge_record_extra(record, log_data, reserved=self._skip, rename_fields=self.rename_fields)
        if message_dict:  # exc_info, stack_info, or the items of a dict logged as the message
            log_data.update(message_dict)
