"""The one owner of stepguard's signal handlers (SIGTERM above all).

A step told to stop -- a pod deleted, a task killed, ``kill <pid>`` -- must still revoke its
credentials, remove its sandbox or pod and flush its spans. Python's default SIGTERM action skips
every ``finally`` block, so stepguard installs one handler per signal, here, and every part that
cares registers with it instead of installing its own:

* :func:`unwind_on` -- while the block runs, the signal raises :class:`Terminated` (a
  ``SystemExit``, status ``128 + signum``) in the main thread, once: every ``finally`` and
  ``__exit__`` then runs (revocation, pod deletion, receipts). Further deliveries are ignored
  until the last such block has unwound. Blocks nest and share the one handler. A handler the
  host installed in place of stepguard's (Airflow's task runner calls ``on_kill`` from its own)
  is left alone unless the block says ``take_over=True`` (the CLI step runner and the pod
  runner, which own their process).
* :func:`on_signal` -- a hook run on a delivery that does not unwind (the audit flush), before
  the signal goes to the host's handler or to its default action; and
  :func:`on_death` -- a hook run when the signal is about to end the process by its default
  action (the audit trail records the open spans as terminated). With no block active the
  signal then goes where it would have gone without stepguard.
* :func:`deferred` -- a block during which delivery waits (an audit record being appended must
  not be interleaved with records the hooks write); the signal is handled when it ends.

Handlers can only be installed from the main thread; elsewhere the functions do nothing.

>>> import os, signal
>>> try:
...     with unwind_on(signal.SIGUSR1, take_over=True):
...         os.kill(os.getpid(), signal.SIGUSR1)
... except Terminated as exc:
...     print(exc.code)
138
>>> signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL
True
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Callable, Iterator
from types import FrameType
from typing import Any

Hook = Callable[[int], None]


class Terminated(SystemExit):
    """A signal asked the process to stop; raised so that cleanup runs on the way out."""

    def __init__(self, signum: int) -> None:
        super().__init__(128 + signum)
        self.signum = signum


class _Signal:
    """What is installed for one signal number."""

    def __init__(self) -> None:
        self.previous: Any = None
        self.installed = False
        self.depth = 0
        self.hooks: list[Hook] = []
        self.death_hooks: list[Hook] = []


_state: dict[int, _Signal] = {}
_lock = threading.RLock()
_busy = 0
_pending: list[int] = []


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def _slot(signum: int) -> _Signal:
    slot = _state.get(signum)
    if slot is None:
        slot = _state[signum] = _Signal()
    return slot


def _install(signum: int) -> None:
    slot = _slot(signum)
    current = signal.getsignal(signum)
    if current is _handler:
        slot.installed = True
        return
    if current is signal.SIG_IGN and slot.installed and slot.depth:
        return  # unwinding: stays ignored until the last block ends
    slot.previous = current
    signal.signal(signum, _handler)
    slot.installed = True


def _release(signum: int) -> None:
    """Put back what was there before, once nothing needs the handler any more."""
    slot = _slot(signum)
    if slot.depth or slot.hooks or slot.death_hooks or not slot.installed:
        if slot.installed and not slot.depth and signal.getsignal(signum) is signal.SIG_IGN:
            signal.signal(signum, _handler)  # the unwinding is over
        return
    if signal.getsignal(signum) in (_handler, signal.SIG_IGN):
        previous = slot.previous
        signal.signal(signum, signal.SIG_DFL if previous is None else previous)
    slot.installed = False
    slot.previous = None


def _run(hooks: list[Hook], signum: int) -> None:
    for hook in list(hooks):
        with contextlib.suppress(Exception):  # a failing hook must not stop the shutdown path
            hook(signum)


def _handler(signum: int, frame: FrameType | None) -> None:
    if _busy:
        _pending.append(signum)
        return
    _handle(signum, frame)


def _handle(signum: int, frame: FrameType | None) -> None:
    slot = _slot(signum)
    if slot.depth:
        # Unwinding ends every span and flushes at the end of the step: no hook needed.
        signal.signal(signum, signal.SIG_IGN)
        raise Terminated(signum)
    _run(slot.hooks, signum)
    previous = slot.previous
    if previous is signal.SIG_IGN:
        return
    if callable(previous) and previous is not signal.SIG_DFL:
        previous(signum, frame)  # the host's handler (it usually raises)
        return
    # Default disposition: the process is about to die. Let the hooks record that, then die the
    # way it would have without us (same signal, same exit status).
    _run(slot.death_hooks, signum)
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)


def _is_foreign(handler: Any) -> bool:
    return handler not in (signal.SIG_DFL, signal.SIG_IGN, None, _handler)


@contextlib.contextmanager
def unwind_on(signum: int = signal.SIGTERM, *, take_over: bool = False) -> Iterator[None]:
    """While the block runs, ``signum`` raises :class:`Terminated` (see the module docs)."""
    if not _main_thread():
        yield
        return
    with _lock:
        slot = _slot(signum)
        # Only a handler installed in place of ours counts as the host's: with ours in place
        # (audit hooks), the block unwinds, and the hooks' previous handler is not called.
        if _is_foreign(signal.getsignal(signum)) and not take_over and not slot.depth:
            active = False
        else:
            _install(signum)
            slot.depth += 1
            active = True
    try:
        yield
    finally:
        if active:
            with _lock:
                slot.depth -= 1
                _release(signum)


def on_signal(signum: int, hook: Hook) -> bool:
    """Run ``hook(signum)`` on a delivery of ``signum`` that no :func:`unwind_on` block turns
    into :class:`Terminated` (see the module docs); False off the main thread."""
    if not _main_thread():
        return False
    with _lock:
        slot = _slot(signum)
        if hook not in slot.hooks:
            slot.hooks.append(hook)
        _install(signum)
    return True


def on_death(signum: int, hook: Hook) -> bool:
    """Run ``hook(signum)`` when ``signum`` is about to end the process by its default action."""
    if not _main_thread():
        return False
    with _lock:
        slot = _slot(signum)
        if hook not in slot.death_hooks:
            slot.death_hooks.append(hook)
        _install(signum)
    return True


def remove_hooks(signum: int, *hooks: Hook) -> None:
    """Drop hooks added with :func:`on_signal` / :func:`on_death`; the previous handler comes
    back when nothing else needs ours."""
    if not _main_thread():
        return
    with _lock:
        slot = _slot(signum)
        for hook in hooks:
            for registry in (slot.hooks, slot.death_hooks):
                if hook in registry:
                    registry.remove(hook)
        _release(signum)


class _Deferred:
    """Delivery waits while the block runs (a class, not a generator-based context manager: it
    wraps every audit record)."""

    def __enter__(self) -> None:
        global _busy  # noqa: PLW0603 - process-wide state by design
        _busy += 1

    def __exit__(self, *exc: object) -> None:
        global _busy  # noqa: PLW0603
        _busy -= 1
        if not _busy and _pending:
            signum = _pending.pop(0)
            _pending.clear()
            _handle(signum, None)


_DEFERRED = _Deferred()


def deferred() -> _Deferred:
    """Context manager: signals delivered inside the block are handled when it ends."""
    return _DEFERRED
