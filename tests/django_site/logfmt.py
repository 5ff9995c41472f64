"""A log formatter that writes pgleak's structured event as one JSON line before the message.

``server.py`` reads those lines back (``DjangoServer.events()``), so tests assert on the
fields a JSON log pipeline would get, not on the wording of the message.
"""

from __future__ import annotations

import json
import logging

#: Prefix of the line that carries a record's ``record.pgleak`` as JSON.
EVENT_PREFIX = "pgleak-event: "


class EventFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(levelname)s %(name)s [%(process)d %(threadName)s] %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        event = getattr(record, "pgleak", None)
        if event is None:
            return text
        return f"{EVENT_PREFIX}{json.dumps(event, default=str, sort_keys=True)}\n{text}"
