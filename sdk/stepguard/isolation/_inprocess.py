"""Isolation mode ``process`` for a Python callable: the body runs in this process, under the
step's deadline.

In the main thread the deadline interrupts the body (``SIGALRM`` raises
:class:`~stepguard.errors.StepTimeout` inside it); elsewhere (a worker thread) it cannot be
interrupted, and overrunning it is reported when the body returns. The body's own exception
becomes :class:`~stepguard.errors.BodyFailed` naming its type, with the original chained;
stepguard's own errors pass through unchanged. The exception's text may hold data, so it is kept
only when the caller passes ``mask`` (a redaction function, e.g. :func:`stepguard.audit.redact`):
its first line, masked, with values of secret-named keys (``password=...``) and URI passwords
masked too, and shortened, then follows the type.

>>> call_in_process(lambda env: None, {}, deadline_s=5, name="noop")
>>> call_in_process(lambda env: 1 / 0, {}, deadline_s=5, name="div")
Traceback (most recent call last):
...
stepguard.errors.BodyFailed: step body raised ZeroDivisionError: div
>>> call_in_process(lambda env: int("x"), {}, deadline_s=5, name="p",
...                 mask=str.upper)  # doctest: +ELLIPSIS
Traceback (most recent call last):
...
stepguard.errors.BodyFailed: step body raised ValueError: INVALID LITERAL FOR INT() ...: p
"""

from __future__ import annotations

import re
import signal
import threading
import time
from collections.abc import Callable
from types import FrameType
from typing import Any, TypeVar

from stepguard.errors import BodyFailed, StepguardError, StepTimeout

E = TypeVar("E")


#: Longest body message kept in an error (and so in the receipt and the task log).
MAX_BODY_MESSAGE = 300


def call_in_process(body: Callable[[E], Any], env: E, *, deadline_s: float, name: str,
                    mask: Callable[[str], str] | None = None) -> None:
    """Call ``body(env)`` under a deadline of ``deadline_s`` seconds (see the module docs)."""
    in_main = threading.current_thread() is threading.main_thread()
    if not in_main or not hasattr(signal, "setitimer"):
        t0 = time.monotonic()
        _call(body, env, name, mask)
        if time.monotonic() - t0 > deadline_s:
            raise StepTimeout("step body exceeded its deadline", subject=name)
        return

    def on_alarm(signum: int, frame: FrameType | None) -> None:
        raise StepTimeout("step body exceeded its deadline and was interrupted", subject=name)

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, deadline_s)
    try:
        _call(body, env, name, mask)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _call(body: Callable[[E], Any], env: E, name: str,
          mask: Callable[[str], str] | None) -> None:
    try:
        body(env)
    except StepguardError:
        raise
    except Exception as exc:
        message = f"step body raised {type(exc).__name__}"
        said = body_message(exc, mask)
        if said:
            message = f"{message}: {said}"
        raise BodyFailed(message, subject=name) from exc


_ASSIGNED_SECRET = re.compile(
    r"(?i)\b([\w-]*(?:pass(?:word|wd)?|pwd|secret|token|api[_-]?key|access[_-]?key|"
    r"private[_-]?key|credentials?|auth)[\w-]*)(\s*[=:]\s*)(\"[^\"]*\"|'[^']*'|\S+)")
_URI_PASSWORD = re.compile(r"(\b[a-z][a-z0-9+.-]*://[^/\s:@]+:)[^@\s/]+@")


def body_message(exc: BaseException, mask: Callable[[str], str] | None) -> str:
    """The first line of ``exc``'s text, masked and shortened; empty without ``mask``.

    After ``mask``, values assigned to secret-named keys and passwords in URIs are masked too:

    >>> body_message(ValueError("login failed: password=hunter2 at postgresql://etl:pw@db/p"),
    ...              str)
    'login failed: password=[REDACTED] at postgresql://etl:[REDACTED]@db/p'
    >>> body_message(ValueError("feature column 3 has NaN"), None)
    ''
    """
    if mask is None:
        return ""
    lines = str(exc).strip().splitlines()
    if not lines:
        return ""
    text = str(mask(lines[0].strip()))
    text = _ASSIGNED_SECRET.sub(lambda m: f"{m.group(1)}{m.group(2)}[REDACTED]", text)
    text = _URI_PASSWORD.sub(lambda m: f"{m.group(1)}[REDACTED]@", text)
    if len(text) > MAX_BODY_MESSAGE:
        text = text[:MAX_BODY_MESSAGE - 3] + "..."
    return text
