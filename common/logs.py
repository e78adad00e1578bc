"""Logging to journald with structured fields, or to stderr in the same words.

Call `event(log, "enrolled", "joined as %s", host, host_id=...)`: the journal gets
VIRTFLEET_EVENT=enrolled, VIRTFLEET_HOST_ID=..., a MESSAGE_ID for the events an
operator searches for, and the plain message; stderr gets the message with the fields
appended as key=value.
"""

from __future__ import annotations

import logging
import os
import sys
import uuid
from typing import Any

# Stable ids so `journalctl MESSAGE_ID=...` finds an event across versions.
MESSAGE_IDS = {
    "enrolled": uuid.UUID("5f0c1b0e-8f7c-4c5e-9a2b-0d6b7f1e2a01"),
    "libvirtd_down": uuid.UUID("5f0c1b0e-8f7c-4c5e-9a2b-0d6b7f1e2a02"),
    "libvirtd_up": uuid.UUID("5f0c1b0e-8f7c-4c5e-9a2b-0d6b7f1e2a03"),
    "certificate_renewed": uuid.UUID("5f0c1b0e-8f7c-4c5e-9a2b-0d6b7f1e2a04"),
    "checkin_refused": uuid.UUID("5f0c1b0e-8f7c-4c5e-9a2b-0d6b7f1e2a05"),
    "connection_lost": uuid.UUID("5f0c1b0e-8f7c-4c5e-9a2b-0d6b7f1e2a06"),
    "connection_open": uuid.UUID("5f0c1b0e-8f7c-4c5e-9a2b-0d6b7f1e2a07"),
    "status_changed": uuid.UUID("5f0c1b0e-8f7c-4c5e-9a2b-0d6b7f1e2a08"),
    "tunnel_open": uuid.UUID("5f0c1b0e-8f7c-4c5e-9a2b-0d6b7f1e2a09"),
    "tunnel_closed": uuid.UUID("5f0c1b0e-8f7c-4c5e-9a2b-0d6b7f1e2a0a"),
    "server_moved": uuid.UUID("5f0c1b0e-8f7c-4c5e-9a2b-0d6b7f1e2a0b"),
    "leases_dropped": uuid.UUID("5f0c1b0e-8f7c-4c5e-9a2b-0d6b7f1e2a0c"),
}


def event(log: logging.Logger, name: str, msg: str, *args: Any, level: int = logging.INFO,
          **fields: Any) -> None:
    extra = {"VIRTFLEET_EVENT": name}
    for key, value in fields.items():
        if value is not None:
            extra["VIRTFLEET_" + key.upper()] = str(value)
    if name in MESSAGE_IDS:
        extra["MESSAGE_ID"] = MESSAGE_IDS[name].hex
    log.log(level, msg, *args, extra=extra)


# Hostnames and libvirt errors come from hosts: escaped, a newline in one cannot forge a
# log line. A traceback (record.exc_text) keeps its lines.
_CONTROL = {c: f"\\x{c:02x}" for c in (*range(32), 127)} | {ord("\n"): "\\n", ord("\r"): "\\r"}


class _StderrFormatter(logging.Formatter):
    def formatMessage(self, record: logging.LogRecord) -> str:
        line = super().formatMessage(record)
        fields = [
            f"{k[len('VIRTFLEET_'):].lower()}={v}"
            for k, v in vars(record).items()
            if k.startswith("VIRTFLEET_")
        ]
        return (line + (" [" + " ".join(fields) + "]" if fields else "")).translate(_CONTROL)


def journal_available() -> bool:
    return os.path.exists("/run/systemd/journal/socket")


def setup(name: str, level: str = "INFO", *, to_journal: bool | None = None) -> None:
    """Send logs to the journal when there is one (or when asked), else to stderr."""
    root = logging.getLogger()
    root.handlers.clear()
    root.setLevel(level.upper())
    if to_journal is None:
        to_journal = journal_available() and "JOURNAL_STREAM" in os.environ
    handler: logging.Handler
    if to_journal:
        from systemd.journal import JournalHandler

        handler = JournalHandler(SYSLOG_IDENTIFIER=name)
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(_StderrFormatter(f"%(asctime)s {name} %(levelname)s %(message)s"))
    root.addHandler(handler)
    # aiohttp's access log is one line per check-in: noise at this scale.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
