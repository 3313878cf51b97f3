"""Flush on SIGTERM without corrupting the audit chain.

A Python signal handler runs between two bytecodes of the main thread, possibly in the middle of
an audit-log append. Appending from the handler then would chain a record to a stale head, so a
handler that finds an append in progress defers itself to the end of that append.
"""

from __future__ import annotations

import os
import signal
import threading
import weakref
from types import FrameType
from typing import Any

_busy = 0
_deferred: list[int] = []
_previous: dict[int, Any] = {}
_flush_targets: weakref.WeakSet[Any] = weakref.WeakSet()
#: Spans opened by an Auditor in this process, innermost last (ended as "terminated" on a
#: fatal signal so the record shows the step was killed, not that it vanished).
open_spans: list[Any] = []
_flush_timeout_ms = 5000

class _Critical:
    """Defer signal handling while an audit record is being appended (a class, not a
    generator-based context manager: it runs on every span)."""

    def __enter__(self) -> None:
        global _busy  # noqa: PLW0603 - process-wide state by design
        _busy += 1

    def __exit__(self, *exc: object) -> None:
        global _busy  # noqa: PLW0603
        _busy -= 1
        if not _busy and _deferred:
            signum = _deferred.pop(0)
            _deferred.clear()
            _handle(signum, None)


CRITICAL = _Critical()


def critical() -> _Critical:
    """Context manager: defer signal handling while an audit record is being appended."""
    return CRITICAL

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

def _handler(signum: int, frame: FrameType | None) -> None:
    if _busy:
        _deferred.append(signum)
        return
    _handle(signum, frame)

def _handle(signum: int, frame: FrameType | None) -> None:
    flush_all()
    previous = _previous.get(signum, signal.SIG_DFL)
    if previous is signal.SIG_IGN:
        return
    if callable(previous) and previous is not signal.SIG_DFL:
        # The previous handler (Airflow's, for one) usually raises: the with-blocks then end
        # their spans with the real error and flush at step end.
        previous(signum, frame)
        return
    # Default disposition: the process is about to die. Record that, flush, then die the
    # way it would have without us (same signal, same exit status).
    end_open_spans(signal.Signals(signum).name)
    flush_all()
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)

def install_signal_flush(
    signals: tuple[int, ...] = (signal.SIGTERM,),
    *,
    timeout_ms: int = 5000,
) -> bool:
    """Install a handler that force-flushes audit spans on ``signals``, then chains to the
    handler that was there before (or to the default action). Idempotent.

    Returns False when it cannot install (not on the main thread); spans are still flushed at
    the end of every step.
    """
    global _flush_timeout_ms  # noqa: PLW0603 - process-wide state by design
    _flush_timeout_ms = timeout_ms
    if threading.current_thread() is not threading.main_thread():
        return False
    for signum in signals:
        current = signal.getsignal(signum)
        if current is _handler:
            continue
        _previous[signum] = current
        signal.signal(signum, _handler)
    return True

def uninstall_signal_flush() -> None:
    """Restore the handlers :func:`install_signal_flush` replaced."""
    if threading.current_thread() is not threading.main_thread():
        return
    for signum, previous in list(_previous.items()):
        if signal.getsignal(signum) is _handler:
            signal.signal(signum, previous if previous is not None else signal.SIG_DFL)
        del _previous[signum]
