"""Export honesty: how many spans the remote (OTLP) exporter of a provider delivered and how many
it could not, so a step can say in its receipt -- and in the local log -- that its spans did not
reach the collector. The local hash-chained log is written synchronously and holds them anyway.

No OpenTelemetry SDK import here: the step lifecycle reads the counters cheaply.

>>> counter = ExportCounter()
>>> before = counter.snapshot()
>>> counter.add(exported=7)
>>> counter.add(dropped=2)
>>> export_status(counter, before, flushed=True)
{'status': 'lost', 'spans_exported': 7, 'spans_dropped': 2}
>>> export_status(None, None, flushed=True)
{'status': 'none', 'spans_exported': 0, 'spans_dropped': 0}
"""

from __future__ import annotations

import threading
import weakref
from typing import Any

#: ``status`` values: every span delivered; some could not be delivered; the flush did not
#: finish in time (still queued, may yet be lost); no remote exporter (local log only).
EXPORT_STATUSES = ("ok", "lost", "unconfirmed", "none")


class ExportCounter:
    """Spans a remote exporter delivered (``exported``) and failed to deliver (``dropped``)."""

    __slots__ = ("__weakref__", "_lock", "dropped", "exported")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.exported = 0
        self.dropped = 0

    def add(self, *, exported: int = 0, dropped: int = 0) -> None:
        with self._lock:
            self.exported += exported
            self.dropped += dropped

    def snapshot(self) -> tuple[int, int]:
        """``(exported, dropped)`` now."""
        with self._lock:
            return self.exported, self.dropped


_counters: weakref.WeakKeyDictionary[Any, ExportCounter] = weakref.WeakKeyDictionary()


def register_counter(provider: Any, counter: ExportCounter) -> None:
    """Attach ``counter`` (the one a provider's remote exporter updates) to ``provider``."""
    _counters[provider] = counter


def counter_for(provider: Any) -> ExportCounter | None:
    """The remote-export counter of ``provider``; ``None`` when it has no remote exporter built
    by :func:`stepguard.audit.configure` (local log only, or a caller's own provider)."""
    try:
        return _counters.get(provider)
    except TypeError:  # not weak-referenceable: not one of ours
        return None


def export_status(counter: ExportCounter | None, before: tuple[int, int] | None, *,
                  flushed: bool) -> dict[str, Any]:
    """What a receipt's ``audit_export`` says about the spans exported since ``before``."""
    if counter is None:
        return {"status": "none", "spans_exported": 0, "spans_dropped": 0}
    exported, dropped = counter.snapshot()
    b_exported, b_dropped = before if before is not None else (0, 0)
    d_exported, d_dropped = exported - b_exported, dropped - b_dropped
    status = "lost" if d_dropped else ("ok" if flushed else "unconfirmed")
    return {"status": status, "spans_exported": d_exported, "spans_dropped": d_dropped}
