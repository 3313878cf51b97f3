"""The process's renewal scheduler: one daemon thread keeps every open credential session's
step token and leases renewed when they are due.

A session adds itself with its next due time and is dropped when it revokes; the scheduler
sleeps until the earliest due time and then runs the session's ``_renew_due()``, which renews
and schedules the next renewal, on a short-lived daemon worker thread of its own. One session
whose Vault hangs (its renewal may take a whole retry budget) therefore never delays another
session's renewal past its token's TTL; a session has at most one renewal running, since the
next one is scheduled only when the current one ends. Sessions are held weakly: a session
nobody closes is not kept alive by its renewals (its token's TTL then ends it). After a fork
the child starts afresh.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import weakref
from typing import Protocol

log = logging.getLogger("stepguard.credentials")


class Renewable(Protocol):
    """What the renewal thread needs of a session."""

    def _renew_due(self) -> None:
        """Renew now and schedule the next renewal; must not raise."""


class Renewals:
    """The schedule of due renewals and the thread that runs them (see module docs)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._due: weakref.WeakKeyDictionary[Renewable, float] = (
            weakref.WeakKeyDictionary())
        self._thread: threading.Thread | None = None
        self._workers = threading.local()
        self._pid = 0

    def add(self, session: Renewable, at: float) -> None:
        """Renew ``session`` at monotonic time ``at`` (starts the thread when needed)."""
        with self._cond:
            if self._pid != os.getpid():
                # After fork: the parent's thread and schedule do not exist here.
                self._thread, self._pid = None, os.getpid()
                self._due = weakref.WeakKeyDictionary()
            self._due[session] = at
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, daemon=True,
                                                name="stepguard-renewals")
                self._thread.start()
            self._cond.notify()

    def remove(self, session: Renewable) -> None:
        """Drop ``session``'s pending renewal (a renewal already running finishes)."""
        with self._cond:
            self._due.pop(session, None)

    def scheduled(self, session: Renewable) -> bool:
        """True while a renewal of ``session`` is pending."""
        with self._cond:
            return session in self._due

    def on_renewal_thread(self) -> bool:
        """True when called from a renewal (a session revoking from its own renewal)."""
        return (threading.current_thread() is self._thread
                or getattr(self._workers, "renewing", False))

    def _renew(self, session: Renewable) -> None:
        self._workers.renewing = True
        try:
            session._renew_due()
        except Exception as exc:  # pragma: no cover - _renew_due catches its own
            log.warning("renewal failed unexpectedly (%s)", type(exc).__name__)

    def _run(self) -> None:
        while True:
            with self._cond:
                now = time.monotonic()
                ready = [s for s, at in self._due.items() if at <= now]
                for s in ready:
                    del self._due[s]
                if not ready:
                    nxt = min(self._due.values(), default=None)
                    self._cond.wait(None if nxt is None else nxt - now)
                    continue
            for session in ready:
                threading.Thread(target=self._renew, args=(session,), daemon=True,
                                 name="stepguard-renewal").start()


#: The one renewal scheduler of this process.
RENEWALS = Renewals()
