"""Structured, quiet-by-default logging shared by the build, the runtime and the artifacts CLI.

``KILN_LOG_LEVEL`` sets the level (default given by the caller). ``KILN_LOG_FORMAT=json`` (the default when
stderr is not a terminal) writes one JSON object per line; ``text`` writes ``level logger: message``.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        data = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        data.update(getattr(record, "fields", {}) or {})
        if record.exc_info:
            data["exc"] = self.formatException(record.exc_info)
        return json.dumps(data, default=str)


def setup_logging(default_level: str = "WARNING") -> None:
    """Configure the root logger once for a kiln process."""
    level = os.environ.get("KILN_LOG_LEVEL", default_level).upper()
    fmt = os.environ.get("KILN_LOG_FORMAT") or ("text" if sys.stderr.isatty() else "json")
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)
    logging.getLogger("kiln").setLevel(level)
