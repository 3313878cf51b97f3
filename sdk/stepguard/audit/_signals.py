"""Flush on SIGTERM without corrupting the audit chain.

A Python signal handler runs between two bytecodes of the main thread, possibly in the middle of
an audit-log append. Appending from the handler then would chain a record to a stale head, so a
signal that arrives during an append is handled at the end of that append.

The handler itself belongs to :mod:`stepguard._private.signals`, the one owner of stepguard's
signal handlers: this module registers its flush (and, when the signal will end the process, the
"terminated" marking of open spans) as hooks there.
"""

from __future__ import annotations

import signal
import weakref
from typing import Any

from stepguard._private import signals as _owner

_flush_targets: weakref.WeakSet[Any] = weakref.WeakSet()
#: Spans opened by an Auditor in this process, innermost last (ended as "terminated" on a
#: fatal signal so the record shows the step was killed, not that it vanished).
open_spans: list[Any] = []
_flush_timeout_ms = 5000
_installed: set[int] = set()


def critical() -> Any:
    """Context manager: defer signal handling while an audit record is being appended."""
    return _owner.deferred()


def register_flush_target(target: Any) -> None:
    """Remember an object with ``force_flush(timeout_millis)`` to flush on SIGTERM."""
    if callable(getattr(target, "force_flush", None)):
        _flush_targets.add(target)

def flush_all(timeout_ms: int | None = None) -> bool:
    """Force-flush every registered tracer provider; True when all reported success."""
    ok = True
    for target in list(_flush_targets):
        try:
            ok = bool(target.force_flush(timeout_ms or _flush_timeout_ms)) and ok
        except Exception:  # a failing exporter must not stop the shutdown path
            ok = False
    return ok

def end_open_spans(reason: str) -> None:
    from opentelemetry.trace import Status, StatusCode

    for span in reversed(list(open_spans)):
        if span.is_recording():
            span.set_attribute("stepguard.terminated", True)
            span.set_attribute("error.type", reason)
            span.set_status(Status(StatusCode.ERROR, reason))
            span.end()
    open_spans.clear()

def _flush_hook(signum: int) -> None:
    flush_all()


def _death_hook(signum: int) -> None:
    end_open_spans(signal.Signals(signum).name)
    flush_all()


def install_signal_flush(
    signals: tuple[int, ...] = (signal.SIGTERM,),
    *,
    timeout_ms: int = 5000,
) -> bool:
    """Flush audit spans when one of ``signals`` arrives, before it goes on to the handler that
    was there before (or to the default action, after marking the open spans terminated).
    Idempotent.

    Returns False when it cannot install (not on the main thread); spans are still flushed at
    the end of every step.
    """
    global _flush_timeout_ms  # noqa: PLW0603 - process-wide state by design
    _flush_timeout_ms = timeout_ms
    for signum in signals:
        if not (_owner.on_signal(signum, _flush_hook) and _owner.on_death(signum, _death_hook)):
            return False
        _installed.add(signum)
    return True


def uninstall_signal_flush() -> None:
    """Drop the hooks :func:`install_signal_flush` added (the previous handlers come back)."""
    for signum in list(_installed):
        _owner.remove_hooks(signum, _flush_hook, _death_hook)
        _installed.discard(signum)
