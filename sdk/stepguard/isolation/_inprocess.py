"""Isolation mode ``process`` for a Python callable: the body runs in this process, under the
step's deadline.

In the main thread the deadline interrupts the body (``SIGALRM`` raises
:class:`~stepguard.errors.StepTimeout` inside it); elsewhere (a worker thread) it cannot be
interrupted, and overrunning it is reported when the body returns. The body's own exception
becomes :class:`~stepguard.errors.BodyFailed` naming its type (its text may hold data), with the
original chained; stepguard's own errors pass through unchanged.

>>> call_in_process(lambda env: None, {}, deadline_s=5, name="noop")
>>> call_in_process(lambda env: 1 / 0, {}, deadline_s=5, name="div")
Traceback (most recent call last):
...
stepguard.errors.BodyFailed: step body raised ZeroDivisionError: div
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable
from types import FrameType
from typing import Any, TypeVar

from stepguard.errors import BodyFailed, StepguardError, StepTimeout

E = TypeVar("E")


def call_in_process(body: Callable[[E], Any], env: E, *, deadline_s: float, name: str) -> None:
    """Call ``body(env)`` under a deadline of ``deadline_s`` seconds (see the module docs)."""
    in_main = threading.current_thread() is threading.main_thread()
    if not in_main or not hasattr(signal, "setitimer"):
        t0 = time.monotonic()
        _call(body, env, name)
        if time.monotonic() - t0 > deadline_s:
            raise StepTimeout("step body exceeded its deadline", subject=name)
        return

    def on_alarm(signum: int, frame: FrameType | None) -> None:
        raise StepTimeout("step body exceeded its deadline and was interrupted", subject=name)

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, deadline_s)
    try:
        _call(body, env, name)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _call(body: Callable[[E], Any], env: E, name: str) -> None:
    try:
        body(env)
    except StepguardError:
        raise
    except Exception as exc:
        # The body's own exception text may hold data; keep the type, chain the original.
        raise BodyFailed(f"step body raised {type(exc).__name__}", subject=name) from exc
