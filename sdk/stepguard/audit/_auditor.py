"""The span model: one ``stepguard.step`` span per step, a child span per control, an event per
verdict. OpenTelemetry API only; the SDK is configured separately (see ``_setup``)."""

from __future__ import annotations

import contextlib
import os
import re
import time
from collections.abc import Mapping
from types import TracebackType
from typing import TYPE_CHECKING, Any

from stepguard.audit import _signals
from stepguard.audit._attributes import (
    STEP_SPAN,
    TASK_SPAN,
    VERDICT_EVENT,
    Attr,
    Attributes,
    AttributeValue,
)
from stepguard.audit._redact import has_secrets, redact
from stepguard.errors import ConfigurationError

if TYPE_CHECKING:
    from opentelemetry.context import Context
    from opentelemetry.trace import Span, Tracer, TracerProvider

_NAME = re.compile(r"^[a-z][a-z0-9_]*$")
_CONTROL_NAMES: dict[tuple[str, str], str] = {}
_SCOPE = "stepguard"
_MAX_MESSAGE = 1024

#: Task spans (see :meth:`Auditor.begin_task`) active in this process, innermost last.
_active_tasks: list[TaskSpan] = []


def _guard_attrs(attributes: Attributes | None) -> dict[str, AttributeValue]:
    if not attributes:
        return {}
    attrs = {k: v for k, v in attributes.items() if v is not None}
    if has_secrets():
        return redact(attrs)  # type: ignore[no-any-return]
    return attrs


def _error_type(exc: BaseException) -> str:
    cls = type(exc)
    if cls.__module__ == "builtins":
        return cls.__qualname__
    return f"{cls.__module__}.{cls.__qualname__}"


def _is_error(exc: BaseException) -> bool:
    if isinstance(exc, SystemExit):
        return exc.code not in (0, None)
    return not isinstance(exc, GeneratorExit)


def _record_error(span: Span, exc: BaseException) -> None:
    from opentelemetry.trace import Status, StatusCode

    etype = _error_type(exc)
    span.set_attribute(Attr.ERROR_TYPE, etype)
    # Our own event rather than span.record_exception: the message is redacted and the
    # stack trace (source lines, paths) is left out of the audit record.
    span.add_event("exception", {
        "exception.type": etype,
        "exception.message": redact(str(exc))[:_MAX_MESSAGE],
    })
    span.set_status(Status(StatusCode.ERROR, type(exc).__name__))


_OK: Any = None
_MODULES: tuple[Any, Any] | None = None


def _otel() -> tuple[Any, Any]:
    """(opentelemetry.context, opentelemetry.trace), imported on first use: a per-span
    ``from ... import`` costs more than the rest of our own per-span work."""
    global _MODULES  # noqa: PLW0603 - import cache
    if _MODULES is None:
        from opentelemetry import context, trace

        _MODULES = (context, trace)
    return _MODULES


def _ok_status() -> Any:
    global _OK  # noqa: PLW0603 - built once, lazily (keeps the import light)
    if _OK is None:
        from opentelemetry.trace import Status, StatusCode

        _OK = Status(StatusCode.OK)
    return _OK


class AuditSpan:
    """A span handed out by :class:`Auditor`: every value set through it passes the redaction
    guard. ``.span`` is the underlying OpenTelemetry span."""

    __slots__ = ("span",)

    def __init__(self, span: Span) -> None:
        self.span = span

    def set_attribute(self, key: str, value: AttributeValue | None) -> None:
        """Set one attribute (``None`` is ignored); secret values are redacted."""
        if value is not None:
            self.span.set_attribute(key, redact(value) if has_secrets() else value)

    def set_attributes(self, attributes: Attributes) -> None:
        """Set several attributes at once; secret values are redacted."""
        self.span.set_attributes(_guard_attrs(attributes))

    def add_event(self, name: str, attributes: Attributes | None = None) -> None:
        """Add an event; secret values are redacted."""
        self.span.add_event(name, _guard_attrs(attributes))

    def verdict(self, name: str, passed: bool, **attrs: AttributeValue | None) -> None:
        """Record the verdict of one check as a ``stepguard.verdict`` event on this span."""
        self.span.add_event(VERDICT_EVENT, _verdict_attrs(name, passed, attrs))

    def get_span_context(self) -> Any:
        """The OpenTelemetry span context (same as on the underlying span)."""
        return self.span.get_span_context()

    def is_recording(self) -> bool:
        """False when auditing is off (no-op provider) or the span has ended."""
        return bool(self.span.is_recording())

    @property
    def trace_id(self) -> str:
        """The trace id, 32 lowercase hex digits (what a receipt records)."""
        return f"{self.span.get_span_context().trace_id:032x}"

    @property
    def span_id(self) -> str:
        """The span id, 16 lowercase hex digits."""
        return f"{self.span.get_span_context().span_id:016x}"

    @property
    def traceparent(self) -> str:
        """The W3C ``traceparent`` value naming this span as parent."""
        ctx = self.span.get_span_context()
        return f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{int(ctx.trace_flags):02x}"


