"""One line per event, ``key=value``, to stderr (journald adds the timestamp under systemd).

Call sites log ``event=name k=v ...``; :class:`KeyValueFormatter` prefixes time, level and
logger. :func:`kv` quotes values with spaces. Secrets are never passed to a logger.
"""

from __future__ import annotations

import logging
import os
import sys
import time


def kv(value: object) -> str:
    """A value safe for one ``key=value`` field (quoted if it has spaces or quotes)."""
    s = str(value)
    if not s:
        return '""'
    if any(c in s for c in ' "=\n\t'):
        return '"' + s.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    return s


class KeyValueFormatter(logging.Formatter):
    def __init__(self, with_time: bool) -> None:
        super().__init__()
        self.with_time = with_time

    def format(self, record: logging.LogRecord) -> str:
        msg = record.getMessage().replace("\n", "\\n")
        head = f"level={record.levelname.lower()} logger={record.name}"
        if self.with_time:
            t = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            head = f"ts={t}.{int(record.msecs):03d}Z {head}"
        line = f"{head} {msg}"
        if record.exc_info:
            exc = self.formatException(record.exc_info).replace("\n", "\\n")
            line += f" exc={kv(exc)}"
        return line


def setup(level: str | None = None) -> None:
    """Configures the root logger once: stderr, key=value, level from ``SYSVM_LOG_LEVEL``."""
    lvl = (level or os.environ.get("SYSVM_LOG_LEVEL", "INFO")).upper()
    handler = logging.StreamHandler(sys.stderr)
    # Under systemd journald timestamps every line itself.
    handler.setFormatter(KeyValueFormatter(with_time="JOURNAL_STREAM" not in os.environ))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(getattr(logging, lvl, logging.INFO))
    # websockets logs every failed opening handshake at INFO with a traceback; we log our own.
    logging.getLogger("websockets").setLevel(logging.WARNING)
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
