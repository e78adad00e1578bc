"""The hosts as an engine sees them, and the ordered changes to them (list + watch).

Every change an engine schedules on (status, detail, role, admin state, facts) gets the
next revision and is kept, in order, for a while: a watcher resuming from revision N
gets every change after N, none missed; one whose N is older than what is kept (or
newer than anything: the server restarted and lost its memory) gets told to list
again (HTTP 410), never a silent gap. Revisions start from the clock at start-up, so
they only grow across restarts.

Usage figures (free memory, load, free pool or hugepage space, running domains) are
current in every record, but a change of them alone is no change: they move with every
check-in, and an engine would be woken ten times a second by nothing.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from common import wire

KEEP = 10_000  # changes kept for watchers that resume
WATCHER_QUEUE = 1000  # changes a watcher may lag behind before it is cut off (it lists again)


@dataclass(frozen=True)
class Change:
    revision: int
    type: str  # added | modified | removed
    host: dict[str, Any]

    def line(self) -> bytes:
        return json.dumps({"type": self.type, "revision": self.revision, "host": self.host},
                          separators=(",", ":")).encode() + b"\n"


class Gone(Exception):
    """The revision asked for is no longer (or not yet) known: list again."""


class ChangeLog:
    def __init__(self, keep: int = KEEP, clock: Callable[[], float] = time.time) -> None:
        self.revision = int(clock() * 1000)
        self.first = self.revision  # changes after this one are kept
        self._changes: collections.deque[Change] = collections.deque(maxlen=keep)
        self._records: dict[str, dict[str, Any]] = {}
        self._digests: dict[str, str] = {}
        self._watchers: set[asyncio.Queue[Change | None]] = set()

    def records(self) -> tuple[int, list[dict[str, Any]]]:
        return self.revision, list(self._records.values())

    def get(self, host_id: str) -> dict[str, Any] | None:
        return self._records.get(host_id)

    def update(self, host_id: str, record: dict[str, Any]) -> None:
        """The host's current record; a new revision if anything but usage changed."""
        digest = _digest(record)
        known = host_id in self._records
        self._records[host_id] = record
        if self._digests.get(host_id) == digest:
            return
        self._digests[host_id] = digest
        self._publish(Change(self.revision + 1, "modified" if known else "added", record))

    def remove(self, host_id: str) -> None:
        record = self._records.pop(host_id, None)
        self._digests.pop(host_id, None)
        if record is not None:
            self._publish(Change(self.revision + 1, "removed", record))

    def _publish(self, change: Change) -> None:
        self.revision = change.revision
        if len(self._changes) == self._changes.maxlen:
            self.first = self._changes[0].revision
        self._changes.append(change)
        for queue in list(self._watchers):
            if queue.qsize() >= WATCHER_QUEUE:
                self._watchers.discard(queue)
                queue.put_nowait(None)  # too far behind: it must list again
            else:
                queue.put_nowait(change)

    def watch(self, since: int) -> tuple[list[Change], asyncio.Queue[Change | None]]:
        """The kept changes after `since`, and a queue of those to come (None: cut off)."""
        if since < self.first or since > self.revision:
            raise Gone(f"revision {since} is not known here (kept: {self.first} to "
                       f"{self.revision}): list again")
        backlog = [c for c in self._changes if c.revision > since]
        queue: asyncio.Queue[Change | None] = asyncio.Queue()
        self._watchers.add(queue)
        return backlog, queue

    def unwatch(self, queue: asyncio.Queue[Change | None]) -> None:
        self._watchers.discard(queue)

    @property
    def watchers(self) -> int:
        return len(self._watchers)


def _digest(record: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(wire.steady(record), sort_keys=True).encode()).hexdigest()