def _verdict_attrs(name: str, passed: bool, attrs: Mapping[str, AttributeValue | None]
                   ) -> dict[str, AttributeValue]:
    out: dict[str, AttributeValue] = {Attr.VERDICT_NAME: name, Attr.VERDICT_PASSED: bool(passed)}
    for key, value in attrs.items():
        if value is not None:
            out[key if "." in key else f"stepguard.verdict.{key}"] = value
    return _guard_attrs(out)


class _Scope:
    """Context manager for one span (a class, not a generator: it runs on every step)."""

    __slots__ = ("_attrs", "_auditor", "_flush", "_name", "_parent", "_span", "_token")

    def __init__(self, auditor: Auditor, name: str, attrs: dict[str, AttributeValue],
                 parent: Context | None, flush: bool) -> None:
        self._auditor = auditor
        self._name = name
        self._attrs = attrs
        self._parent = parent
        self._flush = flush
        self._span: Span | None = None
        self._token: object = None

    def __enter__(self) -> AuditSpan:
        context, trace = _otel()
        span = self._auditor.tracer.start_span(self._name, context=self._parent,
                                               attributes=self._attrs)
        self._span = span
        self._token = context.attach(trace.set_span_in_context(span, self._parent))
        _signals.open_spans.append(span)
        return AuditSpan(span)

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        context, _ = _otel()
        span = self._span
        assert span is not None
        try:
            context.detach(self._token)
        finally:
            # Absent when a fatal-signal handler already ended it.
            with contextlib.suppress(ValueError):
                _signals.open_spans.remove(span)
            # A span ended by the signal handler is no longer recording: leave it as it is.
            if span.is_recording():
                if exc is not None and _is_error(exc):
                    _record_error(span, exc)
                else:
                    # Explicit OK: an audit record states that the control passed.
                    span.set_status(_ok_status())
                span.end()
            if self._flush:
                self._auditor.flush()


class TaskSpan:
    """A ``stepguard.task`` span for one orchestrator task (see :meth:`Auditor.begin_task`)."""

    def __init__(self, auditor: Auditor, span: Span, secured: bool | None,
                 token: object | None) -> None:
        self._auditor = auditor
        self.span = span
        self.secured = secured
        self.steps = 0
        self._token = token
        self._ended = False

    @property
    def trace_id(self) -> str:
        return f"{self.span.get_span_context().trace_id:032x}"

    def end(self, state: str = "success", error: BaseException | str | None = None,
            *, end_time: int | None = None) -> None:
        """End the task span. ``state`` is the task's final state; ``error`` (an exception or
        an error type name) marks it failed. ``stepguard.secured`` is, unless given when the span
        began, whether a stepguard step ran inside it in this process."""
        from opentelemetry import context
        from opentelemetry.trace import Status, StatusCode

        if self._ended:
            return
        self._ended = True
        if self in _active_tasks:
            _active_tasks.remove(self)
        if self._token is not None:
            context.detach(self._token)  # type: ignore[arg-type]
        secured = self.secured if self.secured is not None else self.steps > 0
        self.span.set_attribute(Attr.SECURED, secured)
        self.span.set_attribute("stepguard.task.state", state)
        if isinstance(error, BaseException):
            _record_error(self.span, error)
        elif error or state in ("failed", "upstream_failed"):
            self.span.set_attribute(Attr.ERROR_TYPE, redact(error or state))
            self.span.set_status(Status(StatusCode.ERROR, str(redact(error or state))))
        else:
            # The outcome is known: an audit record says so rather than leaving it unset.
            self.span.set_status(Status(StatusCode.OK))
        self.span.end(end_time=end_time)
        self._auditor.flush()


