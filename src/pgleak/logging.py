"""A JSON log formatter for pgleak's records (and any others): one JSON object per line.

Every pgleak record already carries its event as a dict in ``record.pgleak``; this formatter
writes it out under ``"pgleak"``, beside the record's time, level, logger and message, so a log
pipeline can filter on ``pgleak.event`` and ``pgleak summary LOG`` can read the log back::

    import logging, pgleak.logging
    handler = logging.StreamHandler()
    handler.setFormatter(pgleak.logging.JSONFormatter())
    logging.getLogger("pgleak").addHandler(handler)

Records from other loggers are written the same way, without the ``"pgleak"`` key.
"""

from __future__ import annotations

import datetime
import json
import logging
from typing import Any

__all__ = ["JSONFormatter"]


class JSONFormatter(logging.Formatter):
    """``{"time", "level", "logger", "message", "pgleak"?, "exc"?}``, one line per record.

    The message is the record's whole text (a pgleak report's stacks included, with their
    newlines escaped); values JSON cannot hold are written as their ``str()``.
    """

    def format(self, record: logging.LogRecord) -> str:
        data: dict[str, Any] = {
            "time": datetime.datetime.fromtimestamp(record.created, datetime.timezone.utc)
            .isoformat(timespec="milliseconds")
            .replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        fields = getattr(record, "pgleak", None)
        if isinstance(fields, dict):
            data["pgleak"] = fields
        if record.exc_info:
            data["exc"] = self.formatException(record.exc_info)
        return json.dumps(data, default=str)
