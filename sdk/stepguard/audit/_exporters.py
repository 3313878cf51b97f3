"""OpenTelemetry SDK exporters: the hash-chained JSON-lines log and the redaction wrapper.

Imported only by :func:`stepguard.audit.configure` and friends: it pulls in ``opentelemetry.sdk``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from opentelemetry.context import Context
from opentelemetry.sdk.trace import Event, ReadableSpan, Span, SpanProcessor
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
from opentelemetry.trace import Link, Status, StatusCode

from stepguard.audit._chain import AuditLog
from stepguard.audit._export import ExportCounter
from stepguard.audit._redact import contains_secret, has_secrets, redact
from stepguard.errors import AuditError


def _attrs(attributes: Mapping[str, Any] | None) -> dict[str, Any]:
    # The SDK's attributes are already cleaned (sequences are tuples, JSON encodes them as
    # lists); bytes and non-finite floats are handled when the record is encoded.
    if not attributes:
        return {}
    copy = getattr(attributes, "copy", None)  # a C-level copy, not a Python-level iteration
    return copy() if copy is not None else dict(attributes)


_STATUS = {code: code.name for code in StatusCode}


def span_to_record(span: ReadableSpan) -> dict[str, Any]:
    """The audit-log payload for one finished span."""
    ctx = span.context
    parent = span.parent
    status = span.status
    events = span.events
    record: dict[str, Any] = {
        "name": span.name,
        "trace_id": format(ctx.trace_id, "032x") if ctx else None,
        "span_id": format(ctx.span_id, "016x") if ctx else None,
        "parent_span_id": format(parent.span_id, "016x") if parent else None,
        "start_ns": span.start_time,
        "end_ns": span.end_time,
        "status": _STATUS[status.status_code],
        "attributes": _attrs(span.attributes),
        "events": [{"name": e.name, "time_ns": e.timestamp, "attributes": _attrs(e.attributes)}
                   for e in events] if events else [],
    }
    if status.description:
        record["status_message"] = status.description
    if span.links:
        record["links"] = [{"trace_id": f"{link.context.trace_id:032x}",
                            "span_id": f"{link.context.span_id:016x}"} for link in span.links]
    if span.resource is not None:
        # Only the service name per record: the rest of the resource (SDK name and version)
        # repeats on every line and says nothing about what ran.
        service = span.resource.attributes.get("service.name")
        if service is not None:
            record["service"] = service
    return record


class JsonlSpanExporter(SpanExporter):
    """Writes each finished span as one record of the hash-chained audit log.

    For providers that take exporters only; :class:`AuditLogProcessor` is the cheaper path. Use
    with a ``SimpleSpanProcessor`` so the record is written when the span ends, not when a batch
    fills.
    """

    def __init__(self, log: AuditLog) -> None:
        self.log = log

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        try:
            self.log.append_many([("span", span_to_record(s)) for s in spans])
        except AuditError:
            return SpanExportResult.FAILURE
        return SpanExportResult.SUCCESS

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        if self.log.fsync != "step":
            return True
        try:
            self.log.flush()
        except AuditError:
            return False
        return True

    def shutdown(self) -> None:
        self.log.close()


class AuditLogProcessor(SpanProcessor):
    """Appends every span to the hash-chained log the moment it ends, through the redaction
    guard. Every span, sampled or not: an audit record is not a statistical sample.

    ``force_flush`` (run at each step's end and on SIGTERM) fsyncs when the log's policy is
    ``"step"`` and releases the descriptors; ``shutdown`` closes the log (fsync).
    """

    def __init__(self, log: AuditLog) -> None:
        self.log = log
        self._shutdown = False

    def on_start(self, span: Span, parent_context: Context | None = None) -> None:
        pass

    def on_end(self, span: ReadableSpan) -> None:
        if self._shutdown:
            return
        if has_secrets() and _span_has_secret(span):
            span = redact_span(span)
        try:
            self.log.append("span", span_to_record(span))
        except AuditError:
            import logging

            logging.getLogger("stepguard.audit").exception("audit record not written")

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        try:
            if self.log.fsync == "step":
                self.log.flush()
        except AuditError:
            return False
        finally:
            self.log.release()
        return True

    def shutdown(self) -> None:
        self._shutdown = True
        try:
            self.log.close()
        except AuditError as err:
            # Runs from atexit too: report once on stderr instead of a traceback. Every record
            # was already written when its span ended; only the final fsync failed.
            import sys

            print(f"stepguard: warning: {err}", file=sys.stderr)


def _span_has_secret(span: ReadableSpan) -> bool:
    def values(attrs: Mapping[str, Any] | None) -> Any:
        for k, v in (attrs or {}).items():
            yield k
            if isinstance(v, str):
                yield v
            elif isinstance(v, list | tuple):
                yield from (x for x in v if isinstance(x, str))

    texts = [span.name, span.status.description or ""]
    texts += list(values(span.attributes))
    for event in span.events:
        texts.append(event.name)
        texts += list(values(event.attributes))
    for link in span.links:
        texts += list(values(link.attributes))
    return any(contains_secret(t) for t in texts)


def redact_span(span: ReadableSpan) -> ReadableSpan:
    """A copy of ``span`` with every value holding a registered secret replaced."""
    status = span.status
    return ReadableSpan(
        name=redact(span.name),
        context=span.context,
        parent=span.parent,
        resource=span.resource,
        attributes=redact(dict(span.attributes or {})),
        events=[Event(redact(e.name), redact(dict(e.attributes or {})), e.timestamp)
                for e in span.events],
        links=[Link(link.context, redact(dict(link.attributes or {}))) for link in span.links],
        kind=span.kind,
        status=Status(status.status_code, redact(status.description))
        if status.description else status,
        start_time=span.start_time,
        end_time=span.end_time,
        instrumentation_scope=span.instrumentation_scope,
    )


class RedactingSpanExporter(SpanExporter):
    """Wraps any exporter: spans holding a registered secret are redacted before export.

    The guard at the source (:class:`~stepguard.audit.AuditSpan`) covers our own spans; this
    covers every span the provider exports, including other libraries' and Airflow's.
    """

    def __init__(self, inner: SpanExporter, counter: ExportCounter | None = None) -> None:
        self.inner = inner
        #: Spans delivered and not delivered (see :mod:`stepguard.audit._export`).
        self.counter = counter if counter is not None else ExportCounter()

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        if has_secrets():
            spans = [redact_span(s) if _span_has_secret(s) else s for s in spans]
        try:
            result = self.inner.export(spans)
        except BaseException:
            self.counter.add(dropped=len(spans))
            raise
        if result == SpanExportResult.SUCCESS:
            self.counter.add(exported=len(spans))
        else:
            self.counter.add(dropped=len(spans))
        return result

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return bool(self.inner.force_flush(timeout_millis))

    def shutdown(self) -> None:
        self.inner.shutdown()