class Auditor:
    """Emits stepguard's audit spans through an OpenTelemetry tracer provider.

    ``tracer_provider=None`` uses the global provider at each call, so inside Airflow with its
    tracing on the spans go wherever Airflow's go and nest under the current task span. Each
    step's end force-flushes the provider (when it has ``force_flush``), so a process that leaves
    with ``os._exit`` right after a step loses nothing.

    >>> from opentelemetry.sdk.trace import TracerProvider
    >>> from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    >>> from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    >>> mem = InMemorySpanExporter()
    >>> provider = TracerProvider()
    >>> provider.add_span_processor(SimpleSpanProcessor(mem))
    >>> auditor = Auditor(provider)
    >>> with auditor.step_span("fit", {"cicd.pipeline.name": "train"}) as step:
    ...     with auditor.control_span("integrity", "verify"):
    ...         auditor.verdict("inputs-match-manifest", True, files=3)
    >>> [s.name for s in mem.get_finished_spans()]
    ['stepguard.integrity.verify', 'stepguard.step']
    >>> mem.get_finished_spans()[0].events[0].attributes["stepguard.verdict.passed"]
    True
    """

    def __init__(self, tracer_provider: TracerProvider | None = None, *,
                 flush_on_step_end: bool = True, flush_timeout_ms: int = 5000) -> None:
        self._provider = tracer_provider
        self._flush_on_step_end = flush_on_step_end
        self._flush_timeout_ms = flush_timeout_ms
        self._tracer: Tracer | None = None
        if tracer_provider is not None:
            _signals.register_flush_target(tracer_provider)

    @classmethod
    def disabled(cls) -> Auditor:
        """An auditor that records nothing (auditing off)."""
        from opentelemetry.trace import NoOpTracerProvider

        return cls(NoOpTracerProvider(), flush_on_step_end=False)

    @property
    def tracer(self) -> Tracer:
        if self._tracer is None:
            from opentelemetry import trace

            from stepguard._private.version import VERSION as __version__

            if self._provider is not None:
                self._tracer = self._provider.get_tracer(_SCOPE, __version__)
            else:
                # A proxy tracer: follows the global provider even if it is set later.
                self._tracer = trace.get_tracer(_SCOPE, __version__)
        return self._tracer

    @property
    def tracer_provider(self) -> Any:
        from opentelemetry import trace

        return self._provider if self._provider is not None else trace.get_tracer_provider()

    def step_span(self, name: str, attributes: Attributes | None = None, *,
                  secured: bool = True, parent_from_env: bool = True,
                  parent: Context | None = None) -> _Scope:
        """Context manager for the ``stepguard.step`` span of one step; yields an
        :class:`AuditSpan`.

        The parent is the current span (Airflow's task span, our ``stepguard.task`` span); when
        there is none and ``parent_from_env`` is true, the ``TRACEPARENT`` environment variable set
        by :func:`inject_env` in the launching process; else ``parent`` (the run root of
        :func:`~stepguard.audit.run_context`), else a new trace. An exception marks the span as
        an error with ``error.type``; the provider is flushed when the step ends.
        """
        _, trace = _otel()
        attrs = _guard_attrs(attributes)
        attrs[Attr.STEP_NAME] = name
        attrs.setdefault(Attr.SECURED, secured)
        chosen = None
        if not trace.get_current_span().get_span_context().is_valid:
            if parent_from_env and "TRACEPARENT" in os.environ:
                from stepguard.audit._propagation import extract_env

                chosen = extract_env(os.environ)
                if not trace.get_current_span(chosen).get_span_context().is_valid:
                    chosen = parent
            else:
                chosen = parent
        parent = chosen
        if _active_tasks:
            _active_tasks[-1].steps += 1
        return _Scope(self, STEP_SPAN, attrs, parent, self._flush_on_step_end)

    def control_span(self, control: str, operation: str,
                     attributes: Attributes | None = None) -> _Scope:
        """Context manager for a control's child span, named ``stepguard.<control>.<operation>``
        (``stepguard.credentials.acquire``, ``stepguard.integrity.verify``,
        ``stepguard.isolation.run``, ``stepguard.signing.sign``, ``stepguard.registry.publish``).
        """
        name = _CONTROL_NAMES.get((control, operation))
        if name is None:
            if not _NAME.match(control) or not _NAME.match(operation):
                raise ConfigurationError(
                    "audit control and operation must be lowercase identifiers",
                    subject=f"{control}.{operation}")
            name = _CONTROL_NAMES[(control, operation)] = f"stepguard.{control}.{operation}"
        attrs = _guard_attrs(attributes)
        attrs[Attr.CONTROL] = control
        attrs[Attr.OPERATION] = operation
        return _Scope(self, name, attrs, None, False)

    def verdict(self, name: str, passed: bool, **attrs: AttributeValue | None) -> None:
        """Add a ``stepguard.verdict`` event (``stepguard.verdict.name``/``.passed``, plus
        ``attrs``: plain keys get the ``stepguard.verdict.`` prefix) to the current span."""
        _, trace = _otel()
        trace.get_current_span().add_event(VERDICT_EVENT, _verdict_attrs(name, passed, attrs))

    def set_attributes(self, attributes: Attributes) -> None:
        """Set attributes on the current span, through the redaction guard."""
        from opentelemetry import trace

        trace.get_current_span().set_attributes(_guard_attrs(attributes))

    def begin_task(self, task_name: str, *, secured: bool | None = None,
                   attributes: Attributes | None = None, start_time: int | None = None,
                   activate: bool = False, parent: Context | None = None) -> TaskSpan:
        """Start a ``stepguard.task`` span for an orchestrator task, ours or not.

        For the Airflow listener: begin when the task instance starts running, :meth:`TaskSpan.end`
        when it finishes. With ``secured=None`` the span records ``stepguard.secured=true`` only
        if a stepguard step ran inside it in this process. ``activate=True`` makes it the current
        span so the step's spans nest under it (then end it in the same thread).

        ``parent`` (the run root of :func:`~stepguard.audit.run_context`) makes the task span
        its child, so every task of one pipeline run shares the one trace derived from the run's
        identity, whatever span is current; a current span of the orchestrator's own (Airflow
        3's ``worker.<task>`` span, in the DAG run's trace) is kept as a link. Without
        ``parent`` the task span is a child of the current span.
        """
        from opentelemetry import context, trace

        attrs = _guard_attrs(attributes)
        attrs[Attr.TASK_NAME] = task_name
        links = None
        if parent is not None:
            current = trace.get_current_span().get_span_context()
            if current.is_valid:
                links = [trace.Link(current)]
        span = self.tracer.start_span(TASK_SPAN, context=parent, attributes=attrs,
                                      start_time=start_time, links=links)
        token = context.attach(trace.set_span_in_context(span)) if activate else None
        task = TaskSpan(self, span, secured, token)
        _active_tasks.append(task)
        return task

    def record_task(self, task_name: str, *, secured: bool, start_time: int | None = None,
                    end_time: int | None = None, state: str = "success",
                    error: BaseException | str | None = None,
                    attributes: Attributes | None = None,
                    parent: Context | None = None) -> str:
        """Record a finished task as one ``stepguard.task`` span (times in ns since the epoch);
        returns its trace id. For tasks observed only after the fact."""
        start = start_time if start_time is not None else time.time_ns()
        task = TaskSpan(self, self.tracer.start_span(
            TASK_SPAN, context=parent,
            attributes={**_guard_attrs(attributes), Attr.TASK_NAME: task_name},
            start_time=start), secured, None)
        task.end(state, error, end_time=end_time)
        return task.trace_id

    def flush(self, timeout_ms: int | None = None) -> bool:
        """Force-flush the tracer provider (no-op for providers without ``force_flush``)."""
        flush = getattr(self.tracer_provider, "force_flush", None)
        if flush is None:
            return True
        return bool(flush(timeout_ms or self._flush_timeout_ms))


_default: Auditor | None = None


def get_auditor() -> Auditor:
    """The process-wide auditor on the global tracer provider."""
    global _default  # noqa: PLW0603 - one per process by design
    if _default is None:
        _default = Auditor()
    return _default
