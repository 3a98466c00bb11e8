"""One active telemetry supervisor per installation.

Two ``manage.py supervise`` processes started by mistake (or a second one kept as a
standby) would follow every node twice and send every frame twice. The supervisor holds
a PostgreSQL session advisory lock, on a database connection of its own, for as long as
it supervises; another one waits as a standby and takes over within a second or two of
the first ending, however it ends (a killed process's connection closes, and the lock
with it). A supervisor that finds its lock gone (the database restarted, the connection
dropped) stops supervising and waits for the lock again, so two never supervise at once.

With SQLite (``make run``, one process with the supervisor inside) there is nothing to
share with, and the lease is always held.
"""

from __future__ import annotations

import contextlib
import logging
import zlib
from typing import Any

from django.conf import settings
from django.db import connections

log = logging.getLogger(__name__)


def lease_key(name: str) -> int:
    """A 32-bit advisory lock key for ``name`` in this installation."""
    return zlib.crc32(f"distlab:{settings.SANDBOX_INSTANCE}:{name}".encode())


class Lease:
    def __init__(self, name: str) -> None:
        self.name = name
        self.key = lease_key(name)
        self._db: Any = None  # a DatabaseWrapper of our own, never shared with a thread's

    @property
    def shared(self) -> bool:
        """Whether other processes can hold it too (a PostgreSQL database)."""
        return connections["default"].vendor == "postgresql"

    def acquire(self) -> bool:
        """Take the lease if nobody holds it; never waits. True if it is ours."""
        if not self.shared:
            return True
        try:
            if self._db is None:
                self._db = connections.create_connection("default")
            with self._db.cursor() as cursor:
                cursor.execute("SELECT pg_try_advisory_lock(%s)", [self.key])
                return bool(cursor.fetchone()[0])
        except Exception as exc:  # the database is away: not ours, try again later
            log.warning("lease %s: %s", self.name, exc)
            self._drop()
            return False

    def held(self) -> bool:
        """Still ours: our connection answers and the database says we hold the lock."""
        if not self.shared:
            return True
        if self._db is None:
            return False
        try:
            with self._db.cursor() as cursor:
                cursor.execute(
                    "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted"
                    " AND pid = pg_backend_pid() AND objid = %s",
                    [self.key & 0xFFFFFFFF],
                )
                return bool(cursor.fetchone()[0])
        except Exception as exc:
            log.warning("lease %s lost: %s", self.name, exc)
            self._drop()
            return False

    def release(self) -> None:
        """Let go (closing our connection ends the lock whatever state it is in)."""
        self._drop()

    def _drop(self) -> None:
        if self._db is not None:
            with contextlib.suppress(Exception):
                self._db.close()
            self._db = None
